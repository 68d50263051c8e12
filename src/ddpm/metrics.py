"""Offline sample-quality metrics for MNIST-like samples.

Inception-v3 weights cannot be fetched offline, so the project trains its own small MNIST classifier
(:class:`MNISTClassifier`) and measures samples in that classifier's space, as TF-GAN's MNIST
"classifier score" and "frechet classifier distance" do:

* FID in the penultimate feature space (``ddpm.fid``, computed in float64), with an error bar from repeated
  draws and, as the floor, held-out real digits scored exactly like the samples at the same n;
* mean classifier confidence, the entropy of the histogram of predicted classes (diversity), the accuracy
  of class-conditional samples against the requested labels, and an Inception-Score analogue;
* a memorisation check: the nearest training image of every sample in pixel space (``ddpm.memorisation``).

The classifier lives in ``ddpm.digit_classifier``, the sample-file layout in ``ddpm.samplefiles``; this module
holds the classifier-based scores and :func:`evaluate_images`, and re-exports the rest.

**These numbers are not comparable with published FIDs or Inception Scores**, which use Inception-v3
features of natural images; they only compare models measured here with the same classifier and the same
number of samples (FID is biased upwards at small sample sizes, hence the floor).

Image conventions: tensors are ``[N, C, H, W]`` float in ``[-1, 1]``; sample files follow OpenAI's
evaluation suite, an ``.npz`` with ``arr_0`` = uint8 ``[N, H, W, C]`` and optionally ``arr_1`` = int64
labels ``[N]``. :func:`as_model_images` converts either to the former. The book's evaluation chapter
(``theory/evaluation.md``) explains each number and its caveats.
"""

from __future__ import annotations

import math

import torch

from .digit_classifier import (IMAGE_SHAPE, MNISTClassifier, MNISTClassifierConfig, classifier_accuracy,  # noqa: F401
                               classifier_outputs, load_or_train_mnist_classifier, real_digits,
                               train_mnist_classifier)
from .fid import (fid_floor, fid_from_features, fid_with_error, frechet_distance, gaussian_stats,  # noqa: F401
                  heldout_floor, inception_fid, paired_fid_difference, precision_recall,
                  sliced_wasserstein)
from .memorisation import closest_pairs, memorisation_summary, nearest_neighbours  # noqa: F401
from .plotting import to_uint8  # noqa: F401  (re-exported: samples as the OpenAI .npz layout)
from .samplefiles import as_model_images, load_samples  # noqa: F401

NOT_COMPARABLE = (
    "FID and the Inception-Score analogue are measured in the feature space of the project's own MNIST "
    "classifier; they are not comparable with published Inception-v3 FIDs or Inception Scores."
)


#: The scores of 2-D samples of the swiss roll (:func:`swiss_roll_scores`) and their column titles in the book.
SWISS_ROLL_SCORES = {"precision": "precision", "recall": "recall", "inner": "recall, inner arm",
                     "outer": "recall, outer arm", "sw": "sliced Wasserstein"}


def swiss_roll_scores(points, data) -> dict:
    """2-D ``points`` against swiss-roll ``data`` [M, 2], as the book scores them: ``precision`` and ``recall``
    (:func:`ddpm.fid.precision_recall`), the recall on each arm of the roll (``inner``: the data at a radius below
    3 pi / 15, the middle turn; ``outer``: the rest) and the sliced Wasserstein distance ``sw`` (projections from
    seed 0)."""
    data = torch.as_tensor(data)
    inner = data.norm(dim=1) < 3 * math.pi / 15
    return {**precision_recall(points, data), "inner": precision_recall(points, data[inner])["recall"],
            "outer": precision_recall(points, data[~inner])["recall"],
            "sw": sliced_wasserstein(points, data, generator=torch.Generator().manual_seed(0))}


# ----------------------------------------------------------------------------------------------------------
# Classifier-based scores
# ----------------------------------------------------------------------------------------------------------


def _check_probs(probs) -> torch.Tensor:
    p = torch.as_tensor(probs).double()
    if p.ndim != 2:
        raise ValueError(f"probs: expected [N, K] class probabilities, got shape {tuple(p.shape)}")
    if (p < 0).any() or not torch.allclose(p.sum(1), torch.ones(len(p), dtype=p.dtype), atol=1e-6):
        raise ValueError("probs: every row must be a probability vector (non-negative, summing to 1)")
    return p


def mean_confidence(probs) -> float:
    """Mean over samples of the largest class probability, ``mean_i max_k p(k | x_i)`` (fidelity)."""
    return float(_check_probs(probs).max(1).values.mean())


