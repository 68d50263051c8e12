"""The command line ``python -m ddpm``: help, train/resume, sample (.png and .npz), nll, evaluate, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm.__main__ as cli
from ddpm.checkpoint import load_training_state
from ddpm.train import TrainConfig, Trainer

torch.set_num_threads(1)

TINY_UNET = dict(image_size=28, in_channels=1, model_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                 attention_resolutions=[], num_heads=1, dropout=0.0, num_classes=10, learn_sigma=True)


@pytest.fixture(scope="module")
def image_ckpt(tmp_path_factory):
    """A class-conditional, learned-variance tiny U-Net checkpoint (2 steps of training)."""
    from ddpm.data import load_dataset

    x, y = load_dataset("mnist5k", split="test")
    config = TrainConfig(name="cli-tiny", model=TINY_UNET, dataset="mnist5k", schedule="cosine", T=20,
                         loss_type="hybrid", batch_size=8, steps=2, label_dropout=0.1)
    out = tmp_path_factory.mktemp("ck") / "run"
    Trainer(config, out_dir=out, data=(x, y), progress=False).fit()
    return out


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "toy2d"
    assert cli.main(["train", "--preset", "toy2d", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(capsys, *argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    command = argv[0] if argv[0] in cli.COMMANDS else ""  # every message names the program and the command
    assert err.startswith(f"python -m ddpm {command}".strip()), err
    assert match in err, err
    return err


def test_help_of_every_subcommand(capsys):
    for sub in ([], ["train"], ["sample"], ["inpaint"], ["edit"], ["nll"], ["evaluate"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(sub + ["--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: python -m ddpm")
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    text = capsys.readouterr().out
    for option in ("--checkpoint", "--sampler", "--steps", "--n", "--class", "--labels", "--guidance-scale",
                   "--classifier", "--seed", "--data-root", "--out", "--overwrite"):
        assert option in text


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "ddpm", "nll", "--checkpoint", "/nonexistent/run"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_train_writes_a_checkpoint_and_resumes(tmp_path, capsys, toy_ckpt):
    assert load_training_state(toy_ckpt)["state"]["step"] == 3
    code, out, err = run(capsys, "train", "--preset", "toy2d", "--steps", "5", "--out", toy_ckpt, "--resume",
                         "--no-progress")
    assert code == 0 and "resuming" in out and "to step 5" in out and err == ""
    assert load_training_state(toy_ckpt)["state"]["step"] == 5
    before = {f.name: f.read_bytes() for f in Path(toy_ckpt).iterdir() if f.is_file()}
    code, out, err = run(capsys, "train", "--preset", "toy2d", "--steps", "4", "--out", toy_ckpt, "--resume",
                         "--no-progress")
    assert code == 0 and "already at step 5" in out and "nothing to train" in out and err == ""
    assert {f.name: f.read_bytes() for f in Path(toy_ckpt).iterdir() if f.is_file()} == before  # left untouched


def test_train_refuses_bad_input(tmp_path, capsys, toy_ckpt):
    assert_usage_error(capsys, "train", "--preset", "mnist", match="unknown preset 'mnist'; valid presets are toy2d")
    assert_usage_error(capsys, "train", "--preset", "toy2d", "--steps", "0", match="--steps must be a positive integer")
    assert_usage_error(capsys, "train", "--preset", "toy2d", "--steps", "-4", match="--steps must be a positive integer")
    assert_usage_error(capsys, "train", "--preset", "toy2d", "--steps", "many", match="--steps must be a positive")
    assert_usage_error(capsys, "train", "--preset", "toy2d", "--out", tmp_path / "none", "--resume",
                       match="no checkpoint in")
    assert_usage_error(capsys, "train", "--preset", "toy2d", "--out", toy_ckpt, match="pass --resume to continue")
    assert_usage_error(capsys, "train", "--preset", "mnist-cpu", "--out", toy_ckpt, "--resume",
                       match="was trained with another configuration")
    assert_usage_error(capsys, "train", match="the following arguments are required: --preset")
    assert_usage_error(capsys, "fly", match="invalid choice: 'fly'")


def test_a_device_this_machine_lacks_is_a_usage_error(tmp_path, capsys, monkeypatch):
    import torch

    base = ("train", "--preset", "toy2d", "--steps", "1", "--out", tmp_path / "run", "--device")
    assert_usage_error(capsys, *base, "warp", match="--device 'warp' is not a torch device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert_usage_error(capsys, *base, "cuda", match="--device cuda: this machine has no usable CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert_usage_error(capsys, *base, "cuda:3", match="--device cuda:3: this machine has 1 CUDA GPU(s)")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_sample_png_and_npz(tmp_path, capsys, image_ckpt):
    code, out, _ = run(capsys, "sample", "--checkpoint", image_ckpt, "--sampler", "ddim", "--steps", "4", "--n", "5",
                       "--out", tmp_path / "grid.png")
    assert code == 0 and "wrote 5 samples" in out
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (3 * 30 + 2, 2 * 30 + 2)  # 3 columns x 2 rows of 28 px with 2 px padding

    code, out, _ = run(capsys, "sample", "--checkpoint", image_ckpt, "--sampler", "ddpm", "--steps", "3", "--n", "6",
                       "--class", "7", "--seed", "1", "--batch-size", "4", "--out", tmp_path / "s.npz")
    assert code == 0
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (6, 28, 28, 1)
        assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == [7] * 6
        first = f["arr_0"]
    run(capsys, "sample", "--checkpoint", image_ckpt, "--sampler", "ddpm", "--steps", "3", "--n", "6", "--class", "7",
        "--seed", "1", "--batch-size", "4", "--out", tmp_path / "again.npz")
    with np.load(tmp_path / "again.npz") as f:
        assert np.array_equal(f["arr_0"], first)  # the seed fixes the samples

    code, out, _ = run(capsys, "sample", "--checkpoint", image_ckpt, "--steps", "2", "--n", "12",
                       "--guidance-scale", "2", "--out", tmp_path / "cfg.npz")
    assert code == 0 and "guidance scale 2.0" in out
    with np.load(tmp_path / "cfg.npz") as f:
        assert f["arr_1"].tolist() == [i % 10 for i in range(12)]

    code, out, _ = run(capsys, "sample", "--checkpoint", image_ckpt, "--steps", "2", "--n", "3",
                       "--out", tmp_path / "uncond.npz")
    with np.load(tmp_path / "uncond.npz") as f:
        assert f.files == ["arr_0"]  # unconditional samples carry no labels


@pytest.mark.parametrize("sampler, steps, evaluations", [("heun", "3", 5), ("dpm++2m", "4", 4)])
def test_sample_with_the_solvers_counts_network_evaluations(tmp_path, capsys, image_ckpt, sampler, steps, evaluations):
    code, out, _ = run(capsys, "sample", "--checkpoint", image_ckpt, "--sampler", sampler, "--steps", steps, "--n", "4",
                       "--guidance-scale", "1", "--out", tmp_path / "s.npz")
    assert code == 0 and f"({sampler}, {evaluations} network evaluations" in out
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (4, 28, 28, 1)


def test_sampler_names_of_the_command_line_are_the_package_samplers():
    from ddpm.samplers import SAMPLERS

    assert cli.SAMPLER_NAMES == SAMPLERS
    from ddpm.flow import FLOW_METHODS

    assert cli.FLOW_SAMPLER_NAMES == FLOW_METHODS


def test_preset_names_of_the_command_line_are_the_package_presets(capsys):
    from ddpm.presets import preset_names

    assert list(cli.PRESET_NAMES) == preset_names()
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse may wrap inside a name
    assert ",".join(preset_names()) in help_text


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small"])
def test_ancestral_sampling_uses_the_variance_the_model_was_trained_with(tmp_path, capsys, monkeypatch, var_type):
    import ddpm.samplers as samplers

    from ddpm.data import load_dataset

    x, y = load_dataset("mnist5k", split="test", n=16)
    model = {**TINY_UNET, "learn_sigma": False, "num_classes": None}
    config = TrainConfig(name="cli-var", model=model, dataset="mnist5k", schedule="cosine", T=10,
                         loss_type="simple", var_type=var_type, batch_size=8, steps=1)
    Trainer(config, out_dir=tmp_path / "run", data=(x, None), progress=False).fit()
    seen = []
    real = samplers.ddpm_sample

    def spy(*args, **kwargs):
        seen.append(kwargs.get("var_type"))
        return real(*args, **kwargs)

    monkeypatch.setattr(samplers, "ddpm_sample", spy)
    code, _, err = run(capsys, "sample", "--checkpoint", tmp_path / "run", "--sampler", "ddpm", "--n", 2,
                       "--out", tmp_path / "s.npz")
    assert code == 0, err
    assert seen == [var_type]


def test_to_uint8_matches_the_evaluation_format():
    from ddpm.plotting import to_uint8  # what `sample --out FILE.npz` writes

    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.2]).view(1, 1, 1, 6)
    assert to_uint8(x).reshape(-1).tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)


def test_sample_refuses_bad_input(tmp_path, capsys, image_ckpt, toy_ckpt):
    base = ["sample", "--checkpoint", image_ckpt, "--steps", "2"]
    assert_usage_error(capsys, *base, "--n", "0", "--out", tmp_path / "a.png", match="--n must be a positive integer")
    assert_usage_error(capsys, *base, "--n", "-2", "--out", tmp_path / "a.png", match="--n must be a positive integer")
    assert_usage_error(capsys, "sample", "--checkpoint", image_ckpt, "--steps", "0", "--out", tmp_path / "a.png",
                       match="--steps must be a positive integer")
    assert_usage_error(capsys, "sample", "--checkpoint", image_ckpt, "--steps", "21", "--out", tmp_path / "a.png",
                       match="--steps must be at most T = 20")
    assert_usage_error(capsys, *base, "--class", "10", "--out", tmp_path / "a.png", match="--class must be in 0..9")
    assert_usage_error(capsys, *base, "--class", "-1", "--out", tmp_path / "a.png", match="must be an integer >= 0")
    assert_usage_error(capsys, *base, "--guidance-scale", "-1", "--out", tmp_path / "a.png",
                       match="must be a finite number >= 0")
    assert_usage_error(capsys, *base, "--out", tmp_path / "a.jpg",
                       match="python -m ddpm sample: --out must end in .png or .npz")
    assert_usage_error(capsys, *base, "--sampler", "rk4", "--out", tmp_path / "a.png", match="invalid choice: 'rk4'")
    assert_usage_error(capsys, *base, "--sampler", "euler", "--out", tmp_path / "a.png",
                       match="is a diffusion model; use one of ddpm, ddim, heun, dpm++2m")
    assert_usage_error(capsys, "sample", "--checkpoint", tmp_path / "missing", "--out", tmp_path / "a.png",
                       match="not found")
    assert_usage_error(capsys, "sample", "--checkpoint", toy_ckpt, "--out", tmp_path / "a.png",
                       match="model of 2-D points")
    assert not list(tmp_path.iterdir())


def test_corrupt_and_foreign_checkpoints_are_one_line(tmp_path, capsys, image_ckpt):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(image_ckpt, broken)
    data = (broken / "ema.safetensors").read_bytes()
    (broken / "ema.safetensors").write_bytes(data[: len(data) // 3])
    assert_usage_error(capsys, "sample", "--checkpoint", broken, "--n", "1", "--out", tmp_path / "a.png",
                       match="truncated or corrupt")
    assert_usage_error(capsys, "nll", "--checkpoint", broken, match="truncated or corrupt")
    (broken / "config.json").write_text("{not json")
    assert_usage_error(capsys, "nll", "--checkpoint", broken, match="truncated or corrupt")


def test_nll(capsys, image_ckpt):
    code, out, err = run(capsys, "nll", "--checkpoint", image_ckpt, "--n", "3", "--timesteps", "2")
    assert code == 0 and err == ""
    assert "bits/dim on 3 held-out mnist5k images (estimate from 2 random timesteps per image)" in out
    mean = float(out.split()[1])
    assert 0 < mean < 100
    code, out, _ = run(capsys, "nll", "--checkpoint", image_ckpt, "--n", "2")
    assert code == 0 and "exact sum over all 20 timesteps" in out
    assert_usage_error(capsys, "nll", "--checkpoint", image_ckpt, "--n", "0", match="--n must be a positive integer")
    assert_usage_error(capsys, "nll", "--checkpoint", image_ckpt, "--timesteps", "0",
                       match="--timesteps must be a positive integer")


def test_evaluate(tmp_path, capsys, monkeypatch):
    import ddpm.metrics as metrics

    path = tmp_path / "s.npz"
    np.savez(path, arr_0=np.zeros((4, 28, 28, 1), np.uint8), arr_1=np.arange(4))
    seen = []
    monkeypatch.setattr(metrics, "evaluate_samples", lambda p: seen.append(Path(p)) or {"fid": 1.5})
    monkeypatch.setattr(metrics, "format_report", lambda d: f"report fid={d['fid']}")
    code, out, _ = run(capsys, "evaluate", "--samples", path)
    assert code == 0 and out.strip() == "report fid=1.5" and seen == [path]

    assert_usage_error(capsys, "evaluate", "--samples", tmp_path / "none.npz", match="not found")
    assert_usage_error(capsys, "evaluate", "--samples", tmp_path / "x.png", match="must be an .npz file")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    assert_usage_error(capsys, "evaluate", "--samples", tmp_path / "bad.npz", match="not a readable .npz")
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 28, 28, 1), np.float32))
    assert_usage_error(capsys, "evaluate", "--samples", tmp_path / "float.npz", match="arr_0 must be uint8")
    np.savez(tmp_path / "small.npz", arr_0=np.zeros((2, 14, 14, 1), np.uint8))  # an mnist14 model's samples
    assert_usage_error(capsys, "evaluate", "--samples", tmp_path / "small.npz", match="28x28 grey digits")
    assert seen == [path]  # no bad file reached the metric


def test_train_without_the_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    from urllib.error import URLError

    from torchvision.datasets import MNIST

    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(MNIST, "download", offline)
    err = assert_usage_error(capsys, "train", "--preset", "mnist-gpu", "--out", tmp_path / "run", "--data-root",
                             tmp_path / "data", match="train on the offline digits 'mnist5k' (--preset mnist-cpu")
    assert "no network" in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# nothing of the user's is overwritten: train --out, sample --out


def test_train_refuses_a_folder_of_other_files_in_one_line_and_leaves_it_alone(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    env = {**os.environ, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "ddpm", "train", "--preset", "mnist-cpu", "--out", str(d)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("python -m ddpm train: ") and "choose an empty or new folder" in proc.stderr
    assert (d / "notes.txt").read_text() == "my notes" and [p.name for p in d.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_train_checks_its_out_folder_before_any_work(tmp_path, capsys, monkeypatch):
    import ddpm.data
    import ddpm.train

    def no_work(*args, **kwargs):
        raise AssertionError("a refused --out must be refused before the data or the model")

    monkeypatch.setattr(ddpm.train, "Trainer", no_work)
    monkeypatch.setattr(ddpm.data, "load_dataset", no_work)
    runs = tmp_path / "runs"
    (runs / "other").mkdir(parents=True)
    (runs / "notes.txt").write_text("mine")
    (runs / "other" / "a.txt").write_text("mine too")
    (tmp_path / "file").write_text("a file")
    for out, match in [(runs, "is a folder that is not a ddpm checkpoint"), (tmp_path / "file", "is a file")]:
        err = assert_usage_error(capsys, "train", "--preset", "toy2d", "--steps", "3", "--out", out, match=match)
        assert err.rstrip().endswith("choose an empty or new folder")
    (runs / "config.json").write_text('{"format": "not ours"}')  # a config.json is not enough to be a checkpoint
    assert_usage_error(capsys, "train", "--preset", "toy2d", "--out", runs, match="not a ddpm checkpoint")
    assert sorted(p.name for p in runs.iterdir()) == ["config.json", "notes.txt", "other"]
    assert (runs / "other" / "a.txt").read_text() == "mine too" and (tmp_path / "file").read_text() == "a file"

    monkeypatch.undo()  # an empty folder is a fine place for a new run
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "train", "--preset", "toy2d", "--steps", "2", "--out", tmp_path / "empty",
                         "--no-progress")
    assert code == 0 and err == "" and load_training_state(tmp_path / "empty")["state"]["step"] == 2


def test_sample_checks_its_out_file_before_loading_the_model(tmp_path, capsys, monkeypatch, image_ckpt):
    import ddpm.cache

    def no_model(*args, **kwargs):
        raise AssertionError("a bad --out must be refused before the model is loaded")

    monkeypatch.setattr(ddpm.cache, "load_model", no_model)
    base = ["sample", "--checkpoint", image_ckpt, "--steps", "2", "--n", "2", "--out"]
    (tmp_path / "old.npz").write_bytes(b"earlier samples")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert_usage_error(capsys, *base, tmp_path / "old.npz",
                       match="--out " + str(tmp_path / "old.npz") + " already exists; choose another name or pass "
                             "--overwrite to replace it")
    assert_usage_error(capsys, *base, tmp_path / "folder.png", match="is a folder; give a file name ending in .png")
    assert_usage_error(capsys, *base, tmp_path / "folder.png", "--overwrite", match="is a folder")
    assert_usage_error(capsys, *base, tmp_path / "notes.txt" / "a.png",
                       match=f"its folder cannot be made, because {tmp_path / 'notes.txt'} is a file")
    assert_usage_error(capsys, *base, tmp_path / "s.jpg", match="--out must end in .png or .npz")
    import ddpm.samplefiles

    monkeypatch.setattr(ddpm.samplefiles.os, "access", lambda path, mode: False)  # as for a read-only place
    assert_usage_error(capsys, *base, tmp_path / "new" / "s.npz", match=f"the folder {tmp_path} is not writable")
    monkeypatch.undo()
    assert (tmp_path / "old.npz").read_bytes() == b"earlier samples"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "notes.txt", "old.npz"]


def test_sample_overwrites_only_when_asked_and_writes_atomically(tmp_path, capsys, monkeypatch, image_ckpt):
    base = ["sample", "--checkpoint", image_ckpt, "--steps", "2", "--n", "3", "--class", "4"]
    code, _, err = run(capsys, *base, "--seed", "0", "--out", tmp_path / "s.npz")
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as f:
        first = f["arr_0"]
    code, _, err = run(capsys, *base, "--seed", "1", "--out", tmp_path / "s.npz", "--overwrite")
    assert code == 0, err
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == first.shape and not np.array_equal(f["arr_0"], first)  # replaced
        second = f["arr_0"]
    code, _, err = run(capsys, *base, "--out", tmp_path / "sub" / "dir" / "grid.png")  # folders are made
    assert code == 0 and (tmp_path / "sub" / "dir" / "grid.png").is_file(), err

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    err = assert_usage_error(capsys, *base, "--out", tmp_path / "s.npz", "--overwrite",
                             match="cannot write it (No space left on device); the samples were not saved")
    assert str(tmp_path / "s.npz") in err
    monkeypatch.undo()
    with np.load(tmp_path / "s.npz") as f:
        assert np.array_equal(f["arr_0"], second)  # the earlier file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "sub"]  # no temporary file left


def test_sample_labels_random_and_cycle(tmp_path, capsys, image_ckpt):
    base = ["sample", "--checkpoint", image_ckpt, "--steps", "2", "--n", "40", "--batch-size", "40"]
    code, out, err = run(capsys, *base, "--labels", "random", "--seed", "5", "--out", tmp_path / "r.npz")
    assert code == 0 and "labels drawn from the training set's class frequencies" in out, err
    with np.load(tmp_path / "r.npz") as f:
        labels = f["arr_1"]
        assert f["arr_0"].shape == (40, 28, 28, 1)
    assert labels.dtype == np.int64 and labels.shape == (40,) and labels.min() >= 0 and labels.max() <= 9
    from ddpm.data import class_frequencies, draw_labels

    want = draw_labels(40, class_frequencies("mnist5k"), torch.Generator().manual_seed(5))
    assert labels.tolist() == want.tolist()  # the seed fixes the labels as it fixes the samples
    assert labels.tolist() != [i % 10 for i in range(40)]

    code, out, _ = run(capsys, *base, "--labels", "cycle", "--out", tmp_path / "c.npz")
    assert code == 0 and "classes cycled" in out
    with np.load(tmp_path / "c.npz") as f:
        assert f["arr_1"].tolist() == [i % 10 for i in range(40)]

    assert_usage_error(capsys, *base, "--labels", "random", "--class", "3", "--out", tmp_path / "x.npz",
                       match="argument --class: not allowed with argument --labels")
    assert_usage_error(capsys, *base, "--labels", "every", "--out", tmp_path / "x.npz", match="invalid choice: 'every'")
    from ddpm.data import load_dataset

    x, _ = load_dataset("mnist5k", split="test", n=16)
    uncond = {**TINY_UNET, "learn_sigma": False, "num_classes": None}
    config = TrainConfig(name="cli-uncond", model=uncond, dataset="mnist5k", schedule="cosine", T=10, batch_size=8,
                         steps=1)
    Trainer(config, out_dir=tmp_path / "uncond", data=(x, None), progress=False).fit()
    assert_usage_error(capsys, "sample", "--checkpoint", tmp_path / "uncond", "--labels", "random", "--out",
                       tmp_path / "x.npz", match="--labels needs a class-conditional model or --classifier")
    assert not (tmp_path / "x.npz").exists()
