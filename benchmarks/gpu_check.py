"""The GPU check: one script that a machine with CUDA runs in a few minutes, recording what it found.

    python benchmarks/gpu_check.py [--device cuda] [--quick]

Three parts, each timed, each allowed to fail without stopping the others:

1. ``tests``: ``tests/test_device.py`` on the device (bf16 training steps, channels-last, fused AdamW,
   ``torch.compile`` against eager, guided and unguided sampling, save and resume);
2. ``profile``: ``benchmarks/gpu_profile.py`` on both GPU presets, every speed option on and off;
3. ``mnist-gpu``: a short run of the ``mnist-gpu`` preset on the offline ``mnist5k`` digits (the GPU machine
   has no network), then a grid of 100 DDIM-50 samples, one class per column.

It writes ``benchmarks/results/gpu_check_<device>.json`` (and the profile's ``gpu_<device>.json`` and a
``gpu_check_<device>_grid.png``), which the book's benchmark page reads. Without CUDA it runs on the CPU with
``--quick`` sizes, which only shows that the script works; the test suite does exactly that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def run_tests(device: str, quick: bool) -> dict:
    env = {**os.environ, "DDPM_TEST_DEVICE": device, "DDPM_TEST_COMPILE": "0" if quick else "1",
           "DDPM_PROGRESS": "0"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_device.py")],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    summary = re.findall(r"(\d+) (passed|failed|skipped|error)", out.stdout)
    return {"ok": out.returncode == 0, "seconds": round(time.perf_counter() - start, 1),
            "counts": {kind: int(n) for n, kind in summary}, "tail": _tail(out.stdout + out.stderr)}


def run_profile(device: str, quick: bool, out_file: Path) -> dict:
    steps, warmup = ("3", "1") if quick else ("30", "5")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "--device", device, "--steps", steps,
           "--warmup", warmup, "--out", str(out_file)]
    if quick:
        cmd += ["--presets", "mnist-gpu", "--variants", "default,no-bf16", "--batch-size", "8"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DDPM_PROGRESS": "0"})
    return {"ok": out.returncode == 0, "seconds": round(time.perf_counter() - start, 1), "file": out_file.name,
            "tail": _tail(out.stdout + out.stderr)}


def run_mnist_gpu(device: str, quick: bool, grid_file: Path) -> dict:
    from ddpm.data import load_dataset
    from ddpm.plotting import save_png_grid
    from ddpm.presets import get_preset
    from ddpm.samplers import sample_in_batches
    from ddpm.train import Trainer

    steps = 4 if quick else 1500
    changes = {"dataset": "mnist5k", "steps": steps, "checkpoint_every": 0, "preview_every": 0}
    if quick:
        changes["batch_size"] = 8
        changes["model"] = {**get_preset("mnist-gpu").model, "model_channels": 16, "num_res_blocks": 1}
    config = get_preset("mnist-gpu", **changes)
    start = time.perf_counter()
    trainer = Trainer(config, data=load_dataset("mnist5k", split="train"), device=device, progress=False).fit()
    train_s = time.perf_counter() - start
    n = 20 if quick else 100
    labels = torch.arange(n, device=device) % 10
    start = time.perf_counter()
    with torch.inference_mode():
        x = sample_in_batches(trainer.ema, trainer.schedule, (1, 28, 28), n, batch_size=n, y=labels, sampler="ddim",
                              steps=5 if quick else 50, generator=torch.Generator(device).manual_seed(0), device=device)
    sample_s = time.perf_counter() - start
    save_png_grid(x, grid_file, nrow=10)
    losses = trainer.history["loss"]
    return {"ok": all(v == v for v in losses), "steps": steps, "batch_size": config.batch_size,
            "train_seconds": round(train_s, 1), "images_per_s": round(steps * config.batch_size / train_s, 1),
            "sample_seconds": round(sample_s, 2), "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "grid": grid_file.name, "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (what the CPU test runs)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "quick": args.quick}
    start = time.perf_counter()
    for part, fn in (("tests", lambda: run_tests(args.device, args.quick)),
                     ("profile", lambda: run_profile(args.device, args.quick, args.out_dir / f"gpu_{slug}.json")),
                     ("mnist-gpu", lambda: run_mnist_gpu(args.device, args.quick,
                                                         args.out_dir / f"gpu_check_{slug}_grid.png"))):
        try:
            report[part] = fn()
        except Exception as exc:  # one broken part must not hide the others' results
            report[part] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(f"{part}: {'ok' if report[part]['ok'] else 'FAILED'} "
              + json.dumps({k: v for k, v in report[part].items() if k not in ("tail", "ok")}), flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    path = args.out_dir / f"gpu_check_{slug}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"all parts in {report['seconds']:.0f} s; wrote {path}")
    sys.exit(0 if all(report[p]["ok"] for p in ("tests", "profile", "mnist-gpu")) else 1)


if __name__ == "__main__":
    main()
