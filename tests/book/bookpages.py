"""Helpers shared by the checks of the built book: the pages of ``_toc.yml`` and their sources."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOC = ROOT / "_toc.yml"
BUILD = ROOT / "_build"
HTML = BUILD / "html"
SCREENSHOTS = BUILD / "screenshots"

# {cite}`a,b`, {cite:p}`a`, {cite:t}`a` ... in Markdown sources and notebook Markdown cells.
CITE_ROLE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")


@dataclass(frozen=True)
class Page:
    """One page of the book: its docname (path without suffix), source file and built HTML file."""

    docname: str
    source: Path | None
    html: Path


def _toc_docnames(toc: dict) -> list[str]:
    """Docnames in reading order: the root, then every ``file`` entry of parts, chapters and sections."""
    names = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [re.sub(r"\.(md|ipynb)$", "", name) for name in names]


def _source(docname: str) -> Path | None:
    """The source file of a docname; None when _toc.yml names a file that does not exist (a test reports it)."""
    for suffix in (".md", ".ipynb"):
        path = ROOT / f"{docname}{suffix}"
        if path.exists():
            return path
    return None


def toc_pages() -> list[Page]:
    toc = yaml.safe_load(TOC.read_text(encoding="utf-8"))
    return [Page(name, _source(name), HTML / f"{name}.html") for name in _toc_docnames(toc)]


def source_text(page: Page) -> str:
    """The text a reader wrote: a Markdown file, or the Markdown cells of a notebook."""
    if page.source is None:
        return ""
    if page.source.suffix == ".ipynb":
        import json

        nb = json.loads(page.source.read_text(encoding="utf-8"))
        return "\n".join(
            "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for cell in nb["cells"]
            if cell["cell_type"] == "markdown"
        )
    return page.source.read_text(encoding="utf-8")


def cited_keys(pages: list[Page]) -> set[str]:
    keys: set[str] = set()
    for page in pages:
        for group in CITE_ROLE.findall(source_text(page)):
            keys.update(key.strip() for key in group.split(",") if key.strip())
    return keys


def require_build() -> Path:
    """The built HTML folder, or a test failure that says how to produce it."""
    if not (HTML / "index.html").is_file():
        pytest.fail(
            f"{HTML} has no built book: run `make book` (or `jupyter-book build . -W -n --keep-going`) first",
            pytrace=False,
        )
    return HTML
