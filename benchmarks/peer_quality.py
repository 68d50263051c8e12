"""Benchmark: quality per CPU-minute of three pipelines, each trained as its own users would train it.

    pip install -r benchmarks/requirements.txt      # diffusers and denoising-diffusion-pytorch
    python benchmarks/peer_quality.py [--budget 600] [--n 1000] [--only ours diffusers lucidrains]

Three pipelines get the same data (the 4,000 ``mnist5k`` training digits), about the same parameter count (within
10% of ours) and the same wall-clock training time (``--budget`` seconds, 10 minutes by default):

* ``ours``: the ``mnist-cpu`` preset as it is (class-conditional with label dropout, L_hybrid with Min-SNR-5, lr
  2e-3 with a cosine decay, batch 64, EMA 0.999), sampled with the null label, so it is scored as an
  unconditional model although it also learned the conditional one;
* ``diffusers``: ``UNet2DModel`` in the layout of diffusers' small-image examples (two residual blocks per level,
  widths c/2c/2c, attention at 14x14 and 7x7, c matched to our parameter count), ``DDPMScheduler`` with its
  defaults (linear betas, 1,000 steps, eps prediction), trained with the defaults of diffusers' example
  ``train_unconditional.py``: AdamW lr 1e-4, betas (0.95, 0.999), weight decay 1e-6, cosine decay after 500 warm-up
  steps, batch 16, gradient clipping at 1, EMA with warm-up (inv_gamma 1, power 3/4, at most 0.9999);
* ``lucidrains``: ``denoising_diffusion_pytorch.Unet`` (``dim_mults=(1, 2, 4)``, ``dim`` matched) inside
  ``GaussianDiffusion`` with its defaults (v prediction, sigmoid schedule, 1,000 steps), trained as its ``Trainer``
  does with its defaults: Adam lr 1e-4, betas (0.9, 0.99), batch 16, gradient clipping at 1, EMA 0.995 updated
  every 10 steps. Its ``Trainer`` class itself is not used because it computes an Inception FID, which needs a
  download; its loop is a few lines, written out below.

Random horizontal flips are off for both references (diffusers' example has them off by default, lucidrains' on):
a mirrored digit is not a digit, and flips would only handicap them.

Each pipeline's number of steps is set from its own measured step time (the lower quartile of 16 timed steps after
two warm-up steps), so that its training takes ``--budget`` seconds; its learning-rate schedule knows where it
ends. Run it on an otherwise idle machine. Each pipeline then draws ``--n`` samples with its own DDIM sampler in 50
steps (eta 0), from its EMA weights, and every sample set is scored by the project's metric (``ddpm.metrics``)
against the training digits, next to the real-data floor at the same n (held-out digits scored the same way).

Results go to ``benchmarks/results/peer_quality.json`` and a 10x10 grid per pipeline to
``benchmarks/results/peer_<name>.png``; the book's benchmark page shows both.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_unets import TOLERANCE, _closest, _versions  # noqa: E402

from ddpm.metrics import classifier_outputs, fid_with_error, heldout_floor, load_or_train_mnist_classifier, real_digits  # noqa: E402
from ddpm.plotting import image_grid  # noqa: E402
from ddpm.presets import get_preset  # noqa: E402
from ddpm.samplers import sample_in_batches  # noqa: E402
from ddpm.train import Trainer  # noqa: E402
from ddpm.unet import count_parameters  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "peer_quality.json"
PIPELINES = ("ours", "diffusers", "lucidrains")
SAMPLING_STEPS = 50


class Batches:
    """Shuffled minibatches of the training digits, epoch after epoch, as a DataLoader with ``shuffle=True``."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.images, self.batch_size = images, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(len(images), generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.order):
            self.order, self.pos = torch.randperm(len(self.images), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.images[idx]


def steps_for_budget(step: Callable[[], None], budget_s: float, probes: int = 16) -> tuple[int, float]:
    """(steps that fill ``budget_s``, seconds per step) from the lower quartile of ``probes`` timed steps."""
    for _ in range(2):
        step()
    times = []
    for _ in range(probes):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    per_step = sorted(times)[len(times) // 4]
    return max(1, int(budget_s / per_step)), per_step


def probe_then_train(module: nn.Module, fresh: Callable, budget_s: float) -> tuple[int, float, float, object]:
    """Time a probe, restore the initial weights, then train for the budget: (steps, s per step, train s, ema).

    ``fresh(total_steps)`` builds a new optimiser, schedule and EMA and returns ``(step, ema)``; the probe gets one
    with a placeholder length, the real run one that knows where it ends (a decaying learning rate needs it).
    """
    initial = copy.deepcopy(module.state_dict())
    probe_step, _ = fresh(10_000)
    steps, per_step = steps_for_budget(probe_step, budget_s)
    module.load_state_dict(initial)
    step, ema = fresh(steps)
    module.train()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps, per_step, time.perf_counter() - start, ema


# ----------------------------------------------------------------------------------------------------- ours


def run_ours(budget_s: float, n: int, seed: int) -> dict:
    data = real_digits("train")
    probe = get_preset("mnist-cpu", preview_every=0, checkpoint_every=0)
    trainer = Trainer(probe, progress=False, data=data)
    steps, per_step = steps_for_budget(trainer.train_step, budget_s)
    config = get_preset("mnist-cpu", steps=steps, preview_every=0, checkpoint_every=0)
    trainer = Trainer(config, progress=False, data=data).fit()
    model = trainer.ema.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        samples = sample_in_batches(model, trainer.schedule, (1, 28, 28), n, batch_size=250, sampler="ddim",
                                    steps=SAMPLING_STEPS, generator=torch.Generator().manual_seed(seed))
    return {"samples": samples, "steps": steps, "batch_size": config.batch_size, "train_s": trainer.wall_time,
            "probe_s_per_step": per_step, "sampling_s": time.perf_counter() - start,
            "parameters": count_parameters(model), "recipe": "mnist-cpu preset (null label)"}


# ------------------------------------------------------------------------------------------------ diffusers


def diffusers_unet(target: int):
    from diffusers import UNet2DModel

    return _closest(UNet2DModel, lambda c: dict(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(c, 2 * c, 2 * c), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ), range(8, 65, 8), target)


def run_diffusers(budget_s: float, n: int, seed: int, target: int) -> dict:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    kwargs, model = diffusers_unet(target)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batch_size = 16
    batches = Batches(real_digits("train")[0], batch_size, seed)  # already in [-1, 1], as the example normalises

    def make_step(optimizer, lr_scheduler, ema):
        def step() -> None:
            clean = batches.next()
            noise = torch.randn_like(clean)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),))
            loss = F.mse_loss(model(scheduler.add_noise(clean, noise, t), t).sample, noise)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            ema.step(model.parameters())
            optimizer.zero_grad(set_to_none=True)
        return step

    def fresh(total_steps: int):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                     num_training_steps=total_steps)
        ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        return make_step(optimizer, lr_scheduler, ema), ema

    steps, per_step, train_s, ema = probe_then_train(model, fresh, budget_s)
    ema.copy_to(model.parameters())
    model.eval()
    pipe = DDIMPipeline(unet=model, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    chunks = []
    with torch.inference_mode():
        for size in _chunks(n, 250):
            images = pipe(batch_size=size, generator=gen, num_inference_steps=SAMPLING_STEPS, eta=0.0,
                          output_type="np").images  # [N, H, W, 1] in [0, 1]
            chunks.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) * 2 - 1)
    return {"samples": torch.cat(chunks), "steps": steps, "batch_size": batch_size, "train_s": train_s,
            "probe_s_per_step": per_step, "sampling_s": time.perf_counter() - start,
            "parameters": count_parameters(model), "kwargs": kwargs,
            "recipe": "train_unconditional.py defaults: AdamW 1e-4 (0.95, 0.999), wd 1e-6, cosine after 500 warm-up "
                      "steps, batch 16, clip 1, EMA warm-up to 0.9999; DDPMScheduler linear, eps"}


