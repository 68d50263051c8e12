"""Benchmark: the GPU presets' training speed and peak memory, with and without each speed option.

    python benchmarks/gpu_profile.py [--presets mnist-gpu,cifar10-gpu] [--steps 50] [--warmup 10]

For each preset it builds the project's ``Trainer`` (the real training step: L_hybrid, label dropout, EMA,
gradient clipping) on random data of the dataset's shape, so that no download is needed, and times ``--steps``
optimiser steps after ``--warmup`` steps, in these variants:

=================  ====================================================================================
``default``        what the preset does on a GPU: bf16 autocast, channels-last, fused AdamW, SDPA attention
``no-bf16``        float32 instead of bf16 autocast
``no-channels-last``  NCHW tensors
``no-fused-adamw`` the multi-tensor (foreach) AdamW instead of the fused kernel
``math-attention`` scaled-dot-product attention restricted to the plain math kernel
``compile``        the default plus ``torch.compile`` (compilation time reported apart)
=================  ====================================================================================

It prints images per second, the speed relative to ``default``, and the peak memory
(``torch.cuda.max_memory_allocated``), and writes ``benchmarks/results/gpu_<device name>.json``. On a machine without
CUDA it runs on the CPU (the CUDA-only options then change nothing), which only checks that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from ddpm.data import dataset_info
from ddpm.presets import get_preset
from ddpm.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("default", "no-bf16", "no-channels-last", "no-fused-adamw", "math-attention", "compile")


def synthetic_data(dataset: str, n: int, num_classes: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images in [-1, 1] and labels with the dataset's shape: throughput does not depend on the pixels."""
    info = dataset_info(dataset)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *info.shape, generator=gen) * 2 - 1
    y = torch.randint(0, num_classes or info.num_classes, (n,), generator=gen)
    return x, y


def attention_context(variant: str):
    if variant != "math-attention":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_variant(preset: str, variant: str, *, steps: int, warmup: int, batch_size: int | None, device: torch.device) -> dict:
    """Images per second and peak memory of ``steps`` training steps of one preset in one variant."""
    config = get_preset(preset)
    changes = {"checkpoint_every": 0, "preview_every": 0}
    if batch_size:
        changes["batch_size"] = batch_size
    if variant == "no-bf16":
        changes["bf16"] = False
    if variant == "no-channels-last":
        changes["channels_last"] = False
    if variant == "compile":
        changes["compile"] = True
    config = dataclasses.replace(config, **changes)
    data = synthetic_data(config.dataset, max(4 * config.batch_size, 512), config.num_classes)
    trainer = Trainer(config, device=device, progress=False, data=data)
    if variant == "no-fused-adamw":
        trainer.optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=config.lr,
                                              weight_decay=config.weight_decay, foreach=True)
    with attention_context(variant):
        _sync(device)
        start = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step()
        _sync(device)
        warmup_s = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        _sync(device)
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"images_per_s": steps * config.batch_size / seconds, "seconds": seconds, "warmup_s": warmup_s,
            "steps": steps, "batch_size": config.batch_size, "peak_memory_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="mnist-gpu,cifar10-gpu", help="comma-separated presets")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the presets' batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="results file (default results/gpu_<device>.json)")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    presets = [p for p in args.presets.split(",") if p]
    try:
        for p in presets:
            get_preset(p)
    except ValueError as err:
        parser.error(str(err))

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}")
    results: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                     "settings": {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size},
                     "presets": {}}
    for preset in presets:
        rows = {}
        print(f"\n{preset}\n  {'variant':18s} {'img/s':>9s} {'vs default':>10s} {'peak MiB':>9s} {'warm-up s':>9s}")
        for variant in variants:
            row = run_variant(preset, variant, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                              device=device)
            rows[variant] = row
            base = rows.get("default", row)["images_per_s"]
            peak = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
            print(f"  {variant:18s} {row['images_per_s']:9.1f} {row['images_per_s'] / base:10.2f} {peak:>9s} "
                  f"{row['warmup_s']:9.1f}", flush=True)
        results["presets"][preset] = rows
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or RESULTS / f"gpu_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