def class_histogram_entropy(probs_or_labels, num_classes: int | None = None) -> float:
    """Entropy in nats of the histogram of predicted classes (diversity); ``ln K`` when all K classes are equal.

    Accepts probabilities ``[N, K]`` (arg-max is the prediction) or integer predictions ``[N]``
    (then ``num_classes`` is required).
    """
    x = torch.as_tensor(probs_or_labels)
    if x.ndim == 2:
        num_classes = x.shape[1]
        pred = _check_probs(x).argmax(1)
    else:
        if num_classes is None:
            raise ValueError("num_classes: required when class predictions [N] are given instead of probabilities")
        pred = x.long()
    h = torch.bincount(pred, minlength=num_classes).double()
    q = h / h.sum()
    return float(-torch.xlogy(q, q).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def classifier_score(probs, splits: int = 1) -> tuple[float, float]:
    """Inception-Score analogue (Salimans et al. 2016) with the metric classifier: ``exp(E_x KL(p(y|x) || p(y)))``.

    ``p(y)`` is the mean of ``p(y|x)`` over the (split of the) samples. Ranges from 1 (every sample gets the
    same prediction) to K (confident predictions, all K classes equally often). With ``splits > 1`` the
    samples are cut into equal parts as in the original code; returns (mean, std over splits).
    """
    p = _check_probs(probs)
    if splits < 1 or splits > len(p):
        raise ValueError(f"splits: must be in [1, N={len(p)}], got {splits}")
    scores = []
    for part in torch.chunk(p, splits):
        marginal = part.mean(0, keepdim=True)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, marginal.expand_as(part))).sum(1)
        scores.append(math.exp(float(kl.mean())))
    s = torch.tensor(scores, dtype=torch.float64)
    return float(s.mean()), float(s.std()) if splits > 1 else 0.0


def within_class_spread(features, labels) -> float:
    """Diversity within classes: the mean over classes k of the root-mean-square distance of the features
    ``[N, D]`` labelled k (``labels`` ``[N]``) to their class centroid. Falls as guidance collapses each class
    onto its most typical examples, which the class histogram cannot see when the requested labels are balanced.
    """
    f, y = torch.as_tensor(features).double(), torch.as_tensor(labels).long()
    if f.ndim != 2 or y.shape != (len(f),):
        raise ValueError(f"features [N, D] and labels [N] expected, got {tuple(f.shape)} and {tuple(y.shape)}")
    spreads = []
    for k in torch.unique(y):
        fk = f[y == k]
        spreads.append(float((fk - fk.mean(0)).pow(2).sum(1).mean().sqrt()))
    return sum(spreads) / len(spreads)


