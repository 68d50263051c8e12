"""What the book's notebooks share: glued values, one rule for verdicts, tables and sample grids.

The notebooks put measured numbers into their prose through MyST-NB's ``glue``; outside the book (a plain
Jupyter session) :func:`glue` prints the value instead. Every comparison in the book ends in one of four
verdicts, decided by one rule (:func:`verdict`, :func:`verdict_close`):

* ``"held"``: the measured difference goes the claimed way by more than twice its error;
* ``"did not hold"``: it goes the other way by more than twice its error;
* ``"inconclusive"``: the interval of twice the error either side admits both, although the test was large enough
  to detect the smallest effect that matters for the claim (fixed before the run);
* ``"beyond this budget"``: the interval admits both *and* the test was too small to decide by construction: its
  detectable difference (:func:`detectable`) exceeds that smallest effect. The row says what a decisive test needs.

Two arms that share their noise (the same ``x_T``, the same weights, the same digits) are compared with a paired
error (:func:`ddpm.fid.paired_fid_difference`), which is what lets a few hundred samples decide. Two separately
trained models also differ by the luck of their training run: :func:`with_seed_spread` folds a measured spread over
training seeds into the error.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from .plotting import CODE_COLUMN, _imshow, image_grid, wrap  # noqa: F401  (CODE_COLUMN and wrap: re-exported)

__all__ = ["CODE_COLUMN", "POWER_Z", "VERDICTS", "Comparison", "PageClock", "combine", "compare", "detectable",
           "glue", "model_source", "recorded_seed_spread", "samples_figure", "saved_activation_bytes", "same_n",
           "table", "timed_ratio", "verdict", "verdict_close", "with_seed_spread", "wrap"]

VERDICTS = ("held", "did not hold", "inconclusive", "beyond this budget")
#: A difference of (k + POWER_Z) errors is detected by the 2-error rule four times in five (80% power).
POWER_Z = 0.8416

def glue(name: str, value, display: bool = False) -> None:
    """MyST-NB's ``glue`` (hidden by default: the value appears where the text references it); print outside the
    book."""
    try:
        from myst_nb import glue as _glue
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - the book's requirements install both
        _glue, get_ipython = None, lambda: None
    if _glue is None or get_ipython() is None:
        print(f"{name}: {value}")
        return
    _glue(name, value, display=display)


class PageClock:
    """The wall time of one execution of a notebook: started in its first cell, glued by :meth:`glue` in its last
    as ``run_time`` ("40 seconds", "3.2 minutes") and ``run_profile`` ("cpu" or "gpu")."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @staticmethod
    def words(seconds: float) -> str:
        return f"{seconds / 60:.1f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"

    def glue(self) -> None:
        from .presets import profile

        glue("run_time", self.words(self.seconds))
        glue("run_profile", profile())


def model_source(trained) -> str:
    """How this run got ``trained`` (a ``ddpm.cache.TrainedModel``), for a page's run-time note: loaded from the
    model cache, or trained here (with the minutes it took, both stages of a latent model together)."""
    if trained.info.get("cached", True):
        return "loaded from the model cache"
    seconds = trained.info.get("wall_time_s", float("nan")) + trained.info.get("autoencoder_seconds", 0.0)
    return f"trained in this run ({seconds / 60:.1f} minutes), because this page was the first to need it"


def detectable(std: float, k: float = 2.0) -> float:
    """The smallest true difference that the rule "beyond k errors" detects four times in five: (k + 0.84) std."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"detectable needs a finite, non-negative error, got {std!r}")
    return (k + POWER_Z) * std


def _check(gain: float, std: float) -> None:
    if not (math.isfinite(gain) and math.isfinite(std)) or std < 0:
        raise ValueError(f"a verdict needs a finite gain and a non-negative error, got {gain!r} +- {std!r}")


def verdict(gain: float, std: float, k: float = 2.0, effect: float | None = None) -> str:
    """The verdict on a claim whose measured effect is ``gain`` (positive: the claimed direction) +- ``std``.

    ``effect``: the smallest effect that matters for the claim, fixed before the run (e.g. 10% of the baseline's
    FID). An inconclusive result whose :func:`detectable` difference exceeds it is ``"beyond this budget"``: the test
    could not have decided."""
    _check(gain, std)
    if gain - k * std > 0:
        return "held"
    if gain + k * std < 0:
        return "did not hold"
    if effect is not None and detectable(std, k) > effect:
        return "beyond this budget"
    return "inconclusive"


def verdict_close(difference: float, std: float, margin: float, k: float = 2.0) -> str:
    """The verdict on "the two agree within ``margin``": held when the whole interval ``difference +- k std`` lies
    inside ``[-margin, margin]``, did not hold when it lies wholly outside, inconclusive otherwise, and ``"beyond
    this budget"`` when it is inconclusive and ``k std`` reaches the margin, so that no outcome could have held."""
    if margin <= 0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    _check(difference, std)
    low, high = abs(difference) - k * std, abs(difference) + k * std
    if high <= margin:
        return "held"
    if low > margin:
        return "did not hold"
    return "beyond this budget" if k * std >= margin else "inconclusive"


