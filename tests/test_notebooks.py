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
SHOWS_IMAGES = re.compile(r"\b(image_grid|samples_figure|trajectory_figure|trajectory_animation)\(")


CODE_COLUMN = 82  # characters of code that the book's code column shows without scrolling sideways (1,300 px window)
CHAPTERS = [p for p in NOTEBOOKS if p.parent.name == "notebooks"]


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_the_book_has_its_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    assert {"forward_process", "toy_2d", "training_mnist", "sampling", "solvers", "flow_matching", "improved_ddpm",
            "guidance", "editing", "evaluation", "benchmarks"} <= names, names


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
    glued = set(re.findall(r'glue\(\s*"([A-Za-z0-9_]+)"', code))
    if "clock.glue()" in code:  # ddpm.book.PageClock glues the page's run time and profile
        glued |= {"run_time", "run_profile"}
    for key in re.findall(r"\{glue:text\}`([A-Za-z0-9_]+)", prose):
        assert key in glued or re.search(r'glue\(\s*f"', code), f"{path.name}: prose pastes {key!r}, never glued"


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


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_each_notebook_opens_with_what_it_shows_and_ends_with_takeaways_and_exercises(path):
    prose = [source(c) for c in cells(path) if c["cell_type"] == "markdown"]
    assert "About this page" in prose[0], f"{path.name}: the first cell has no 'About this page' box"
    for part in ("**What it shows:**", "**Prerequisites:**", "**Run time:**"):
        assert part in prose[0], f"{path.name}: the 'About this page' box lacks {part}"
    text = "\n".join(prose)
    assert "{admonition} Key takeaways" in text, f"{path.name}: no 'Key takeaways' admonition"
    exercises = text[text.index("## Exercises"):] if "## Exercises" in text else ""
    assert re.search(r"^\d\. ", exercises, re.M), f"{path.name}: no numbered exercises"
    assert ":class: dropdown" in exercises, f"{path.name}: the exercises have no solutions in a dropdown"
    code = [source(c) for c in cells(path) if c["cell_type"] == "code"]
    assert "clock.glue()" in code[-1], f"{path.name}: the last cell must glue the page's run time"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_share_one_glue_and_hide_their_plumbing(path):
    code_cells = [c for c in cells(path) if c["cell_type"] == "code"]
    for cell in code_cells:
        assert "from myst_nb import glue" not in source(cell), f"{path.name}: glue comes from ddpm.book"
        assert "display(HTML(" not in source(cell) or "animation_html" in source(cell), (
            f"{path.name}: tables come from ddpm.book.table, not raw HTML")
    hidden = sum(bool(set(c.get("metadata", {}).get("tags", [])) & {"hide-input", "remove-input", "remove-cell"})
                 for c in code_cells)
    assert hidden >= len(code_cells) // 2, f"{path.name}: only {hidden} of {len(code_cells)} code cells hide their input"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_code_lines_fit_the_code_column(path):
    for cell in cells(path):
        tags = set(cell.get("metadata", {}).get("tags", []))
        if cell["cell_type"] != "code" or tags & {"remove-input", "remove-cell"}:
            continue
        for line in source(cell).splitlines():
            assert len(line) <= CODE_COLUMN, f"{path.name}: a code line of {len(line)} characters: {line[:60]}..."

