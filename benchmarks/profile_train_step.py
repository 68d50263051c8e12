"""Benchmark: where the time of one ``mnist-cpu`` training step goes.

    python benchmarks/profile_train_step.py [--preset mnist-cpu] [--steps 30] [--repeats 3] [--threads N]

Times, in one process and taking turns within each repeat, a ladder of steps that each add one piece of the
``Trainer``'s work to the one before:

0. ``bare, fp32 NCHW``: the network's forward on a fixed batch, an MSE loss, backward and an AdamW step, in fp32
   with the usual memory layout;
1. ``bare, fp32 channels-last``: the same with channels-last tensors;
2. ``bare``: the same in the precision and layout of the ``Trainer``: with ``cpu_bf16`` on a CPU with native bf16
   (``mnist-cpu``), the step under bf16 autocast in the usual layout, else fp32 channels-last as in rung 1;
3. ``+ loss``: the preset's objective through ``ddpm.losses.training_losses`` (L_hybrid: the bound term too);
4. ``+ clip``: gradient clipping;
5. ``+ ema``: the EMA update;
6. ``+ data``: the epoch shuffle, label dropout, t and noise from per-step generators, the logged statistics;
7. ``Trainer.train_step``: the real thing.

Each rung prints its median milliseconds per step, images/s and its share over the rung below, so the
overhead of every piece is read off directly. Writes ``benchmarks/results/train_step_profile.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ddpm.losses import training_losses
from ddpm.presets import get_preset
from ddpm.train import Trainer, build_model, ema_decay_at, update_ema

RESULTS = Path(__file__).resolve().parent / "results"


def _rungs(config, x, y):
    """The ladder of step functions; each closes over its own network and optimiser (same initial weights)."""
    trainer = Trainer(config, progress=False, data=(x, y), device="cpu")  # the rungs' networks are on the CPU too
    schedule, T, batch = trainer.schedule, config.T, config.batch_size
    fixed_x, fixed_y = x[:batch], y[:batch] if y is not None else None
    g = torch.Generator().manual_seed(0)
    fixed_t = torch.randint(0, T, (batch,), generator=g)
    fixed_noise = torch.randn(fixed_x.shape, generator=g)

    def make(level, channels_last=trainer.channels_last, bf16=trainer.use_bf16):
        torch.manual_seed(config.seed)
        model = build_model(config)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
        counter = {"step": 0}

        def step():
            model.train()
            if level >= 5:  # the data path as the Trainer takes it
                idx = trainer.batch_indices(counter["step"])
                x0, yb = x[idx], y[idx] if y is not None else None
                gen = torch.Generator().manual_seed(counter["step"])
                if yb is not None and config.label_dropout > 0:
                    drop = torch.rand(yb.shape, generator=gen) < config.label_dropout
                    yb = torch.where(drop, torch.full_like(yb, 10), yb)
                t, weights = trainer.t_sampler.sample(batch, generator=gen)
                noise = torch.randn(x0.shape, generator=gen)
            else:
                x0, yb, t, noise, weights = fixed_x, fixed_y, fixed_t, fixed_noise, None
            if channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                if level >= 2:
                    terms = training_losses(model, schedule, x0, t, y=yb, noise=noise, loss_type=config.loss_type,
                                            var_type=trainer.var_type, snr_gamma=config.snr_gamma)
                    loss = terms["loss"].mean() if weights is None else (terms["loss"] * weights).mean()
                else:
                    out = model(schedule.q_sample(x0, t, noise), t, yb)
                    loss = ((out[:, : x0.shape[1]].float() - noise) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if level >= 3:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or 1.0)
            opt.step()
            if level >= 4:
                update_ema(ema, model, ema_decay_at(counter["step"], config.ema_decay))
            if level >= 5:
                float(loss.detach())  # the logged statistics read the loss back
            counter["step"] += 1

        return step

    names = ["bare", "+ loss", "+ clip", "+ ema", "+ data"]
    rungs = {"bare, fp32 NCHW": make(1, channels_last=False, bf16=False),
             "bare, fp32 channels-last": make(1, channels_last=True, bf16=False)}
    rungs.update({name: make(level) for level, name in enumerate(names, start=1)})
    rungs["Trainer.train_step"] = trainer.train_step
    return rungs, trainer.use_bf16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mnist-cpu")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per rung and repeat (default 30)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = get_preset(args.preset, preview_every=0, checkpoint_every=0)
    from ddpm.data import load_dataset

    x, y = load_dataset(config.dataset, split="train")
    rungs, rungs_bf16 = _rungs(config, x, y)
    for fn in rungs.values():  # warm-up
        for _ in range(3):
            fn()
    times = {name: [] for name in rungs}
    for r in range(args.repeats):
        order = list(rungs)[r % len(rungs):] + list(rungs)[: r % len(rungs)]
        for name in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                rungs[name]()
            times[name].append((time.perf_counter() - start) / args.steps)

    batch = config.batch_size
    print(f"{args.preset}: batch {batch}, {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"{'rung':<26} {'ms/step':>8} {'images/s':>9} {'vs rung above':>14}")
    report, previous = [], None
    for name, values in times.items():
        ms = 1000 * statistics.median(values)
        extra = "" if previous is None else f"{ms / previous - 1:+.1%}"
        print(f"{name:<26} {ms:>8.1f} {batch / ms * 1000:>9.0f} {extra:>14}")
        report.append({"rung": name, "ms_per_step": round(ms, 2), "images_per_s": round(batch / ms * 1000, 1),
                       "all_ms": [round(1000 * v, 2) for v in values]})
        previous = ms
    nchw, last, bare, real = (report[i]["ms_per_step"] for i in (0, 1, 2, -1))
    fp32 = min(nchw, last)
    print(f"Trainer.train_step / bare step: {real / bare:.2f}; fp32 channels-last / NCHW step time: {last / nchw:.2f}; "
          f"the Trainer's bare step ({'bf16' if rungs_bf16 else 'fp32'}) / the faster fp32 one: {bare / fp32:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_step_profile.json").write_text(json.dumps(
        {"preset": args.preset, "batch_size": batch, "threads": torch.get_num_threads(),
         "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "rungs": report,
         "bf16": rungs_bf16, "trainer_over_bare": round(real / bare, 3),
         "channels_last_over_nchw": round(last / nchw, 3), "bare_over_fp32": round(bare / fp32, 3)},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
