"""Benchmark: our U-Net against diffusers' and lucidrains' U-Nets of the same size on 28x28 digits.

    pip install -r benchmarks/requirements.txt      # diffusers and denoising-diffusion-pytorch
    python benchmarks/compare_unets.py [--repeats 7] [--quality-minutes 4] [--out FILE]

Four networks of about the same parameter count (within 10% of ours), all predicting eps for 1x28x28 images:

* ``ours``: the ``mnist-cpu`` preset's U-Net (channels 16/32/80 at 28/14/7, one residual block per level, attention
  at 7x7, AdaGN), unconditional and with one output channel so that every network computes the same function type;
* ``diffusers-same``: diffusers' ``UNet2DModel`` with the same layout (widths, depth, attention, scale-shift
  conditioning), so that the ratio measures the implementation alone; diffusers takes one GroupNorm group count for
  every level, chosen so that the first level has our two channels per group;
* ``diffusers-usual``: ``UNet2DModel`` in the layout of diffusers' own small-image examples (two residual blocks
  per level, widths c/2c/2c, attention at 14x14 and 7x7), with c chosen to match our parameter count;
* ``lucidrains``: ``denoising_diffusion_pytorch.Unet`` with ``dim_mults=(1, 2, 4)``, ``dim`` chosen likewise.

In one process, with the networks taking turns within every repeat (the order rotates), it measures

* training throughput: images per second of a DDPM training step (forward, backward, AdamW step) at one batch size;
* sampling throughput: network evaluations per second (inference mode, one batch), and images per second of a DDIM
  run in 50 steps driven by the project's sampler for every network;
* peak memory of a training step, each network in a fresh subprocess (the rise of the peak resident set size on a
  CPU, ``torch.cuda.max_memory_allocated`` on a GPU);
* quality per compute (``--quality-minutes``, 0 to skip): ours and both diffusers networks train for the same wall
  time with the same recipe, then the project's FID (``ddpm.metrics``) of 1,000 DDIM-50 samples.

It prints the ratios ours/theirs with their spread over the repeats (median, min-max of the paired per-repeat
ratios) and writes everything to ``benchmarks/results/unets_<device>.json``, which the book's benchmark page reads.
The targets of the issue are checked on the medians: training at least 1.3 times diffusers and 3 times lucidrains,
sampling at least 1.3 times diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ddpm.schedule import NoiseSchedule
from ddpm.unet import UNet, UNetConfig, _num_groups, count_parameters

RESULTS = Path(__file__).resolve().parent / "results"
NETWORKS = ("ours", "diffusers-same", "diffusers-usual", "lucidrains")
TOLERANCE = 0.10  # parameter counts must agree within 10%
TARGETS = {  # (measurement, reference network): minimum ratio ours/theirs
    ("train_images_per_s", "diffusers-same"): 1.3,
    ("train_images_per_s", "diffusers-usual"): 1.3,
    ("train_images_per_s", "lucidrains"): 3.0,
    ("evals_per_s", "diffusers-same"): 1.3,
    ("evals_per_s", "diffusers-usual"): 1.3,
}


def our_config() -> UNetConfig:
    """The ``mnist-cpu`` U-Net, unconditional and with one output channel (the references output eps only)."""
    from ddpm.presets import get_preset

    model = dict(get_preset("mnist-cpu").model)
    model.update(num_classes=None, learn_sigma=False)
    return UNetConfig.from_dict(model)


class Adapter(nn.Module):
    """Gives a reference U-Net the project's signature ``model(x, t, y=None) -> eps``."""

    def __init__(self, net: nn.Module, returns_sample: bool) -> None:
        super().__init__()
        self.net, self.returns_sample = net, returns_sample

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(x, t)
        return out.sample if self.returns_sample else out


def _closest(build: Callable[..., nn.Module], kwargs_of: Callable[[int], dict], widths, target: int):
    """(kwargs, network) of the width whose network has the parameter count closest to ``target``."""
    built = {w: build(**kwargs_of(w)) for w in widths}
    best = min(built, key=lambda w: abs(count_parameters(built[w]) - target))
    return kwargs_of(best), built[best]


