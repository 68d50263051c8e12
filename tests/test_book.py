"""Tests of ddpm.book (the verdict rule, tables, grids) and of the paired FID difference it relies on."""

import math

import pytest
import torch

from ddpm import book
from ddpm.fid import fid_with_error, paired_fid_difference


def _features(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


# ---------------------------------------------------------------------------------------------------------
# the verdict rule
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gain,std,expected", [
    (5.0, 2.0, "held"), (-5.0, 2.0, "did not hold"), (3.0, 2.0, "inconclusive"), (-3.0, 2.0, "inconclusive"),
    (0.0, 0.0, "inconclusive"), (4.0, 2.0, "inconclusive"), (4.01, 2.0, "held"),
])
def test_verdict_thresholds_at_twice_the_error(gain, std, expected):
    assert book.verdict(gain, std) == expected


def test_verdict_rejects_nonsense():
    with pytest.raises(ValueError, match="finite"):
        book.verdict(float("nan"), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        book.verdict(1.0, -1.0)


@pytest.mark.parametrize("diff,std,margin,expected", [
    (1.0, 1.0, 5.0, "held"), (-1.0, 1.0, 5.0, "held"), (10.0, 1.0, 5.0, "did not hold"),
    (-10.0, 1.0, 5.0, "did not hold"), (4.0, 1.0, 5.0, "inconclusive"),
])
def test_verdict_close(diff, std, margin, expected):
    assert book.verdict_close(diff, std, margin) == expected


def test_compare_lower_and_higher_is_better_and_paired():
    a, b = {"fid": 10.0, "std": 1.0, "n": 500}, {"fid": 20.0, "std": 1.0, "n": 500}
    c = book.compare(a, b)
    assert (c.gain, c.verdict, c.paired) == (10.0, "held", False)
    assert c.std == pytest.approx(math.sqrt(2))
    assert book.compare(b, a).verdict == "did not hold"
    acc_a, acc_b = {"accuracy": 0.9, "std": 0.01}, {"accuracy": 0.8, "std": 0.01}
    assert book.compare(acc_a, acc_b, key="accuracy", higher_is_better=True).verdict == "held"
    # the same two scores, with a paired error that is wide: the verdict follows the paired error
    wide = book.compare(a, b, paired={"diff": -10.0, "std": 6.0, "n": 500})
    assert (wide.gain, wide.std, wide.verdict, wide.paired) == (10.0, 6.0, "inconclusive", True)
    assert wide.words("x", "y", "z") == "z"
    assert wide.detectable == pytest.approx(2.8416 * 6.0)
    # the same wide test against an effect that it could never detect
    beyond = book.compare(a, b, paired={"diff": -10.0, "std": 6.0, "n": 500}, effect=12.0)
    assert beyond.verdict == "beyond this budget" and beyond.words("x", "y", "z") == "z"
    assert beyond.words("x", "y", "z", "w") == "w"


def test_fids_at_different_n_are_not_compared():
    with pytest.raises(ValueError, match="different n"):
        book.compare({"fid": 10.0, "std": 1.0, "n": 500}, {"fid": 20.0, "std": 1.0, "n": 1000})
    with pytest.raises(ValueError, match="different n"):
        book.same_n({"fid": 10.0, "n": 200}, {"fid": 12.0, "n": 1000})
    assert book.same_n({"fid": 10.0, "n": 200}, {"fid": 12.0, "n": 200}) == 200
    with pytest.raises(ValueError, match="no n"):
        book.compare({"fid": 10.0, "std": 1.0}, {"fid": 20.0, "std": 1.0})


def test_verdicts_say_when_the_test_could_not_decide():
    assert book.verdict(1.0, 1.0, effect=10.0) == "inconclusive"  # 2.84 < 10: it could have decided
    assert book.verdict(1.0, 5.0, effect=10.0) == "beyond this budget"  # 14.2 > 10
    assert book.verdict(30.0, 5.0, effect=10.0) == "held"  # a large effect decides whatever the budget
    assert book.verdict_close(1.0, 1.0, margin=5.0) == "held"
    assert book.verdict_close(4.0, 1.0, margin=5.0) == "inconclusive"
    assert book.verdict_close(1.0, 3.0, margin=5.0) == "beyond this budget"  # 2 x 3 >= 5: held was impossible
    assert book.verdict_close(20.0, 3.0, margin=5.0) == "did not hold"
    assert book.combine(["held", "held"]) == "held"
    assert book.combine(["held", "inconclusive"]) == "inconclusive"
    assert book.combine(["held", "beyond this budget", "inconclusive"]) == "beyond this budget"
    assert book.combine(["beyond this budget", "did not hold"]) == "did not hold"
    with pytest.raises(ValueError):
        book.combine(["maybe"])
    folded = book.with_seed_spread({"fid": 30.0, "std": 3.0, "n": 1000}, 4.0, arms=2)
    assert folded["std"] == pytest.approx(math.sqrt(9 + 2 * 16)) and folded["sampling_std"] == 3.0
    assert folded["fid"] == 30.0 and folded["n"] == 1000


# ---------------------------------------------------------------------------------------------------------
# the paired FID difference
# ---------------------------------------------------------------------------------------------------------


def test_paired_difference_of_identical_arms_is_exactly_zero():
    a, ref = _features(300, 4, 0), _features(2000, 4, 1)
    out = paired_fid_difference(a, a.clone(), ref)
    assert out["diff"] == 0.0 and out["std"] == 0.0 and out["fid_a"] == out["fid_b"]


def test_paired_difference_matches_the_unpaired_means_and_is_tighter_for_shared_noise():
    ref = _features(4000, 4, 1)
    a = _features(300, 4, 2, shift=0.2, scale=1.3)  # a model somewhat off the reference distribution
    b = a * 1.05 + 0.03  # the same noise through a slightly different sampler
    paired = paired_fid_difference(a, b, ref, generator=torch.Generator().manual_seed(5))
    fa = fid_with_error(a, ref, generator=torch.Generator().manual_seed(6))
    fb = fid_with_error(b, ref, generator=torch.Generator().manual_seed(7))
    # the mean difference agrees with the two separate scores (different reference draws: loose tolerance)
    assert paired["diff"] == pytest.approx(fa["fid"] - fb["fid"], abs=0.5 * math.hypot(fa["std"], fb["std"]))
    assert paired["diff"] < 0  # b is the scaled, shifted copy: further from the reference
    # shared noise cancels: the paired error is far below the independent combined error
    assert paired["std"] < 0.4 * math.hypot(fa["std"], fb["std"])


def test_paired_difference_rejects_unpaired_arms():
    with pytest.raises(ValueError, match="same shape"):
        paired_fid_difference(_features(10, 3, 0), _features(11, 3, 1), _features(50, 3, 2))


# ---------------------------------------------------------------------------------------------------------
# tables, grids, glue
# ---------------------------------------------------------------------------------------------------------


def test_table_is_markdown_with_alignment_and_escaped_cells():
    md = book.table(["sampler", "FID"], [("a|b", "1.0 ± 0.1"), ("c", 2)]).data
    lines = md.splitlines()
    assert lines[0] == "| sampler | FID |" and lines[1] == "| :--- | ---: |"
    assert lines[2] == "| a\\|b | 1.0 ± 0.1 |" and lines[3] == "| c | 2 |"
    with pytest.raises(ValueError, match="2 columns"):
        book.table(["a", "b"], [(1, 2, 3)])


def test_samples_figure_gives_each_digit_the_requested_pixels():
    import matplotlib

    matplotlib.use("Agg")
    x = torch.zeros(20, 1, 28, 28)
    fig = book.samples_figure({"left": x, "right": x}, nrow=10, pixels=40)
    ax = fig.axes[0]
    fig.canvas.draw()
    width_px = ax.get_window_extent().width
    grid_px = 10 * 28 + 11 * 2  # ten digits and their padding
    assert width_px / grid_px * 28 >= 38  # about 40 screen pixels per digit at the figure's dpi


def test_glue_prints_outside_a_notebook(capsys):
    book.glue("answer", 42)
    assert capsys.readouterr().out == "answer: 42\n"


def test_page_clock_words():
    assert book.PageClock.words(40.2) == "40 seconds"
    assert book.PageClock.words(192.0) == "3.2 minutes"
    assert 0 <= book.PageClock().seconds < 5


def test_samples_figure_wraps_panels_into_rows():
    import matplotlib

    matplotlib.use("Agg")
    x = torch.zeros(10, 1, 28, 28)
    fig = book.samples_figure({str(k): x for k in range(3)}, nrow=5, columns=2)
    visible = [ax for ax in fig.axes if ax.get_title()]
    assert len(fig.axes) == 4 and len(visible) == 3  # a 2x2 layout, the fourth panel empty


def test_wrap_folds_to_the_code_column():
    text = "word " * 60
    assert max(len(line) for line in book.wrap(text).splitlines()) <= book.CODE_COLUMN
    assert book.wrap("short") == "short"


def test_saved_activation_bytes_counts_what_backward_keeps():
    from ddpm.book import saved_activation_bytes

    layer = torch.nn.Linear(6, 5)
    x = torch.randn(8, 6)
    # addmm keeps its input (8x6) for the weight's gradient and ReLU its output (8x5); the weight is excluded
    assert saved_activation_bytes(lambda: layer(x).relu().sum(), exclude=layer.parameters()) == 4 * 8 * (6 + 5)
    # when the input needs a gradient too, addmm also keeps the weight (6x5): counted unless it is excluded
    xg = x.clone().requires_grad_()
    assert saved_activation_bytes(lambda: layer(xg).relu().sum()) == 4 * (8 * (6 + 5) + 6 * 5)
    assert saved_activation_bytes(lambda: layer(xg).relu().sum(), exclude=layer.parameters()) == 4 * 8 * (6 + 5)
    assert saved_activation_bytes(lambda: (x * x).sum()) == 0  # nothing requires a gradient: nothing is kept
    double = saved_activation_bytes(lambda: layer(torch.cat([x, x])).relu().sum(), exclude=layer.parameters())
    assert double == 2 * 4 * 8 * (6 + 5)  # activations grow with the batch


def test_model_source_says_whether_the_model_was_trained_here():
    from types import SimpleNamespace

    assert book.model_source(SimpleNamespace(info={"cached": True})) == "loaded from the model cache"
    fresh = SimpleNamespace(info={"cached": False, "wall_time_s": 600.0})
    assert book.model_source(fresh).startswith("trained in this run (10.0 minutes)")
    latent = SimpleNamespace(info={"cached": False, "wall_time_s": 300.0, "autoencoder_seconds": 120.0})
    assert "(7.0 minutes)" in book.model_source(latent)


def test_timed_ratio_measures_how_many_times_longer_one_call_takes():
    import time as _time

    ratio, err = book.timed_ratio(lambda: _time.sleep(0.02), lambda: _time.sleep(0.005), repeats=4)
    assert 2.5 < ratio < 5.0 and 0 <= err < 1.0
    with pytest.raises(ValueError, match="repeats"):
        book.timed_ratio(lambda: None, lambda: None, repeats=1)
