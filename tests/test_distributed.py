"""Two processes on the CPU with gloo: DistributedDataParallel keeps the ranks identical, shards the data,
and only rank 0 writes checkpoints (the same code runs under ``torchrun --nproc_per_node=N`` on GPUs)."""

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ddpm.checkpoint import load_training_state, load_weights, save_weights
from ddpm.train import TrainConfig

STEPS = 4


def _config() -> TrainConfig:
    return TrainConfig(name="ddp-toy", model_type="mlp", model={"dim": 2, "hidden": 16, "num_layers": 1},
                       dataset="moons", T=50, batch_size=16, steps=STEPS, lr=1e-2, ema_decay=0.5,
                       checkpoint_every=2, log_every=2)


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    import ddpm.checkpoint as ck
    from ddpm.data import load_dataset
    from ddpm.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    saves = []
    real_save = ck.save_training_state

    def spy(directory, **kwargs):  # record which rank writes checkpoints
        saves.append(kwargs["state"]["step"])
        return real_save(directory, **kwargs)

    ck.save_training_state = spy
    seen = []
    trainer = Trainer(_config(), out_dir=f"{folder}/run", data=load_dataset("moons", n=64, seed=1),
                      progress=False, callbacks=[lambda tr, m: seen.append(tr.last_batch_indices.tolist())])
    trainer.fit()
    save_weights(f"{folder}/rank{rank}.safetensors",
                 {**{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
                  **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}}, {"rank": rank})
    with open(f"{folder}/rank{rank}.json", "w") as f:
        json.dump({"batches": seen, "saves": saves, "world": trainer.world_size, "local_batch": trainer.local_batch,
                   "loss": trainer.history["loss"]}, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo")
def test_two_processes_stay_identical_shard_data_and_only_rank0_writes(tmp_path):
    # fork: the children reuse the imported modules instead of importing torch again
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2 and r0["local_batch"] == r1["local_batch"] == 8

    w0, _ = load_weights(tmp_path / "rank0.safetensors")
    w1, _ = load_weights(tmp_path / "rank1.safetensors")
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # gradients were averaged: identical weights and EMA
    assert r0["loss"] == r1["loss"]  # the logged loss is the mean over both ranks

    # different data on each rank, and together a without-replacement pass over the shuffled set
    for b0, b1 in zip(r0["batches"], r1["batches"]):
        assert len(b0) == len(b1) == 8 and not set(b0) & set(b1)
    epoch = [i for b in r0["batches"] + r1["batches"] for i in b]
    assert len(set(epoch)) == len(epoch) == 2 * STEPS * 8 == 64

    assert r0["saves"] == [2, 4] and r1["saves"] == []  # only rank 0 writes
    state = load_training_state(tmp_path / "run")
    assert state["state"]["step"] == STEPS and state["state"]["world_size"] == 2
    for k, v in state["model"].items():
        assert torch.equal(v, w0[f"model.{k}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.json", "rank0.safetensors", "rank1.json",
                                                          "rank1.safetensors", "run", "run.lock"]


def _interrupted_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Rank 1 alone gets Ctrl-C (a real SIGINT) at the end of step 2; both ranks report where they stopped."""
    import datetime
    import os
    import signal

    from ddpm.data import load_dataset
    from ddpm.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))

    def ctrl_c_on_rank_1(trainer, metrics):
        if rank == 1 and metrics["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    config = _config()
    trainer = Trainer(TrainConfig.from_dict({**config.to_dict(), "steps": 8, "checkpoint_every": 0}),
                      out_dir=f"{folder}/run", data=load_dataset("moons", n=64, seed=1), progress=False,
                      callbacks=[ctrl_c_on_rank_1])
    outcome = "finished"
    try:
        trainer.fit()
    except KeyboardInterrupt:
        outcome = "interrupted"
    with open(f"{folder}/stop{rank}.json", "w") as f:
        json.dump({"outcome": outcome, "step": trainer.step, "saved": trainer.last_checkpoint_step}, f)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed/gloo")
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    # the request of rank 1 reaches rank 0 through the all-reduce of step 3: both stop after step 3 and rank 0 writes
    # the checkpoint of that step (acting on it alone at step 2 would leave rank 0 waiting in the next all-reduce)
    mp.start_processes(_interrupted_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0 = json.loads((tmp_path / "stop0.json").read_text())
    r1 = json.loads((tmp_path / "stop1.json").read_text())
    assert r0["outcome"] == r1["outcome"] == "interrupted"
    assert r0["step"] == r1["step"] == 3
    assert r0["saved"] == 3  # rank 0 wrote the checkpoint of the agreed step; rank 1 skipped it with it
    state = load_training_state(tmp_path / "run")
    assert state["state"]["step"] == 3 and state["state"]["world_size"] == 2
