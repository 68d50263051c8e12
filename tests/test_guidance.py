"""Tests of ddpm.guidance: classifier-free guidance, classifier guidance, the noise-aware classifier.

Classifier guidance is checked on a 2-D Gaussian mixture where everything is analytic: under the forward
process x_t | y=k ~ N(sqrt(ab_t) mu_k, (ab_t s0^2 + 1 - ab_t) I), which gives the exact noise-aware
classifier p(y | x_t, t) and the exact eps-prediction eps*(x_t, t) = -sqrt(1 - ab_t) grad log p(x_t).
"""

import math

import pytest
import torch
from torch import nn

from ddpm.guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    NoiseAwareClassifier,
    NoiseAwareClassifierConfig,
    accuracy_by_quartile,
    load_classifier,
    save_classifier,
    train_noise_aware_classifier,
)
from ddpm.samplers import Guidance, ddim_sample, ddpm_sample
from ddpm.schedule import NoiseSchedule
from ddpm.mlp import MLP, MLPConfig
from ddpm.unet import UNet, UNetConfig

# ---------------------------------------------------------------------------------------------------------
# 2-D Gaussian mixture with analytic classifier and oracle denoiser
# ---------------------------------------------------------------------------------------------------------

MU = torch.tensor([[-0.5, 0.0], [0.5, 0.0], [0.0, 0.6]], dtype=torch.float64)
S0 = 0.3  # standard deviation of each component at t = 0


class MixtureClassifier(nn.Module):
    """Exact p(y | x_t, t) of the mixture (equal weights): logits = -||x - sqrt(ab) mu_k||^2 / (2 v_t)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.dummy = nn.Parameter(torch.zeros(()))  # so that the module has a device

    def forward(self, x, t):
        ab = self.schedule.alpha_bar.to(x.device)[t].to(x.dtype)[:, None, None]
        var = ab * S0**2 + 1 - ab
        centres = ab.sqrt() * MU.to(x.dtype)[None]  # [N, K, 2]
        return -((x[:, None, :] - centres) ** 2).sum(-1) / (2 * var[:, :, 0]) + 0 * self.dummy


class MixtureOracle(nn.Module):
    """eps*(x_t, t) = -sqrt(1 - ab) grad log p(x_t) for the unconditional mixture; y is ignored."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.classifier = MixtureClassifier(schedule)

    def forward(self, x, t, y=None):
        ab = self.schedule.alpha_bar.to(x.device)[t].to(x.dtype)[:, None]
        var = ab * S0**2 + 1 - ab
        r = self.classifier(x, t).softmax(1)  # responsibilities [N, K]
        mean = r @ (MU.to(x.dtype)) * ab.sqrt()  # sum_k r_k sqrt(ab) mu_k
        score = -(x - mean) / var
        return -(1 - ab).sqrt() * score


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(T=1000)


def test_cond_grad_is_scaled_analytic_gradient_even_under_inference_mode(schedule):
    clf = MixtureClassifier(schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    ab = schedule.alpha_bar[t][:, None]
    var = ab * S0**2 + 1 - ab
    r = clf(x, t).softmax(1)
    # grad_x log p(y|x_t) = -(x - sqrt(ab) mu_y)/v + sum_k r_k (x - sqrt(ab) mu_k)/v
    expected = (ab.sqrt() * MU[y] - ab.sqrt() * (r @ MU)) / var
    guidance = ClassifierGuidance(clf, scale=2.5)
    with torch.inference_mode():
        x_inf, t_inf, y_inf = x.clone(), t.clone(), y.clone()
        got = guidance.cond_grad(x_inf, t_inf, y_inf)
    torch.testing.assert_close(got, 2.5 * expected, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(guidance.cond_grad(x, t, y), 2.5 * expected, rtol=1e-9, atol=1e-12)
    assert ClassifierGuidance(clf, 0.0).cond_grad(x, t, y) is None


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_larger_classifier_scale_raises_log_prob_of_requested_class(schedule, sampler):
    oracle, clf = MixtureOracle(schedule), MixtureClassifier(schedule)
    n = 1500
    y = torch.full((n,), 2, dtype=torch.long)
    mean_log_probs = []
    for scale in (0.0, 1.0, 4.0):
        x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        kwargs = dict(x_T=x_T, y=y, guidance=ClassifierGuidance(clf, scale), clip_denoised=False,
                      generator=torch.Generator().manual_seed(2))
        if sampler == "ddpm":
            x0 = ddpm_sample(oracle, schedule, steps=100, **kwargs)  # respaced: the classifier sees original t
        else:
            x0 = ddim_sample(oracle, schedule, steps=50, **kwargs)
        with torch.no_grad():
            log_p = clf(x0, torch.zeros(n, dtype=torch.long)).log_softmax(1)[:, 2]
        mean_log_probs.append(float(log_p.mean()))
    # unguided samples come from the whole mixture: about a third are near class 2
    assert mean_log_probs[0] < math.log(0.6)
    assert mean_log_probs[0] < mean_log_probs[1] < mean_log_probs[2]
    assert mean_log_probs[2] > math.log(0.9)


def test_classifier_guidance_queries_the_model_without_labels_unless_asked():
    seen = []

    def model(x, t, y=None):
        seen.append(y)
        return torch.zeros_like(x)

    x, t, y = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2])
    clf = nn.Linear(2, 3)
    ClassifierGuidance(clf, 1.0).model_output(model, x, t, y)
    ClassifierGuidance(clf, 1.0, condition_model=True).model_output(model, x, t, y)
    assert seen[0] is None and torch.equal(seen[1], y)


