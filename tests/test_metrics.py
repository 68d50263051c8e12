"""Tests of ddpm.metrics: FID against closed forms, its error bar, classifier scores, nearest neighbours."""

import math

import numpy as np
import pytest
import torch

from ddpm import digit_classifier
from ddpm import metrics as M


def _gaussian(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    z = torch.randn(n, len(mean), generator=g, dtype=torch.float64)
    return torch.as_tensor(mean, dtype=torch.float64) + z @ chol.T


# ---------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form_diagonal():
    # commuting covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1], dtype=torch.float64)
    b = torch.tensor([1.5, 1.0, 0.5, 3.0, 0.4], dtype=torch.float64)
    mu1, mu2 = torch.arange(5.0, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    assert M.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_closed_form_non_commuting_2d():
    # for 2x2 matrices with positive eigenvalues, tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)); A = S1 S2
    s1 = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    prod = s1 @ s2
    tr_sqrt = math.sqrt(float(torch.trace(prod)) + 2 * math.sqrt(float(torch.det(prod))))
    mu1, mu2 = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    expected = float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2)) - 2 * tr_sqrt
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-12)
    # from samples the estimate approaches the closed form
    fa, fb = _gaussian(200_000, mu1, s1, 0), _gaussian(200_000, mu2, s2, 1)
    assert M.fid_from_features(fa, fb) == pytest.approx(expected, rel=0.02)


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise():
    cov = torch.full((16, 16), 0.3, dtype=torch.float64) + 0.7 * torch.eye(16, dtype=torch.float64)
    f = _gaussian(3000, torch.zeros(16), cov, 2)
    assert M.fid_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fids = [M.fid_from_features(f, f + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert fids[0] == pytest.approx(0.0, abs=1e-9)
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_fid_in_classifier_features_grows_with_pixel_noise():
    torch.manual_seed(0)
    model = M.MNISTClassifier(M.MNISTClassifierConfig(channels=(8, 8), feature_dim=32)).eval()
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(400, 1, 28, 28, generator=g) < 0.2).float() * 2 - 1  # sparse binary "digits"
    noise = torch.randn(images.shape, generator=g)
    ref = M.classifier_outputs(model, images)["features"]
    assert M.fid_from_features(ref, ref) == pytest.approx(0.0, abs=1e-9)
    fids = [M.fid_from_features(ref, M.classifier_outputs(model, (images + s * noise).clamp(-1, 1))["features"])
            for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_fid_error_bar_shrinks_with_more_samples_and_floor_is_small():
    cov = torch.eye(8, dtype=torch.float64) + 0.2
    reference = _gaussian(6000, torch.zeros(8), cov, 4)
    small = M.fid_with_error(_gaussian(150, torch.zeros(8), cov, 5), reference, n_draws=12,
                             generator=torch.Generator().manual_seed(0))
    large = M.fid_with_error(_gaussian(2000, torch.zeros(8), cov, 6), reference, n_draws=12,
                             generator=torch.Generator().manual_seed(0))
    assert small["n"] == 150 and small["n_reference"] == 150 and large["n_reference"] == 2000
    assert large["std"] < 0.5 * small["std"]
    assert large["fid"] < small["fid"]  # the small-sample bias of FID
    shifted = M.fid_with_error(_gaussian(2000, torch.full((8,), 0.5), cov, 7), reference, n_draws=12)
    assert shifted["fid"] > large["fid"] + 5 * large["std"]
    assert shifted["fid_point"] == pytest.approx(8 * 0.25, rel=0.15)
    floor = M.fid_floor(reference, 2000, n_draws=6)
    assert floor["n"] == 2000 and 0 < floor["fid"] < shifted["fid"] / 5
    assert M.fid_floor(reference, 10_000)["n"] == 3000  # capped at half the real set
    with pytest.raises(ValueError, match="n_splits"):
        M.fid_with_error(reference, reference, n_splits=1)
    with pytest.raises(ValueError, match="same n"):
        M.heldout_floor(reference[:100], reference, 101)  # a floor at another n than the samples' is refused


# ---------------------------------------------------------------------------------------------------------
# Classifier scores on constructed probability vectors
# ---------------------------------------------------------------------------------------------------------


def test_classifier_score_closed_forms():
    eye = torch.eye(10, dtype=torch.float64)
    # confident, balanced over k classes: exp(KL) = exp(ln k) = k
    for k in (1, 4, 10):
        probs = eye[torch.arange(200) % k]
        assert M.classifier_score(probs)[0] == pytest.approx(k, rel=1e-12)
    # identical predictions: the marginal equals every p(y|x), score 1
    p = torch.softmax(torch.randn(1, 10, dtype=torch.float64), 1).expand(50, 10)
    assert M.classifier_score(p)[0] == pytest.approx(1.0, rel=1e-12)
    # two classes, p(y|x) in {(a, 1-a), (1-a, a)} equally often: KL = a ln 2a + (1-a) ln 2(1-a)
    a = 0.8
    probs = torch.tensor([[a, 1 - a], [1 - a, a]], dtype=torch.float64).repeat(30, 1)
    expected = math.exp(a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a)))
    mean, std = M.classifier_score(probs, splits=3)
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_entropy_confidence_and_conditional_accuracy_closed_forms():
    eye = torch.eye(10, dtype=torch.float64)
    assert M.class_histogram_entropy(eye[torch.arange(100) % 10]) == pytest.approx(math.log(10), rel=1e-12)
    assert M.class_histogram_entropy(eye[torch.zeros(30, dtype=torch.long)]) == pytest.approx(0.0, abs=1e-15)
    # counts (1, 1, 2) of 4: H = -2 (1/4) ln(1/4) - (1/2) ln(1/2)
    assert M.class_histogram_entropy(torch.tensor([0, 1, 2, 2]), num_classes=3) == pytest.approx(
        0.5 * math.log(4) + 0.5 * math.log(2), rel=1e-12)
    probs = torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    assert M.mean_confidence(probs) == pytest.approx((0.7 + 0.8 + 0.5 + 0.9) / 4, rel=1e-12)
    assert M.conditional_accuracy(probs, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="probs"):
        M.mean_confidence(torch.tensor([[0.7, 0.7]]))
    with pytest.raises(ValueError, match="num_classes"):
        M.class_histogram_entropy(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        M.conditional_accuracy(probs, torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------
# Nearest neighbours, conversions, the whole evaluation
# ---------------------------------------------------------------------------------------------------------


def test_nearest_neighbours_find_planted_duplicates():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(300, 1, 28, 28, generator=g) * 2 - 1
    fresh = torch.rand(20, 1, 28, 28, generator=g) * 2 - 1
    planted = torch.tensor([17, 250, 3])
    samples = torch.cat([fresh[:10], train[planted], fresh[10:]])
    d, j = M.nearest_neighbours(samples, train, batch_size=7)
    assert torch.equal(j[10:13], planted) and torch.all(d[10:13] < 1e-6)
    assert torch.all(torch.cat([d[:10], d[13:]]) > 1.0)
    # the brute-force distance on the [0, 1] scale
    diff = ((samples[:, None] - train[None]) / 2).flatten(2).norm(dim=2)
    torch.testing.assert_close(d, diff.min(1).values.double(), rtol=1e-6, atol=1e-6)
    pairs = M.closest_pairs(samples, train, k=4)
    assert set(pairs["sample_index"][:3].tolist()) == {10, 11, 12}
    assert torch.all(pairs["distance"][:-1] <= pairs["distance"][1:])
    assert torch.equal(pairs["samples"][:3], pairs["train"][:3])
    # fresh samples are exchangeable with the real reference images: the 3 copies (distance 0) are certain
    # to fall below the reference's 1% quantile, a fresh one only rarely
    real = torch.rand(200, 1, 28, 28, generator=g) * 2 - 1
    d_real = M.nearest_neighbours(real, train)[0]
    summary = M.memorisation_summary(d, d_real)
    below = (d < torch.quantile(d_real, 0.01)).sum()
    assert summary["n_exact_copies"] == 3 and summary["frac_below_real_p01"] == pytest.approx(float(below) / 23)
    assert 3 <= below <= 5 and summary["nn_min"] < 1e-6 < summary["real_nn_min"]


def test_uint8_and_float_layouts_agree():
    g = torch.Generator().manual_seed(0)
    u = torch.randint(0, 256, (5, 28, 28, 1), generator=g, dtype=torch.uint8).numpy()
    x = M.as_model_images(u)
    assert x.shape == (5, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(M.to_uint8(x), u)
    assert torch.equal(M.as_model_images(x), x)
    with pytest.raises(ValueError, match="images"):
        M.as_model_images(torch.zeros(5, 28, 28))


def _synthetic_digits(n, seed):
    """Class k = a bright square at position k of a 2 x 5 grid, plus noise; [N, 1, 28, 28] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = -torch.ones(n, 1, 28, 28) + 0.1 * torch.rand(n, 1, 28, 28, generator=g)
    for i in range(n):
        r, c = divmod(int(y[i]), 5)
        x[i, 0, 4 + 12 * r: 12 + 12 * r, 1 + 5 * c: 5 + 5 * c] = 1.0
    return x.clamp(-1, 1), y


def test_evaluate_samples_on_npz_and_report(tmp_path):
    train, test = _synthetic_digits(200, 0), _synthetic_digits(100, 1)
    cfg = M.MNISTClassifierConfig(channels=(4, 8), feature_dim=16, epochs=12, batch_size=50, lr=1e-2, max_shift=0)
    model, info = M.train_mnist_classifier(cfg, train_data=train, test_data=test)
    assert info["test_accuracy"] > 0.9
    samples, labels = _synthetic_digits(60, 2)
    labels = labels.clone()
    labels[:6] = (labels[:6] + 1) % 10  # 6 of 60 samples do not show the requested class
    path = tmp_path / "samples.npz"
    np.savez(path, M.to_uint8(samples), labels.numpy())
    result = M.evaluate_samples(path, classifier=model, classifier_info=info, train_data=train, test_data=test,
                                n_draws=3)
    assert result["n_samples"] == 60 and result["fid_n"] == 60 and result["fid_floor_n"] == 60
    assert result["conditional_accuracy"] == pytest.approx(0.9, abs=0.05)
    assert result["class_entropy"] == pytest.approx(math.log(10), abs=0.05)
    assert result["inception_fid"] is None or result["inception_fid"] >= 0
    assert result["n_exact_copies"] == 0 and result["nn_min"] > 0
    report = M.format_report(result)
    assert "not comparable" in report and "conditional accuracy" in report
    # float samples in [-1, 1] give the same numbers as the uint8 file
    again = M.evaluate_images(M.as_model_images(M.to_uint8(samples)), labels, classifier=model,
                              classifier_info=info, train_data=train, test_data=test, n_draws=3)
    assert again["fid"] == pytest.approx(result["fid"]) and again["confidence"] == pytest.approx(result["confidence"])
    with pytest.raises(ValueError, match="npz_path"):
        M.evaluate_samples(tmp_path / "missing.npz", classifier=model)
    with pytest.raises(ValueError, match="images"):
        M.evaluate_images(torch.zeros(4, 3, 32, 32), classifier=model, train_data=train, test_data=test)


def test_the_reported_floor_is_held_out_digits_not_two_draws_of_the_reference():
    train, test = _synthetic_digits(200, 0), _synthetic_digits(100, 1)
    cfg = M.MNISTClassifierConfig(channels=(4, 8), feature_dim=16, epochs=12, batch_size=50, lr=1e-2, max_shift=0)
    model, info = M.train_mnist_classifier(cfg, train_data=train, test_data=test)
    # held-out digits that differ from the training digits (dimmer squares): a floor drawn from the reference
    # alone cannot see that, the held-out floor must
    dim = (test[0].clamp(max=-0.3), test[1])
    result = M.evaluate_images(_synthetic_digits(60, 2)[0], classifier=model, classifier_info=info, train_data=train,
                               test_data=dim, n_draws=3, memorisation=False, inception=False)
    ref = M.classifier_outputs(model, train[0])["features"]
    held = M.classifier_outputs(model, dim[0])["features"]
    assert result["fid_floor_n"] == 60
    two_draws = M.fid_floor(ref, 60)["fid"]
    expected = M.heldout_floor(held, ref, 60)["fid"]
    assert expected > 3 * two_draws
    assert result["fid_floor"] == pytest.approx(expected, rel=0.3)
    # a floor at more digits than are held out is refused, not silently taken at another n
    with pytest.raises(ValueError, match="same n"):
        M.heldout_floor(held, ref, len(held) + 1)
    # more samples than held-out digits: the FID and its floor are both taken at the held-out count
    more = M.evaluate_images(_synthetic_digits(150, 3)[0], classifier=model, classifier_info=info, train_data=train,
                             test_data=dim, n_draws=3, memorisation=False, inception=False)
    assert more["n_samples"] == 150 and more["fid_n"] == more["fid_floor_n"] == len(held)


def test_metric_classifier_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    data = {"train": _synthetic_digits(100, 3), "test": _synthetic_digits(50, 4)}
    monkeypatch.setattr(digit_classifier, "real_digits", lambda split="train", dataset="mnist5k": data[split])
    cfg = M.MNISTClassifierConfig(channels=(4, 8), feature_dim=16, epochs=1, batch_size=50)
    model, info = M.load_or_train_mnist_classifier(cfg)
    assert info["path"] is not None and 0 <= info["test_accuracy"] <= 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(digit_classifier, "train_mnist_classifier", no_training)
    again, info2 = M.load_or_train_mnist_classifier(cfg)
    assert info2["test_accuracy"] == info["test_accuracy"]
    x = data["test"][0][:5]
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_sliced_wasserstein_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g, dtype=torch.float64)
    assert M.sliced_wasserstein(a, a, generator=torch.Generator().manual_seed(1)) == pytest.approx(0.0, abs=1e-12)
    # in 1-D every projection is +-1: a shift by c moves every quantile by c
    x = torch.randn(300, 1, generator=g, dtype=torch.float64)
    assert M.sliced_wasserstein(x, x + 0.7, n_projections=8) == pytest.approx(0.7, rel=1e-9)
    # in D dimensions a shift v gives E|v . theta| over uniform unit theta; in 2-D that is 2|v|/pi
    v = torch.tensor([0.3, -0.4], dtype=torch.float64)
    sw = M.sliced_wasserstein(a, a + v, n_projections=4000, generator=torch.Generator().manual_seed(2))
    assert sw == pytest.approx(2 * 0.5 / math.pi, rel=0.03)
    with pytest.raises(ValueError):
        M.sliced_wasserstein(a, torch.zeros(3, 3))


def test_within_class_spread_closed_form():
    # class 0 at (+-a, 0), class 1 at (0, +-b): RMS distances to the centroids are a and b
    a, b = 0.5, 2.0
    f = torch.tensor([[a, 0], [-a, 0], [0, b], [0, -b], [0, b], [0, -b]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 1])
    assert M.within_class_spread(f, y) == pytest.approx((a + b) / 2, rel=1e-12)
    assert M.within_class_spread(torch.ones(4, 3), torch.tensor([0, 0, 1, 1])) == 0.0
    with pytest.raises(ValueError, match="labels"):
        M.within_class_spread(f, y[:3])


def test_precision_recall_separates_a_blur_from_a_missing_arm():
    g = torch.Generator().manual_seed(0)
    # data: two well separated clusters on a line; a model that draws one of them, and one that blurs both
    data = torch.cat([torch.randn(400, 2, generator=g) * 0.05 + torch.tensor([-1.0, 0.0]),
                      torch.randn(400, 2, generator=g) * 0.05 + torch.tensor([1.0, 0.0])])
    fresh = torch.cat([torch.randn(400, 2, generator=g) * 0.05 + torch.tensor([-1.0, 0.0]),
                       torch.randn(400, 2, generator=g) * 0.05 + torch.tensor([1.0, 0.0])])
    one_arm = torch.randn(800, 2, generator=g) * 0.05 + torch.tensor([1.0, 0.0])
    blur = torch.randn(800, 2, generator=g) * 0.8
    floor = M.precision_recall(fresh, data)
    assert floor["precision"] > 0.9 and floor["recall"] > 0.9
    missing = M.precision_recall(one_arm, data)
    assert missing["precision"] > 0.9 and 0.4 < missing["recall"] < 0.6  # half the data is never reached
    blurred = M.precision_recall(blur, data)
    assert blurred["precision"] < 0.3 and blurred["recall"] > 0.9
    with pytest.raises(ValueError, match="more than k"):
        M.precision_recall(fresh[:3], data)