# ----------------------------------------------------------------------------------------------- lucidrains


def run_lucidrains(budget_s: float, n: int, seed: int, target: int) -> dict:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    torch.manual_seed(seed)
    kwargs, unet = _closest(Unet, lambda dim: {"dim": dim, "dim_mults": (1, 2, 4), "channels": 1},
                            range(8, 49, 2), target)
    diffusion = GaussianDiffusion(unet, image_size=28, timesteps=1000, sampling_timesteps=SAMPLING_STEPS)
    batch_size = 16
    batches = Batches((real_digits("train")[0] + 1) / 2, batch_size, seed)  # its Trainer feeds images in [0, 1]

    def fresh():
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
        ema = EMA(diffusion, beta=0.995, update_every=10)

        def step() -> None:
            loss = diffusion(batches.next())
            loss.backward()
            nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
        return step, ema

    steps, per_step, train_s, ema = probe_then_train(diffusion, lambda total_steps: fresh(), budget_s)
    sampler = ema.ema_model.eval()
    torch.manual_seed(seed)
    start = time.perf_counter()
    chunks = []
    with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):  # its sampler draws a progress bar
        for size in _chunks(n, 250):
            chunks.append(sampler.sample(batch_size=size) * 2 - 1)  # its sampler returns [0, 1]
    return {"samples": torch.cat(chunks).clamp(-1, 1), "steps": steps, "batch_size": batch_size,
            "train_s": train_s, "probe_s_per_step": per_step, "sampling_s": time.perf_counter() - start,
            "parameters": count_parameters(unet), "kwargs": {k: list(v) if isinstance(v, tuple) else v
                                                             for k, v in kwargs.items()},
            "recipe": "Trainer defaults: Adam 1e-4 (0.9, 0.99), batch 16, clip 1, EMA 0.995 every 10 steps; "
                      "GaussianDiffusion defaults: v prediction, sigmoid schedule"}


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per pipeline (default 600)")
    parser.add_argument("--n", type=int, default=1000, help="samples per pipeline (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, choices=PIPELINES, help="pipelines (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    classifier, _ = load_or_train_mnist_classifier()
    reference = classifier_outputs(classifier, real_digits("train")[0])["features"]
    heldout = classifier_outputs(classifier, real_digits("test")[0])["features"]
    floor = heldout_floor(heldout, reference, args.n)
    print(f"real-data floor at n = {floor['n']}: FID {floor['fid']:.1f} +- {floor['std']:.1f}", flush=True)

    from ddpm.unet import UNet, UNetConfig

    target = count_parameters(UNet(UNetConfig.from_dict(get_preset("mnist-cpu").model)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = json.loads(OUT.read_text()) if OUT.exists() else {"runs": {}}
    results.update({"budget_s": args.budget, "n": args.n, "sampler": f"DDIM, {SAMPLING_STEPS} steps, eta 0",
                    "floor": {"fid": round(floor["fid"], 2), "std": round(floor["std"], 2), "n": floor["n"]},
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "versions": _versions()})
    runners = {"ours": lambda: run_ours(args.budget, args.n, args.seed),
               "diffusers": lambda: run_diffusers(args.budget, args.n, args.seed, target),
               "lucidrains": lambda: run_lucidrains(args.budget, args.n, args.seed, target)}
    for name in args.only or PIPELINES:
        print(f"{name}: training for {args.budget:.0f} s ...", flush=True)
        run = runners[name]()
        if abs(run["parameters"] - target) > TOLERANCE * target:
            raise SystemExit(f"{name} has {run['parameters']:,} parameters, more than 10% from ours ({target:,})")
        samples = run.pop("samples")
        fid = fid_with_error(classifier_outputs(classifier, samples)["features"], reference)
        Image.fromarray(image_grid(samples[:100], nrow=10).squeeze(-1)).save(RESULTS / f"peer_{name}.png")
        run.update(fid=round(fid["fid"], 2), fid_std=round(fid["std"], 2), train_s=round(run["train_s"], 1),
                   sampling_s=round(run["sampling_s"], 1), probe_s_per_step=round(run["probe_s_per_step"], 4),
                   images_per_s=round(run["steps"] * run["batch_size"] / run["train_s"], 1),
                   fid_over_floor=round(fid["fid"] / floor["fid"], 2))
        results["runs"][name] = run
        OUT.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{name:<11} {run['parameters']:>9,} params {run['steps']:>6} steps x {run['batch_size']:<3} "
              f"in {run['train_s']:5.0f} s ({run['images_per_s']:.0f} img/s)  FID {run['fid']:6.1f} +- "
              f"{run['fid_std']:4.1f}  ({run['fid_over_floor']:.1f} x floor)", flush=True)
    done = results["runs"]
    if all(name in done for name in PIPELINES):
        best = min(done, key=lambda k: done[k]["fid"])
        print(f"lowest FID: {best}" + ("" if best == "ours" else "  (target: ours lowest, NOT met)"))


if __name__ == "__main__":
    main()
