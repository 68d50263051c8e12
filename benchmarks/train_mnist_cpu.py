"""Benchmark: train the ``mnist-cpu`` preset, then draw 1,000 digits with DDIM in 50 steps.

    python benchmarks/train_mnist_cpu.py [--steps N] [--n 1000] [--sampling-steps 50] [--guidance-scale W]

Training goes through ``load_or_train``, so the checkpoint lands in the model cache that the book reuses
(a second run only samples and reports the recorded training time). Prints the training wall time, training
images per second, sampling images per second and the samples' quality in the project's metric (the metric
classifier's accuracy on the requested classes, FID to the training digits, spread of the mean brightness), and
writes into ``benchmarks/results/``:

* ``mnist_cpu_grid.png``: the first 100 samples, one class per column (labels cycle 0..9);
* ``train_mnist_cpu.json``: the numbers and their provenance.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ddpm.checkpoint import load_or_train
from ddpm.metrics import (classifier_outputs, conditional_accuracy, fid_with_error, load_or_train_mnist_classifier,
                          real_digits)
from ddpm.plotting import save_png_grid, to_uint8
from ddpm.samplers import sample_in_batches

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--n", type=int, default=1000, help="samples to draw (default 1000)")
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=0.0, help="classifier-free guidance w (default 0)")
    parser.add_argument("--batch-size", type=int, default=250, help="samples per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--npz", action="store_true", help="also save the samples as mnist_cpu_samples.npz")
    args = parser.parse_args()

    start = time.perf_counter()
    trained = load_or_train("mnist-cpu", steps=args.steps, progress=None)
    fresh = time.perf_counter() - start > 0.5 * trained.info["wall_time_s"]
    info, config = trained.info, trained.config
    train_images_per_s = info["steps"] * config.batch_size / info["wall_time_s"]

    model, schedule = trained.model, trained.schedule
    guidance = None
    if args.guidance_scale > 0:
        from ddpm.guidance import ClassifierFreeGuidance

        guidance = ClassifierFreeGuidance(args.guidance_scale)
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(args.n) % 10
    start = time.perf_counter()
    with torch.inference_mode():
        samples = sample_in_batches(model, schedule, (1, 28, 28), args.n, batch_size=args.batch_size, y=labels,
                                    sampler="ddim", steps=args.sampling_steps, generator=generator,
                                    guidance=guidance)
    sampling_s = time.perf_counter() - start

    # How digit-like the samples are, in the project's metric (ddpm.metrics): the metric classifier's accuracy on
    # the requested labels, the FID to the training digits, and the spread of the images' mean brightness (foggy
    # backgrounds show up as a far wider spread than the data's).
    classifier, _ = load_or_train_mnist_classifier()
    out = classifier_outputs(classifier, samples)
    accuracy = conditional_accuracy(out["probs"], labels)
    real = real_digits("train")[0]
    fid = fid_with_error(out["features"], classifier_outputs(classifier, real)["features"])
    brightness_std = float(samples.mean((1, 2, 3)).std())
    data_brightness_std = float(real.mean((1, 2, 3)).std())

    RESULTS.mkdir(parents=True, exist_ok=True)
    save_png_grid(samples[:100], RESULTS / "mnist_cpu_grid.png", nrow=10)
    if args.npz:
        import numpy as np

        np.savez(RESULTS / "mnist_cpu_samples.npz", arr_0=to_uint8(samples), arr_1=labels.numpy())

    report = {
        "preset": info["preset"],
        "parameters": info["parameters"],
        "steps": info["steps"],
        "batch_size": config.batch_size,
        "training_wall_time_s": round(info["wall_time_s"], 1),
        "training_images_per_s": round(train_images_per_s, 1),
        "trained_in_this_run": fresh,
        "samples": args.n,
        "sampler": f"DDIM, {args.sampling_steps} steps, eta 0",
        "guidance_scale": args.guidance_scale,
        "sampling_wall_time_s": round(sampling_s, 1),
        "sampling_images_per_s": round(args.n / sampling_s, 2),
        "classifier_accuracy": round(accuracy, 3),
        "fid": round(fid["fid"], 1),
        "fid_std": round(fid["std"], 1),
        "brightness_std": round(brightness_std, 3),
        "data_brightness_std": round(data_brightness_std, 3),
        "device": info["device"],
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "checkpoint_hash": info["checkpoint_hash"],
        "torch": torch.__version__,
    }
    (RESULTS / "train_mnist_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"mnist-cpu: {info['parameters']:,} parameters, {info['steps']} steps of batch {config.batch_size}")
    print(f"training: {info['wall_time_s'] / 60:.1f} min, {train_images_per_s:.0f} images/s on {info['device']}"
          + ("" if fresh else " (recorded when the cached checkpoint was trained)"))
    print(f"sampling: {args.n} digits, DDIM {args.sampling_steps} steps in {sampling_s:.0f} s, "
          f"{args.n / sampling_s:.1f} images/s")
    print(f"quality: the metric classifier reads {accuracy:.1%} of the digits as their requested class; "
          f"FID {fid['fid']:.0f} +- {fid['std']:.0f} to the training digits; mean-brightness spread "
          f"{brightness_std:.3f} (training digits {data_brightness_std:.3f})")
    print(f"grid: {RESULTS / 'mnist_cpu_grid.png'}; checkpoint {info['checkpoint_hash']}")


if __name__ == "__main__":
    main()
