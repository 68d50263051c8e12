"""Checkpoints: safetensors round trips, atomic writes, clear errors, training states, the load_or_train cache."""

import json
from pathlib import Path
import os
import pickle
import random
import time

import numpy as np
import pytest
import torch

from ddpm import atomic, cache
from ddpm import checkpoint as ck
from ddpm.checkpoint import CheckpointError, config_hash, load_weights, save_weights
from ddpm.train import TrainConfig, Trainer

torch.set_num_threads(1)


def toy_config(**overrides) -> TrainConfig:
    base = dict(name="tiny-toy", model_type="mlp", model={"dim": 2, "hidden": 16, "num_layers": 1},
                dataset="moons", T=50, batch_size=16, steps=6, lr=1e-3, ema_decay=0.9, log_every=2)
    base.update(overrides)
    return TrainConfig(**base)


def toy_data(n=64):
    from ddpm.data import load_dataset

    return load_dataset("moons", n=n, seed=3)


# ---------------------------------------------------------------------------------------------------------
# single files


def test_weights_round_trip_keeps_values_dtypes_and_config(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.randn(2, dtype=torch.float64),
        "d": torch.randn(2, 3).to(torch.bfloat16),
        "e": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "view": torch.randn(4, 4).t(),  # non-contiguous
    }
    config = {"lr": 1e-3, "channel_mult": [1, 2], "name": "x", "nested": {"k": None}}
    path = save_weights(tmp_path / "w.safetensors", tensors, config)
    loaded, cfg = load_weights(path, expected_config=config)
    assert cfg == config
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left behind


def test_config_hash_is_stable_and_sensitive(monkeypatch):
    a = {"lr": 1e-3, "model": {"x": [1, 2]}, "steps": 10}
    b = {"steps": 10, "model": {"x": (1, 2)}, "lr": 1e-3}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    assert config_hash(a) != config_hash({**a, "steps": 11})
    h = config_hash(a)
    monkeypatch.setattr(ck, "package_version", lambda: "999.0")
    assert config_hash(a) != h  # the package version is part of the key
    with pytest.raises(ValueError, match="config must be a dict"):
        config_hash([1, 2])


