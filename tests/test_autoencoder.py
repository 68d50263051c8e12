"""The KL-regularised autoencoder of the latent diffusion model (``ddpm.autoencoder``)."""

import pytest
import torch

from ddpm.autoencoder import Autoencoder, AutoencoderConfig, gaussian_kl, load_or_train_autoencoder, train_autoencoder
from ddpm.data import load_dataset

SMALL = AutoencoderConfig(channels=(8, 16), latent_channels=4)


@pytest.fixture(scope="module")
def digits():
    x, _ = load_dataset("mnist5k", split="train")
    return x[:256]


def test_shapes_of_the_latent_and_the_reconstruction():
    model = Autoencoder(SMALL)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    mean, logvar = model.moments(x)
    assert mean.shape == logvar.shape == (3, 4, 7, 7) == (3, *SMALL.latent_shape)
    assert model.decode(model.encode(x)).shape == x.shape


def test_kl_matches_its_closed_form_and_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(50), torch.ones(50))
    assert torch.allclose(gaussian_kl(mean, logvar), torch.distributions.kl_divergence(q, p), atol=1e-6)
    assert torch.equal(gaussian_kl(torch.zeros(3), torch.zeros(3)), torch.zeros(3))  # q = p: no divergence


def test_the_latent_mean_is_deterministic_and_a_sample_is_not():
    model = Autoencoder(SMALL).eval()
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(model.encode(x), model.encode(x))
    a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
    b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b)


def test_training_reconstructs_a_batch_and_scales_the_latent_to_unit_variance(digits):
    torch.manual_seed(0)
    model = Autoencoder(SMALL)
    with torch.no_grad():
        before = float(torch.nn.functional.mse_loss(model.decode(model.encode(digits)), digits))
    result = train_autoencoder(model, digits, steps=150, batch_size=32, lr=3e-3)
    with torch.no_grad():
        z = model.encode(digits)
        after = float(torch.nn.functional.mse_loss(model.decode(z), digits))
    assert after < 0.25 * before and after < 0.1, (before, after)
    assert len(result["history"]["loss"]) == 150
    _check_the_scale_factor(model, digits)


def _check_the_scale_factor(model, digits):
    """Rombach et al.'s scale factor, one over the standard deviation of the latent means of the training digits:
    it gives digits it never saw unit-variance latents too, and the decoder undoes it, so that a round trip is the
    decoder of the unscaled mean."""
    held, _ = load_dataset("mnist5k", split="test")
    with torch.no_grad():
        mean = model.moments(digits)[0]
        assert float(model.scale_factor) == pytest.approx(1 / float(mean.std()), rel=1e-5)
        assert float(model.encode(held[:256]).std()) == pytest.approx(1.0, rel=0.1)
        assert torch.allclose(model.decode(model.encode(digits)), model.decoder(mean), atol=1e-5)


def test_the_scale_factor_brings_a_latent_of_any_scale_to_unit_variance(digits):
    """An encoder whose latent means are 20 times too wide (its last layer scaled): the factor set at the end of
    training (one step at a negligible rate) brings the latents of held-out digits back to unit variance."""
    torch.manual_seed(0)
    model = Autoencoder(SMALL)
    last, z = model.encoder[-1], SMALL.latent_channels
    with torch.no_grad():
        last.weight[:z] *= 20.0
        last.bias[:z] *= 20.0
        held, _ = load_dataset("mnist5k", split="test")
        raw = float(model.moments(held[:256])[0].std())
    train_autoencoder(model, digits, steps=1, batch_size=32, lr=1e-12)
    assert raw > 2.0 and float(model.scale_factor) < 0.5  # the factor has work to do here
    _check_the_scale_factor(model, digits)


def test_cached_autoencoder_loads_with_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    first = load_or_train_autoencoder(SMALL, steps=3, batch_size=8)
    files = list(tmp_path.glob("autoencoder-*.safetensors"))
    assert len(files) == 1 and first.info["steps"] == 3
    second = load_or_train_autoencoder(SMALL, steps=3, batch_size=8)
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    assert second.info["heldout_mse"] == first.info["heldout_mse"]


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible by 4"):
        Autoencoder(AutoencoderConfig(image_size=30))
    with pytest.raises(ValueError, match="kl_weight"):
        Autoencoder(AutoencoderConfig(kl_weight=-1.0))
    model = Autoencoder(SMALL)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 1, 28, 28\]"):
        model.encode(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"z must have shape \[N, 4, 7, 7\]"):
        model.decode(torch.zeros(2, 4, 14, 14))
