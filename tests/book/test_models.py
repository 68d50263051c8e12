"""Checks of the models the book trained (``pytest -m book tests``, after the build has cached them).

A figure can look right while the model is wrong; these tests hold the toy model to a measurable criterion.
"""

from __future__ import annotations

import torch
import pytest

from ddpm.cache import load_or_train
from ddpm.data import load_dataset
from ddpm.fid import precision_recall
from ddpm.samplers import ddpm_sample

pytestmark = pytest.mark.book


def arms(points: torch.Tensor) -> torch.Tensor:
    """True for the inner arm of the swiss roll (radius below the middle turn), False for the outer one."""
    return points.norm(dim=1) < 3 * torch.pi / 15


def test_toy_model_draws_both_arms_of_the_swiss_roll():
    trained = load_or_train("toy2d")  # cached by the book build; trains in about a minute otherwise
    data, _ = load_dataset("swiss_roll", split="test", n=2000)
    fresh, _ = load_dataset("swiss_roll", split="test", n=2000, seed=7)
    with torch.no_grad():
        x = ddpm_sample(trained.model, trained.schedule, (2000, 2), generator=torch.Generator().manual_seed(1))
    floor, got = precision_recall(fresh, data), precision_recall(x, data)
    assert got["precision"] >= 0.8 * floor["precision"], (got, floor)  # the samples lie on the roll
    assert got["recall"] >= 0.8 * floor["recall"], (got, floor)  # and reach all of it
    for inner in (True, False):  # each arm on its own: recall of the data points of that arm
        part = data[arms(data) == inner]
        reached = precision_recall(x, part)["recall"]
        assert reached >= 0.8 * precision_recall(fresh, part)["recall"], ("inner" if inner else "outer", reached)