def test_cache_dir_and_project_root(monkeypatch, tmp_path):
    root = cache.project_root()
    assert (root / "pyproject.toml").is_file() and (root / "src" / "ddpm").is_dir()
    monkeypatch.delenv("DDPM_CACHE", raising=False)
    assert cache.cache_dir() == root / ".cache" / "ddpm"
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "empty", "header-only"])
def test_unusable_weight_files_give_one_clear_line(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    save_weights(path, {"w": torch.randn(64, 64)}, {"k": 1})
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        header_len = int.from_bytes(data[:8], "little")
        path.write_bytes(data[: 8 + header_len])
    with pytest.raises(CheckpointError) as err:
        load_weights(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert ("not found" in msg) if damage == "missing" else ("truncated or corrupt" in msg)
    assert isinstance(err.value, ValueError)


def test_config_mismatch_names_the_key(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", {"w": torch.zeros(1)}, {"lr": 1e-3, "T": 1000})
    with pytest.raises(CheckpointError, match=r"another configuration \(T: 1000 in file, 4000 wanted\)"):
        load_weights(path, expected_config={"lr": 1e-3, "T": 4000})


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch as st

    path = save_weights(tmp_path / "w.safetensors", {"w": torch.ones(3)}, {"v": 1})

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, {"w": torch.zeros(3)}, {"v": 2})
    monkeypatch.undo()
    tensors, cfg = load_weights(path)
    assert cfg == {"v": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ---------------------------------------------------------------------------------------------------------
# training checkpoints


def _forbid_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_training_state_round_trip_without_pickle(tmp_path, monkeypatch):
    trainer = Trainer(toy_config(timestep_sampler="importance", loss_type="vlb",
                                 model={"dim": 2, "hidden": 16, "num_layers": 1, "learn_sigma": True}),
                      data=toy_data(), progress=False)
    trainer.fit(steps=3)
    trainer.save(tmp_path / "run")
    expected_next = (torch.rand(5), random.random(), np.random.rand())
    torch.manual_seed(123), random.seed(1), np.random.seed(2)  # scramble the global generators

    _forbid_pickle(monkeypatch)
    state = ck.load_training_state(tmp_path / "run", trainer.config.to_dict())
    assert torch.equal(torch.rand(5), expected_next[0])  # every random state is restored
    assert random.random() == expected_next[1] and np.random.rand() == expected_next[2]
    assert state["state"]["step"] == 3 and state["config"] == trainer.config.to_dict()
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    opt = trainer.optimizer.state_dict()
    assert state["optimizer"]["param_groups"][0]["betas"] == opt["param_groups"][0]["betas"]
    for i, per_param in opt["state"].items():
        for name, value in per_param.items():
            assert torch.equal(state["optimizer"]["state"][i][name], value)
    assert torch.equal(state["extra"]["loss_counts"], trainer.t_sampler.loss_counts)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json", "ema.safetensors", "extra.safetensors", "model.safetensors", "optimizer.json",
        "optimizer.safetensors", "rng.safetensors", "state.json"]


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(toy_config(), data=toy_data(), progress=False)
    trainer.fit(steps=2)
    trainer.save(tmp_path / "run")
    trainer.fit(steps=4)
    real = ck.save_weights

    def fail_on_ema(path, tensors, config):
        if path.name == "ema.safetensors":
            raise OSError("power cut")
        return real(path, tensors, config)

    monkeypatch.setattr(ck, "save_weights", fail_on_ema)
    with pytest.raises(OSError, match="power cut"):
        trainer.save(tmp_path / "run")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run.lock"]  # no half-written directory left
    assert ck.load_training_state(tmp_path / "run")["state"]["step"] == 2


def test_every_rename_is_made_durable_before_the_old_checkpoint_goes(tmp_path, monkeypatch):
    trainer = Trainer(toy_config(), data=toy_data(), progress=False)
    trainer.fit(steps=2)
    trainer.save(tmp_path / "run")
    trainer.fit(steps=4)
    events = []
    real_replace, real_fsync, real_rmtree = os.replace, atomic.fsync_path, atomic.shutil.rmtree
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b)))
    monkeypatch.setattr(atomic, "fsync_path", lambda p: (events.append(("fsync", Path(p).name)), real_fsync(p)))
    monkeypatch.setattr(atomic.shutil, "rmtree",
                        lambda p, **kw: (events.append(("rmtree", Path(p).name)), real_rmtree(p, **kw)))
    trainer.save(tmp_path / "run")
    monkeypatch.undo()
    parent = tmp_path.name
    swap = [i for i, e in enumerate(events) if e == ("replace", "run")]
    assert len(swap) == 1
    after = events[swap[0] + 1:]
    # the folder holding the checkpoint is synced after the new one moves in, and before the old one is deleted
    assert after[0] == ("fsync", parent) and after[1][0] == "rmtree" and after[1][1].startswith(".run.old-")
    # the old checkpoint was set aside durably too, and every file rename inside was followed by a sync
    aside = [i for i, e in enumerate(events) if e[0] == "replace" and e[1].startswith(".run.old-")]
    assert aside and events[aside[0] + 1] == ("fsync", parent)
    for i, e in enumerate(events):
        if e[0] == "replace" and e[1].endswith((".json", ".safetensors")):
            assert events[i + 1][0] == "fsync", events[i: i + 2]
    assert ck.load_training_state(tmp_path / "run")["state"]["step"] == 4


def test_swap_interrupted_between_renames_is_recovered(tmp_path):
    trainer = Trainer(toy_config(), data=toy_data(), progress=False)
    trainer.fit(steps=2)
    trainer.save(tmp_path / "run")
    os.replace(tmp_path / "run", tmp_path / ".run.old-00000000000000000001")  # the crash window of the swap
    assert ck.load_training_state(tmp_path / "run")["state"]["step"] == 2
    assert (tmp_path / "run").is_dir()


@pytest.mark.parametrize("damage", ["missing-dir", "no-config", "bad-json", "truncated-model", "not-ddpm", "a-file"])
def test_unusable_training_checkpoints(tmp_path, damage):
    trainer = Trainer(toy_config(), data=toy_data(), progress=False)
    trainer.fit(steps=1)
    run = tmp_path / "run"
    trainer.save(run)
    if damage == "missing-dir":
        run = tmp_path / "elsewhere"
    elif damage == "no-config":
        (run / "config.json").unlink()
    elif damage == "bad-json":
        (run / "state.json").write_text('{"step": 1, "hist')
    elif damage == "truncated-model":
        data = (run / "model.safetensors").read_bytes()
        (run / "model.safetensors").write_bytes(data[:-10])
    elif damage == "not-ddpm":
        (run / "config.json").write_text(json.dumps({"hello": 1}))
    else:
        run = tmp_path / "file"
        run.write_text("x")
    with pytest.raises(CheckpointError) as err:
        ck.load_training_state(run)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(CheckpointError):
        cache.load_model(run, ema=False)


