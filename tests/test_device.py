"""The training and sampling paths on one device: the CPU in the ordinary suite, CUDA in the GPU check.

``benchmarks/gpu_check.py`` runs this file with ``DDPM_TEST_DEVICE=cuda`` (and ``DDPM_TEST_COMPILE=1``) on a
machine with a GPU; on the CPU the same tests run here, so that the GPU path cannot rot unseen. On CUDA the
trainer uses bf16 autocast, channels-last tensors and fused AdamW; the tests check that it really does.
"""

from __future__ import annotations

import os

import pytest
import torch

from ddpm.guidance import ClassifierFreeGuidance
from ddpm.samplers import ddim_sample, ddpm_sample
from ddpm.schedule import NoiseSchedule
from ddpm.train import TrainConfig, Trainer

DEVICE = torch.device(os.environ.get("DDPM_TEST_DEVICE", "cpu"))
COMPILE = os.environ.get("DDPM_TEST_COMPILE", "0") == "1"

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="DDPM_TEST_DEVICE=cuda without CUDA")

TINY = dict(image_size=28, in_channels=1, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[14], num_heads=2, dropout=0.0, num_classes=10, learn_sigma=True)


def config(**overrides) -> TrainConfig:
    base = dict(name="device-tiny", model=TINY, dataset="mnist5k", schedule="cosine", T=50, loss_type="hybrid",
                batch_size=8, steps=3, lr=1e-3, warmup_steps=1, ema_decay=0.9, label_dropout=0.2,
                bf16=True, channels_last=True, log_every=1)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def digits():
    from ddpm.data import load_dataset

    x, y = load_dataset("mnist5k", split="train")
    return x[:64], y[:64]


def test_training_steps_use_the_speed_options_and_stay_finite(digits):
    trainer = Trainer(config(), data=digits, device=DEVICE, progress=False)
    assert trainer.channels_last  # on the CPU as on CUDA
    assert trainer.use_bf16 == (DEVICE.type == "cuda")
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] == 3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    if DEVICE.type == "cuda":
        assert trainer.optimizer.param_groups[0].get("fused") is True
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert all(torch.isfinite(torch.tensor(v)) for v in trainer.history["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert next(trainer.ema.parameters()).device.type == DEVICE.type


@pytest.mark.skipif(not COMPILE, reason="torch.compile takes minutes on a CPU; DDPM_TEST_COMPILE=1 runs it")
def test_compiled_training_matches_eager(digits):
    eager = Trainer(config(steps=2), data=digits, device=DEVICE, progress=False).fit()
    compiled = Trainer(config(steps=2, compile=True), data=digits, device=DEVICE, progress=False).fit()
    tol = 5e-2 if DEVICE.type == "cuda" else 1e-4  # bf16 autocast rounds differently in fused kernels
    assert compiled.history["loss"] == pytest.approx(eager.history["loss"], rel=tol)


def test_guided_and_unguided_sampling(digits):
    model = Trainer(config(), data=digits, device=DEVICE, progress=False).fit().ema
    y = torch.arange(4, device=DEVICE) % 10
    g = lambda: torch.Generator(DEVICE).manual_seed(0)  # noqa: E731
    schedule = NoiseSchedule.cosine(T=50)
    with torch.no_grad():
        plain = ddim_sample(model, schedule, (4, 1, 28, 28), steps=5, y=y, generator=g(), device=DEVICE)
        guided = ddim_sample(model, schedule, (4, 1, 28, 28), steps=5, y=y, generator=g(), device=DEVICE,
                             guidance=ClassifierFreeGuidance(3.0))
        ancestral = ddpm_sample(model, schedule, (4, 1, 28, 28), steps=5, y=y, generator=g(), device=DEVICE)
    for x in (plain, guided, ancestral):
        assert x.shape == (4, 1, 28, 28) and x.device.type == DEVICE.type and torch.isfinite(x).all()
        assert x.abs().max() <= 1 + 1e-3  # x_0 is clipped to the data range
    assert not torch.equal(plain, guided)


def test_save_and_resume_on_the_device(tmp_path, digits):
    full = Trainer(config(steps=4), data=digits, device=DEVICE, progress=False).fit()
    first = Trainer(config(steps=4), out_dir=tmp_path / "run", data=digits, device=DEVICE, progress=False)
    first.fit(steps=2)
    resumed = Trainer(config(steps=4), out_dir=tmp_path / "run", data=digits, device=DEVICE, progress=False)
    resumed.load()
    assert resumed.step == 2
    resumed.fit()
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        if DEVICE.type == "cpu":
            assert torch.equal(a, b)  # bitwise on the CPU
        else:  # CUDA kernels may reorder sums; the trajectory must still be the same one
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