def build_networks(names=NETWORKS) -> dict[str, tuple[nn.Module, dict]]:
    """name -> (network with the project's signature, description); parameter counts are checked against ours."""
    cfg = our_config()
    ours = UNet(cfg)
    target = count_parameters(ours)
    nets: dict[str, tuple[nn.Module, dict]] = {"ours": (ours, {"config": cfg.to_dict()})}
    if "diffusers-same" in names or "diffusers-usual" in names:
        from diffusers import UNet2DModel

        widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
        if "diffusers-same" in names:
            kwargs = dict(
                sample_size=28, in_channels=1, out_channels=1, block_out_channels=widths,
                layers_per_block=cfg.num_res_blocks, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=_num_groups(widths[0]),
                attention_head_dim=widths[-1] // cfg.num_heads, resnet_time_scale_shift="scale_shift", dropout=0.0,
            )
            nets["diffusers-same"] = (Adapter(UNet2DModel(**kwargs), True), {"kwargs": kwargs})
        if "diffusers-usual" in names:
            kwargs, net = _closest(UNet2DModel, lambda c: dict(
                sample_size=28, in_channels=1, out_channels=1, block_out_channels=(c, 2 * c, 2 * c),
                layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
            ), range(8, 65, 8), target)
            nets["diffusers-usual"] = (Adapter(net, True), {"kwargs": kwargs})
    if "lucidrains" in names:
        from denoising_diffusion_pytorch import Unet

        kwargs, net = _closest(Unet, lambda dim: {"dim": dim, "dim_mults": (1, 2, 4), "channels": 1},
                               range(8, 49, 2), target)
        nets["lucidrains"] = (Adapter(net, False), {"kwargs": kwargs})
    for name, (net, info) in nets.items():
        info["parameters"] = count_parameters(net)
        if abs(info["parameters"] - target) > TOLERANCE * target:
            raise SystemExit(f"{name} has {info['parameters']:,} parameters, more than 10% from ours ({target:,})")
    return nets


