"""Checks of the theory chapters' sources (fast; the book build executes them).

Every theory chapter is a MyST Markdown notebook: it has at least one figure computed at build time from the
package (a code cell with a named, captioned figure), and ends with two to five exercises whose worked solutions
sit in a collapsed dropdown. Its code fits the book's code column.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CODE_COLUMN = 82
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
CHAPTERS = [ROOT / f"{c['file']}.md" for part in TOC["parts"] for c in part["chapters"]
            if c["file"].startswith("theory/")]
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```$", re.M | re.S)


def test_the_book_has_its_theory_chapters():
    names = [p.stem for p in CHAPTERS]
    assert names == ["origins", "ddpm", "improved_ddpm", "faster_sampling", "continuous_time", "flow_matching",
                     "guided_diffusion", "editing", "evaluation", "latent_diffusion"], names
    assert all(p.is_file() for p in CHAPTERS)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_theory_chapter_computes_a_figure_from_the_package(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n") and "kernelspec:" in text.split("\n---\n", 1)[0], \
        f"{path.name}: no notebook front matter (jupytext and kernelspec), so its code would not run"
    cells = CODE_CELL.findall(text)
    assert any("from ddpm" in c or "import ddpm" in c for c in cells), f"{path.name}: no cell uses the package"
    figures = [c for c in cells if re.search(r"^\s*caption:", c, re.M) and re.search(r"^\s*name: fig-", c, re.M)]
    assert figures, f"{path.name}: no computed figure with a name and a caption"
    for cell in cells:
        body = cell.split("---\n", 2)[-1] if cell.startswith("---") else cell
        long = [line for line in body.splitlines() if len(line) > CODE_COLUMN]
        assert not long, f"{path.name}: code lines wider than {CODE_COLUMN} characters: {long[:2]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_theory_chapter_ends_with_exercises_and_collapsed_solutions(path):
    text = path.read_text(encoding="utf-8")
    assert "\n## Exercises\n" in text, f"{path.name}: no Exercises section"
    exercises = text.split("\n## Exercises\n", 1)[1]
    questions, _, solutions = exercises.partition("{admonition} Solutions")
    assert solutions, f"{path.name}: the exercises have no Solutions admonition"
    assert re.search(r"^:class: dropdown$", solutions, re.M), f"{path.name}: the solutions are not collapsed"
    n_questions = len(re.findall(r"^\d+\. ", questions, re.M))
    n_solutions = len(re.findall(r"^\d+\. ", solutions, re.M))
    assert 2 <= n_questions <= 5, f"{path.name}: {n_questions} exercises (want 2 to 5)"
    assert n_solutions == n_questions, f"{path.name}: {n_questions} exercises but {n_solutions} solutions"
