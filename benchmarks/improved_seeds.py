"""Benchmark: the Improved DDPM variants of the book, each trained from several seeds, and how much the seed moves them.

    python benchmarks/improved_seeds.py [--seeds 0 1 2] [--n 500] [--nll-n 40]

The Improved DDPM notebook compares three variants of ``mnist14`` (``ddpm.presets.improved_variants``: cosine
L_simple, linear L_hybrid, cosine L_hybrid), each trained once, from seed 0. Two separately trained models differ by
the luck of their training run as well as by their recipe; this script trains every variant from each seed (through
``load_or_train``, so seed 0 is the notebook's own cache entry) and measures, on the same digits and the same starting
noise as the notebook:

* the negative log-likelihood bound in bits/dim, every one of its T terms computed, on ``--nll-n`` held-out digits;
* the FID of ``--n`` samples of respaced ancestral sampling with 25, 50 and 100 steps, with the learned variance for
  the L_hybrid models and with each fixed variance for the L_simple model, and of DDIM with 50 steps, against the
  real-data floor of as many held-out digits.

It writes ``benchmarks/results/improved_seeds.json``: every number per seed, and for every measure the standard
deviation over seeds (``seed_std``), which the notebook folds into the error of its comparisons
(``ddpm.book.with_seed_spread``). That spread includes the sampling noise of each run, so folding it in is
conservative.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ddpm.cache import load_or_train
from ddpm.data import load_dataset
from ddpm.likelihood import bpd_terms
from ddpm.metrics import fid_with_error, heldout_floor, load_or_train_mnist_classifier, pooled_digit_features
from ddpm.presets import improved_variants
from ddpm.samplers import sample
from train_mnist_cpu import cpu_name  # the script beside this one

RESULTS = Path(__file__).resolve().parent / "results"
#: (sampler, steps, reverse variance) of every run, by variant: the L_hybrid models sample with their learned
#: variance, the L_simple model with each fixed one (Nichol & Dhariwal 2021, Fig. 8); DDIM ignores the variance.
RUNS = {
    "cosine, L_simple": [("ddpm", s, v) for s in (25, 50, 100) for v in ("fixed_small", "fixed_large")],
    "linear, L_hybrid": [("ddpm", s, "learned_range") for s in (25, 50, 100)],
    "cosine, L_hybrid": [("ddpm", s, "learned_range") for s in (25, 50, 100)],
}
for _runs in RUNS.values():
    _runs.append(("ddim", 50, None))


def run_key(sampler: str, steps: int, var_type: str | None) -> str:
    """The name of a run in the record: ``ddpm-25-learned_range``, ``ddim-50``."""
    return f"{sampler}-{steps}" + (f"-{var_type}" if var_type else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--n", type=int, default=500, help="samples per run (default 500, as the notebook)")
    parser.add_argument("--nll-n", type=int, default=40, help="held-out digits of the exact bound (default 40)")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the starting noise (the notebook's)")
    args = parser.parse_args()

    classifier, _ = load_or_train_mnist_classifier()
    reference = pooled_digit_features(classifier, load_dataset("mnist5k-14", split="train")[0])
    heldout = pooled_digit_features(classifier, load_dataset("mnist5k-14", split="test")[0])
    floor = heldout_floor(heldout, reference, args.n)
    x_test = load_dataset("mnist5k-14", split="test")[0]
    x_test = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(args.sample_seed))[:args.nll_n]]
    x_T = torch.randn(args.n, 1, 14, 14, generator=torch.Generator().manual_seed(args.sample_seed))

    per_seed: dict[str, dict[str, dict]] = {}
    for seed in args.seeds:
        for name, config in improved_variants(seed=seed).items():
            start = time.perf_counter()
            trained = load_or_train(config, progress=False)
            entry = {"train_seconds": round(trained.info["wall_time_s"], 1), "checkpoint": trained.info["checkpoint_hash"]}
            nll = bpd_terms(trained.model, trained.schedule, x_test,
                            generator=torch.Generator().manual_seed(args.sample_seed))["total"]
            entry["nll"] = round(float(nll.mean()), 4)
            entry["nll_per_digit"] = [round(float(v), 4) for v in nll]
            for sampler, steps, var_type in RUNS[name]:
                x0 = sample(trained.model, trained.schedule, x_T=x_T, sampler=sampler, steps=steps, var_type=var_type,
                            generator=torch.Generator().manual_seed(args.sample_seed + 1))
                score = fid_with_error(pooled_digit_features(classifier, x0), reference)
                entry[run_key(sampler, steps, var_type)] = {"fid": round(score["fid"], 2), "std": round(score["std"], 2)}
            per_seed.setdefault(name, {})[str(seed)] = entry
            print(f"seed {seed}, {name}: NLL {entry['nll']:.3f} bits/dim, "
                  + ", ".join(f"{k} {v['fid']:.1f}" for k, v in entry.items() if isinstance(v, dict))
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)

    spreads: dict[str, dict[str, float]] = {}
    for name, seeds in per_seed.items():
        measures = {"nll": [e["nll"] for e in seeds.values()]}
        for key in next(iter(seeds.values())):
            if isinstance(next(iter(seeds.values()))[key], dict):
                measures[key] = [e[key]["fid"] for e in seeds.values()]
        spreads[name] = {key: round(statistics.stdev(v), 4) for key, v in measures.items() if len(v) > 1}
    # the spread of a paired NLL difference between two variants, over seeds (same digits, same seed)
    names = list(per_seed)
    nll_diff_spread = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diffs = [per_seed[a][s]["nll"] - per_seed[b][s]["nll"] for s in per_seed[a]]
            if len(diffs) > 1:
                nll_diff_spread[f"{a} - {b}"] = round(statistics.stdev(diffs), 4)
    record = {
        "seeds": args.seeds,
        "n": args.n,
        "nll_n": args.nll_n,
        "floor": {"fid": round(floor["fid"], 2), "std": round(floor["std"], 2), "n": floor["n"]},
        "per_seed": per_seed,
        "seed_std": spreads,
        "nll_difference_seed_std": nll_diff_spread,
        "estimator": "split-half",
        "cpu": cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "improved_seeds.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"seed_std": spreads, "nll_difference_seed_std": nll_diff_spread}, indent=2))


if __name__ == "__main__":
    main()
