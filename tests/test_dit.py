"""The diffusion transformer (``ddpm.dit``): shapes, DiT's initialisation, parameter count, batch independence."""

import math

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


def architecture(cfg):
    """The DiT's weights by name and shape, written out from the architecture: the timestep MLP (D -> D -> D), the
    label table (one row per class and the null label), the patch embedding (p*p*C -> D), per block the attention
    (D -> 3D, D -> D), the MLP (D -> rD -> D, with a depthwise 3x3 convolution of the rD features for conv_mlp) and
    the adaLN map (D -> 6D), then the final adaLN map (D -> 2D) and the output layer (D -> p*p*C_out)."""
    d, p, width = cfg.hidden, cfg.patch_size, cfg.mlp_ratio * cfg.hidden
    out = p * p * cfg.in_channels * (2 if cfg.learn_sigma else 1)

    def linear(name, n_in, n_out):
        return {f"{name}.weight": (n_out, n_in), f"{name}.bias": (n_out,)}

    shapes = {**linear("time_embed.0", d, d), **linear("time_embed.2", d, d)}
    if cfg.num_classes is not None:
        shapes["label_embed.weight"] = (cfg.num_classes + 1, d)
    shapes.update(linear("patch_embed", p * p * cfg.in_channels, d))
    for b in range(cfg.depth):
        shapes.update({**linear(f"blocks.{b}.qkv", d, 3 * d), **linear(f"blocks.{b}.proj", d, d),
                       **linear(f"blocks.{b}.mlp.0", d, width), **linear(f"blocks.{b}.mlp.2", width, d)})
        if cfg.conv_mlp:
            shapes.update({f"blocks.{b}.mlp.conv.weight": (width, 1, 3, 3), f"blocks.{b}.mlp.conv.bias": (width,)})
        shapes.update(linear(f"blocks.{b}.modulation", d, 6 * d))
    shapes.update({**linear("final_modulation", d, 2 * d), **linear("out", d, out)})
    return shapes


@pytest.mark.parametrize("config", [TINY, dict(TINY, num_classes=None, learn_sigma=True, patch_size=4, depth=3),
                                    dict(TINY, image_size=28, in_channels=1, patch_size=7, hidden=48, mlp_ratio=2),
                                    dict(TINY, conv_mlp=True, depth=3, mlp_ratio=2)])
def test_weights_and_parameter_count_follow_the_architecture(config):
    """The names and shapes of the saved weights (so that old checkpoints load) and the parameter count, counted
    from the architecture; ``expected_parameters``, which the book quotes, agrees."""
    cfg = DiTConfig(**config)
    model = DiT(cfg)
    shapes = architecture(cfg)
    assert {name: tuple(w.shape) for name, w in model.state_dict().items()} == shapes
    count = sum(math.prod(shape) for shape in shapes.values())
    assert sum(p.numel() for p in model.parameters()) == count == expected_parameters(cfg)
    if config == TINY:  # hidden 32, p 2, C 4, 2 blocks of MLP width 128, 10 classes: the sum done once by hand
        assert count == 2 * 1056 + 11 * 32 + 544 + 2 * (3168 + 1056 + 4224 + 4128 + 6336) + 2112 + 528 == 43_472


def _uniform_moments_ok(w, bound, z=5.0):
    """Whether the entries of w look like U(-bound, bound): inside the bound, and mean and variance (bound^2 / 3)
    within z standard errors (Var(w) = a^2/3 and Var(w^2) = a^4/5 - a^4/9 for U(-a, a))."""
    n, a = w.numel(), bound
    mean_ok = abs(w.mean().item()) < z * math.sqrt(a * a / 3 / n)
    var_ok = abs(w.pow(2).mean().item() - a * a / 3) < z * math.sqrt((a ** 4 / 5 - a ** 4 / 9) / n)
    return w.abs().max().item() <= bound and mean_ok and var_ok


@pytest.mark.parametrize("conv_mlp", [False, True])
def test_initialisation_follows_dit(conv_mlp):
    """As facebookresearch/DiT's initialize_weights: Xavier-uniform linear layers with zero biases, N(0, 0.02^2) for
    the label table and the timestep MLP, zero adaLN and output layers; the depthwise convolution (not in DiT) keeps
    PyTorch's default U(-1/3, 1/3) for a 3x3 kernel of one channel."""
    cfg = DiTConfig(**dict(TINY, hidden=64, depth=2, conv_mlp=conv_mlp))
    torch.manual_seed(3)
    model = DiT(cfg)
    named = dict(model.named_modules())
    normal = [model.label_embed.weight, model.time_embed[0].weight, model.time_embed[2].weight]
    for w in normal:  # the standard deviation of n normal draws has a standard error of about std / sqrt(2n)
        assert w.std().item() == pytest.approx(0.02, abs=5 * 0.02 / math.sqrt(2 * w.numel()))
        assert abs(w.mean().item()) < 5 * 0.02 / math.sqrt(w.numel())
    xavier = ["patch_embed"] + [f"blocks.{b}.{layer}" for b in range(2) for layer in ("qkv", "proj", "mlp.0", "mlp.2")]
    for name in xavier:
        w = named[name].weight
        fan_out, fan_in = w.shape
        assert _uniform_moments_ok(w, math.sqrt(6 / (fan_in + fan_out))), name
    zero = ["final_modulation", "out"] + [f"blocks.{b}.modulation" for b in range(2)]
    for name, module in named.items():
        if isinstance(module, torch.nn.Linear):
            assert name in xavier + zero + ["time_embed.0", "time_embed.2"], name  # no linear layer is left out
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    for name in zero:
        assert torch.equal(named[name].weight, torch.zeros_like(named[name].weight)), name
    if conv_mlp:
        for b in range(2):
            conv = named[f"blocks.{b}.mlp.conv"]
            assert _uniform_moments_ok(conv.weight, 1 / 3) and _uniform_moments_ok(conv.bias, 1 / 3, z=6)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([1, 2, 10]))
    assert torch.equal(out, torch.zeros_like(out))


def test_the_label_does_not_drown_the_noise_level():
    """At the start the class and the timestep add comparable amounts to the conditioning vector: at width 128 the
    label rows, N(0, 0.02^2), and the time embedding have about the same RMS (with N(0, 1) rows, as nn.Embedding
    draws them, the class was about eight times the time embedding)."""
    from ddpm.blocks import timestep_embedding

    torch.manual_seed(0)
    model = DiT(DiTConfig(**dict(TINY, hidden=128)))
    with torch.no_grad():
        time = model.time_embed(timestep_embedding(torch.arange(0, 1000, 10), 128)).pow(2).mean().sqrt().item()
    label = model.label_embed.weight.pow(2).mean().sqrt().item()
    assert 0.5 < label / time < 2, (label, time)


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