def test_scale_one_with_exact_classifier_samples_the_class_conditional(schedule):
    """With the exact score and the exact classifier, s = 1 samples p(x_0 | y) (Algorithm 1, small steps)."""
    oracle, clf = MixtureOracle(schedule), MixtureClassifier(schedule)
    n = 2000
    y = torch.full((n,), 0, dtype=torch.long)
    x0 = ddpm_sample(oracle, schedule, x_T=torch.randn(n, 2, generator=torch.Generator().manual_seed(3),
                                                       dtype=torch.float64),
                     steps=250, y=y, guidance=ClassifierGuidance(clf, 1.0), clip_denoised=False,
                     generator=torch.Generator().manual_seed(4))
    # p(x_0 | y=0) = N(mu_0, S0^2 I): mean within a few standard errors, std close to S0
    assert torch.allclose(x0.mean(0), MU[0], atol=5 * S0 / math.sqrt(n) + 0.02)
    assert torch.allclose(x0.std(0), torch.full((2,), S0, dtype=torch.float64), rtol=0.1)


# ---------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------------------


class CountingModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, x, t, y=None):
        self.calls += 1
        return self.model(x, t, y)


def _tiny_unet(learn_sigma):
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(), num_heads=1, dropout=0.0, num_classes=3, learn_sigma=learn_sigma)
    model = UNet(cfg).eval()
    for p in model.parameters():  # the U-Net's output layer starts at zero; make outputs non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def test_cfg_with_w_zero_equals_the_conditional_model_exactly():
    model = _tiny_unet(learn_sigma=True)
    schedule = NoiseSchedule.cosine(T=100)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 50, 99])
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        assert torch.equal(ClassifierFreeGuidance(0.0).model_output(model, x, t, y), model(x, t, y))
    x_T = torch.randn(4, 1, 8, 8, generator=g)
    plain = ddim_sample(model, schedule, x_T=x_T, steps=10, y=y)
    guided = ddim_sample(model, schedule, x_T=x_T, steps=10, y=y, guidance=ClassifierFreeGuidance(0.0))
    assert torch.equal(plain, guided)
    plain = ddpm_sample(model, schedule, x_T=x_T, steps=10, y=y, generator=torch.Generator().manual_seed(5))
    guided = ddpm_sample(model, schedule, x_T=x_T, steps=10, y=y, guidance=ClassifierFreeGuidance(0.0),
                         generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, guided)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_cfg_combines_eps_in_one_batched_call_and_keeps_conditional_variance(learn_sigma):
    model = CountingModel(_tiny_unet(learn_sigma))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 8, 8, generator=g)
    t = torch.tensor([3, 20, 40, 60, 99])
    y = torch.tensor([0, 1, 2, 0, 1])
    w = 2.0
    with torch.no_grad():
        out = ClassifierFreeGuidance(w).model_output(model, x, t, y)
        assert model.calls == 1
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 3))  # 3 = num_classes = null label
    assert out.shape == cond.shape == (5, 2 if learn_sigma else 1, 8, 8)
    torch.testing.assert_close(out[:, :1], (1 + w) * cond[:, :1] - w * uncond[:, :1], rtol=1e-5, atol=1e-5)
    if learn_sigma:
        torch.testing.assert_close(out[:, 1:], cond[:, 1:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, :1], cond[:, :1])  # guidance did change eps


def test_cfg_null_label_from_argument_for_models_without_config():
    mlp = MLP(MLPConfig(dim=2, hidden=16, num_layers=2, num_classes=4))

    def bare(x, t, y):  # a plain function has no .config: the null label must be passed
        return mlp(x, t, y)

    x, t, y = torch.randn(3, 2), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="null_label"):
        ClassifierFreeGuidance(1.0).model_output(bare, x, t, y)
    with torch.no_grad():
        out = ClassifierFreeGuidance(1.0, null_label=4).model_output(bare, x, t, y)
        torch.testing.assert_close(out, 2 * mlp(x, t, y) - mlp(x, t, None))


