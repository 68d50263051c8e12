"""Training: configuration checks, exact resume, Ctrl-C, NaN guard, EMA, warm-up, label dropout, presets."""

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

import ddpm.callbacks as callbacks_mod
import ddpm.train as train_mod
import ddpm.trainconfig as trainconfig
from ddpm import presets
from ddpm.checkpoint import load_training_state
from ddpm.data import load_dataset
from ddpm.train import TrainConfig, Trainer, TrainingDiverged, ema_decay_at, progress_enabled, update_ema

torch.set_num_threads(1)

TINY_UNET = dict(image_size=28, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[], num_heads=1, dropout=0.1, num_classes=10, learn_sigma=True)


def unet_config(**overrides) -> TrainConfig:
    base = dict(name="tiny-unet", model=TINY_UNET, dataset="mnist5k", schedule="cosine", T=40, loss_type="hybrid",
                batch_size=4, steps=6, lr=1e-3, warmup_steps=2, ema_decay=0.9, label_dropout=0.3, log_every=2)
    base.update(overrides)
    return TrainConfig(**base)


def toy_config(**overrides) -> TrainConfig:
    base = dict(name="tiny-toy", model_type="mlp", model={"dim": 2, "hidden": 16, "num_layers": 2},
                dataset="swiss_roll", T=50, batch_size=16, steps=8, lr=1e-3, ema_decay=0.9, log_every=2)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("mnist5k", split="train")
    keep = torch.arange(0, len(y), 45)  # 100 digits, every class
    return x[keep], y[keep]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------------------
# configuration


def test_config_round_trips_through_json():
    config = unet_config()
    d = config.to_dict()
    again = TrainConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert d["model"]["channel_mult"] == [1, 2] and d["model"]["use_scale_shift_norm"] is True  # defaults filled in
    assert config.resolved_var_type == "learned_range"
    assert toy_config().resolved_var_type == "fixed_small"


@pytest.mark.parametrize("change, message", [
    ({"loss_type": "l1"}, "loss_type must be one of simple, hybrid, vlb"),
    ({"lr": -1.0}, "lr must be a positive number"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"batch_size": 2.5}, "batch_size must be an integer >= 1"),
    ({"ema_decay": 1.0}, r"ema_decay must be a number in \[0, 1\)"),
    ({"label_dropout": 1.5}, "label_dropout must be a probability"),
    ({"grad_clip": 0}, "grad_clip must be None or a positive number"),
    ({"schedule": "sigmoid"}, "schedule must be one of linear, cosine"),
    ({"dataset": "imagenet"}, "dataset must be one of mnist5k"),
    ({"var_type": "fixed_small"}, "does not fit model learn_sigma=True"),
    ({"model": {**TINY_UNET, "learn_sigma": False}, "var_type": None}, "'hybrid' needs a learned variance"),
    ({"model": {**TINY_UNET, "num_classes": None}}, "label_dropout > 0 needs a class-conditional model"),
    ({"model": {**TINY_UNET, "num_classes": 7}}, "does not match the 10 classes"),
    ({"model": {**TINY_UNET, "in_channels": 3}}, "use model_type 'unet' or 'dit' with in_channels=1"),
    ({"model": {**TINY_UNET, "colour": 1}}, "unknown UNetConfig keys"),
    ({"model_type": "mlp"}, "unknown MLPConfig keys"),
    ({"compile": "yes"}, "compile must be True or False"),
    ({"lr_decay": "step"}, "lr_decay must be one of constant, cosine"),
    ({"snr_gamma": 0.0}, "snr_gamma must be None or a positive number"),
    ({"snr_gamma": 5.0, "loss_type": "vlb"}, "snr_gamma weights the eps MSE"),
])
def test_bad_configs_are_refused_with_the_field_named(change, message):
    with pytest.raises(ValueError, match=message):
        unet_config(**change).validate()


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown TrainConfig keys \['learning_rate'\]"):
        TrainConfig.from_dict({**toy_config().to_dict(), "learning_rate": 1})


