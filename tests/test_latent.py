"""Latent diffusion end to end: a ``TrainConfig`` with an autoencoder, training on latents, checkpoints that carry
the decoder, resuming, the model cache and the command line decoding samples to images."""

import dataclasses

import numpy as np
import pytest
import torch

import ddpm.__main__ as cli
from ddpm.cache import load_autoencoder, load_model, load_or_train
from ddpm.checkpoint import config_hash
from ddpm.data import load_dataset
from ddpm.presets import get_preset
from ddpm.train import TrainConfig, Trainer, build_model

TINY_DIT = dict(image_size=7, in_channels=4, patch_size=1, hidden=16, depth=1, num_heads=2, num_classes=10)
TINY_AE = dict(channels=[4, 8], latent_channels=4, steps=20, batch_size=16)


def tiny_config(**overrides) -> TrainConfig:
    fields = dict(name="latent-tiny", model_type="dit", model=TINY_DIT, dataset="mnist5k", autoencoder=TINY_AE,
                  T=50, batch_size=16, lr=1e-3, steps=3, label_dropout=0.2, preview_every=3)
    fields.update(overrides)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def digits():
    x, y = load_dataset("mnist5k", split="train")
    return x[:128], y[:128]


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("latent") / "run"
    trainer = Trainer(tiny_config(), out_dir=out, data=digits, progress=False).fit()
    return out, trainer


def test_the_config_of_a_latent_model():
    config = tiny_config()
    assert config.is_latent and config.sample_shape == (4, 7, 7)
    saved = config.to_dict()["autoencoder"]
    assert saved == {"channels": [4, 8], "latent_channels": 4, "kl_weight": 1e-3, "steps": 20, "batch_size": 16,
                     "lr": 2e-3}  # defaults filled in, so that equal models hash equally
    assert TrainConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    pixel = get_preset("mnist-cpu")
    assert not pixel.is_latent and pixel.sample_shape == (1, 28, 28)
    assert "autoencoder" not in pixel.to_dict()  # a pixel model's dict and hash are unchanged


def test_the_latent_preset_is_a_unet_on_the_autoencoders_latents():
    config = get_preset("mnist-latent")
    assert config.model_type == "unet" and config.is_latent
    mc = config.model_config()
    assert (mc.in_channels, mc.image_size, mc.image_size) == config.sample_shape == (4, 7, 7)
    assert config.num_classes == 10 and config.label_dropout > 0


@pytest.mark.parametrize("change, match", [
    (dict(autoencoder={**TINY_AE, "widths": [4, 8]}), "unknown autoencoder keys ['widths']"),
    (dict(autoencoder={**TINY_AE, "steps": 0}), "autoencoder steps must be an integer >= 1"),
    (dict(autoencoder=[4, 8]), "autoencoder must be a dict"),
    (dict(model={**TINY_DIT, "in_channels": 1, "image_size": 28, "patch_size": 4}), "latents are 4x7x7"),
    (dict(autoencoder={**TINY_AE, "latent_channels": 2}), "in_channels=2 and image_size=7"),
])
def test_a_bad_latent_config_is_one_clear_error(change, match):
    with pytest.raises(ValueError, match=None) as err:
        tiny_config(**change).validate()
    assert match in str(err.value) and "\n" not in str(err.value)


