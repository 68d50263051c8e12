"""The execution-statistics page: where the book lists it, what the introduction says about it, and the table that
the build writes into it (MyST-NB's ``nb-exec-table``: one row per executed page, with its run time and status).

The first two checks read the sources and run with the unit tests; the last reads the built book (``-m book``).
"""

from __future__ import annotations

import re

import pytest
import yaml
from bookpages import ROOT, TOC, article, is_executed, require_build, soup_of

PAGE = "reference/execution_statistics"
COLUMNS = ["Document", "Modified", "Method", "Run Time (s)", "Status"]


def test_the_page_is_in_the_reference_part_before_the_bibliography():
    toc = yaml.safe_load(TOC.read_text(encoding="utf-8"))
    reference = [part for part in toc["parts"] if part.get("caption") == "Reference"]
    assert reference, "_toc.yml has no part captioned 'Reference'"
    files = [chapter["file"] for chapter in reference[0]["chapters"]]
    assert PAGE in files, f"{PAGE} is not in the Reference part of _toc.yml: {files}"
    assert files.index(PAGE) < files.index("reference/bibliography"), "the bibliography must stay the last page"
    source = (ROOT / f"{PAGE}.md").read_text(encoding="utf-8")
    assert re.search(r"^(```|:::)\{nb-exec-table\}", source, re.M), f"{PAGE}.md has no nb-exec-table directive"


def test_the_introduction_points_at_the_page_instead_of_typing_a_duration():
    intro = (ROOT / "intro.md").read_text(encoding="utf-8")
    section = intro.split("## Rebuilding the book", 1)[1].split("\n## ", 1)[0]
    assert "ref-execution-statistics" in section, "'Rebuilding the book' does not refer to the statistics page"
    typed = re.findall(r"[^.]*\b(?:minutes?|hours?)\b[^.]*\.", section)
    assert not typed, f"'Rebuilding the book' types a duration by hand: {typed}"


@pytest.mark.book
def test_the_built_page_lists_every_executed_page_once(html_dir, pages):
    require_build()
    body = article(soup_of(html_dir / f"{PAGE}.html"))
    tables = [t for t in body.select("table") if [th.get_text(strip=True) for th in t.select("thead th")] == COLUMNS]
    assert len(tables) == 1, f"{PAGE}: expected one execution table with the columns {COLUMNS}, found {len(tables)}"
    rows = [[td.get_text(strip=True) for td in row.select("td")] for row in tables[0].select("tbody tr")]
    listed = [row[0] for row in rows]
    executed = sorted(page.docname for page in pages if is_executed(page))
    assert sorted(listed) == executed, (
        f"rows {sorted(listed)} do not match the book's executed pages {executed}: a notebook is missing, "
        "repeated, or was not executed by this build")
    for document, _, method, seconds, status in rows:
        assert method == "cache", f"{document}: executed with method {method!r}, not the book's 'cache'"
        assert re.fullmatch(r"\d+(\.\d+)?", seconds), f"{document}: run time {seconds!r} is not a number of seconds"
        assert status == "✅", f"{document}: its last execution failed"
    links = [a.get("href", "") for a in tables[0].select("tbody tr td:first-child a")]
    assert len(links) == len(rows), "a row without a link to its page"
    for href in links:
        assert (html_dir / PAGE).parent.joinpath(href.split("#")[0]).resolve().is_file(), f"broken link {href}"