def combine(verdicts: Iterable[str]) -> str:
    """One verdict for a claim made of several comparisons that must all hold: held if every one held, did not hold if
    any did not, beyond this budget if any could not decide, inconclusive otherwise."""
    verdicts = list(verdicts)
    unknown = set(verdicts) - set(VERDICTS)
    if not verdicts or unknown:
        raise ValueError(f"combine needs verdicts among {VERDICTS}, got {verdicts!r}")
    if all(v == "held" for v in verdicts):
        return "held"
    for v in ("did not hold", "beyond this budget"):
        if v in verdicts:
            return v
    return "inconclusive"


def with_seed_spread(score: dict, seed_std: float, *, arms: int = 1) -> dict:
    """``score`` (``{"fid" or "diff": value, "std": sampling error, ...}``) with the spread between training runs
    folded into its error: ``std -> sqrt(std^2 + arms * seed_std^2)``, ``arms = 2`` for the difference of two
    separately trained models. Records ``"sampling_std"`` and ``"seed_std"`` beside it."""
    if not (math.isfinite(seed_std) and seed_std >= 0):
        raise ValueError(f"seed_std must be a finite, non-negative spread, got {seed_std!r}")
    return {**score, "std": math.sqrt(score["std"] ** 2 + arms * seed_std ** 2), "sampling_std": score["std"],
            "seed_std": seed_std}


def recorded_seed_spread(pattern: str) -> tuple[float, int, str]:
    """The spread over training seeds of a preset's class-conditional FID without guidance, from the records of
    ``benchmarks/train_mnist_cpu.py`` in ``benchmarks/results/<pattern>`` (runs of the preset's own length without
    changes): ``(standard deviation, number of seeds, the processor the records were made on)``. The field is the
    headline FID (labels from the class frequencies) where every record has it, else the unguided FID of labels
    0-9 in turn (a balanced label mix). Fewer than two seeds on record is a one-line ValueError."""
    import json

    from .paths import project_root
    from .presets import get_preset

    runs = []
    for path in sorted((project_root() / "benchmarks" / "results").glob(pattern)):
        record = json.loads(path.read_text())
        if record["steps"] == get_preset(record["preset"]).steps and not record.get("changes"):
            runs.append(record)
    if runs and all("headline_fid" in r for r in runs):
        values = [r["headline_fid"] for r in runs]
    else:
        values = [r["conditional_fid"] for r in runs if r.get("conditional_guidance") == 0.0]
    if len(values) < 2:
        raise ValueError(f"need two or more training seeds on record for {pattern}; run benchmarks/train_mnist_cpu.py "
                         "with --train-seed 1 and 2")
    return statistics.stdev(values), len(values), runs[0]["cpu"]


def same_n(*scores: dict) -> int:
    """The common number of samples ``n`` of FID scores (a model's and its floor's): FIDs at different n differ by
    their small-sample bias, so comparing them is refused with a one-line error."""
    ns = {int(s["n"]) for s in scores if "n" in s}
    if len(ns) > 1:
        raise ValueError(f"FIDs at different n ({', '.join(map(str, sorted(ns)))}) cannot be compared: score every "
                         "arm and its floor at the same n (subsample the larger set)")
    if not ns:
        raise ValueError("the scores carry no n: use ddpm.fid's scores, which record it")
    return ns.pop()