def test_presets(monkeypatch):
    for name in presets.preset_names():
        config = presets.get_preset(name)
        config.validate()
        assert config.name == name
    cpu = presets.get_preset("mnist-cpu")
    from ddpm.unet import UNet, count_parameters

    n = count_parameters(UNet(cpu.model_config()))
    assert 1_000_000 <= n <= 1_500_000, n
    assert cpu.dataset == "mnist5k" and cpu.loss_type == "hybrid" and cpu.resolved_var_type == "learned_range"
    assert cpu.num_classes == 10 and cpu.label_dropout > 0 and 64 <= cpu.batch_size <= 128
    assert presets.get_preset("toy2d").model_type == "mlp"
    assert presets.get_preset("toy2d", steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown preset 'mnist'; valid presets are toy2d, mnist-cpu, mnist-flow, mnist-gpu, cifar10-gpu"):
        presets.get_preset("mnist")
    monkeypatch.setenv("DDPM_PROFILE", "gpu")
    assert presets.profile() == "gpu" and presets.mnist_preset() == "mnist-gpu"
    monkeypatch.setenv("DDPM_PROFILE", "cpu")
    assert presets.profile() == "cpu" and presets.mnist_preset() == "mnist-cpu"
    monkeypatch.setenv("DDPM_PROFILE", "tpu")
    with pytest.raises(ValueError, match="DDPM_PROFILE must be one of cpu, gpu"):
        presets.profile()
    monkeypatch.delenv("DDPM_PROFILE")
    assert presets.profile() == ("gpu" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------
# small pieces


def test_ema_warmup_end_is_where_the_cap_first_binds():
    from ddpm.optim import ema_warmup_end

    for decay in (0.9, 0.99, 0.999, 0.9999):
        n = ema_warmup_end(decay)
        assert n == pytest.approx((10 * decay - 1) / (1 - decay), abs=1)  # the closed form
        assert ema_decay_at(n, decay) == decay and ema_decay_at(n - 1, decay) < decay
    # below the end of the shorter warm-up, two caps give the same decay at every update: the same weights
    short = ema_warmup_end(0.999)
    assert all(ema_decay_at(k, 0.999) == ema_decay_at(k, 0.9999) for k in range(0, short, 97))
    assert ema_decay_at(short + 10, 0.999) < ema_decay_at(short + 10, 0.9999)
    with pytest.raises(ValueError, match="decay must lie in"):
        ema_warmup_end(1.0)


def test_ema_decay_warm_up_and_update():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999
    assert ema_decay_at(0, 0.999, warmup=False) == 0.999

    class WithBuffer(torch.nn.Module):
        def __init__(self, w, b):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(w))
            self.register_buffer("count", torch.tensor(b))

    ema, model = WithBuffer([1.0, 2.0], [5.0]), WithBuffer([3.0, 6.0], [9.0])
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.w, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6]))
    assert torch.equal(ema.count, torch.tensor([9.0]))  # buffers are copied, not averaged


def test_learning_rate_warm_up():
    trainer = Trainer(toy_config(warmup_steps=4, lr=1e-3), progress=False)
    assert [trainer.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    trainer.fit(steps=5)
    assert trainer.history["lr"] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_cosine_learning_rate_decay_ends_at_a_tenth_and_fixes_the_step_count():
    config = toy_config(warmup_steps=2, lr=1e-3, lr_decay="cosine", steps=12)
    trainer = Trainer(config, progress=False)
    lrs = [trainer.lr_at(s) for s in range(12)]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3])  # warm-up, then the top of the cosine
    assert lrs[-1] == pytest.approx(trainconfig.FINAL_LR_FRACTION * 1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # never rises after the warm-up
    mid = 2 + (12 - 1 - 2) / 2  # half-way along the cosine: the mean of the two ends
    assert trainer.lr_at(int(mid)) > trainer.lr_at(int(mid) + 1)
    assert train_mod.resume_free_keys(config) == ("checkpoint_every", "preview_every", "log_every")
    assert "steps" in train_mod.resume_free_keys(toy_config())


def test_cosine_decay_run_cannot_be_resumed_with_another_step_count(tmp_path):
    config = toy_config(lr_decay="cosine", steps=6)
    Trainer(config, out_dir=tmp_path / "run", progress=False).fit(steps=3)
    longer = Trainer(dataclasses.replace(config, steps=10), out_dir=tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="steps"):
        longer.load()


def test_min_snr_weighting_reaches_the_trainer(digits, monkeypatch):
    seen = {}
    real = train_mod.training_losses

    def spy(*args, **kwargs):
        seen["snr_gamma"] = kwargs.get("snr_gamma")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "training_losses", spy)
    Trainer(unet_config(snr_gamma=5.0, steps=1), data=digits, progress=False).fit()
    assert seen["snr_gamma"] == 5.0