def conditional_accuracy(probs, labels) -> float:
    """Fraction of class-conditional samples whose predicted class equals the requested label ``[N]``."""
    p = _check_probs(probs)
    y = torch.as_tensor(labels).long()
    if y.shape != (len(p),):
        raise ValueError(f"labels: expected shape [{len(p)}], got {tuple(y.shape)}")
    return float((p.argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------


def pooled_digit_features(classifier, images14) -> torch.Tensor:
    """Features of 14x14 digits (``mnist5k-14`` or a model of it) ``[N, 1, 14, 14]``: each pixel doubled to the metric
    classifier's 28x28 input, so that pooled samples and pooled real digits are scored the same way."""
    import torch.nn.functional as F

    x = torch.as_tensor(images14)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 14, 14):
        raise ValueError(f"images14: expected [N, 1, 14, 14], got {list(x.shape)}")
    return classifier_outputs(classifier, F.interpolate(x.float(), scale_factor=2, mode="nearest"))["features"]


def evaluate_images(
    images,
    labels=None,
    *,
    classifier: MNISTClassifier | None = None,
    classifier_info: dict | None = None,
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    test_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    n_draws: int = 10,
    seed: int = 0,
    memorisation: bool = True,
    inception: bool = True,
    device=None,
) -> dict:
    """All metrics of samples (uint8 ``[N,H,W,C]`` or float ``[N,C,H,W]`` in [-1, 1]), optional requested labels ``[N]``.

    Reference data default to the mnist5k training digits (FID reference, nearest neighbours) and the 1,000
    held-out digits (classifier accuracy, real-data reference values); the classifier defaults to
    :func:`load_or_train_mnist_classifier`. Keys: ``n_samples``, ``classifier_test_accuracy``, ``fid``,
    ``fid_std``, ``fid_n`` (all samples, or a random subset of as many as there are held-out digits),
    ``fid_floor``, ``fid_floor_std``, ``fid_floor_n`` (:func:`heldout_floor`: as many held-out digits as the FID
    scored samples, scored like them), ``fid_heldout``, ``fid_heldout_std``, ``fid_heldout_n`` (the held-out digits, which neither the
    metric classifier nor the generator saw, against training digits), ``confidence``, ``class_entropy``
    (nats), ``class_entropy_max`` (ln K), ``classifier_score``, the same three scores of held-out real digits
    (``real_*``), ``conditional_accuracy`` (None without labels), memorisation quantiles (``nn_*``,
    ``real_nn_*``, ``frac_below_real_p01``, ``n_exact_copies``), ``inception_fid`` (None unless available)
    and ``note``. The numbers are not comparable with published Inception FIDs (see ``note``).
    """
    x = as_model_images(images)
    if x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"images: the metric classifier takes 28x28 grey digits, got [N,C,H,W]={list(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"images: need at least 2 samples, got {len(x)}")
    if classifier is None:
        classifier, classifier_info = load_or_train_mnist_classifier(device=device)
    x_train, _ = train_data if train_data is not None else real_digits("train")
    x_test, y_test = test_data if test_data is not None else real_digits("test")
    gen = torch.Generator().manual_seed(seed)

    out = classifier_outputs(classifier, x)
    ref = classifier_outputs(classifier, x_train)["features"]
    real = classifier_outputs(classifier, x_test)
    # the FID and its floor at one n: all samples, or a random subset as large as the held-out set
    n_fid = min(len(x), len(x_test))
    scored = out["features"][torch.randperm(len(x), generator=gen)[:n_fid]] if n_fid < len(x) else out["features"]
    fid = fid_with_error(scored, ref, n_draws=n_draws, generator=torch.Generator().manual_seed(seed))
    floor = heldout_floor(real["features"], ref, n_fid, n_draws=n_draws, generator=torch.Generator().manual_seed(seed))
    heldout = fid_with_error(real["features"], ref, n_draws=n_draws, generator=torch.Generator().manual_seed(seed))
    probs, num_classes = out["probs"], out["probs"].shape[1]
    test_acc = (classifier_info or {}).get("test_accuracy")
    result = {
        "n_samples": len(x),
        "classifier_test_accuracy": (float(test_acc) if test_acc is not None
                                     else conditional_accuracy(real["probs"], y_test)),
        "fid": fid["fid"], "fid_std": fid["std"], "fid_n": fid["n"],
        "fid_floor": floor["fid"], "fid_floor_std": floor["std"], "fid_floor_n": floor["n"],
        "fid_heldout": heldout["fid"], "fid_heldout_std": heldout["std"], "fid_heldout_n": heldout["n"],
        "confidence": mean_confidence(probs),
        "class_entropy": class_histogram_entropy(probs),
        "class_entropy_max": math.log(num_classes),
        "classifier_score": classifier_score(probs)[0],
        "real_confidence": mean_confidence(real["probs"]),
        "real_class_entropy": class_histogram_entropy(real["probs"]),
        "real_classifier_score": classifier_score(real["probs"])[0],
        "conditional_accuracy": None if labels is None else conditional_accuracy(probs, labels),
    }
    if memorisation:
        d_samples, _ = nearest_neighbours(x, x_train)
        d_real, _ = nearest_neighbours(x_test, x_train)
        result.update(memorisation_summary(d_samples, d_real))
    result["inception_fid"] = inception_fid(x, x_train, device=device) if inception else None
    result["note"] = NOT_COMPARABLE
    return result


def evaluate_samples(npz_path, **kwargs) -> dict:
    """:func:`evaluate_images` on an OpenAI-style ``.npz`` (``arr_0`` uint8 ``[N,H,W,C]``, optional ``arr_1`` labels).

    The labels in ``arr_1`` are taken as the requested classes of conditional samples.
    """
    images, labels = load_samples(npz_path)
    return evaluate_images(images, labels, **kwargs)


def format_report(metrics: dict) -> str:
    """A plain-text table of :func:`evaluate_images` results, ending with the comparability caveat."""
    m = metrics

    def num(key, fmt="{:.3f}"):
        return "n/a" if m.get(key) is None else fmt.format(m[key])

    lines = [
        f"samples                      {m['n_samples']}",
        f"metric classifier test acc.  {num('classifier_test_accuracy', '{:.4f}')} (held-out mnist5k digits)",
        f"FID (classifier features)    {num('fid', '{:.2f}')} +- {num('fid_std', '{:.2f}')} "
        f"(against {m.get('fid_n')} real digits)",
        f"FID floor, held-out digits   {num('fid_floor', '{:.2f}')} +- {num('fid_floor_std', '{:.2f}')} "
        f"({m.get('fid_floor_n')} held-out digits scored like the samples)",
        f"FID held-out real digits     {num('fid_heldout', '{:.2f}')} +- {num('fid_heldout_std', '{:.2f}')} "
        f"({m.get('fid_heldout_n')} unseen digits against as many training digits)",
        f"mean confidence              {num('confidence')} (real digits: {num('real_confidence')})",
        f"class-histogram entropy      {num('class_entropy')} nats of max {num('class_entropy_max')} "
        f"(real digits: {num('real_class_entropy')})",
        f"Inception-Score analogue     {num('classifier_score', '{:.2f}')} (real digits: "
        f"{num('real_classifier_score', '{:.2f}')})",
        f"conditional accuracy         {num('conditional_accuracy')}",
    ]
    if "nn_median" in m:
        lines += [
            f"nearest training image (L2)  min {num('nn_min')}, 5% {num('nn_p05')}, median {num('nn_median')} "
            f"(held-out real digits: min {num('real_nn_min')}, 5% {num('real_nn_p05')}, "
            f"median {num('real_nn_median')})",
            f"closer than 1% of real       {num('frac_below_real_p01')}; exact copies {m.get('n_exact_copies')}",
        ]
    if m.get("inception_fid") is not None:
        lines.append(f"FID (Inception-v3, optional) {m['inception_fid']:.2f}")
    lines.append("note: " + m.get("note", NOT_COMPARABLE))
    return "\n".join(lines)