def test_resume_refuses_another_configuration(tmp_path):
    trainer = Trainer(toy_config(), data=toy_data(), progress=False)
    trainer.fit(steps=1)
    trainer.save(tmp_path / "run")
    other = Trainer(toy_config(lr=5e-4), data=toy_data(), progress=False)
    with pytest.raises(CheckpointError, match=r"another configuration \(lr: 0.001 in file, 0.0005 wanted\)"):
        other.load(tmp_path / "run")
    longer = Trainer(toy_config(steps=50, checkpoint_every=7), data=toy_data(), progress=False)
    longer.load(tmp_path / "run")  # more steps or other checkpoint intervals are fine
    assert longer.step == 1


# ---------------------------------------------------------------------------------------------------------
# load_or_train


def test_load_or_train_trains_once_then_reuses(tmp_path, monkeypatch):
    import ddpm.train as train_mod

    config = toy_config(dataset="moons", steps=5)
    first = cache.load_or_train(config, cache_dir=tmp_path, progress=False)
    digest = config_hash(config.to_dict())
    assert first.path == tmp_path / f"tiny-toy-{digest}"
    assert first.info["checkpoint_hash"] == digest and first.info["steps"] == 5
    assert first.info["preset"] == "tiny-toy" and first.info["profile"] in ("cpu", "gpu")
    assert first.info["wall_time_s"] > 0 and "cpu" in first.info["device"]
    assert len(first.history["loss"]) == 5
    assert not first.model.training and not first.raw_model.training
    assert first.schedule.T == 50

    def no_training(self, steps=None):
        raise AssertionError("a cached model must not be trained again")

    monkeypatch.setattr(train_mod.Trainer, "fit", no_training)
    again = cache.load_or_train(config.to_dict(), cache_dir=tmp_path)
    for k, v in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)
    assert again.history == first.history and again.info["wall_time_s"] == first.info["wall_time_s"]
    monkeypatch.undo()

    # another number of steps is another model
    shorter = cache.load_or_train(config, steps=3, cache_dir=tmp_path, progress=False)
    assert shorter.info["steps"] == 3 and shorter.path != first.path
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        cache.load_or_train(config, steps=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        cache.load_or_train("nope", cache_dir=tmp_path)


def test_load_or_train_resumes_an_interrupted_run(tmp_path):
    config = toy_config(steps=6)
    reference = Trainer(config, progress=False).fit()
    digest = config_hash(config.to_dict())
    partial = Trainer(config, out_dir=tmp_path / f"tiny-toy-{digest}", progress=False)
    partial.fit(steps=4)  # as if Ctrl-C had stopped it at step 4
    result = cache.load_or_train(config, cache_dir=tmp_path, progress=False)
    assert result.info["steps"] == 6
    for k, v in reference.ema.state_dict().items():
        assert torch.equal(result.model.state_dict()[k], v)


def test_load_or_train_leaves_the_global_random_state_alone(tmp_path):
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    cache.load_or_train(toy_config(steps=2), cache_dir=tmp_path, progress=False)  # trains
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(42)
    cache.load_or_train(toy_config(steps=2), cache_dir=tmp_path, progress=False)  # cached
    assert torch.equal(torch.rand(3), expected)


def test_load_or_train_replaces_a_corrupt_cache_entry(tmp_path, capsys):
    config = toy_config(steps=2)
    first = cache.load_or_train(config, cache_dir=tmp_path, progress=False)
    assert "trains this model again" not in capsys.readouterr().err
    (first.path / "ema.safetensors").write_bytes(b"\x00" * 10)
    again = cache.load_or_train(config, cache_dir=tmp_path, progress=False)
    err = capsys.readouterr().err.strip().splitlines()  # one line says why the notebook trains again
    assert len(err) == 1 and "ema.safetensors is truncated or corrupt" in err[0]
    assert err[0].endswith("the model cache trains this model again")
    for k, v in first.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)  # retrained, with the same seed: the same weights
    load_weights(again.path / "ema.safetensors")  # and the file is whole again


