"""Command line: ``python -m ddpm train | sample | inpaint | edit | nll | evaluate`` (``--help`` on each).

A thin layer over the library: every subcommand parses its arguments, calls the package and prints a short
report. Bad input (an unknown preset, a missing or corrupt checkpoint, a configuration mismatch, a count that
is not positive, a class out of range) gives one line on stderr and exit status 2, without a traceback.

Examples::

    python -m ddpm train --preset mnist-cpu --out runs/mnist-cpu
    python -m ddpm sample --checkpoint runs/mnist-cpu --sampler ddim --steps 50 --n 64 --out grid.png
    python -m ddpm sample --checkpoint runs/mnist-cpu --sampler ddim --steps 50 --n 1000 --out samples.npz
    python -m ddpm sample --checkpoint runs/mnist-cpu --guidance-scale 2 --labels random --n 1000 --out cfg.npz
    python -m ddpm inpaint --checkpoint runs/mnist-cpu --images digits.npz --mask top --method repaint --out done.npz
    python -m ddpm edit --checkpoint runs/mnist-cpu --images strokes.npz --strength 0.5 --out edited.png
    python -m ddpm nll --checkpoint runs/mnist-cpu --n 100 --timesteps 50
    python -m ddpm evaluate --samples samples.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_editing import add_editing_parsers, cmd_edit, cmd_inpaint
from .cliargs import (PROG, Parser, UsageError, check_out, load_pixel_diffusion_model, nonneg_float, nonneg_int,
                      positive, read_image_file, save_out, torch_device)

# the names of ddpm.samplers.SAMPLERS and ddpm.flow.FLOW_METHODS, kept here so that `--help` does not import torch
# (a test compares them); "heun" names Karras et al.'s for a diffusion model and the flow's for a flow
SAMPLER_NAMES = ("ddpm", "ddim", "heun", "dpm++2m")
FLOW_SAMPLER_NAMES = ("euler", "midpoint", "heun")
# the names of ddpm.presets.PRESETS, for the same reason
PRESET_NAMES = ("toy2d", "mnist-cpu", "mnist-flow", "mnist-gpu", "cifar10-gpu", "mnist-latent", "mnist14")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Train, sample from, edit and evaluate diffusion models (DDPM, "
                     "Improved DDPM, guided diffusion, flow matching).")
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,inpaint,edit,nll,evaluate}", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("train", help="train a preset; checkpoints are resumable",
                       description="Train a preset configuration. Ctrl-C saves a resumable checkpoint.")
    p.add_argument("--preset", required=True, help=", ".join(PRESET_NAMES))
    p.add_argument("--steps", type=positive("--steps"), help="override the preset's number of steps")
    p.add_argument("--out", type=Path, help="checkpoint folder: new, empty, or (with --resume) a checkpoint; a file "
                   "or a folder of other files is refused (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--data-root", type=Path, help="torchvision dataset folder (default: $DDPM_DATA or .cache/data)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help="draw samples into a .png grid or an .npz file",
                       description="Draw samples with the EMA weights of a checkpoint. A .png output is an image "
                       "grid; an .npz output follows OpenAI's evaluation format (arr_0 uint8 [N, H, W, C], "
                       "arr_1 int64 labels for class-conditional samples).")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--sampler", choices=SAMPLER_NAMES + FLOW_SAMPLER_NAMES[:2],
                   help="a diffusion model: ancestral DDPM, DDIM (eta = 0, the default), Heun (Karras et al.) or "
                   "DPM-Solver++(2M); a flow (mnist-flow): euler (the default), midpoint or heun")
    p.add_argument("--steps", type=positive("--steps"),
                   help="sampling steps (default: all T for ddpm and ddim, 18 noise levels for heun, 20 for dpm++2m; "
                   "16 for a flow)")
    p.add_argument("--n", type=positive("--n"), default=64, help="number of samples (default 64)")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--class", dest="label", type=nonneg_int, help="class label of every sample")
    labels.add_argument("--labels", choices=("random", "cycle"),
                        help="labels of class-conditional samples: random draws each one from the class frequencies "
                        "of the model's training set (as ADM and DiT sample for FID), cycle takes 0, 1, ..., K-1 in "
                        "turn (the default with --guidance-scale); written to arr_1 of an .npz")
    p.add_argument("--guidance-scale", type=nonneg_float,
                   help="classifier-free guidance scale w (or the classifier scale with --classifier)")
    p.add_argument("--classifier", type=Path, help="noise-aware classifier checkpoint for classifier guidance")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--batch-size", type=positive("--batch-size"), default=256, help="samples per batch")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--data-root", type=Path, help="torchvision dataset folder (read by --labels random)")
    p.add_argument("--out", required=True, type=Path, help="output file, .png or .npz (checked before sampling)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")

    add_editing_parsers(sub)

    p = sub.add_parser("nll", help="negative log-likelihood in bits/dim on held-out data",
                       description="Negative log-likelihood bound in bits/dim of the EMA model on the first N "
                       "held-out images (unconditional: the null label). Without --timesteps every one of the T "
                       "terms is computed; with --timesteps K an unbiased estimate from K random timesteps per "
                       "image is reported with its standard error.")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--n", type=positive("--n"), default=100, help="number of held-out images (default 100)")
    p.add_argument("--timesteps", type=positive("--timesteps"), help="K sampled timesteps per image")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--data-root", type=Path, help="torchvision dataset folder")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")

    p = sub.add_parser("evaluate", help="metrics of a sample file",
                       description="The project's metrics (classifier-feature FID, confidence, class entropy, "
                       "nearest neighbours) for an .npz sample file.")
    p.add_argument("--samples", required=True, type=Path, help=".npz file with arr_0 uint8 [N, H, W, C]")
    return parser


# ---------------------------------------------------------------------------------------------------------


def _check_train_out(out: Path, resume: bool) -> None:
    """Refuse an --out that training would have to overwrite, before any work (the library refuses it too)."""
    from .checkpoint import is_checkpoint, refuse_foreign

    if resume and not (out / "config.json").exists():
        raise UsageError(f"--resume: no checkpoint in {out}; drop --resume to start a new run")
    if not resume and is_checkpoint(out):
        raise UsageError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if not resume:
        refuse_foreign(out)  # a file, or a folder of other files: one line naming the fix


def cmd_train(args) -> int:
    from .callbacks import PreviewPNGWriter
    from .checkpoint import check_config, read_checkpoint_header
    from .presets import get_preset
    from .train import Trainer, TrainingDiverged, resume_free_keys, setup_distributed

    try:
        config = get_preset(args.preset, **({} if args.steps is None else {"steps": args.steps}))
    except ValueError as exc:
        raise UsageError(str(exc)) from None  # main() names the command
    out = args.out if args.out is not None else Path("runs") / args.preset
    _check_train_out(out, args.resume)
    if args.resume:  # a clear error for a broken or foreign checkpoint before anything is built
        check_config(out, read_checkpoint_header(out)["config"], config.to_dict(), ignore=resume_free_keys(config))
    distributed = setup_distributed()
    device = torch_device(args.device) if args.device else None
    trainer = Trainer(config, out_dir=out, device=device, progress=False if args.no_progress else None,
                      preset=args.preset, data_root=args.data_root,
                      callbacks=[PreviewPNGWriter(out)] if config.preview_every else [])
    if args.resume:
        trainer.load()
    try:
        if trainer.step >= config.steps:  # a finished run, resumed: say so rather than report a run that did nothing
            if trainer.is_main:
                print(f"{out} is already at step {trainer.step}, the end of a run of {config.steps} steps; "
                      f"nothing to train (pass a larger --steps to continue)", flush=True)
            return 0
        if args.resume and trainer.is_main:
            print(f"resuming {out} at step {trainer.step}", flush=True)
        trainer.fit()
    except KeyboardInterrupt:
        if trainer.is_main:
            print(f"interrupted at step {trainer.step}; resumable checkpoint in {out}; continue with: "
                  f"{PROG} train --preset {args.preset} --out {out} --resume", file=sys.stderr)
        return 130
    except TrainingDiverged as exc:
        print(f"{PROG} train: {exc}", file=sys.stderr)
        return 1
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if trainer.is_main:
        h = trainer.history
        tail = h["loss"][-min(50, len(h["loss"])):]
        print(f"trained {args.preset} to step {trainer.step} in {trainer.wall_time:.0f} s on {trainer.device_name()}; "
              f"mean loss of the last {len(tail)} steps {sum(tail) / max(len(tail), 1):.4f}; checkpoint {out}")
    return 0


def _sample_labels(args, dataset: str, num_classes, guidance, device):
    """The labels ``[n]`` of the samples (None: unconditional): --class, --labels, or cycled under guidance."""
    import torch

    if args.label is not None:
        return torch.full((args.n,), args.label, dtype=torch.long, device=device)
    if args.labels == "random":
        from .data import class_frequencies, draw_labels

        frequencies = class_frequencies(dataset, root=args.data_root)
        if len(frequencies) != num_classes:
            raise UsageError(f"--labels random: {dataset} has {len(frequencies)} classes, the model or classifier "
                             f"{num_classes}")
        return draw_labels(args.n, frequencies, generator=torch.Generator().manual_seed(args.seed)).to(device)
    if args.labels == "cycle" or guidance is not None:
        return (torch.arange(args.n) % num_classes).to(device)
    return None


def cmd_sample(args) -> int:
    import torch

    from .cache import load_autoencoder, load_model
    from .data import dataset_info
    from .samplers import nfe, sample_in_batches
    from .schedule import NoiseSchedule

    check_out(args)  # before the model is loaded, so that a bad place costs nothing and nothing is lost
    device = torch_device(args.device)
    model, config, _ = load_model(args.checkpoint, device=device)
    info = dataset_info(config.dataset)
    if info.kind != "image":
        raise UsageError(f"{args.checkpoint} is a model of 2-D points; sample it from Python (ddpm.samplers)")
    schedule = NoiseSchedule.from_name(config.schedule, config.T)
    flow = config.objective == "flow"
    names = FLOW_SAMPLER_NAMES if flow else SAMPLER_NAMES
    if args.sampler is None:
        args.sampler = names[0] if flow else "ddim"
    if args.sampler not in names:
        kind = "a flow (objective 'flow')" if flow else "a diffusion model"
        raise UsageError(f"--sampler {args.sampler}: {args.checkpoint} is {kind}; use one of {', '.join(names)}")
    if not flow and args.steps is not None and args.steps > config.T:
        raise UsageError(f"--steps must be at most T = {config.T}, got {args.steps}")
    if flow and args.classifier is not None:
        raise UsageError("--classifier: classifier guidance needs a diffusion model; guide a flow with "
                         "--guidance-scale (classifier-free)")

    classifier = None
    if args.classifier is not None:
        from .guidance import load_classifier

        try:
            classifier = load_classifier(args.classifier, device=device, schedule=schedule)
        except (ValueError, OSError, TypeError) as exc:
            raise UsageError(f"--classifier: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    # labels come from the model's classes, or from the classifier's for an unconditional model
    num_classes = config.num_classes
    if num_classes is None and classifier is not None:
        num_classes = int(getattr(getattr(classifier, "config", None), "num_classes", 10))
    chosen = "--class" if args.label is not None else ("--labels" if args.labels is not None else None)
    if chosen is not None and num_classes is None:
        raise UsageError(f"{chosen} needs a class-conditional model or --classifier; {args.checkpoint} is "
                         "unconditional")
    if args.label is not None and args.label >= num_classes:
        raise UsageError(f"--class must be in 0..{num_classes - 1}, got {args.label}")

    guidance = None
    if classifier is not None:
        from .guidance import ClassifierGuidance

        # the labels steer through the classifier only; the diffusion model is queried without them
        guidance = ClassifierGuidance(classifier, 1.0 if args.guidance_scale is None else args.guidance_scale)
    elif args.guidance_scale is not None:
        if config.num_classes is None:
            raise UsageError("--guidance-scale without --classifier needs a class-conditional model "
                             "(classifier-free guidance)")
        from .guidance import ClassifierFreeGuidance

        guidance = ClassifierFreeGuidance(args.guidance_scale)

    y = _sample_labels(args, config.dataset, num_classes, guidance, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    # ancestral steps use the variance the model was trained with (fixed_large, fixed_small or learned)
    variance = {"var_type": config.resolved_var_type} if args.sampler == "ddpm" else {}
    # a latent model samples latents (which are not clipped to the pixel range) and decodes them to images
    autoencoder = load_autoencoder(args.checkpoint, config, device=device)
    with torch.no_grad():
        if flow:
            from .flow import DEFAULT_FLOW_STEPS, flow_nfe, flow_sample_in_batches

            args.steps = DEFAULT_FLOW_STEPS if args.steps is None else args.steps
            x = flow_sample_in_batches(model, config.sample_shape, args.n, batch_size=args.batch_size, y=y,
                                       method=args.sampler, steps=args.steps, generator=generator,
                                       guidance=guidance, device=device).clamp(-1, 1)
        else:
            x = sample_in_batches(model, schedule, config.sample_shape, args.n, batch_size=args.batch_size, y=y,
                                  sampler=args.sampler, steps=args.steps, generator=generator, guidance=guidance,
                                  device=device, clip_denoised=autoencoder is None, **variance)
        if autoencoder is not None:
            from .autoencoder import decode_in_batches

            x = decode_in_batches(autoencoder, x, args.batch_size)
    save_out(args, x, y, "samples")
    steps = flow_nfe(args.sampler, args.steps) if flow else nfe(args.sampler, args.steps, config.T)
    what = (f"class {args.label}" if args.label is not None else
            "labels drawn from the training set's class frequencies" if args.labels == "random" else
            "classes cycled" if y is not None else "unconditional")
    g = f", guidance scale {guidance.scale}" if guidance is not None else ""
    print(f"wrote {args.n} samples ({args.sampler}, {steps} network evaluations, {what}{g}, seed {args.seed}) "
          f"to {args.out}")
    return 0


def cmd_nll(args) -> int:
    import torch

    from .data import DatasetUnavailable, load_dataset
    from .likelihood import nll_bits_per_dim, nll_estimate
    from .schedule import NoiseSchedule

    model, config, device = load_pixel_diffusion_model(
        args, flow="nll computes a diffusion model's variational bound; give it a diffusion checkpoint such as "
        "mnist-cpu", latent="its bound is in bits per latent value, not per pixel; nll needs a pixel model")
    try:
        x, _ = load_dataset(config.dataset, split="test", root=args.data_root, n=args.n)
    except DatasetUnavailable as exc:
        raise UsageError(str(exc)) from None
    if x.ndim != 4:
        raise UsageError(f"{args.checkpoint} is a model of 2-D points; bits/dim is defined for images")
    x = x.to(device)
    schedule = NoiseSchedule.from_name(config.schedule, config.T)
    generator = torch.Generator(device).manual_seed(args.seed)
    var_type = config.resolved_var_type
    if args.timesteps is None:
        per_image = nll_bits_per_dim(model, schedule, x, var_type=var_type, generator=generator)
        mean = per_image.mean().item()
        stderr = (per_image.std(unbiased=True) / len(per_image) ** 0.5).item() if len(per_image) > 1 else float("nan")
        how = f"exact sum over all {config.T} timesteps"
    else:
        mean, stderr = nll_estimate(model, schedule, x, args.timesteps, var_type=var_type, generator=generator)
        how = f"estimate from {args.timesteps} random timesteps per image"
    print(f"NLL {mean:.3f} ± {stderr:.3f} bits/dim on {len(x)} held-out {config.dataset} images ({how})")
    return 0


def cmd_evaluate(args) -> int:
    path = args.samples
    arr, _ = read_image_file(path, "--samples", f"; write one with: {PROG} sample ... --out {path}")
    from .metrics import IMAGE_SHAPE, evaluate_samples, format_report

    channels, height, width = IMAGE_SHAPE
    if arr.shape[1:] != (height, width, channels):  # checked before the metric loads its classifier
        raise UsageError(f"--samples: the metric scores 28x28 grey digits [N, 28, 28, 1], got {list(arr.shape)}; "
                         "sample a 28x28 model (mnist-cpu, mnist-gpu or mnist-latent)")

    print(format_report(evaluate_samples(path)))
    return 0


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "inpaint": cmd_inpaint, "edit": cmd_edit, "nll": cmd_nll,
            "evaluate": cmd_evaluate}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 success, 1 training diverged, 2 bad input, 130 interrupted)."""
    from .checkpoint import CheckpointError
    from .data import DatasetUnavailable

    parser = build_parser()
    command = None
    try:
        args = parser.parse_args(argv)
        command = args.command
        return COMMANDS[command](args)
    except (UsageError, CheckpointError, DatasetUnavailable, ValueError) as exc:
        # one line naming the program and the command, as argparse's own errors do; a ValueError is a bad value
        # found by the library (e.g. a respacing that does not fit T): its first line says what
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        if not message.startswith(PROG):
            message = f"{PROG} {command}: {message}" if command else f"{PROG}: {message}"
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
