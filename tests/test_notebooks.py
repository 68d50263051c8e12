"""Checks of the notebooks' sources (fast; the book build executes them).

Every notebook is committed without outputs, imports the package rather than re-implementing it, gives every
figure a name and a caption, and follows every figure of generated samples with its provenance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "reference").glob("*.ipynb"))
SAMPLERS = ("ddim_sample(", "ddpm_sample(", "sample(")
# a cell that shows images: a grid, a denoising trajectory or its animation
SHOWS_IMAGES = re.compile(r"\b(image_grid|trajectory_figure|trajectory_animation)\(")


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_book_has_its_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"forward_process", "toy_2d", "training_mnist", "sampling", "improved_ddpm", "guidance",
            "evaluation", "benchmarks"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for cell in cells(path):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name}: a code cell holds outputs; clear them before committing"
            assert cell.get("execution_count") is None, f"{path.name}: a code cell keeps its execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_imports_the_package_and_glues_its_numbers(path):
    code = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "code")
    assert "from ddpm" in code or "import ddpm" in code, f"{path.name} does not use the ddpm package"
    prose = "\n".join(source(c) for c in cells(path) if c["cell_type"] == "markdown")
    for key in re.findall(r"\{glue:text\}`([A-Za-z0-9_]+)", prose):
        assert f'glue("{key}"' in code or "glue(f\"" in code, f"{path.name}: prose pastes {key!r}, never glued"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_figure_has_a_name_and_a_caption(path):
    names = []
    for cell in cells(path):
        figure = cell.get("metadata", {}).get("mystnb", {}).get("figure")
        if figure is not None:
            assert figure.get("name") and figure.get("caption"), f"{path.name}: a figure without name or caption"
            names.append(figure["name"])
    assert len(names) == len(set(names)), f"{path.name}: figure names repeat: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_figures_of_samples_are_followed_by_their_provenance(path):
    code_cells = [source(c) for c in cells(path) if c["cell_type"] == "code"]
    figure_cells = [i for i, code in enumerate(code_cells) if SHOWS_IMAGES.search(code)]
    drawn = any(any(s in code for s in SAMPLERS) for code in code_cells) or "load_or_train(" in "".join(code_cells)
    for i in figure_cells:
        if not drawn:
            continue
        following = code_cells[i: i + 3]
        assert any("provenance(" in code for code in following), (
            f"{path.name}: the figure of samples in code cell {i} is not followed by a provenance line")