def test_guidance_rejects_bad_input():
    with pytest.raises(ValueError, match="scale"):
        ClassifierFreeGuidance(-1.0)
    with pytest.raises(ValueError, match="scale"):
        ClassifierGuidance(nn.Linear(2, 2), -0.5)
    with pytest.raises(ValueError, match="y"):
        ClassifierGuidance(nn.Linear(2, 2), 1.0).cond_grad(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), None)
    assert isinstance(ClassifierFreeGuidance(1.0), Guidance)
    assert isinstance(ClassifierGuidance(nn.Linear(2, 2), 1.0), Guidance)


# ---------------------------------------------------------------------------------------------------------
# Noise-aware classifier
# ---------------------------------------------------------------------------------------------------------


def _bars(n, generator):
    """8x8 images in [-1, 1] of two classes: a bright horizontal (class 0) or vertical (class 1) bar."""
    y = torch.randint(0, 2, (n,), generator=generator)
    pos = torch.randint(1, 7, (n,), generator=generator)
    x = -torch.ones(n, 1, 8, 8)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i], :] = 1.0
        else:
            x[i, 0, :, pos[i]] = 1.0
    return x, y


def test_noise_aware_classifier_learns_and_loses_accuracy_with_noise(tmp_path):
    torch.manual_seed(0)
    cfg = NoiseAwareClassifierConfig(image_size=8, in_channels=1, num_classes=2, channels=(8, 16), time_embed_dim=32)
    clf = NoiseAwareClassifier(cfg)
    schedule = NoiseSchedule.linear(T=200)
    g = torch.Generator().manual_seed(0)
    x, y = _bars(400, g)
    xe, ye = _bars(400, g)
    before = accuracy_by_quartile(clf, schedule, xe, ye, generator=torch.Generator().manual_seed(1))
    out = train_noise_aware_classifier(clf, schedule, x, y, steps=120, batch_size=64, lr=3e-3,
                                       eval_data=(xe, ye), generator=g)
    acc = out["accuracy_by_quartile"]
    assert len(out["loss"]) == 120 and len(acc) == 4
    assert acc[0] > 0.95 and acc[0] > before[0] + 0.2
    assert acc[3] < acc[0]  # at the noisiest quartile the label is (nearly) erased
    # the classifier drives guidance inside a no_grad sampler loop
    with torch.no_grad():
        grad = ClassifierGuidance(clf, 3.0).cond_grad(xe[:4], torch.full((4,), 150), ye[:4])
    assert grad.shape == (4, 1, 8, 8) and grad.abs().sum() > 0
    # save / load round trip
    path = save_classifier(clf, tmp_path / "clf.safetensors", info={"accuracy_by_quartile": acc}, schedule=schedule)
    loaded = load_classifier(path, schedule=schedule)
    assert loaded.config == cfg and loaded.info["accuracy_by_quartile"] == acc
    assert loaded.schedule_record == {"name": "linear", "T": 200, "betas_sum": round(float(schedule.betas.sum()), 12),
                                      "betas_last": round(float(schedule.betas[-1]), 12)}
    # a classifier trained for another schedule, or another T, is refused in one line that names both
    for other in (NoiseSchedule.cosine(T=200), NoiseSchedule.linear(T=1000)):
        with pytest.raises(ValueError, match=r"trained for the linear schedule with T=200, but the model uses") as err:
            load_classifier(path, schedule=other)
        assert "\n" not in str(err.value)
    from ddpm.checkpoint import save_weights

    unrecorded = save_weights(tmp_path / "old.safetensors", clf.state_dict(),
                              {"model": "NoiseAwareClassifier", "config": cfg.to_dict(), "info": {}})
    with pytest.raises(ValueError, match="does not record the noise schedule"):
        load_classifier(unrecorded, schedule=schedule)
    t = torch.tensor([0, 50, 100, 199])
    with torch.no_grad():
        assert torch.equal(loaded(xe[:4], t), clf(xe[:4], t))


def test_noise_aware_classifier_shapes_and_errors(tmp_path):
    clf = NoiseAwareClassifier(NoiseAwareClassifierConfig(channels=(8, 8, 8), time_embed_dim=16))
    assert clf(torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999])).shape == (3, 10)
    assert clf(torch.randn(2, 1, 28, 28), 7).shape == (2, 10)
    with pytest.raises(ValueError, match="x"):
        clf(torch.randn(2, 3, 28, 28), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t"):
        clf(torch.randn(2, 1, 28, 28), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="channels"):
        NoiseAwareClassifierConfig(channels=())
    from ddpm.checkpoint import save_weights

    other = save_weights(tmp_path / "other.safetensors", {"w": torch.zeros(1)}, {"model": "UNet"})
    with pytest.raises(ValueError, match="path"):
        load_classifier(other)
