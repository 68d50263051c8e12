"""The diffusion transformer (``ddpm.dit``): shapes, adaLN-Zero start, parameter count, batch independence."""

import pytest
import torch

from ddpm.dit import (DiT, DiTConfig, TokenMLP, expected_parameters, patchify, sincos_position_embedding,
                      unpatchify)
from ddpm.guidance import ClassifierFreeGuidance
from ddpm.samplers import sample
from ddpm.schedule import NoiseSchedule

torch.manual_seed(0)
TINY = dict(image_size=8, in_channels=4, patch_size=2, hidden=32, depth=2, num_heads=4, num_classes=10)


def _randomise(model):
    """Give every zero-initialised layer random weights, so that tests see a working network."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("learn_sigma, conv_mlp", [(False, False), (True, False), (False, True)])
def test_shapes_and_zero_output_at_initialisation(learn_sigma, conv_mlp):
    model = DiT(DiTConfig(**TINY, learn_sigma=learn_sigma, conv_mlp=conv_mlp))
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8 if learn_sigma else 4, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero and a zero output layer: the network starts at 0
    # a gradient still reaches the zero layers, so training can leave the start
    out.sum().backward()
    assert model.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config", [TINY, dict(TINY, num_classes=None, learn_sigma=True, patch_size=4, depth=3),
                                    dict(TINY, image_size=28, in_channels=1, patch_size=7, hidden=48, mlp_ratio=2),
                                    dict(TINY, conv_mlp=True, depth=3, mlp_ratio=2)])
def test_parameter_count_matches_its_formula(config):
    cfg = DiTConfig(**config)
    assert sum(p.numel() for p in DiT(cfg).parameters()) == expected_parameters(cfg)


def test_patchify_and_unpatchify_are_inverse_and_patches_are_local():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(unpatchify(tokens, 2, 3, 4, 6), x)
    # token 4 is the patch in row 1, column 1: pixels (2..3, 2..3) of every channel
    assert torch.equal(tokens[0, 4].reshape(2, 2, 3).permute(2, 0, 1), x[0, :, 2:4, 2:4])


@pytest.mark.parametrize("grid", [None, 4])
def test_the_token_mlp_mixes_a_patch_with_its_eight_neighbours_only_with_the_convolution(grid):
    mlp = _randomise(TokenMLP(8, 2, grid))
    h = torch.randn(1, 16, 8)
    moved = h.clone()
    moved[0, 6] += 1.0  # the token in row 1, column 2 of the 4x4 grid
    with torch.no_grad():
        changed = (mlp(moved) - mlp(h)).abs().sum(-1).reshape(4, 4) > 1e-6
    expected = torch.zeros(4, 4, dtype=torch.bool)
    if grid:
        expected[0:3, 1:4] = True
    else:
        expected[1, 2] = True
    assert torch.equal(changed, expected)


def test_position_embedding_distinguishes_every_patch():
    pos = sincos_position_embedding(32, 4)
    assert pos.shape == (16, 32)
    assert torch.cdist(pos, pos).add(torch.eye(16) * 10).min() > 0.1


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_each_example_is_independent_of_the_rest_of_the_batch(conv_mlp):
    model = _randomise(DiT(DiTConfig(**TINY, conv_mlp=conv_mlp))).eval()
    x, t, y = torch.randn(5, 4, 8, 8), torch.tensor([3, 500, 10, 999, 0]), torch.tensor([0, 10, 3, 3, 7])
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        out = model(x, t, y)
        assert torch.allclose(model(x[perm], t[perm], y[perm]), out[perm], atol=1e-5)
        assert torch.allclose(model(x[:1], t[:1], y[:1]), out[:1], atol=1e-5)
        # the class and the timestep both change the output
        assert not torch.allclose(model(x, t, torch.full_like(y, 10)), out)
        assert not torch.allclose(model(x, t + 1, y), out)


def test_samplers_and_guidance_run_on_the_transformer():
    model = _randomise(DiT(DiTConfig(**TINY))).eval()
    sched = NoiseSchedule.linear(100)
    y = torch.arange(4)
    for name in ("ddpm", "ddim", "heun", "dpm++2m"):
        x = sample(model, sched, (4, 4, 8, 8), sampler=name, steps=3, y=y,
                   guidance=ClassifierFreeGuidance(1.5), generator=torch.Generator().manual_seed(0))
        assert x.shape == (4, 4, 8, 8) and torch.isfinite(x).all()


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        DiT(DiTConfig(**dict(TINY, image_size=7)))
    with pytest.raises(ValueError, match="num_heads"):
        DiT(DiTConfig(**dict(TINY, hidden=30, num_heads=4)))
    model = DiT(DiTConfig(**TINY))
    with pytest.raises(ValueError, match=r"x must have shape \[N, 4, 8, 8\]"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="y must hold labels"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 11]))
    cfg = DiTConfig(**TINY)
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg


def test_a_transformer_trains_and_reloads_through_the_trainer(tmp_path):
    from ddpm.cache import load_model
    from ddpm.data import load_dataset
    from ddpm.train import TrainConfig, Trainer

    x, y = load_dataset("mnist5k", split="train")
    keep = torch.arange(0, len(y), 45)
    config = TrainConfig(name="dit-test", model_type="dit", dataset="mnist5k", steps=3, batch_size=8, T=50,
                         label_dropout=0.1, checkpoint_every=0, preview_every=0,
                         model=dict(image_size=28, in_channels=1, patch_size=7, hidden=16, depth=1, num_heads=2,
                                    num_classes=10))
    trainer = Trainer(config, out_dir=tmp_path / "run", data=(x[keep], y[keep]), progress=False).fit()
    assert len(trainer.history["loss"]) == 3
    model, loaded_config, _ = load_model(tmp_path / "run")
    assert isinstance(model, DiT) and loaded_config.model_type == "dit"
    with pytest.raises(ValueError, match="use model_type 'unet' or 'dit' with in_channels=1 and image_size=28"):
        TrainConfig(model_type="dit", dataset="mnist5k", model=dict(TINY)).validate()
