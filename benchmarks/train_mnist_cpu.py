"""Benchmark: train a cpu-profile digit preset (``mnist-cpu`` or ``mnist-latent``), then check it against its targets.

    python benchmarks/train_mnist_cpu.py [--preset mnist-latent] [--steps N] [--train-seed S] [--set KEY=VALUE ...]
                                         [--n 1000] [--sampling-steps 50]

Training goes through ``load_or_train``, so the checkpoint lands in the model cache that the book reuses
(a second run only samples and reports the recorded training time). Then, with DDIM in ``--sampling-steps`` steps:

* ``--n`` unconditional samples (the null label) and their FID to the training digits in the project's metric,
  against the real-data floor at the same n (as many held-out digits, scored the same way);
* ``--n`` headline samples: labels drawn from the training set's class frequencies (``ddpm.data.draw_labels``),
  no guidance, the convention of ADM and DiT for a class-conditional model; their FID and accuracy;
* ``--n`` conditional samples (labels 0..9 in turn; unguided for ``mnist-cpu``, with classifier-free guidance
  w = 1 for ``mnist-latent``) and the metric classifier's accuracy on them, beside its accuracy on the held-out
  real digits (what real digits score), and their FID too: the gap between the two sets' FIDs is what the
  unconditional branch lacks.

A latent model samples latents (not clipped) and decodes them; its training time counts both stages. It prints each
target of the preset with its measured value and whether it is met (``TARGETS``):

* training takes at most 12 minutes (``mnist-latent``: 8, the autoencoder included);
* unconditional FID at most twice the floor;
* conditional accuracy at least 95%;

and writes into ``benchmarks/results/`` (``<name>`` is ``mnist_cpu`` or ``mnist_latent``):

* ``<name>_grid.png``: 100 unconditional samples, 10x10;
* ``<name>_grid_conditional.png``: the first 100 conditional samples, one class per column;
* ``train_<name>.json``: the numbers and their provenance.

With ``--steps`` other than the preset's, ``<name>`` ends in ``_steps<N>`` (for example ``mnist_cpu_steps4800``),
so that a longer or shorter run is recorded beside the preset's record instead of over it; likewise ``--train-seed``
other than the preset's ends it in ``_seed<S>``, and each ``--set KEY=VALUE`` (a field of the preset, ``model.KEY``
for a field of its network; the value is read as JSON, else as a string) adds ``_set_<KEY>-<VALUE>``: an ablation,
one change from the preset at its full length, recorded beside it (``mnist_cpu_set_ema_warmup-false``);
``--set model_type=dit`` trains the preset's alternative network instead of its own (for ``mnist-latent``, a
diffusion transformer on the same latents: ``ddpm.presets.ALTERNATIVE_NETWORKS``). The error bars of one record count the sampling only;
a second training seed shows how much one training run differs from the next.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from ddpm.cache import load_or_train
from ddpm.data import class_frequencies, draw_labels
from ddpm.guidance import ClassifierFreeGuidance
from ddpm.metrics import (classifier_outputs, conditional_accuracy, fid_with_error, heldout_floor,
                          load_or_train_mnist_classifier, real_digits)
from ddpm.plotting import save_png_grid, to_uint8
from ddpm.presets import ALTERNATIVE_NETWORKS, get_preset, recipe_summary
from ddpm.samplers import sample_in_batches

RESULTS = Path(__file__).resolve().parent / "results"
#: Each preset's targets: training minutes, unconditional FID over the real-data floor, conditional accuracy, and
#: the guidance weight of the conditional samples.
TARGETS = {
    "mnist-cpu": {"minutes": 12.0, "fid_over_floor": 2.0, "accuracy": 0.95, "guidance": 0.0},
    "mnist-latent": {"minutes": 8.0, "fid_over_floor": 2.0, "accuracy": 0.95, "guidance": 1.0},
}


def cpu_name() -> str:
    """The processor's model name where the system tells it (Linux), else what ``platform`` knows: the machine's
    speed decides the recorded minutes, so the record says which machine it was."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_overrides(items: list[str], base) -> tuple[dict, dict, str]:
    """``["KEY=VALUE", ...]`` -> (fields for ``get_preset``, ``{KEY: value}`` as asked, the record-name suffix
    ``_set_KEY-VALUE...``).

    ``model.KEY`` changes one field of the network's configuration; ``model_type=TYPE`` swaps in the preset's
    alternative network of that type (``ddpm.presets.ALTERNATIVE_NETWORKS``). Values are JSON (``0.9995``, ``null``,
    ``[14, 7]``), else strings (``cosine``). A malformed item or an unknown field is a one-line error.
    """
    fields, asked, suffix = {}, {}, ""
    # a change of network comes first, so that model.KEY changes the network swapped in
    for item in sorted(items, key=lambda item: not item.startswith("model_type=")):
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, for example --set ema_decay=0.9995")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        model = fields.get("model", base.model)
        if key == "model_type" and value != base.model_type:
            swaps = ALTERNATIVE_NETWORKS.get(base.name, {})
            if value not in swaps:
                raise SystemExit(f"--set {item!r}: {base.name} has no {value!r} network to swap in; valid: "
                                 f"{', '.join([base.model_type, *swaps])}")
            fields["model_type"], fields["model"] = value, dict(swaps[value])
        elif key.startswith("model."):
            sub = key.split(".", 1)[1]
            if sub not in model:
                raise SystemExit(f"--set {item!r}: the network has no field {sub!r}; valid: {', '.join(model)}")
            fields["model"] = {**model, sub: value}
        elif not hasattr(base, key) or key in ("name", "model"):
            raise SystemExit(f"--set {item!r}: {key!r} is not a field of the preset's TrainConfig")
        else:
            fields[key] = value
        asked[key] = value
        shown = "".join(c for c in json.dumps(value) if c not in ' "[]').replace("null", "none")
        suffix += f"_set_{key.removeprefix('model.')}-{shown}"
    return fields, asked, suffix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(TARGETS), default="mnist-cpu", help="preset (default mnist-cpu)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of the training run (default: the preset's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change one field of the preset (repeatable), for example ema_decay=0.9995")
    parser.add_argument("--n", type=int, default=1000, help="samples to draw (default 1000)")
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--batch-size", type=int, default=250, help="samples per sampler call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--npz", action="store_true", help="also save the samples as mnist_cpu_samples.npz")
    args = parser.parse_args()

    start = time.perf_counter()
    preset = get_preset(args.preset)
    changes, asked, set_suffix = parse_overrides(args.overrides, preset)
    if args.train_seed is not None:
        changes["seed"] = args.train_seed
    try:
        config = get_preset(args.preset, **changes)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--set: {exc}") from None
    trained = load_or_train(config, steps=args.steps, progress=None)
    fresh = time.perf_counter() - start > 0.5 * trained.info["wall_time_s"]
    info, config = trained.info, trained.config
    target = TARGETS[args.preset]
    name = args.preset.replace("-", "_")
    if config.steps != preset.steps:
        name += f"_steps{config.steps}"
    if config.seed != preset.seed:
        name += f"_seed{config.seed}"
    name += set_suffix
    train_images_per_s = info["steps"] * config.batch_size / info["wall_time_s"]
    first_stage_s = info.get("autoencoder_seconds", 0.0)

    model, schedule = trained.model, trained.schedule
    generator = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(args.n) % 10
    draw = dict(batch_size=args.batch_size, sampler="ddim", steps=args.sampling_steps, generator=generator,
                clip_denoised=not config.is_latent)  # latents are not bounded like pixels
    guidance = ClassifierFreeGuidance(target["guidance"]) if target["guidance"] else None
    start = time.perf_counter()
    with torch.inference_mode():
        uncond = trained.decode(sample_in_batches(model, schedule, config.sample_shape, args.n, **draw))
    sampling_s = time.perf_counter() - start
    with torch.inference_mode():
        samples = trained.decode(sample_in_batches(model, schedule, config.sample_shape, args.n, y=labels,
                                                   guidance=guidance, **draw))
    headline_labels = draw_labels(args.n, class_frequencies(config.dataset), torch.Generator().manual_seed(args.seed))
    with torch.inference_mode():
        headline = trained.decode(sample_in_batches(model, schedule, config.sample_shape, args.n, y=headline_labels,
                                                    **draw))

    # How digit-like the samples are, in the project's metric (ddpm.metrics): FID of the unconditional samples to
    # the training digits against held-out real digits scored the same way, the metric classifier's accuracy on the
    # requested labels, and the spread of the images' mean brightness (foggy backgrounds widen it).
    classifier, _ = load_or_train_mnist_classifier()
    conditional = classifier_outputs(classifier, samples)
    accuracy = conditional_accuracy(conditional["probs"], labels)
    real = real_digits("train")[0]
    reference = classifier_outputs(classifier, real)["features"]
    fid = fid_with_error(classifier_outputs(classifier, uncond)["features"], reference)
    conditional_fid = fid_with_error(conditional["features"], reference)
    headline_out = classifier_outputs(classifier, headline)
    headline_fid = fid_with_error(headline_out["features"], reference)
    headline_accuracy = conditional_accuracy(headline_out["probs"], headline_labels)
    heldout, heldout_labels = real_digits("test")
    heldout_out = classifier_outputs(classifier, heldout)
    floor = heldout_floor(heldout_out["features"], reference, args.n)
    # what real digits score: how often the metric classifier reads held-out digits as their own label
    real_accuracy = conditional_accuracy(heldout_out["probs"], heldout_labels)
    brightness_std = float(uncond.mean((1, 2, 3)).std())
    data_brightness_std = float(real.mean((1, 2, 3)).std())
    train_min = (info["wall_time_s"] + first_stage_s) / 60
    targets = {
        "training minutes": (train_min, f"<= {target['minutes']:g}", train_min <= target["minutes"]),
        "unconditional FID / floor": (fid["fid"] / floor["fid"], f"<= {target['fid_over_floor']:g}",
                                      fid["fid"] <= target["fid_over_floor"] * floor["fid"]),
        "conditional accuracy": (accuracy, f">= {target['accuracy']:g}", accuracy >= target["accuracy"]),
    }

    RESULTS.mkdir(parents=True, exist_ok=True)
    save_png_grid(uncond[:100], RESULTS / f"{name}_grid.png", nrow=10)
    save_png_grid(samples[:100], RESULTS / f"{name}_grid_conditional.png", nrow=10)
    if args.npz:
        import numpy as np

        np.savez(RESULTS / f"{name}_samples.npz", arr_0=to_uint8(samples), arr_1=labels.numpy())
        np.savez(RESULTS / f"{name}_samples_unconditional.npz", arr_0=to_uint8(uncond))

    report = {
        "preset": info["preset"],
        "recipe": recipe_summary(config),
        "model_type": config.model_type,
        "parameters": info["parameters"],
        "steps": info["steps"],
        "training_seed": config.seed,
        "changes": asked,
        "batch_size": config.batch_size,
        "training_wall_time_s": round(info["wall_time_s"], 1),
        "first_stage_wall_time_s": round(first_stage_s, 1),
        "conditional_guidance": target["guidance"],
        "training_images_per_s": round(train_images_per_s, 1),
        "trained_in_this_run": fresh,
        "samples": args.n,
        "sampler": f"DDIM, {args.sampling_steps} steps, eta 0",
        "sampling_wall_time_s": round(sampling_s, 1),
        "sampling_images_per_s": round(args.n / sampling_s, 2),
        "headline_fid": round(headline_fid["fid"], 2),
        "headline_fid_std": round(headline_fid["std"], 2),
        "headline_accuracy": round(headline_accuracy, 4),
        "estimator": "split-half",
        "conditional_accuracy": round(accuracy, 4),
        "conditional_fid": round(conditional_fid["fid"], 2),
        "conditional_fid_std": round(conditional_fid["std"], 2),
        "real_accuracy": round(real_accuracy, 4),
        "real_accuracy_n": len(heldout_labels),
        "unconditional_fid": round(fid["fid"], 2),
        "unconditional_fid_std": round(fid["std"], 2),
        "floor_fid": round(floor["fid"], 2),
        "floor_fid_std": round(floor["std"], 2),
        "targets": {name: {"value": round(v, 3), "target": t, "met": bool(ok)} for name, (v, t, ok) in targets.items()},
        "brightness_std": round(brightness_std, 3),
        "data_brightness_std": round(data_brightness_std, 3),
        "device": info["device"],
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "checkpoint_hash": info["checkpoint_hash"],
        "torch": torch.__version__,
    }
    (RESULTS / f"train_{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.preset}: {info['parameters']:,} parameters, {info['steps']} steps of batch {config.batch_size}, "
          f"training seed {config.seed}")
    stage = f" after {first_stage_s / 60:.1f} min for the autoencoder" if config.is_latent else ""
    print(f"training: {info['wall_time_s'] / 60:.1f} min{stage}, {train_images_per_s:.0f} examples/s on "
          f"{info['device']}" + ("" if fresh else " (recorded when the cached checkpoint was trained)"))
    print(f"sampling: {args.n} unconditional digits, DDIM {args.sampling_steps} steps in {sampling_s:.0f} s, "
          f"{args.n / sampling_s:.1f} images/s")
    print(f"unconditional FID {fid['fid']:.1f} +- {fid['std']:.1f} to the training digits; real-data floor "
          f"{floor['fid']:.1f} +- {floor['std']:.1f} ({floor['n']} held-out digits); mean-brightness spread "
          f"{brightness_std:.3f} (training digits {data_brightness_std:.3f})")
    print(f"headline (labels from the class frequencies, no guidance): FID {headline_fid['fid']:.1f} +- "
          f"{headline_fid['std']:.1f}, {headline_accuracy:.1%} the requested digit")
    print(f"conditional (w = {target['guidance']:g}): the metric classifier reads {accuracy:.1%} of {args.n} digits as "
          f"their requested class, and {real_accuracy:.1%} of {len(heldout_labels)} held-out real digits as their label; "
          f"their FID {conditional_fid['fid']:.1f} +- {conditional_fid['std']:.1f}")
    for label, (value, goal, ok) in targets.items():
        print(f"target {label:<27} {value:8.3f}  {goal:<7} {'met' if ok else 'NOT met'}")
    print(f"grids: {RESULTS / f'{name}_grid.png'} (unconditional), {RESULTS / f'{name}_grid_conditional.png'}; "
          f"checkpoint {info['checkpoint_hash']}")


if __name__ == "__main__":
    main()
