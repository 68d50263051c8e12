"""Helpers shared by the checks of the built book: the pages of ``_toc.yml`` and their sources."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOC = ROOT / "_toc.yml"
BUILD = ROOT / "_build"
# The built book under test: this checkout's build, or another build of the same book named by DDPM_BOOK_HTML.
HTML = Path(os.environ["DDPM_BOOK_HTML"]).resolve() if os.environ.get("DDPM_BOOK_HTML") else BUILD / "html"
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


def is_executed(page: Page) -> bool:
    """Whether MyST-NB executes the page: a notebook, or MyST Markdown with a ``kernelspec`` in its front matter."""
    if page.source is None:
        return False
    if page.source.suffix == ".ipynb":
        return True
    front = re.match(r"---\n(.*?)\n---\n", page.source.read_text(encoding="utf-8"), re.S)
    return front is not None and "kernelspec" in (yaml.safe_load(front.group(1)) or {})


def cited_keys(pages: list[Page]) -> set[str]:
    keys: set[str] = set()
    for page in pages:
        for group in CITE_ROLE.findall(source_text(page)):
            keys.update(key.strip() for key in group.split(",") if key.strip())
    return keys


def soup_of(path: Path):
    """The parsed HTML of a built page (a test failure when the page is missing)."""
    from bs4 import BeautifulSoup

    assert path.is_file(), f"missing built page {path}"
    return BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")


def article(soup):
    """The page content written by the author, without the theme's navigation."""
    node = soup.find("article") or soup.find("main")
    assert node is not None, "no <article> or <main> element: the page layout is not the expected one"
    return node


def require_build() -> Path:
    """The built HTML folder, or a test failure that says how to produce it."""
    if not (HTML / "index.html").is_file():
        pytest.fail(
            f"{HTML} has no built book: run `make book` (or `jupyter-book build . -W -n --keep-going`) first",
            pytrace=False,
        )
    return HTML