def test_cpu_bf16_is_left_out_of_the_dict_unless_set():
    plain = unet_config()
    assert "cpu_bf16" not in plain.to_dict()  # the hashes of configs without it do not change
    fast = unet_config(cpu_bf16=True)
    assert fast.to_dict()["cpu_bf16"] is True
    again = TrainConfig.from_dict(json.loads(json.dumps(fast.to_dict())))
    assert again.cpu_bf16 and again.to_dict() == fast.to_dict()
    assert presets.get_preset("mnist-cpu").cpu_bf16 and not presets.get_preset("mnist14").cpu_bf16
    with pytest.raises(ValueError, match="cpu_bf16 must be True or False"):
        unet_config(cpu_bf16="yes").validate()


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_runs_the_step_in_bf16_only_where_the_cpu_has_it(digits, monkeypatch, native):
    if native and not train_mod.cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: native)
    trainer = Trainer(unet_config(cpu_bf16=True, steps=2), data=digits, device="cpu", progress=False)
    assert trainer.use_bf16 is native
    assert trainer.channels_last is not native  # oneDNN's bf16 convolutions are slow in channels-last
    dtypes = []
    handle = trainer.model.input_blocks[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer.fit()
    handle.remove()
    assert set(dtypes) == {torch.bfloat16 if native else torch.float32}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not bf16 weights
    assert all(p.dtype == torch.float32 for p in trainer.ema.parameters())
    assert math.isfinite(trainer.history["loss"][-1])
    assert not Trainer(unet_config(steps=2), data=digits, device="cpu", progress=False).use_bf16  # off by default


def test_every_example_once_per_epoch_and_fresh_order_next_epoch():
    x, y = load_dataset("moons", n=40, seed=0)
    trainer = Trainer(toy_config(batch_size=16, dataset="moons"), data=(x, y), progress=False)
    assert trainer.steps_per_epoch == 2
    epoch0 = torch.cat([trainer.batch_indices(0), trainer.batch_indices(1)])
    epoch1 = torch.cat([trainer.batch_indices(2), trainer.batch_indices(3)])
    assert len(set(epoch0.tolist())) == 32 and len(set(epoch1.tolist())) == 32
    assert not torch.equal(epoch0, epoch1)


def test_label_dropout_uses_the_null_label(monkeypatch, digits):
    seen = []
    real = train_mod.training_losses

    def spy(model, schedule, x0, t, **kw):
        seen.append(kw["y"].clone())
        return real(model, schedule, x0, t, **kw)

    monkeypatch.setattr(train_mod, "training_losses", spy)
    trainer = Trainer(unet_config(label_dropout=0.5, batch_size=50), data=digits, progress=False)
    trainer.fit(steps=2)
    y = torch.cat(seen)
    null = (y == 10).float().mean().item()
    assert 0.3 < null < 0.7  # 100 draws of p = 0.5
    kept = y[y != 10]
    true = torch.cat([digits[1][trainer.batch_indices(s)] for s in range(2)])
    assert torch.equal(kept, true[y != 10])


def test_loss_goes_down_and_history_is_complete():
    trainer = Trainer(toy_config(steps=150, batch_size=128, lr=3e-3, log_every=50, dataset="gaussian_mixture"),
                      progress=False)
    trainer.fit()
    h = trainer.history
    assert h["step"] == list(range(1, 151)) and len(h["loss"]) == len(h["grad_norm"]) == 150
    assert sum(h["loss"][-30:]) / 30 < 0.8 * sum(h["loss"][:30]) / 30
    assert h["quartile_step"] == [50, 100, 150] and all(len(q) == 4 for q in h["loss_q"])
    # with eps-prediction, the loss is largest at small t: the first quartile is the hardest
    last = h["loss_q"][-1]
    assert all(math.isfinite(v) for v in last) and last[0] > last[3]


def test_callbacks_and_previews(digits):
    events = []

    class Recorder(train_mod.Callback):
        def on_train_start(self, trainer):
            events.append("start")

        def on_step_end(self, trainer, metrics):
            events.append(("step", metrics["step"]))

        def on_preview(self, trainer, samples):
            events.append(("preview", trainer.step, tuple(samples.shape)))

        def on_train_end(self, trainer):
            events.append("end")

    plain = []
    trainer = Trainer(unet_config(steps=4, preview_every=2), data=digits, progress=False,
                      callbacks=[Recorder(), lambda tr, m: plain.append(m["loss"])])
    trainer.fit()
    assert events == ["start", ("step", 1), ("step", 2), ("preview", 2, (16, 1, 28, 28)), ("step", 3), ("step", 4),
                      ("preview", 4, (16, 1, 28, 28)), "end"]
    assert plain == trainer.history["loss"]
    assert trainer.previews[-1][1].abs().max() <= 1.0 + 1e-5


# ---------------------------------------------------------------------------------------------------------
# exact resume, Ctrl-C and divergence


@pytest.mark.parametrize("kind", ["toy", "unet"])
def test_resume_is_bitwise_exact(tmp_path, kind, digits):
    if kind == "toy":
        config, data = toy_config(steps=8, checkpoint_every=3), None
    else:
        config, data = unet_config(steps=6, checkpoint_every=3, timestep_sampler="importance", loss_type="vlb"), digits
    reference = Trainer(config, data=data, progress=False).fit()

    first = Trainer(config, out_dir=tmp_path / "run", data=data, progress=False)
    first.fit(steps=3 if kind == "unet" else 5)  # stop early, as if interrupted after a checkpoint
    torch.manual_seed(999)  # whatever happened in between must not matter
    resumed = Trainer(config, out_dir=tmp_path / "run", data=data, progress=False)
    resumed.load()
    assert resumed.step == first.step
    resumed.fit()
    assert_same_weights(reference.model, resumed.model)
    assert_same_weights(reference.ema, resumed.ema)
    assert reference.history == resumed.history
    assert load_training_state(tmp_path / "run")["state"]["step"] == config.steps


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path, digits):
    config = unet_config(steps=6)
    reference = Trainer(config, data=digits, progress=False).fit()

    def press_ctrl_c(trainer, metrics):
        if metrics["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    run = Trainer(config, out_dir=tmp_path / "run", data=digits, progress=False, callbacks=[press_ctrl_c])
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert load_training_state(tmp_path / "run")["state"]["step"] == 2
    resumed = Trainer(config, out_dir=tmp_path / "run", data=digits, progress=False)
    resumed.load()
    resumed.fit()
    assert_same_weights(reference.model, resumed.model)
    assert_same_weights(reference.ema, resumed.ema)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    x, y = load_dataset("swiss_roll", n=256, seed=0)

    def poison(trainer, metrics):
        if metrics["step"] == 5:
            trainer.x.fill_(float("nan"))

    trainer = Trainer(toy_config(steps=10, checkpoint_every=4), out_dir=tmp_path / "run", data=(x, y),
                      progress=False, callbacks=[poison])
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5; the last good checkpoint \(step 4\) is kept"):
        trainer.fit()
    state = load_training_state(tmp_path / "run")
    assert state["state"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ---------------------------------------------------------------------------------------------------------
# progress bars


def test_progress_rule(monkeypatch):
    monkeypatch.setenv("DDPM_PROGRESS", "1")
    assert progress_enabled() is True and progress_enabled(False) is False
    monkeypatch.setenv("DDPM_PROGRESS", "0")
    assert progress_enabled() is False and progress_enabled(True) is True
    monkeypatch.delenv("DDPM_PROGRESS")
    monkeypatch.setattr(callbacks_mod, "_in_book_build", lambda: True)
    assert progress_enabled() is False
    monkeypatch.setattr(callbacks_mod, "_in_book_build", lambda: False)
    monkeypatch.setattr(callbacks_mod, "_in_notebook", lambda: False)

    class Pipe:
        def isatty(self):
            return False

    monkeypatch.setattr("sys.stderr", Pipe())
    assert progress_enabled() is False


def test_no_progress_output_when_disabled(capfd):
    Trainer(toy_config(steps=3), progress=False).fit()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_book_build_is_recognised_from_the_parent_process(tmp_path):
    """A kernel started by ``jupyter-book build`` has that command among its ancestors: no progress bar there."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("ancestor detection reads /proc (Linux)")
    fake = tmp_path / "jupyter-book"
    fake.write_text("import subprocess, sys\n"
                    "code = 'from ddpm.callbacks import _batch_ancestor; print(_batch_ancestor())'\n"
                    "sys.exit(subprocess.run([sys.executable, '-c', code]).returncode)\n")
    env = {k: v for k, v in os.environ.items() if k != "DDPM_PROGRESS"}
    out = subprocess.run([sys.executable, str(fake), "build", "."], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1:3] == [str(fake), "build"]  # the nearest batch ancestor is the book build


def test_objects_with_some_hooks_and_bad_callbacks():
    class OnlyPreviews:
        def __init__(self):
            self.shapes = []

        def on_preview(self, trainer, samples):
            self.shapes.append(tuple(samples.shape))

    duck = OnlyPreviews()
    Trainer(toy_config(steps=2, preview_every=1), progress=False, callbacks=[duck]).fit()
    assert duck.shapes == [(16, 2), (16, 2)]
    with pytest.raises(ValueError, match="callbacks must be Callback objects or callables"):
        Trainer(toy_config(), progress=False, callbacks=[42])


def test_recipe_summary_names_what_the_preset_does():
    from ddpm.presets import recipe_summary

    text = recipe_summary(toy_config(lr=2e-3, lr_decay="cosine", snr_gamma=5.0, loss_type="simple"))
    assert text.startswith("the simple objective with Min-SNR-5 weighting") and "AdamW at 0.002 with a cosine decay" in text
    assert "$" not in text
    plain = recipe_summary(unet_config())
    assert "Min-SNR" not in plain and "label dropout 0.3" in plain and "constant after the warm-up" in plain
    # a run too short for the warm-up to reach the cap says where its decay stops instead of naming the cap
    short = recipe_summary(toy_config(steps=2400, ema_decay=0.999))
    assert f"stops at {ema_decay_at(2399, 0.999):.4f} on the last step, short of its cap 0.999" in short
    assert recipe_summary(toy_config(steps=20000, ema_decay=0.999)).endswith("EMA 0.999")