def test_preview_samples_survive_the_cache_and_a_resume(tmp_path):
    config = toy_config(steps=6, preview_every=2)
    first = cache.load_or_train(config, cache_dir=tmp_path, progress=False)
    assert [step for step, _ in first.previews] == [2, 4, 6]
    assert all(images.shape == (16, 2) for _, images in first.previews)
    again = cache.load_or_train(config, cache_dir=tmp_path, progress=False)  # from the cache
    assert [step for step, _ in again.previews] == [2, 4, 6]
    for (_, a), (_, b) in zip(first.previews, again.previews):
        assert torch.equal(a, b)
    # an interrupted run keeps the previews it had drawn
    digest = config_hash(config.to_dict())
    directory = tmp_path / "resume" / f"tiny-toy-{digest}"
    Trainer(config, out_dir=directory, progress=False).fit(steps=4)
    resumed = cache.load_or_train(config, cache_dir=tmp_path / "resume", progress=False)
    assert [step for step, _ in resumed.previews] == [2, 4, 6]
    assert torch.equal(resumed.previews[0][1], first.previews[0][1])


# ---------------------------------------------------------------------------------------------------------
# nothing but a checkpoint is ever replaced; a lock beside each checkpoint; readers during a swap


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_save_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "other").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    (run / "other" / "a.txt").write_text("also mine")
    trainer = Trainer(toy_config(steps=4, checkpoint_every=2), out_dir=run, data=toy_data(), progress=False)
    with pytest.raises(CheckpointError, match="is a folder that is not a ddpm checkpoint") as err:
        trainer.fit()  # the first checkpoint is refused, as is any direct save
    assert "\n" not in str(err.value) and str(err.value).endswith("choose an empty or new folder")
    with pytest.raises(CheckpointError, match="choose an empty or new folder"):
        trainer.save()
    assert (run / "notes.txt").read_text() == "mine" and (run / "other" / "a.txt").read_text() == "also mine"
    assert _siblings(run) == ["notes.txt", "other"] and _siblings(tmp_path) == ["run"]  # nothing written beside it

    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        trainer.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    (run / "config.json").write_text(json.dumps({"format": "something else"}))  # a config.json, but not ours
    with pytest.raises(CheckpointError, match="not a ddpm checkpoint"):
        trainer.save(run)
    assert not ck.is_checkpoint(run) and not ck.is_checkpoint(tmp_path / "file")

    (tmp_path / "empty").mkdir()  # an empty folder, or an earlier checkpoint, is what a save may replace
    trainer.save(tmp_path / "empty")
    assert ck.is_checkpoint(tmp_path / "empty") and ck.load_training_state(tmp_path / "empty")["state"]["step"] == 2
    trainer.out_dir = tmp_path / "empty"
    trainer.fit(steps=3)  # and replaces its own checkpoint at the end
    assert ck.load_training_state(tmp_path / "empty")["state"]["step"] == 3


def test_a_failed_final_rename_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(toy_config(), data=toy_data(), progress=False)
    trainer.fit(steps=2)
    trainer.save(tmp_path / "run")
    trainer.fit(steps=4)
    real_replace = os.replace

    def refuse_the_move_in(src, dst):
        if Path(dst).name == "run" and ".tmp-" in Path(src).name:
            raise OSError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", refuse_the_move_in)
    with pytest.raises(CheckpointError, match=r"could not move the new checkpoint .* \(Permission denied\); it is "
                                              r"kept, complete, in") as err:
        trainer.save(tmp_path / "run")
    monkeypatch.undo()
    kept = Path(str(err.value).split("complete, in ")[1].split(": move it")[0])
    assert kept.parent == tmp_path and kept.name.startswith(".run.tmp-")
    assert ck.load_training_state(kept)["state"]["step"] == 4  # the new checkpoint, whole
    assert ck.load_training_state(tmp_path / "run")["state"]["step"] == 2  # the old one, back in its place
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_a_reader_waits_out_a_swap_instead_of_undoing_it(tmp_path):
    import threading

    from ddpm.locking import holding_lock

    trainer = Trainer(toy_config(), data=toy_data(), progress=False)
    trainer.fit(steps=2)
    trainer.save(tmp_path / "run")
    trainer.fit(steps=3)
    trainer.save(tmp_path / "next")
    aside = tmp_path / ".run.old-00000000000000000001"
    locked, finish = threading.Event(), threading.Event()

    def writer():  # a writer caught between its two renames, holding the lock (threads exclude each other too)
        with holding_lock(tmp_path / "run"):
            os.replace(tmp_path / "run", aside)
            locked.set()
            finish.wait(10)
            os.replace(tmp_path / "next", tmp_path / "run")
            ck.shutil.rmtree(aside)

    thread = threading.Thread(target=writer)
    thread.start()
    assert locked.wait(10)
    timer = threading.Timer(0.3, finish.set)
    timer.start()
    try:
        header = ck.read_checkpoint_header(tmp_path / "run")  # waits for the new checkpoint
        state = ck.load_training_state(tmp_path / "run", restore_rng=False)
    finally:
        finish.set()
        thread.join()
    assert header["format"] == "ddpm-checkpoint" and state["state"]["step"] == 3
    assert _siblings(tmp_path) == ["next.lock", "run", "run.lock"]  # the aside copy was not moved back


