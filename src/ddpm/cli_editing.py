"""The command line's editing subcommands: ``inpaint`` and ``edit`` (SDEdit), over ``ddpm.editing``.

Every check of the input (the output path, the image file, its size and channels, the labels, the model's kind)
runs before any network evaluation, and each failure is one line with exit status 2.
"""

from __future__ import annotations

from pathlib import Path

from .cliargs import (UsageError, check_out, load_pixel_diffusion_model, nonneg_float, nonneg_int, number, positive,
                      read_image_file, save_out)

# the names of ddpm.editing.INPAINT_METHODS and MASKS, kept here so that `--help` does not import torch (a test
# compares them)
INPAINT_METHOD_NAMES = ("replace", "repaint", "dps")
MASK_NAMES = ("top", "bottom", "left", "right", "center")


def add_editing_parsers(sub) -> None:
    """Add the ``inpaint`` and ``edit`` subcommands to the subparsers ``sub``."""
    for name in ("inpaint", "edit"):
        if name == "inpaint":
            p = sub.add_parser("inpaint", help="fill a region of given images (no retraining)",
                               description="Generate the --mask region of each image of --images so that it agrees "
                               "with the rest, with a diffusion checkpoint's EMA weights: replacement (Song et al. "
                               "2021), RePaint's resampling (Lugmayr et al. 2022) or diffusion posterior sampling "
                               "(Chung et al. 2023). The known pixels are kept exactly.")
            p.add_argument("--mask", required=True, choices=MASK_NAMES,
                           help="the region to generate: half of the image, or its central square")
            p.add_argument("--method", choices=INPAINT_METHOD_NAMES, default="repaint",
                           help="replace, repaint (the default: jump length 5, 2 passes) or dps")
            p.add_argument("--steps", type=positive("--steps"), default=50,
                           help="noise levels of the ancestral sampler (default 50; RePaint walks some twice)")
        else:
            p = sub.add_parser("edit", help="SDEdit: noise given images part of the way and denoise them",
                               description="SDEdit (Meng et al. 2022): each image of --images is noised to the step "
                               "ceil(S T) - 1 of --strength S and denoised by the ancestral sampler; small S keeps "
                               "the input, S = 1 forgets it.")
            p.add_argument("--strength", required=True,
                           type=number(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "--strength"),
                           help="how far to noise: in (0, 1]")
            p.add_argument("--steps", type=positive("--steps"), default=50,
                           help="reverse steps from the noised image (default 50, at most the steps it is noised by)")
        p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (a diffusion model)")
        p.add_argument("--images", required=True, type=Path,
                       help=".npz with arr_0 uint8 [N, H, W, C] (the layout `sample` writes), and optionally "
                       "arr_1 int64 labels")
        labels = p.add_mutually_exclusive_group()
        labels.add_argument("--class", dest="label", type=nonneg_int, help="class label for every image")
        labels.add_argument("--labels", action="store_true", help="use the labels in arr_1 of --images")
        p.add_argument("--guidance-scale", type=nonneg_float,
                       help="classifier-free guidance scale w (needs --class or --labels)")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--out", required=True, type=Path,
                       help="output file, .png or .npz, in the input's order (checked before any work)")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (refused otherwise)")



def _editing_inputs(args):
    """Model, schedule, images [N, C, H, W], labels and guidance for ``inpaint`` and ``edit``, every check done
    before any network evaluation; each failure one line."""
    import numpy as np
    import torch

    from .data import dataset_info
    from .samplefiles import as_model_images
    from .schedule import NoiseSchedule

    check_out(args)
    arr, stored = read_image_file(args.images, "--images")
    model, config, device = load_pixel_diffusion_model(
        args, flow=f"{args.command} needs a diffusion model such as mnist-cpu",
        latent=f"{args.command} works on a pixel model such as mnist-cpu")
    if dataset_info(config.dataset).kind != "image":
        raise UsageError(f"{args.checkpoint} is a model of 2-D points; edit points from Python (ddpm.editing)")
    c, h, w = config.sample_shape
    if arr.shape[1:] != (h, w, c):
        raise UsageError(f"--images: the model makes images of {h}x{w} with {c} channel(s) ([N, {h}, {w}, {c}]), "
                         f"got {list(arr.shape)}")
    x = as_model_images(arr).to(device)
    num_classes = config.num_classes
    if (args.label is not None or args.labels) and num_classes is None:
        raise UsageError(f"{'--class' if args.label is not None else '--labels'} needs a class-conditional model; "
                         f"{args.checkpoint} is unconditional")
    y = None
    if args.label is not None:
        if args.label >= num_classes:
            raise UsageError(f"--class must be in 0..{num_classes - 1}, got {args.label}")
        y = torch.full((len(x),), args.label, dtype=torch.long, device=device)
    elif args.labels:
        if stored is None or stored.shape != (len(x),) or not np.issubdtype(stored.dtype, np.integer):
            raise UsageError(f"--labels: {args.images} has no arr_1 with one integer label per image; give --class K")
        if stored.min() < 0 or stored.max() >= num_classes:
            raise UsageError(f"--labels: arr_1 must hold classes 0..{num_classes - 1}, got {stored.min()} to "
                             f"{stored.max()}")
        y = torch.from_numpy(stored.astype(np.int64)).to(device)
    guidance = None
    if args.guidance_scale is not None:
        if y is None:
            raise UsageError("--guidance-scale needs the class to guide toward: --class K or --labels")
        from .guidance import ClassifierFreeGuidance

        guidance = ClassifierFreeGuidance(args.guidance_scale)
    schedule = NoiseSchedule.from_name(config.schedule, config.T)
    return model, config, schedule, x, y, guidance, device


def _save_edited(args, x, y, guidance, what: str) -> int:
    """Write the edited images (and their labels to an .npz) and report ``what`` was done in one line."""
    save_out(args, x, y, "images")
    g = f", guidance scale {guidance.scale}" if guidance is not None else ""
    print(f"{what}{g}, seed {args.seed}) to {args.out}")
    return 0


def cmd_inpaint(args) -> int:
    import torch

    from .editing import inpaint, inpaint_nfe, region_mask

    model, config, schedule, x, y, guidance, device = _editing_inputs(args)
    if args.steps > config.T:
        raise UsageError(f"--steps must be at most T = {config.T}, got {args.steps}")
    mask = region_mask(args.mask, x.shape[2], x.shape[3]).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    out = inpaint(model, schedule, x, mask, method=args.method, steps=args.steps, y=y, guidance=guidance,
                  var_type=config.resolved_var_type, generator=generator)
    return _save_edited(args, out, y, guidance, f"inpainted the {args.mask} of {len(x)} images ({args.method}, "
                        f"{inpaint_nfe(args.method, args.steps)} network evaluations each")


def cmd_edit(args) -> int:
    import torch

    from .editing import sdedit, sdedit_start

    model, config, schedule, x, y, guidance, device = _editing_inputs(args)
    generator = torch.Generator(device).manual_seed(args.seed)
    t0 = sdedit_start(schedule, args.strength)
    out = sdedit(model, schedule, x, args.strength, steps=args.steps, y=y, guidance=guidance,
                 var_type=config.resolved_var_type, generator=generator)
    return _save_edited(args, out, y, guidance, f"edited {len(x)} images (SDEdit from step {t0} of {config.T}, "
                        f"{min(args.steps, t0 + 1)} ancestral steps")