@dataclass(frozen=True)
class Comparison:
    """Candidate against baseline: ``gain`` (how much better the candidate is), its ``std``, the ``verdict`` on
    "the candidate is better", whether the error is ``paired``, and the ``detectable`` difference of the test."""

    gain: float
    std: float
    verdict: str
    paired: bool
    detectable: float = float("nan")

    def words(self, held: str, did_not_hold: str, inconclusive: str, beyond: str | None = None) -> str:
        """The phrase of the text that belongs to this verdict (``beyond`` defaults to the inconclusive one)."""
        return {"held": held, "did not hold": did_not_hold, "inconclusive": inconclusive,
                "beyond this budget": inconclusive if beyond is None else beyond}[self.verdict]


def compare(candidate: dict, baseline: dict, *, paired: dict | None = None, higher_is_better: bool = False,
            key: str = "fid", effect: float | None = None) -> Comparison:
    """Is ``candidate`` better than ``baseline``? Both are scores ``{key: value, "std": error, "n": samples}`` (an
    FID by default, lower is better); FIDs at different n are refused (:func:`same_n`). With ``paired``
    (:func:`ddpm.fid.paired_fid_difference` of candidate against baseline) its ``diff`` and ``std`` replace the
    difference of the two and their independent combined error. ``effect``: see :func:`verdict`."""
    if key == "fid":
        same_n(candidate, baseline, *([paired] if paired is not None else []))
    if paired is not None:
        gain, std = -paired["diff"], paired["std"]
    else:
        gain = baseline[key] - candidate[key]
        std = math.hypot(candidate["std"], baseline["std"])
    if higher_is_better:
        gain = -gain
    return Comparison(gain, std, verdict(gain, std, effect=effect), paired is not None, detectable(std))


def timed_ratio(slow, fast, repeats: int = 7, warmup: int = 1) -> tuple[float, float]:
    """How many times longer ``slow()`` takes than ``fast()``: ``(mean ratio, its standard error)`` over ``repeats``
    interleaved pairs of calls (after ``warmup`` untimed pairs), so that a drift of the machine's speed affects both
    alike."""
    if repeats < 2:
        raise ValueError(f"repeats must be at least 2 for an error, got {repeats}")
    for _ in range(warmup):
        slow(), fast()
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        slow()
        middle = time.perf_counter()
        fast()
        end = time.perf_counter()
        ratios.append((middle - start) / (end - middle))
    mean = sum(ratios) / repeats
    spread = math.sqrt(sum((r - mean) ** 2 for r in ratios) / (repeats - 1))
    return mean, spread / math.sqrt(repeats)


def saved_activation_bytes(fn, exclude: Iterable = ()) -> int:
    """Bytes of the tensors that autograd keeps for the backward pass while ``fn()`` runs, each storage counted
    once and the storages of ``exclude`` (a model's parameters) left out: the activation memory of one training
    step, which is what grows with the batch. ``fn`` returns nothing of interest; its graph is freed afterwards."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in exclude}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(kept.values())


def table(header: Sequence[str], rows: Iterable[Sequence], align: str | None = None):
    """A Markdown table (styled by the book's theme like every other table of the book). ``align``: one letter
    per column, ``l`` or ``r`` (default: first column left, the others right)."""
    from IPython.display import Markdown

    header = [str(h) for h in header]
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} letters for {len(header)} columns")
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        cells = [str(c).replace("|", "\\|") for c in row]
        if len(cells) != len(header):
            raise ValueError(f"a row has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return Markdown("\n".join(lines))


def samples_figure(panels: dict, nrow: int, pixels: int = 40, columns: int | None = None, title_size: int = 10):
    """Sample grids, each image about ``pixels`` screen pixels wide at the book's figure resolution (100 dpi), whatever
    its size in pixels (a 14x14 digit is drawn as large as a 28x28 one).

    ``panels``: title -> images ``[N, C, H, W]`` in [-1, 1], ``nrow`` images per grid row; ``columns`` panels per
    row of the figure (default: all side by side).
    """
    import matplotlib.pyplot as plt

    grids = {name: image_grid(x, nrow=nrow) for name, x in panels.items()}
    columns = columns or len(grids)
    rows = math.ceil(len(grids) / columns)
    first = next(iter(grids.values()))
    side = next(iter(panels.values())).shape[-1]  # 28 for digits, 14 for pooled digits
    scale = pixels / side / 100  # inches per image pixel at 100 dpi
    width, height = first.shape[1] * scale, first.shape[0] * scale
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns + 0.2 * (columns - 1), (height + 0.35) * rows),
                             squeeze=False, dpi=100)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        _imshow(ax, grid)
        ax.set_title(name, fontsize=title_size)
    fig.tight_layout(pad=0.3)
    return fig