def test_training_runs_on_latents_and_previews_are_decoded_images(latent_ckpt, digits):
    _, trainer = latent_ckpt
    assert trainer.step == 3 and trainer.x.shape == (128, 4, 7, 7)
    with torch.no_grad():  # the training set is the autoencoder's scaled latent means of the images
        expected = trainer.autoencoder.encode(digits[0])
    torch.testing.assert_close(trainer.x, expected)
    (step, images), = trainer.previews
    assert step == 3 and images.shape == (16, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1


def test_the_checkpoint_carries_the_autoencoder(latent_ckpt):
    out, trainer = latent_ckpt
    model, config, state = load_model(out)
    assert config.is_latent and state["step"] == 3
    ae = load_autoencoder(out)
    for key, value in trainer.autoencoder.state_dict().items():
        assert torch.equal(ae.state_dict()[key], value), key
    assert float(ae.scale_factor) != 1.0  # the scale factor travels with the weights
    assert load_autoencoder(out, config) is not None


def test_resuming_restores_the_runs_own_autoencoder(latent_ckpt, digits):
    out, first = latent_ckpt
    second = Trainer(tiny_config(), data=digits, progress=False)
    with torch.no_grad():
        for p in second.autoencoder.parameters():
            p.add_(0.1)  # as if the cached autoencoder had been retrained differently
    second.reencode()
    assert not torch.allclose(second.x, first.x)
    second.load(out)
    assert torch.equal(second.x, first.x)
    for key, value in first.autoencoder.state_dict().items():
        assert torch.equal(second.autoencoder.state_dict()[key], value), key


def test_a_checkpoint_without_its_autoencoder_is_one_line(latent_ckpt, tmp_path):
    import shutil

    from ddpm.checkpoint import CheckpointError, load_weights, save_weights

    out, _ = latent_ckpt
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    extra, meta = load_weights(broken / "extra.safetensors")
    save_weights(broken / "extra.safetensors", {k: v for k, v in extra.items() if not k.startswith("autoencoder/")},
                 meta)
    with pytest.raises(CheckpointError, match="lacks a usable autoencoder") as err:
        load_autoencoder(broken)
    assert "\n" not in str(err.value)


def test_load_or_train_returns_the_decoder_and_decodes(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    config = tiny_config(steps=2, preview_every=0)
    trained = load_or_train(config, cache_dir=tmp_path / "models", progress=False)
    assert trained.autoencoder is not None
    again = load_or_train(config, cache_dir=tmp_path / "models", progress=False)  # from the cache
    for key, value in trained.autoencoder.state_dict().items():
        assert torch.equal(again.autoencoder.state_dict()[key], value), key
    # the first stage was trained once, on the preset's dataset, and cached beside the models
    assert len(list((tmp_path / "cache").glob("autoencoder-*.safetensors"))) == 1
    z = torch.randn(3, *config.sample_shape)
    images = again.decode(z)
    assert images.shape == (3, 1, 28, 28) and images.abs().max() <= 1
    assert torch.equal(images, trained.decode(z))
    # a different first stage is a different model
    other = dataclasses.replace(config, autoencoder={**TINY_AE, "kl_weight": 1e-2})
    assert config_hash(other.to_dict()) != config_hash(config.to_dict())


def test_the_command_line_decodes_latent_samples_to_images(latent_ckpt, tmp_path, capsys):
    out, _ = latent_ckpt
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", "--checkpoint", str(out), "--n", "5", "--steps", "4", "--out", str(npz),
                     "--guidance-scale", "1"]) == 0
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 28, 28, 1) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4]
    png = tmp_path / "s.png"
    assert cli.main(["sample", "--checkpoint", str(out), "--n", "4", "--steps", "3", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert cli.main(["nll", "--checkpoint", str(out), "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert "is a latent model" in err and err.count("\n") == 1


def test_provenance_names_the_autoencoders_training_time(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    config = tiny_config(steps=1, preview_every=0)
    for trained in (load_or_train(config, cache_dir=tmp_path, progress=False),
                    load_or_train(config, cache_dir=tmp_path, progress=False)):  # trained, then cached
        assert trained.info["autoencoder_seconds"] > 0
        assert "after its autoencoder (" in trained.provenance()


def test_cached_samples_are_drawn_once_per_model_and_settings(tmp_path, monkeypatch):
    from ddpm.cache import TrainedModel, cached_samples

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    model = TrainedModel(model=None, raw_model=None, schedule=None, config=None, history={},
                         info={"checkpoint_hash": "abc"})
    calls = []

    def draw():
        calls.append(1)
        return torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(len(calls)))

    first, seconds = cached_samples(model, draw, sampler="ddim", steps=10, seed=0)
    again, recorded = cached_samples(model, draw, steps=10, sampler="ddim", seed=0)  # order does not matter
    assert len(calls) == 1 and torch.equal(first, again) and recorded == seconds >= 0
    other, _ = cached_samples(model, draw, sampler="ddim", steps=20, seed=0)  # other settings: drawn anew
    assert len(calls) == 2 and not torch.equal(other, first)
    model.info["checkpoint_hash"] = "def"  # another model: drawn anew
    cached_samples(model, draw, sampler="ddim", steps=10, seed=0)
    assert len(calls) == 3
    for f in (tmp_path / "samples").iterdir():  # a corrupt file is drawn again, not an error
        f.write_bytes(b"not a safetensors file")
    cached_samples(model, draw, sampler="ddim", steps=10, seed=0)
    assert len(calls) == 4
    model.info["checkpoint_hash"] = None
    with pytest.raises(ValueError, match="checkpoint hash"):
        cached_samples(model, draw, sampler="ddim")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_cached_samples_come_back_on_the_cpu_when_drawn_and_when_loaded(tmp_path, monkeypatch, device):
    from ddpm.cache import TrainedModel, cached_samples

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    model = TrainedModel(model=None, raw_model=None, schedule=None, config=None, history={},
                         info={"checkpoint_hash": "abc"})
    made = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    drawn, _ = cached_samples(model, lambda: made.to(device), sampler="ddim", steps=4, seed=0)

    def fail():
        raise AssertionError("the samples should come from the cache")

    loaded, _ = cached_samples(model, fail, sampler="ddim", steps=4, seed=0)
    assert drawn.device.type == loaded.device.type == "cpu"
    assert torch.equal(drawn, made) and torch.equal(loaded, made)


def test_cached_ddim_samples_names_one_shared_set_per_weights(tmp_path, monkeypatch):
    from ddpm.cache import TrainedModel, cached_ddim_samples, cached_samples
    from ddpm.samplers import ddim_sample
    from ddpm.schedule import NoiseSchedule

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    config = TrainConfig(model={"image_size": 28, "in_channels": 1, "model_channels": 8, "channel_mult": [1],
                                "attention_resolutions": [], "num_heads": 1, "num_classes": None}, T=40)
    torch.manual_seed(0)
    nets = [build_model(config).eval() for _ in range(2)]
    schedule = NoiseSchedule.from_name(config.schedule, config.T)
    trained = TrainedModel(model=nets[0], raw_model=nets[1], schedule=schedule, config=config, history={},
                           info={"checkpoint_hash": "abc"})
    for weights, net in (("ema", nets[0]), ("raw", nets[1])):
        got, _ = cached_ddim_samples(trained, 3, 5, 7, weights=weights)
        with torch.no_grad():
            want = ddim_sample(net, schedule, (3, 1, 28, 28), steps=5, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(got, want)

        def fail():
            raise AssertionError("the set should come from the cache")

        again, _ = cached_samples(trained, fail, sampler="ddim", spacing="trailing", steps=5, n=3, seed=7,
                                  weights=weights, labels="null", guidance=None)
        assert torch.equal(again, got)
    assert len(list((tmp_path / "samples").iterdir())) == 2
    with pytest.raises(ValueError, match="weights must be 'ema' or 'raw'"):
        cached_ddim_samples(trained, 3, 5, 7, weights="best")
    with pytest.raises(ValueError, match="class-conditional"):
        cached_ddim_samples(trained, 3, 5, 7, labels="frequencies")


def test_headline_samples_draw_labels_from_the_class_frequencies(tmp_path, monkeypatch):
    from ddpm.cache import TrainedModel, cached_ddim_samples, frequency_labels
    from ddpm.data import class_frequencies, draw_labels
    from ddpm.samplers import ddim_sample
    from ddpm.schedule import NoiseSchedule

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    config = TrainConfig(model={"image_size": 28, "in_channels": 1, "model_channels": 8, "channel_mult": [1],
                                "attention_resolutions": [], "num_heads": 1, "num_classes": 10}, T=40)
    torch.manual_seed(0)
    net = build_model(config).eval()
    with torch.no_grad():  # the zero output layer would make every label give the same samples
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trained = TrainedModel(model=net, raw_model=net, schedule=NoiseSchedule.from_name(config.schedule, config.T),
                           config=config, history={}, info={"checkpoint_hash": "abc"})
    labels = frequency_labels(trained, 6, 3)
    assert torch.equal(labels, draw_labels(6, class_frequencies(config.dataset), torch.Generator().manual_seed(3)))
    got, _ = cached_ddim_samples(trained, 6, 4, 3, labels="frequencies")
    with torch.no_grad():
        want = ddim_sample(net, trained.schedule, (6, 1, 28, 28), steps=4, y=labels,
                           generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want)
    null, _ = cached_ddim_samples(trained, 6, 4, 3)  # the null label: another set, from the same noise
    assert not torch.equal(null, got) and len(list((tmp_path / "samples").iterdir())) == 2


def test_the_info_says_whether_the_model_came_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    config = tiny_config(steps=1, preview_every=0)
    assert load_or_train(config, cache_dir=tmp_path, progress=False).info["cached"] is False
    assert load_or_train(config, cache_dir=tmp_path, progress=False).info["cached"] is True