SWAPS = 15


def _save_filled(run, step: int) -> None:
    """A checkpoint of the toy network at ``step`` whose every weight is ``step`` (no optimiser: quick to start)."""
    from ddpm.train import build_model

    config = toy_config()
    net = build_model(config)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(float(step))
    ck.save_training_state(run, config=config.to_dict(), model=net.state_dict(), ema=net.state_dict(),
                           optimizer={"state": {}, "param_groups": []}, state={"step": step})


def _swap_many_times(run: str, saves: int, done) -> None:
    torch.set_num_threads(1)
    for step in range(1, saves + 1):
        _save_filled(run, step)
    done.set()


def test_a_reader_during_swaps_never_crashes_and_never_mixes_two_checkpoints(tmp_path):
    import multiprocessing

    run = tmp_path / "run"
    _save_filled(run, 0)
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Event()
    writer = ctx.Process(target=_swap_many_times, args=(str(run), SWAPS, done))
    writer.start()
    steps = []
    try:
        while not done.is_set() and writer.is_alive():
            header = ck.read_checkpoint_header(run)
            model, config, state = cache.load_model(run)
            values = torch.cat([p.detach().flatten() for p in model.parameters()])
            assert torch.all(values == state["step"]), "the weights of one checkpoint, the state of another"
            assert header["config"] == config.to_dict()
            steps.append(state["step"])
            time.sleep(0.002)  # leave the writer some of the CPU
    finally:
        writer.join(60)
    assert writer.exitcode == 0
    assert steps == sorted(steps) and len(set(steps)) > 1, steps  # the reader saw the checkpoints change
    assert ck.load_training_state(run)["state"]["step"] == SWAPS
    assert _siblings(tmp_path) == ["run", "run.lock"]  # no .old-* or .tmp-* folder left


RACE_STEPS = 40


def _race_config() -> TrainConfig:
    return toy_config(steps=RACE_STEPS, checkpoint_every=20)


def _load_or_train_at_once(cache_dir: str, barrier) -> dict:
    """load_or_train of the race's model as soon as the other process is ready too: its info and EMA weights."""
    torch.set_num_threads(1)
    barrier.wait()
    trained = cache.load_or_train(_race_config(), cache_dir=cache_dir, progress=False)
    return {"info": trained.info, "weights": trained.model.state_dict()}


def _race_child(cache_dir: str, out: str, barrier) -> None:
    result = _load_or_train_at_once(cache_dir, barrier)
    info = result["info"]
    save_weights(out, result["weights"], {k: info[k] for k in ("cached", "checkpoint_hash", "steps")})


def test_two_processes_asking_for_one_model_train_it_once(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # a second interpreter, as a second notebook would be
    barrier = ctx.Barrier(2)
    child = ctx.Process(target=_race_child, args=(str(tmp_path / "cache"), str(tmp_path / "child.safetensors"), barrier))
    child.start()
    try:
        mine = _load_or_train_at_once(str(tmp_path / "cache"), barrier)
    finally:
        child.join(120)
    assert child.exitcode == 0
    weights, theirs = load_weights(tmp_path / "child.safetensors")
    assert sorted([mine["info"]["cached"], theirs["cached"]]) == [False, True]  # one trained, the other loaded
    digest = config_hash(_race_config().to_dict())
    assert mine["info"]["checkpoint_hash"] == theirs["checkpoint_hash"] == digest
    assert mine["info"]["steps"] == theirs["steps"] == RACE_STEPS
    for k, v in weights.items():
        assert torch.equal(mine["weights"][k], v), k
    entry = f"tiny-toy-{digest}"
    assert _siblings(tmp_path / "cache") == [entry, f"{entry}.lock"]  # no stray .old-* or .tmp-* folders
    assert ck.load_training_state(tmp_path / "cache" / entry)["state"]["step"] == RACE_STEPS
