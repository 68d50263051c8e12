"""Benchmark: training recipes for the ``mnist-cpu`` digit model at the same wall-clock budget.

    python benchmarks/recipe_search.py [--budget 240] [--n 1000] [--sampling-steps 25] [--only NAME ...]

Each candidate is the ``mnist-cpu`` preset with a few fields changed (label dropout, Min-SNR-gamma weighting,
learning rate and its decay, EMA decay, batch size, width, schedule). Every candidate gets the same training
time: a short timed run measures its images/s on this machine, and its number of steps is set so that training
takes ``--budget`` seconds (equal wall clock, and a cosine learning-rate decay knows where it ends). Run it on an
otherwise idle machine; the measured images/s of each candidate is printed so that a disturbed run shows.

Each trained model is scored in the project's metric (``ddpm.metrics``):

* FID of ``--n`` unconditional samples (the null label) to the training digits, with its error bar, against the
  real-data floor at the same n: ``--n`` held-out digits scored the same way;
* the metric classifier's accuracy on ``--n-cond`` conditional samples (w = 0) of the requested class.

Results go to ``benchmarks/results/recipe_search.json`` (one entry per candidate, appended as each finishes, so
an interrupted search keeps what it measured); the book's benchmark page plots them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ddpm.metrics import (classifier_outputs, conditional_accuracy, fid_with_error, heldout_floor,
                          load_or_train_mnist_classifier, real_digits)
from ddpm.presets import get_preset
from ddpm.samplers import sample_in_batches
from ddpm.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "recipe_search.json"

#: name -> (what changes, the fields of the mnist-cpu preset it overrides)
CANDIDATES: dict[str, tuple[str, dict]] = {
    "preset": ("the mnist-cpu preset as it was: label dropout 0.1, lr 1e-3 constant, EMA 0.999", {
        "label_dropout": 0.1, "snr_gamma": None, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.999}),
    "drop0.3": ("label dropout 0.3", {
        "label_dropout": 0.3, "snr_gamma": None, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.999}),
    "drop0.5": ("label dropout 0.5", {
        "label_dropout": 0.5, "snr_gamma": None, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.999}),
    "drop0.3+minsnr5": ("label dropout 0.3, Min-SNR-5", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.999}),
    "drop0.3+minsnr5+cos-lr2e-3": ("label dropout 0.3, Min-SNR-5, lr 2e-3 with cosine decay", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 2e-3, "lr_decay": "cosine", "ema_decay": 0.999}),
    "drop0.3+minsnr5+cos-lr4e-3": ("label dropout 0.3, Min-SNR-5, lr 4e-3 with cosine decay", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 4e-3, "lr_decay": "cosine", "ema_decay": 0.999}),
    "drop0.5+minsnr5+cos-lr2e-3": ("label dropout 0.5, Min-SNR-5, lr 2e-3 with cosine decay", {
        "label_dropout": 0.5, "snr_gamma": 5.0, "lr": 2e-3, "lr_decay": "cosine", "ema_decay": 0.999}),
    # without its warm-up: in a run of a few hundred steps the warm-up never reaches a cap of 0.995
    # (ddpm.optim.ema_warmup_end), so that cap alone would train the same average as the preset's 0.999
    "drop0.3+minsnr5+ema0.995": ("label dropout 0.3, Min-SNR-5, EMA 0.995 without warm-up", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.995,
        "ema_warmup": False}),
    "drop0.3+minsnr5+batch32": ("label dropout 0.3, Min-SNR-5, batch 32 (twice the steps)", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.999,
        "batch_size": 32}),
    "drop0.3+minsnr5+batch128": ("label dropout 0.3, Min-SNR-5, batch 128 (half the steps), lr 1.4e-3", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 1.4e-3, "lr_decay": "constant", "ema_decay": 0.999,
        "batch_size": 128}),
    "drop0.3+minsnr5+cosine-schedule": ("label dropout 0.3, Min-SNR-5, cosine noise schedule", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.999,
        "schedule": "cosine"}),
    "drop0.3+minsnr5+narrow-attn14": ("label dropout 0.3, Min-SNR-5, widths 16/32/64 with attention at 14 and 7", {
        "label_dropout": 0.3, "snr_gamma": 5.0, "lr": 1e-3, "lr_decay": "constant", "ema_decay": 0.999,
        "model": {"channel_mult": [1, 2, 4], "attention_resolutions": [14, 7]}}),
}


def candidate_config(name: str, steps: int | None = None):
    """The TrainConfig of candidate ``name`` (``steps`` overrides the preset's)."""
    _, overrides = CANDIDATES[name]
    overrides = dict(overrides)
    base = get_preset("mnist-cpu")
    if "model" in overrides:
        overrides["model"] = {**base.model, **overrides["model"]}
    if steps is not None:
        overrides["steps"] = steps
    return get_preset("mnist-cpu", **overrides, preview_every=0, checkpoint_every=0)


def measure_images_per_s(config, data, steps: int = 16) -> float:
    """Images/s of ``config``'s training step on this machine, from the lower quartile of ``steps`` single-step
    times after two warm-up steps: a step slowed by another process on the machine does not shorten the budget."""
    trainer = Trainer(config, progress=False, data=data)
    for _ in range(2):
        trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return config.batch_size / sorted(times)[len(times) // 4]


def run_candidate(name: str, budget_s: float, data, scorer, args) -> dict:
    probe = candidate_config(name)
    rate = measure_images_per_s(probe, data)
    steps = max(1, int(budget_s * rate / probe.batch_size))
    config = candidate_config(name, steps=steps)
    trainer = Trainer(config, progress=False, data=data).fit()
    model, schedule = trainer.ema.eval(), trainer.schedule
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        uncond = sample_in_batches(model, schedule, (1, 28, 28), args.n, batch_size=250, sampler="ddim",
                                   steps=args.sampling_steps, generator=gen)
        labels = torch.arange(args.n_cond) % 10
        cond = sample_in_batches(model, schedule, (1, 28, 28), args.n_cond, batch_size=250, y=labels,
                                 sampler="ddim", steps=args.sampling_steps, generator=gen)
    sampling_s = time.perf_counter() - start
    fid = scorer["fid"](uncond)
    accuracy = conditional_accuracy(scorer["probs"](cond), labels)
    return {
        "name": name, "description": CANDIDATES[name][0], "overrides": CANDIDATES[name][1],
        "steps": steps, "batch_size": config.batch_size, "train_s": round(trainer.wall_time, 1),
        "images_per_s": round(steps * config.batch_size / trainer.wall_time, 1), "probe_images_per_s": round(rate, 1),
        "fid": round(fid["fid"], 2), "fid_std": round(fid["std"], 2), "n": args.n,
        "accuracy": round(accuracy, 4), "n_cond": args.n_cond, "sampling_s": round(sampling_s, 1),
        "final_loss": round(sum(trainer.history["loss"][-50:]) / len(trainer.history["loss"][-50:]), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240.0, help="training seconds per candidate (default 240)")
    parser.add_argument("--n", type=int, default=1000, help="unconditional samples per candidate (default 1000)")
    parser.add_argument("--n-cond", type=int, default=500, help="conditional samples per candidate (default 500)")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, help="candidate names (default: all)")
    parser.add_argument("--fresh", action="store_true", help="start a new results file instead of appending")
    args = parser.parse_args()
    names = args.only or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; valid: {', '.join(CANDIDATES)}")

    classifier, _ = load_or_train_mnist_classifier()
    reference = classifier_outputs(classifier, real_digits("train")[0])["features"]
    heldout = classifier_outputs(classifier, real_digits("test")[0])["features"]
    floor = heldout_floor(heldout, reference, args.n)
    scorer = {
        "fid": lambda images: fid_with_error(classifier_outputs(classifier, images)["features"], reference),
        "probs": lambda images: classifier_outputs(classifier, images)["probs"],
    }
    data = real_digits("train")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = {"runs": []} if args.fresh or not OUT.exists() else json.loads(OUT.read_text())
    results.update({
        "budget_s": args.budget, "sampler": f"DDIM, {args.sampling_steps} steps, eta 0", "n": args.n,
        "floor": {"fid": round(floor["fid"], 2), "std": round(floor["std"], 2), "n": floor["n"]},
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    })
    print(f"real-data floor at n = {floor['n']}: FID {floor['fid']:.1f} +- {floor['std']:.1f} "
          f"(held-out digits against the training digits)")
    for name in names:
        row = run_candidate(name, args.budget, data, scorer, args)
        results["runs"] = [r for r in results["runs"] if r["name"] != name] + [row]
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name:<34} {row['steps']:>5} steps {row['images_per_s']:>6.0f} img/s  FID {row['fid']:6.1f} "
              f"+- {row['fid_std']:4.1f}  accuracy {row['accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    main()
