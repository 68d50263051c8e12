"""The benchmark scripts: the pieces that run without the optional reference packages, and a tiny GPU-profile run.

The reference U-Nets (diffusers, lucidrains) are optional dependencies (``benchmarks/requirements.txt``); these
tests never need them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm.presets import get_preset
from ddpm.unet import UNet, count_parameters

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def compare():
    return load_script("compare_unets")


def test_our_network_is_the_mnist_cpu_unet_without_labels_or_variances(compare):
    cfg = compare.our_config()
    preset = get_preset("mnist-cpu").model_config()
    assert cfg.num_classes is None and cfg.learn_sigma is False and cfg.out_channels == 1
    for field in ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "num_heads",
                  "use_scale_shift_norm", "image_size"):
        assert getattr(cfg, field) == getattr(preset, field), field
    nets = compare.build_networks(("ours",))
    assert set(nets) == {"ours"}
    assert nets["ours"][1]["parameters"] == count_parameters(UNet(cfg))


def test_ratios_are_paired_per_repeat_and_summarised(compare):
    per_net = {"ours": {"x": [2.0, 3.0, 9.0]}, "ref": {"x": [1.0, 2.0, 3.0]}}
    r = compare.ratios(per_net, "x", "ref")
    assert r == {"median": 2.0, "min": 1.5, "max": 3.0, "n": 3}
    assert compare.summarise([5.0, 1.0, 3.0]) == {"median": 3.0, "min": 1.0, "max": 5.0, "n": 3}


def test_the_adapter_gives_a_reference_network_the_project_signature(compare):
    class Out:
        def __init__(self, sample):
            self.sample = sample

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return Out(x * t[:, None, None, None])

    x, t = torch.ones(2, 1, 28, 28), torch.tensor([2.0, 3.0])
    out = compare.Adapter(Net(), returns_sample=True)(x, t, y=None)
    assert torch.equal(out[:, 0, 0, 0], t)


def test_a_missing_reference_package_names_the_requirements_file(compare, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    monkeypatch.setattr(sys, "argv", ["compare_unets.py", "--quality-minutes", "0"])
    with pytest.raises(SystemExit) as err:
        compare.main()
    assert "benchmarks/requirements.txt" in str(err.value) and "diffusers" in str(err.value)


def test_bad_counts_are_refused_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_unets.py"), "--repeats", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--repeats must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_gpu_profile_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_profile.py"), "--presets", "mnist-gpu", "--variants",
           "default,no-fused-adamw,math-attention", "--steps", "1", "--warmup", "1", "--batch-size", "4",
           "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = result["presets"]["mnist-gpu"]
    assert set(rows) == {"default", "no-fused-adamw", "math-attention"}
    for row in rows.values():
        assert row["images_per_s"] > 0 and row["batch_size"] == 4 and row["steps"] == 1
        assert row["peak_memory_bytes"] is None  # no CUDA: no allocator statistics


def test_the_gpu_profile_refuses_an_unknown_variant_or_preset():
    script = str(ROOT / "benchmarks" / "gpu_profile.py")
    for args, words in ((["--variants", "turbo"], "unknown variants"), (["--presets", "nope"], "nope")):
        done = subprocess.run([sys.executable, script, *args, "--device", "cpu"], capture_output=True, text=True)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    # the script a GPU machine runs: on the CPU with tiny sizes, so that it cannot rot between GPU sessions
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert report["tests"]["ok"] and report["tests"]["counts"]["passed"] >= 3
    assert report["profile"]["ok"] and (tmp_path / report["profile"]["file"]).is_file()
    assert report["mnist-gpu"]["ok"] and (tmp_path / report["mnist-gpu"]["grid"]).is_file()


@pytest.fixture(scope="module")
def peers():
    return load_script("peer_quality")


def test_peer_batches_visit_every_digit_once_per_epoch(peers):
    images = torch.arange(10.0).view(10, 1, 1, 1)
    batches = peers.Batches(images, batch_size=3, seed=0)
    epoch = torch.cat([batches.next() for _ in range(3)]).flatten()  # 9 of 10: the last partial batch waits
    assert len(set(epoch.tolist())) == 9
    assert len(batches.next()) == 3  # a new epoch starts instead of a short batch


def test_peer_step_budget_comes_from_the_lower_quartile_of_step_times(peers, monkeypatch):
    times = iter([0.0, 0.0] + [1.0 + i for i in range(16)])  # two warm-up steps, then 1 s, 2 s, ... 16 s
    calls = []
    clock = iter([v for i in range(16) for v in (0.0, 1.0 + i)])
    monkeypatch.setattr(peers.time, "perf_counter", lambda: next(clock))
    steps, per_step = peers.steps_for_budget(lambda: calls.append(next(times)), 100.0)
    assert len(calls) == 18 and per_step == 5.0 and steps == 20  # sorted times [1..16], index 16 // 4 = 4


def test_an_ablation_changes_the_named_fields_and_names_its_record():
    bench = load_script("train_mnist_cpu")
    base = get_preset("mnist-cpu")
    fields, asked, suffix = bench.parse_overrides(
        ["ema_warmup=false", "snr_gamma=null", "schedule=cosine", "model.attention_resolutions=[14, 7]"], base)
    assert fields["ema_warmup"] is False and fields["snr_gamma"] is None and fields["schedule"] == "cosine"
    assert fields["model"] == {**base.model, "attention_resolutions": [14, 7]}
    assert asked["model.attention_resolutions"] == [14, 7]
    assert suffix == "_set_ema_warmup-false_set_snr_gamma-none_set_schedule-cosine_set_attention_resolutions-14,7"
    config = get_preset("mnist-cpu", **fields)
    assert config.schedule == "cosine" and config.model["attention_resolutions"] == [14, 7]
    assert config.model["channel_mult"] == base.model["channel_mult"]  # the other network fields stay


def test_an_ablation_can_swap_in_the_presets_alternative_network_before_changing_its_fields():
    from ddpm.dit import DiT
    from ddpm.presets import ALTERNATIVE_NETWORKS

    bench = load_script("train_mnist_cpu")
    swap = ALTERNATIVE_NETWORKS["mnist-latent"]["dit"]
    fields, asked, suffix = bench.parse_overrides(["model.hidden=64", "model_type=dit"], get_preset("mnist-latent"))
    assert fields["model_type"] == "dit" and fields["model"] == {**swap, "hidden": 64}
    assert suffix == "_set_model_type-dit_set_hidden-64"
    config = get_preset("mnist-latent", **fields)
    assert config.model_config().hidden == 64 and config.is_latent
    # the alternative is the size its comment states, on the preset's latents
    net = DiT(get_preset("mnist-latent", model_type="dit", model=swap).model_config())
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == 0.72
    unet = get_preset("mnist-latent").model_config()
    assert (swap["in_channels"], swap["image_size"]) == (unet.in_channels, unet.image_size)
    with pytest.raises(SystemExit, match="mnist-cpu has no 'dit' network to swap in; valid: unet"):
        bench.parse_overrides(["model_type=dit"], get_preset("mnist-cpu"))


@pytest.mark.parametrize("item, words", [
    ("ema_decay", "expected KEY=VALUE"),
    ("wobble=1", "not a field"),
    ("name=other", "not a field"),
    ("model.wobble=1", "no field 'wobble'"),
])
def test_a_malformed_ablation_is_refused_in_one_line(item, words):
    bench = load_script("train_mnist_cpu")
    with pytest.raises(SystemExit, match=words):
        bench.parse_overrides([item], get_preset("mnist-cpu"))
