"""Benchmark: sample quality of the ``mnist-cpu`` model and the fidelity/diversity trade-off of guidance.

Prints, for the cached ``mnist-cpu`` model (trained by ``ddpm.cache.load_or_train``):

1. FID in the project's classifier feature space (with its error bar and the real-vs-real floor), mean
   classifier confidence and class-histogram entropy of unconditional DDIM samples (default 1,000, 50 steps);
2. the accuracy of class-conditional samples against the requested labels (no guidance);
3. a sweep over guidance scales: classifier-free guidance w on the conditional model, and classifier guidance
   s with a noise-aware classifier on the same network run unconditionally (null label), each reporting
   conditional accuracy, confidence, log p(y | x_0) under the noise-aware classifier at t = 0, class entropy
   of the predictions, the within-class spread of the metric classifier's features (diversity inside each
   class, which the class histogram misses when the requested labels are balanced) and FID.

The FID numbers are not comparable with published Inception FIDs (see ``ddpm.metrics``).

    python benchmarks/guidance_metrics.py                  # the full run (long on a CPU)
    python benchmarks/guidance_metrics.py --n 200 --n-cond 100 --sweep-n 100 --steps 25   # a quick look
    python benchmarks/guidance_metrics.py --wait 3600      # wait up to an hour for the cached model
    python benchmarks/guidance_metrics.py --checkpoint .cache/ddpm/mnist-cpu-<hash> --sweep-only

The script never trains the diffusion model itself unless ``--train`` is given: it waits for the cache entry
that the training benchmark writes. The metric classifier and the noise-aware classifier are trained once and
cached. ``--json PATH`` also writes the numbers to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from ddpm import cache, checkpoint, metrics
from ddpm.guidance import (ClassifierFreeGuidance, ClassifierGuidance, NoiseAwareClassifierConfig,
                           load_or_train_classifier)
from ddpm.presets import get_preset
from ddpm.samplers import sample_in_batches
from ddpm.schedule import NoiseSchedule


def cached_model_ready(preset: str) -> Path | None:
    """The cache folder of a finished training run of ``preset``, or None while it is missing or unfinished."""
    config = get_preset(preset)
    directory = cache.cache_dir() / f"{preset}-{checkpoint.config_hash(config.to_dict())}"
    state = directory / "state.json"
    if not (directory / "config.json").is_file() or not state.is_file():
        return None
    try:
        step = json.loads(state.read_text()).get("step", 0)
    except (OSError, json.JSONDecodeError):
        return None
    return directory if step >= config.steps else None


def generate(model, schedule, n, *, steps, batch_size, labels=None, guidance=None, seed=0):
    """n DDIM samples [n, 1, 28, 28] in [-1, 1], in batches; labels [n] or None."""
    return sample_in_batches(model, schedule, (1, 28, 28), n, batch_size=batch_size, y=labels, sampler="ddim",
                             steps=steps, guidance=guidance, generator=torch.Generator().manual_seed(seed))


def sweep_row(kind, scale, x, labels, metric_clf, reference, noise_clf, n_draws):
    out = metrics.classifier_outputs(metric_clf, x)
    fid = metrics.fid_with_error(out["features"], reference, n_draws=n_draws)
    with torch.no_grad():
        logp = ClassifierGuidance(noise_clf, 1.0).log_prob(x, torch.zeros(len(x), dtype=torch.long), labels)
    return {
        "guidance": kind, "scale": scale,
        "accuracy": metrics.conditional_accuracy(out["probs"], labels),
        "confidence": metrics.mean_confidence(out["probs"]),
        "log_p_y": float(logp.mean()),
        "class_entropy": metrics.class_histogram_entropy(out["probs"]),
        "spread": metrics.within_class_spread(out["features"], labels),
        "fid": fid["fid"], "fid_std": fid["std"],
    }


def unconditional_and_conditional(args, model, schedule, metric_clf, clf_info, results):
    """Sections 1 and 2: unconditional samples with all metrics, then conditional samples without guidance."""
    # 1. unconditional samples
    t0 = time.perf_counter()
    x = generate(model, schedule, args.n, steps=args.steps, batch_size=args.batch_size, seed=1)
    uncond = metrics.evaluate_images(x, classifier=metric_clf, classifier_info=clf_info, n_draws=args.draws)
    uncond["sampling_seconds"] = time.perf_counter() - t0
    results["unconditional"] = uncond
    print(f"\n== {args.n} unconditional samples ({uncond['sampling_seconds']:.0f} s) ==")
    print(metrics.format_report(uncond))

    # 2. conditional samples, no guidance
    labels = torch.arange(args.n_cond) % 10
    t0 = time.perf_counter()
    xc = generate(model, schedule, args.n_cond, steps=args.steps, batch_size=args.batch_size, labels=labels, seed=2)
    cond = metrics.evaluate_images(xc, labels, classifier=metric_clf, classifier_info=clf_info, n_draws=args.draws,
                                   memorisation=False)
    results["conditional"] = cond
    print(f"\n== {args.n_cond} conditional samples ({time.perf_counter() - t0:.0f} s) ==")
    print(f"conditional accuracy {cond['conditional_accuracy']:.4f}, confidence {cond['confidence']:.4f}, "
          f"class entropy {cond['class_entropy']:.3f} nats, FID {cond['fid']:.2f} +- {cond['fid_std']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist-cpu")
    p.add_argument("--checkpoint", type=Path, help="a training checkpoint folder to use instead of the preset")
    p.add_argument("--n", type=int, default=1000, help="unconditional samples")
    p.add_argument("--n-cond", type=int, default=500, help="conditional samples (labels 0..9 in turn)")
    p.add_argument("--sweep-n", type=int, default=200, help="samples per guidance scale")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg-scales", default="0,1,3", help="classifier-free guidance weights w")
    p.add_argument("--clf-scales", default="0,1,3,10", help="classifier guidance scales s")
    p.add_argument("--classifier-steps", type=int, default=1500, help="training steps of the noise-aware classifier")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--draws", type=int, default=10, help="draws for the FID error bar")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the cached model")
    p.add_argument("--train", action="store_true", help="train the model if it is not cached")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")
    p.add_argument("--sweep-only", action="store_true", help="skip the unconditional and conditional sections")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    results: dict = {"settings": vars(args) | {"json": str(args.json) if args.json else None}}

    if args.checkpoint is not None:
        model, config, state = cache.load_model(args.checkpoint)
        schedule = NoiseSchedule.from_name(config.schedule, config.T)
        print(f"model: checkpoint {args.checkpoint}, {state.get('step')} training steps")
    else:
        deadline = time.time() + args.wait
        while cached_model_ready(args.preset) is None and not args.train:
            if time.time() >= deadline:
                print(f"the {args.preset} model is not in {cache.cache_dir()} yet; run the training benchmark "
                      "first, pass --wait SECONDS, or --train", file=sys.stderr)
                return 1
            time.sleep(30)
        trained = cache.load_or_train(args.preset, progress=False)
        model, schedule = trained.model, trained.schedule
        print(f"model: {trained.provenance()}")
    print(f"sampler: DDIM, eta 0, {args.steps} steps; torch threads {torch.get_num_threads()}")

    metric_clf, clf_info = metrics.load_or_train_mnist_classifier(verbose=True)
    print(f"metric classifier: held-out test accuracy {clf_info['test_accuracy']:.4f}")
    train_x, train_y = metrics.real_digits("train")
    reference = metrics.classifier_outputs(metric_clf, train_x)["features"]
    real_spread = metrics.within_class_spread(reference, train_y)
    print(f"within-class spread of the training digits' features: {real_spread:.2f}")
    results["real_within_class_spread"] = real_spread
    if not args.sweep_only:
        unconditional_and_conditional(args, model, schedule, metric_clf, clf_info, results)

    # 3. guidance sweeps
    t0 = time.perf_counter()
    noise_clf = load_or_train_classifier(schedule, NoiseAwareClassifierConfig(), steps=args.classifier_steps)
    acc = noise_clf.info["accuracy_by_quartile"]
    print(f"\nnoise-aware classifier ({time.perf_counter() - t0:.0f} s): held-out accuracy by timestep quartile "
          + ", ".join(f"{a:.3f}" for a in acc))
    results["noise_aware_classifier"] = noise_clf.info
    labels = torch.arange(args.sweep_n) % 10
    rows = []
    for kind, scales in (("classifier-free", args.cfg_scales), ("classifier", args.clf_scales)):
        for scale in (float(s) for s in scales.split(",")):
            t0 = time.perf_counter()
            guidance = (ClassifierFreeGuidance(scale) if kind == "classifier-free"
                        else ClassifierGuidance(noise_clf, scale))
            xs = generate(model, schedule, args.sweep_n, steps=args.steps, batch_size=args.batch_size, labels=labels,
                          guidance=guidance, seed=3)
            row = sweep_row(kind, scale, xs, labels, metric_clf, reference, noise_clf, args.draws)
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            print(f"  {kind:>15} scale {scale:5.1f}: accuracy {row['accuracy']:.3f}  confidence {row['confidence']:.3f}"
                  f"  log p(y|x0) {row['log_p_y']:7.3f}  class entropy {row['class_entropy']:.3f}"
                  f"  within-class spread {row['spread']:.2f}"
                  f"  FID {row['fid']:7.2f} +- {row['fid_std']:.2f}  ({row['seconds']:.0f} s)", flush=True)
    results["sweep"] = rows
    floor = metrics.fid_floor(reference, args.sweep_n, n_draws=args.draws)
    print(f"  FID floor at {floor['n']} samples (real vs real): {floor['fid']:.2f} +- {floor['std']:.2f}; "
          f"class entropy maximum ln 10 = {math.log(10):.3f}")
    results["sweep_fid_floor"] = floor
    print(f"\ntotal {time.perf_counter() - begin:.0f} s. {metrics.NOT_COMPARABLE}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
