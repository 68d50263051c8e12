"""Tests of ddpm.unet: shapes, zero initialisation, conditioning, attention placement, the AdaGN and
attention formulas against direct computations, config round trips and input validation."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.mlp import MLP, MLPConfig
from ddpm.unet import (
    AttentionBlock,
    ResBlock,
    UNet,
    UNetConfig,
    _num_groups,
    group_norm,
    count_parameters,
    timestep_embedding,
)


def tiny(**overrides) -> UNetConfig:
    """A small 28x28 config with three levels (28, 14, 7) that builds and runs in milliseconds."""
    base = dict(image_size=28, in_channels=1, model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                attention_resolutions=(7,), num_heads=2, dropout=0.0)
    base.update(overrides)
    return UNetConfig(**base)


def perturbed(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so that the zero-initialised layers no longer hide the rest."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def inputs(cfg: UNetConfig, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t


# ---------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(image_size=32, in_channels=3, attention_resolutions=(16, 8), num_head_channels=4),
        tiny(image_size=32, in_channels=3, channel_mult=(1, 2), attention_resolutions=(), resblock_updown=True,
             use_scale_shift_norm=False, learn_sigma=True, num_classes=10),
    ],
    ids=["28x28x1", "32x32x3", "32x32x3-updown-additive-learn_sigma"],
)
def test_output_shape_and_zero_at_initialisation(cfg):
    model = UNet(cfg)
    x, t = inputs(cfg)
    out = model(x, t)
    assert out.shape == (3, cfg.out_channels, cfg.image_size, cfg.image_size)
    # The final convolution starts at zero: the untrained network predicts exactly zero.
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isfinite(perturbed(model)(x, t)).all()


def test_learn_sigma_doubles_the_output_channels():
    assert tiny(in_channels=3, image_size=32, attention_resolutions=()).out_channels == 3
    cfg = tiny(learn_sigma=True)
    assert cfg.out_channels == 2
    x, t = inputs(cfg)
    assert UNet(cfg)(x, t).shape == (3, 2, 28, 28)


def test_mlp_shape_zero_initialisation_and_conditioning():
    for learn_sigma in (False, True):
        cfg = MLPConfig(dim=2, hidden=16, num_layers=2, num_classes=3, learn_sigma=learn_sigma)
        model = MLP(cfg)
        x = torch.randn(5, 2)
        t = torch.arange(5) * 100
        out = model(x, t, torch.tensor([0, 1, 2, 3, 0]))
        assert out.shape == (5, 4 if learn_sigma else 2) and torch.equal(out, torch.zeros_like(out))
    perturbed(model)
    x = torch.randn(4, 2)
    y = torch.tensor([0, 1, 2, 0])
    ref = model(x, torch.full((4,), 10), y)
    assert (ref - model(x, torch.full((4,), 900), y)).abs().min() > 0
    assert (ref - model(x, torch.full((4,), 10), (y + 1) % 3)).abs().min() > 0
    assert torch.equal(model(x, torch.full((4,), 10)), model(x, torch.full((4,), 10), torch.full((4,), 3)))


def test_mlp_fourier_features_closed_form_and_parameter_count():
    cfg = MLPConfig(dim=2, hidden=16, num_layers=1, fourier_levels=3)
    model = MLP(cfg)
    x = torch.tensor([[0.25, -0.5]])
    feats = model.encode(x)
    # x itself, then sin(2^l pi x_i) and cos(2^l pi x_i), coordinate-major within each of sin and cos
    expected = [0.25, -0.5]
    args = [2 ** l * math.pi * v for v in (0.25, -0.5) for l in range(3)]
    expected += [math.sin(a) for a in args] + [math.cos(a) for a in args]
    torch.testing.assert_close(feats, torch.tensor([expected]), rtol=1e-6, atol=1e-6)
    plain = MLP(MLPConfig(dim=2, hidden=16, num_layers=1))
    # only the input layer grows: 2 * 2 * 3 more inputs, 16 weights each
    assert count_parameters(model) - count_parameters(plain) == 2 * 2 * 3 * 16
    assert torch.equal(plain.encode(x), x)


# ---------------------------------------------------------------------------------------------- conditioning


def test_output_depends_on_t_and_y_and_none_means_the_null_label():
    cfg = tiny(num_classes=4)
    model = perturbed(UNet(cfg)).eval()
    x, _ = inputs(cfg, n=4)
    t = torch.full((4,), 100)
    y = torch.tensor([0, 1, 2, 3])
    ref = model(x, t, y)
    per_example = lambda a, b: (a - b).abs().flatten(1).amax(1)  # noqa: E731
    assert (per_example(ref, model(x, torch.full((4,), 700), y)) > 1e-4).all()
    assert (per_example(ref, model(x, t, (y + 1) % 4)) > 1e-4).all()
    null = torch.full((4,), 4)
    assert (per_example(ref, model(x, t, null)) > 1e-4).all()  # the null label is a label of its own
    assert torch.equal(model(x, t, None), model(x, t, null))


def test_examples_are_processed_independently():
    # GroupNorm and attention act within each example: a batch must not mix examples.
    cfg = tiny(num_classes=3, attention_resolutions=(14, 7))
    model = perturbed(UNet(cfg)).eval()
    x, t = inputs(cfg, n=4)
    y = torch.tensor([0, 1, 2, 3])
    full = model(x, t, y)
    for i in range(4):
        torch.testing.assert_close(model(x[i : i + 1], t[i : i + 1], y[i : i + 1]), full[i : i + 1],
                                   rtol=1e-4, atol=1e-5)


def test_a_python_int_timestep_is_broadcast():
    cfg = tiny()
    model = perturbed(UNet(cfg)).eval()
    x, _ = inputs(cfg)
    assert torch.equal(model(x, 250), model(x, torch.full((3,), 250)))


# ---------------------------------------------------------------------------------------------- the pieces


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 17, 999])
    dim = 10
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim) and emb.dtype == torch.float32
    for i in range(dim // 2):
        w = 10000.0 ** (-i / (dim // 2))
        for j, tj in enumerate(t.tolist()):
            assert emb[j, i].item() == pytest.approx(math.sin(tj * w), abs=1e-4)
            assert emb[j, dim // 2 + i].item() == pytest.approx(math.cos(tj * w), abs=1e-4)
    odd = timestep_embedding(t, 11)
    assert odd.shape == (4, 11) and torch.equal(odd[:, :10], emb) and torch.equal(odd[:, 10], torch.zeros(4))


def test_group_norm_groups_divide_the_channels_and_hold_two_channels_at_least():
    for channels in range(1, 200):
        g = _num_groups(channels)
        assert 1 <= g <= 32 and channels % g == 0
        assert channels // g >= 2 or g == 1
    # the OpenAI code's 32 groups wherever its widths allow them; narrow widths keep two channels per group
    assert [_num_groups(c) for c in (64, 128, 256, 192)] == [32, 32, 32, 32]
    assert [_num_groups(c) for c in (16, 32, 48, 80, 1, 3)] == [8, 16, 24, 20, 1, 1]


def test_group_norm_passes_on_the_mean_of_a_channel():
    # One channel per group (instance norm) erases a shift of one channel's mean; two per group keep it.
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 6)
    shift = torch.zeros(1, 16, 1, 1)
    shift[:, 0] = 0.7
    blind = nn.GroupNorm(16, 16)
    torch.testing.assert_close(blind(x + shift), blind(x), rtol=1e-4, atol=1e-4)
    ours = group_norm(16)
    change = (ours(x + shift) - ours(x)).mean(dim=(2, 3))
    assert change[:, 0].abs().min() > 0.1 and change[:, 1].abs().min() > 0.1  # the pair (0, 1) shares a group


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_matches_the_adagn_and_additive_formulas(scale_shift):
    torch.manual_seed(0)
    block = perturbed(ResBlock(8, 12, 16, dropout=0.0, use_scale_shift_norm=scale_shift)).eval()
    x, emb = torch.randn(2, 8, 5, 5), torch.randn(2, 12)
    h = block.in_conv(F.silu(F.group_norm(x, 4, block.in_norm.weight, block.in_norm.bias)))
    e = emb @ block.emb_proj.weight.T + block.emb_proj.bias
    norm = lambda z: F.group_norm(z, 8, block.out_norm.weight, block.out_norm.bias)  # noqa: E731
    if scale_shift:  # AdaGN: GroupNorm(h) * (1 + scale) + shift
        h = norm(h) * (1 + e[:, :16, None, None]) + e[:, 16:, None, None]
    else:
        h = norm(h + e[:, :, None, None])
    expected = block.skip(x) + block.out_conv(F.silu(h))
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-5, atol=1e-5)


def test_attention_block_matches_per_head_softmax_attention():
    torch.manual_seed(0)
    heads, c = 4, 16
    block = perturbed(AttentionBlock(c, heads, resolution=3))
    x = torch.randn(2, c, 3, 3)
    qkv = block.qkv(block.norm(x)).flatten(2)  # [N, 3C, L], channels (q|k|v, head, head_dim)
    q, k, v = qkv.chunk(3, dim=1)
    d = c // heads
    outs = []
    for i in range(heads):
        qi, ki, vi = (z[:, i * d : (i + 1) * d] for z in (q, k, v))  # [N, d, L]
        w = torch.softmax(qi.transpose(1, 2) @ ki / math.sqrt(d), dim=-1)  # [N, L, L]
        outs.append((w @ vi.transpose(1, 2)).transpose(1, 2))  # [N, d, L]
    a = torch.cat(outs, dim=1).reshape(2, c, 3, 3)
    torch.testing.assert_close(block(x), x + block.proj_out(a), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("resolutions", [(), (14,), (28, 7)])
def test_attention_only_at_the_configured_resolutions(resolutions):
    cfg = tiny(attention_resolutions=resolutions, num_res_blocks=2)
    model = UNet(cfg)
    seen = []
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_hook(lambda m, args, out: seen.append((m.resolution, args[0].shape[-1])))
    x, t = inputs(cfg, n=1)
    model(x, t)
    assert all(declared == actual for declared, actual in seen)
    counts = {res: sum(1 for r, _ in seen if r == res) for res in (28, 14, 7)}
    # num_res_blocks blocks per level on the way down, one more on the way up; the middle block at 7x7.
    expected = {res: (2 + 3 if res in resolutions else 0) + (1 if res == 7 else 0) for res in (28, 14, 7)}
    assert counts == expected


def test_heads_from_num_heads_or_num_head_channels():
    by_count = UNet(tiny(model_channels=16, num_heads=4))
    by_width = UNet(tiny(model_channels=16, num_head_channels=8))
    assert {m.num_heads for m in by_count.modules() if isinstance(m, AttentionBlock)} == {4}
    assert {m.num_heads for m in by_width.modules() if isinstance(m, AttentionBlock)} == {32 // 8}


def test_gradients_reach_every_parameter():
    cfg = tiny(num_classes=3, learn_sigma=True, attention_resolutions=(14, 7))
    model = UNet(cfg)
    x, t = inputs(cfg, n=4)
    y = torch.tensor([0, 1, 2, 3])
    target = torch.randn(4, 2, 28, 28, generator=torch.Generator().manual_seed(1))
    # At initialisation the zero output layer receives a gradient (training can start) but blocks
    # behind zero-initialised layers do not yet.
    (model(x, t, y) - target).square().sum().backward()
    assert model.out[-1].weight.grad.abs().sum() > 0
    assert model.input_blocks[1][0].in_conv.weight.grad.abs().sum() == 0
    model.zero_grad()
    (perturbed(model)(x, t, y) - target).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_count_parameters_and_sizes():
    model = UNet(tiny(num_classes=10))
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    # The default config is the ~1-2M parameter network of the cpu profile.
    assert 1_000_000 <= count_parameters(UNet(UNetConfig())) <= 2_000_000


def test_eval_is_deterministic_and_train_dropout_is_not():
    cfg = tiny(dropout=0.3)
    model = perturbed(UNet(cfg))
    x, t = inputs(cfg)
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    torch.manual_seed(1)
    a = model(x, t)
    assert not torch.equal(a, model(x, t))


# ---------------------------------------------------------------------------------------------- configs


def test_config_json_round_trip():
    cfg = tiny(num_classes=10, learn_sigma=True, attention_resolutions=(14, 7), resblock_updown=True)
    back = UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and isinstance(back.channel_mult, tuple) and isinstance(back.attention_resolutions, tuple)
    assert UNetConfig.from_dict({}) == UNetConfig()
    mlp = MLPConfig(hidden=32, num_classes=2, learn_sigma=True)
    assert MLPConfig.from_dict(json.loads(json.dumps(mlp.to_dict()))) == mlp
    with pytest.raises(ValueError, match=r"unknown UNetConfig keys \['colour', 'depth'\]"):
        UNetConfig.from_dict({**cfg.to_dict(), "colour": 1, "depth": 2})
    with pytest.raises(ValueError, match="unknown MLPConfig keys"):
        MLPConfig.from_dict({"width": 3})


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(image_size=30), r"image_size=30 cannot be halved 2 times.*multiple of 4"),
        (dict(image_size=0), r"image_size must be an integer >= 1"),
        (dict(attention_resolutions=(5,)), r"attention_resolutions contains 5.*allowed resolutions are \[28, 14, 7\]"),
        (dict(in_channels=0), r"in_channels must be an integer >= 1"),
        (dict(model_channels=-8), r"model_channels must be an integer >= 1"),
        (dict(channel_mult=(1, 0)), r"channel_mult"),
        (dict(channel_mult=()), r"channel_mult"),
        (dict(num_res_blocks=0), r"num_res_blocks must be an integer >= 1"),
        (dict(num_heads=3), r"num_heads=3 must divide"),
        (dict(num_heads=0), r"num_heads must be an integer >= 1"),
        (dict(num_head_channels=3), r"num_head_channels=3 must divide"),
        (dict(num_head_channels=0), r"num_head_channels"),
        (dict(dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be a probability in \[0, 1\)"),
        (dict(num_classes=0), r"num_classes must be an integer >= 1"),
        (dict(learn_sigma=1), r"learn_sigma must be True or False"),
    ],
)
def test_bad_config_raises_naming_the_parameter(change, name):
    with pytest.raises(ValueError, match=name):
        UNet(tiny(**change))


@pytest.mark.parametrize(
    "change, name",
    [(dict(dim=0), "dim must be an integer >= 1"), (dict(hidden=0), "hidden must be an integer >= 1"),
     (dict(num_layers=0), "num_layers must be an integer >= 1"), (dict(num_classes=-1), "num_classes"),
     (dict(learn_sigma="yes"), "learn_sigma"), (dict(fourier_levels=-1), "fourier_levels must be an integer >= 0")],
)
def test_bad_mlp_config_raises_naming_the_parameter(change, name):
    with pytest.raises(ValueError, match=name):
        MLP(MLPConfig(**change))


def test_bad_forward_inputs_raise_naming_the_parameter():
    uncond = UNet(tiny())
    cond = UNet(tiny(num_classes=3))
    x, t = inputs(tiny(), n=2)
    bad = [
        (uncond, (x[0], t), r"x must have shape \[N, C, H, W\] = \[N, 1, 28, 28\]"),
        (uncond, (torch.randn(2, 3, 28, 28), t), r"x must have shape"),
        (uncond, (torch.randn(2, 1, 32, 32), t), r"x must have shape"),
        (uncond, (torch.zeros(2, 1, 28, 28, dtype=torch.long), t), r"x must be a floating-point"),
        (uncond, (x, torch.zeros(3, dtype=torch.long)), r"t must have shape \[N\]=\[2\]"),
        (uncond, (x, torch.zeros(2, 1, dtype=torch.long)), r"t must have shape"),
        (uncond, (x, t, torch.tensor([0, 1])), r"y must be None: this model is unconditional"),
        (cond, (x, t, torch.tensor([0, 4])), r"y must hold labels in \[0, num_classes\]=\[0, 3\]"),
        (cond, (x, t, torch.tensor([-1, 0])), r"y must hold labels in \[0, num_classes\]"),
        (cond, (x, t, torch.tensor([0, 1, 2])), r"y must be an integer tensor of shape \[N\]=\[2\]"),
        (cond, (x, t, torch.tensor([0.0, 1.0])), r"y must be an integer tensor"),
    ]
    for model, args, message in bad:
        with pytest.raises(ValueError, match=message):
            model(*args)
    mlp = MLP(MLPConfig(dim=2, hidden=8, num_layers=1, num_classes=2))
    bad_mlp = [
        ((torch.randn(4, 3), t.new_zeros(4)), r"x must be a floating-point tensor of shape \[N, dim\] = \[N, 2\]"),
        ((torch.randn(4, 2), t.new_zeros(5)), r"t must have shape"),
        ((torch.randn(4, 2), t.new_zeros(4), torch.full((4,), 3)), r"y must hold labels"),
    ]
    for args, message in bad_mlp:
        with pytest.raises(ValueError, match=message):
            mlp(*args)