class Workload:
    """Fixed inputs for the timings: a training batch and a sampling batch, the same for every network."""

    def __init__(self, batch_size: int, sample_batch: int, device: torch.device, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.schedule = NoiseSchedule.from_name("cosine", 1000)
        x0 = torch.rand(batch_size, 1, 28, 28, generator=gen) * 2 - 1
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        noise = torch.randn(batch_size, 1, 28, 28, generator=gen)
        x_t = self.schedule.q_sample(x0, t, noise)
        xs = torch.randn(sample_batch, 1, 28, 28, generator=gen)
        ts = torch.randint(0, 1000, (sample_batch,), generator=gen)
        self.x0, self.t, self.noise, self.x_t, self.xs, self.ts = (v.to(device) for v in (x0, t, noise, x_t, xs, ts))
        self.device = device


def training_step(net: nn.Module, work: Workload) -> Callable[[], None]:
    """One DDPM training step on the fixed batch: L_simple, backward, AdamW."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        loss = (net(work.x_t, work.t) - work.noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_throughput(nets: dict, work: Workload, repeats: int, steps: int, ddim_n: int, ddim_repeats: int) -> dict:
    """Per network, lists over repeats of training images/s, evaluations/s and DDIM-50 images/s."""
    from ddpm.samplers import ddim_sample

    names = list(nets)
    steps_fn = {name: training_step(net, work) for name, (net, _) in nets.items()}
    out = {name: {"train_images_per_s": [], "evals_per_s": [], "ddim50_images_per_s": []} for name in names}

    def rotated(rep: int) -> list[str]:  # a different network goes first in each repeat
        return names[rep % len(names):] + names[: rep % len(names)]

    for name, (net, _) in nets.items():  # warm-up: first calls allocate and pick kernels
        net.train()
        steps_fn[name]()
        steps_fn[name]()
        with torch.inference_mode():
            net.eval()(work.xs, work.ts)
    for rep in range(repeats):
        for name in rotated(rep):
            nets[name][0].train()

            def run() -> None:
                for _ in range(steps):
                    steps_fn[name]()

            out[name]["train_images_per_s"].append(steps * len(work.x0) / timed(run, work.device))
        for name in rotated(rep):
            net = nets[name][0].eval()
            with torch.inference_mode():
                seconds = timed(lambda: net(work.xs, work.ts), work.device)
            out[name]["evals_per_s"].append(len(work.xs) / seconds)
    for rep in range(ddim_repeats):
        for name in rotated(rep):
            net = nets[name][0].eval()
            gen = torch.Generator(device=work.device).manual_seed(rep)
            with torch.inference_mode():
                seconds = timed(lambda: ddim_sample(net, work.schedule, (ddim_n, 1, 28, 28), steps=50, generator=gen,
                                                   device=work.device), work.device)
            out[name]["ddim50_images_per_s"].append(ddim_n / seconds)
    return out


def summarise(values: list[float]) -> dict:
    """Median, min and max of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratios(per_net: dict, key: str, reference: str) -> dict:
    """Paired per-repeat ratios ours/reference for one measurement, summarised."""
    pairs = [a / b for a, b in zip(per_net["ours"][key], per_net[reference][key])]
    return summarise(pairs)


def peak_memory_probe(name: str, batch_size: int, device: str) -> dict:
    """Run in a fresh process: peak memory of training steps of one network (bytes)."""
    dev = torch.device(device)
    nets = build_networks((name,))
    net = nets[name][0].to(dev).train()
    work = Workload(batch_size, 1, dev)
    step = training_step(net, work)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "kind": "cuda max_memory_allocated"}
    # Linux: writing 5 to /proc/self/clear_refs resets the peak resident set size (VmHWM) to the current one.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    for _ in range(3):
        step()
    return {"peak_bytes": (_status_kib("VmHWM") - base) * 1024, "kind": "rise of the peak resident set size"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: the CPU memory probe needs Linux")


def measure_memory(names, batch_size: int, device: str) -> dict:
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--memory-probe", name, "--batch-size", str(batch_size), "--device", device]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"memory probe for {name} failed: {done.stderr.strip().splitlines()[-1:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def train_for(net: nn.Module, minutes: float, device: torch.device, seed: int = 0) -> dict:
    """The quality recipe: L_simple, cosine schedule, AdamW 1e-3 with 50 warm-up steps, batch 64, EMA 0.999."""
    import copy

    from ddpm.data import load_dataset
    from ddpm.losses import training_losses
    from ddpm.train import ema_decay_at, update_ema

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, _ = load_dataset("mnist5k", split="train")
    schedule = NoiseSchedule.from_name("cosine", 1000)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 60 * minutes:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        x0 = x[idx]
        t = torch.randint(0, 1000, (64,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * min(1.0, (steps + 1) / 50)
        loss = training_losses(net, schedule, x0.to(device), t.to(device), noise=noise.to(device))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        steps += 1
        update_ema(ema, net, ema_decay_at(steps - 1, 0.999))
    return {"ema": ema, "steps": steps, "seconds": time.perf_counter() - start}


def measure_quality(nets: dict, minutes: float, n: int, device: torch.device) -> dict:
    """Same wall time, same recipe: FID of n DDIM-50 samples (the project's metric, with its error bar)."""
    from ddpm.metrics import classifier_outputs, fid_with_error, load_or_train_mnist_classifier, real_digits
    from ddpm.samplers import sample_in_batches

    classifier, _ = load_or_train_mnist_classifier()
    reference = classifier_outputs(classifier, real_digits("train")[0])["features"]
    schedule = NoiseSchedule.from_name("cosine", 1000)
    out = {}
    for name in ("ours", "diffusers-same", "diffusers-usual"):
        if name not in nets:
            continue
        net = nets[name][0].to(device)
        trained = train_for(net, minutes, device)
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.inference_mode():
            samples = sample_in_batches(trained["ema"], schedule, (1, 28, 28), n, batch_size=250, sampler="ddim",
                                        steps=50, generator=gen, device=device)
        fid = fid_with_error(classifier_outputs(classifier, samples)["features"], reference)
        out[name] = {"steps": trained["steps"], "seconds": trained["seconds"], "images_seen": 64 * trained["steps"],
                     "fid": fid["fid"], "fid_std": fid["std"], "n_samples": n}
        print(f"  {name:16s} {trained['steps']:5d} steps in {trained['seconds']:.0f} s   FID {fid['fid']:.1f} "
              f"+- {fid['std']:.1f}", flush=True)
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("ddpm", "diffusers", "denoising-diffusion-pytorch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats per network (default 7)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timing (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch (default 64, as mnist-cpu)")
    parser.add_argument("--sample-batch", type=int, default=250, help="batch of the evaluation timing (default 250)")
    parser.add_argument("--ddim-n", type=int, default=100, help="images per DDIM-50 timing (default 100)")
    parser.add_argument("--ddim-repeats", type=int, default=3, help="DDIM-50 timings per network (default 3)")
    parser.add_argument("--quality-minutes", type=float, default=4.0,
                        help="training minutes per network for the quality comparison; 0 skips it (default 4)")
    parser.add_argument("--quality-n", type=int, default=1000, help="samples for the quality FID (default 1000)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="results file (default results/unets_<device>.json)")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("repeats", "steps", "batch_size", "sample_batch", "ddim_n", "ddim_repeats", "quality_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    if args.memory_probe:
        print(json.dumps(peak_memory_probe(args.memory_probe, args.batch_size, args.device)))
        return
    try:
        nets = build_networks()
    except ImportError as err:
        raise SystemExit(f"{err.name} is missing: pip install -r benchmarks/requirements.txt") from None
    device = torch.device(args.device)
    for net, _ in nets.values():
        net.to(device)
    print(f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}")
    for name, (_, info) in nets.items():
        print(f"  {name:16s} {info['parameters']:>10,} parameters")

    work = Workload(args.batch_size, args.sample_batch, device)
    per_net = measure_throughput(nets, work, args.repeats, args.steps, args.ddim_n, args.ddim_repeats)
    memory = measure_memory(list(nets), args.batch_size, args.device)

    header = f"{'':16s} {'train img/s':>12s} {'evals/s':>10s} {'DDIM-50 img/s':>14s} {'train peak MiB':>15s}"
    print("\n" + header)
    for name in nets:
        m = per_net[name]
        print(f"{name:16s} {summarise(m['train_images_per_s'])['median']:12.1f} "
              f"{summarise(m['evals_per_s'])['median']:10.1f} {summarise(m['ddim50_images_per_s'])['median']:14.2f} "
              f"{memory[name]['peak_bytes'] / 2**20:15.1f}")
    table = {}
    print("\nours / theirs: median (min-max over paired repeats)")
    for ref in nets:
        if ref == "ours":
            continue
        row = {key: ratios(per_net, key, ref) for key in ("train_images_per_s", "evals_per_s", "ddim50_images_per_s")}
        row["train_peak_memory"] = memory["ours"]["peak_bytes"] / memory[ref]["peak_bytes"]
        table[ref] = row
        cells = "  ".join(f"{key.split('_')[0]} {r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"
                          for key, r in row.items() if isinstance(r, dict))
        print(f"  vs {ref:16s} {cells}  memory {row['train_peak_memory']:.2f}")
    targets = []
    for (key, ref), minimum in TARGETS.items():
        if ref in table:
            got = table[ref][key]["median"]
            targets.append({"measurement": key, "reference": ref, "minimum": minimum, "ratio": got,
                            "holds": got >= minimum})
            print(f"  target {key} vs {ref} >= {minimum}: {got:.2f} {'holds' if got >= minimum else 'does not hold'}")

    quality = {}
    if args.quality_minutes > 0:
        print(f"\nquality per compute: {args.quality_minutes:g} min of training each, FID of {args.quality_n} "
              "DDIM-50 samples")
        quality = measure_quality(nets, args.quality_minutes, args.quality_n, device)

    result = {
        "device": str(device), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "versions": _versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "memory_probe")},
        "networks": {name: info for name, (_, info) in nets.items()},
        "measurements": {name: {k: summarise(v) | {"values": v} for k, v in m.items()} for name, m in per_net.items()},
        "memory": memory, "ratios": table, "targets": targets, "quality": quality,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = args.out or RESULTS / f"unets_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
