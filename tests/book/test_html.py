"""Static checks of the built HTML book in ``_build/html``.

Each page listed in ``_toc.yml`` must exist, resolve every reference and citation, render its
mathematics through MathJax loaded from the book's own ``_static`` folder (never a CDN), and reference
only image files that exist. The bibliography page must list every cited work exactly once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from bs4 import BeautifulSoup
from bookpages import HTML, ROOT, Page, article, cited_keys, require_build, soup_of, source_text
from ddpm.book import VERDICTS

pytestmark = pytest.mark.book

# A role that MyST failed to parse shows up in the HTML as its literal source text.
RAW_ROLE = re.compile(r"\{(?:cite(?::[a-z]+)?|eq|ref|numref|doc|term|math)\}`")
# Inline math left as text: a $...$ fragment that contains a TeX command.
RAW_INLINE_MATH = re.compile(r"\$[^$\n]*\\[A-Za-z]+[^$\n]*\$")
# Containers whose text legitimately contains TeX or dollar signs.
MATH_OR_CODE = ["script", "style", "pre", "code", "mjx-container"]
MATH_CLASSES = ("math", "highlight")
# A bibliography directive, in either fence style.
BIBLIOGRAPHY = re.compile(r"^(```|:::)\{bibliography\}", re.M)
# The derivation chapters: each must number its equations, cite its sources and name the code.
THEORY_CHAPTERS = [
    "theory/origins",
    "theory/ddpm",
    "theory/improved_ddpm",
    "theory/faster_sampling",
    "theory/continuous_time",
    "theory/guided_diffusion",
    "theory/evaluation",
]


def prose_text(soup: BeautifulSoup) -> str:
    """Text of the article with mathematics and code removed."""
    node = BeautifulSoup(str(article(soup)), "html.parser")
    for tag in node.find_all(MATH_OR_CODE):
        tag.decompose()
    for tag in node.find_all(class_=lambda c: c is not None and any(k in c.split() for k in MATH_CLASSES)):
        tag.decompose()
    return node.get_text(" ")


def source_has_math(page: Page) -> bool:
    text = source_text(page)
    return "{math}" in text or "$" in text


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "//"))


def local_target(page: Page, url: str) -> Path:
    path = unquote(urlparse(url).path)
    return (page.html.parent / path).resolve()


def test_every_toc_page_is_built(html_dir, page):
    require_build()
    assert page.source is not None, f"_toc.yml lists {page.docname!r} but it has no .md or .ipynb source"
    assert page.html.is_file(), f"{page.docname} is in _toc.yml but {page.html} was not built"


def test_no_unresolved_references(html_dir, page):
    require_build()
    soup = soup_of(page.html)
    text = article(soup).get_text(" ")
    assert "??" not in text, f"{page.docname}: unresolved reference rendered as '??'"
    assert "undefined label" not in text.lower()
    raw = RAW_ROLE.findall(prose_text(soup))
    assert not raw, f"{page.docname}: roles left as raw text: {raw}"
    # Sphinx renders a reference it could not resolve as a bare span with class "xref"; a resolved one is a link
    # (MyST-NB's execution table puts the class on the link itself).
    dangling = [str(tag)[:120] for tag in article(soup).select(".xref")
                if tag.name != "a" and tag.find_parent("a") is None]
    assert not dangling, f"{page.docname}: unresolved cross-references {dangling}"
    problems = article(soup).select(".problematic, .system-message")
    assert not problems, f"{page.docname}: docutils error output in the page: {[p.get_text()[:80] for p in problems]}"


def test_citations_link_to_the_bibliography(html_dir, page):
    require_build()
    soup = soup_of(page.html)
    keys = cited_keys([page])
    links = article(soup).select("span.bibtex-citation a, a.bibtex")
    if keys:
        assert links, f"{page.docname} cites {sorted(keys)} but has no citation links"
    for link in links:
        assert "bibliography.html#" in link.get("href", ""), f"citation link {link} does not point to the bibliography"


def test_no_unrendered_display_math(html_dir, page):
    require_build()
    prose = prose_text(soup_of(page.html))
    assert "$$" not in prose, f"{page.docname}: '$$' left outside a math container"
    raw = RAW_INLINE_MATH.findall(prose)
    assert not raw, f"{page.docname}: inline math left as text: {raw[:3]}"
    assert "\\begin{" not in prose, f"{page.docname}: a LaTeX environment left outside a math container"


def test_math_is_handed_to_mathjax(html_dir, page):
    require_build()
    maths = article(soup_of(page.html)).select(".math")
    if source_has_math(page):
        assert maths, f"{page.docname} has mathematics in its source but no math containers in the HTML"


def test_images_exist(html_dir, page):
    require_build()
    soup = soup_of(page.html)
    for img in soup.find_all("img"):
        src = img.get("src", "")
        assert src, f"{page.docname}: <img> without src"
        if src.startswith("data:"):
            continue
        assert not is_remote(src), f"{page.docname}: image loaded from the network: {src}"
        target = local_target(page, src)
        assert target.is_file(), f"{page.docname}: image {src} -> {target} does not exist"
        assert target.stat().st_size > 0, f"{page.docname}: image {src} is empty"


def test_mathjax_is_local(html_dir, page):
    require_build()
    soup = soup_of(page.html)
    scripts = [s.get("src", "") for s in soup.find_all("script") if s.get("src")]
    mathjax = [src for src in scripts if "mathjax" in src.lower()]
    if article(soup).select(".math"):
        assert mathjax, f"{page.docname} has math but loads no MathJax script"
    for src in mathjax:
        assert not is_remote(src), f"{page.docname}: MathJax loaded from the network: {src}"
        assert "_static/" in src, f"{page.docname}: MathJax not served from _static: {src}"
        assert local_target(page, src).is_file(), f"{page.docname}: {src} does not exist"


def test_no_resources_from_the_network(html_dir, page):
    """Scripts, style sheets, fonts and images a reader needs all come with the book."""
    require_build()
    soup = soup_of(page.html)
    remote = [s["src"] for s in soup.find_all("script", src=True) if is_remote(s["src"])]
    remote += [
        link["href"]
        for link in soup.find_all("link", href=True)
        if is_remote(link["href"]) and set(link.get("rel", [])) & {"stylesheet", "preload", "modulepreload", "icon"}
    ]
    assert not remote, f"{page.docname}: resources from the network: {remote}"


def test_mathjax_bundle_is_complete(html_dir):
    require_build()
    static = html_dir / "_static" / "mathjax"
    assert (static / "tex-chtml.js").is_file(), "the offline MathJax bundle was not copied to _static/mathjax"
    fonts = list((static / "output" / "chtml" / "fonts").rglob("*.woff*"))
    assert fonts, "MathJax CHTML fonts are missing from _static/mathjax"


def test_theory_chapters_have_numbered_equations_citations_and_code_pointers(html_dir, pages):
    require_build()
    listed = {p.docname: p for p in pages}
    missing = [name for name in THEORY_CHAPTERS if name not in listed]
    assert not missing, f"theory chapters missing from _toc.yml: {missing}"
    for page in (listed[name] for name in THEORY_CHAPTERS):
        soup = soup_of(page.html)
        body = article(soup)
        numbered = body.select("div.math span.eqno")
        assert len(numbered) >= 4, f"{page.docname}: only {len(numbered)} numbered equations"
        eq_refs = [a for a in body.select("a.reference.internal") if "#equation-" in a.get("href", "")]
        assert eq_refs, f"{page.docname}: no cross-reference to an equation"
        assert body.select("span.bibtex-citation"), f"{page.docname}: no citation"
        code_names = [c.get_text() for c in body.select("code") if "ddpm" in c.get_text() or "." in c.get_text()]
        assert code_names, f"{page.docname}: no pointer to the code of the package"


def test_bibliography_directive_appears_once(pages):
    with_bib = [p.docname for p in pages if BIBLIOGRAPHY.search(source_text(p))]
    assert with_bib == ["reference/bibliography"], f"the book must have one bibliography page, found {with_bib}"


def _normalise(text: str) -> str:
    text = re.sub(r"[{}]", "", text)
    return re.sub(r"\s+", " ", text).strip().casefold()


def test_bibliography_lists_every_cited_work_once(html_dir, pages):
    require_build()
    import pybtex.database

    keys = cited_keys(pages)
    assert keys, "no citations found in the book sources"
    bib = pybtex.database.parse_file(str(ROOT / "references.bib"))
    missing = sorted(keys - set(bib.entries))
    assert not missing, f"cited keys without an entry in references.bib: {missing}"

    page = next(p for p in pages if BIBLIOGRAPHY.search(source_text(p)))
    soup = soup_of(page.html)
    entries = soup.select('[role="doc-biblioentry"]')
    assert len(entries) == len(keys), f"{len(entries)} bibliography entries for {len(keys)} cited works"
    rendered = [_normalise(e.get_text(" ")) for e in entries]
    for key in sorted(keys):
        entry = bib.entries[key]
        title = _normalise(entry.fields["title"])
        # The title follows the author list (". ") and ends with "."; a plain substring test would also
        # find "denoising diffusion probabilistic models" inside "improved denoising diffusion ...".
        pattern = re.compile(r"(?:^|\.\s)" + re.escape(title) + r"\s?\.")
        hits = [r for r in rendered if pattern.search(r)]
        assert len(hits) == 1, f"{key}: title {title!r} appears {len(hits)} times in the bibliography"
        eprint = entry.fields.get("eprint")
        if eprint:
            assert f"arxiv:{eprint}" in hits[0].replace(" ", ""), f"{key}: arXiv id {eprint} not shown"
        year = entry.fields["year"]
        assert year in hits[0], f"{key}: year {year} not shown"


def test_bib_entries_are_complete():
    import pybtex.database

    bib = pybtex.database.parse_file(str(ROOT / "references.bib"))
    venue_fields = {"booktitle", "journal", "howpublished", "institution", "publisher"}
    for key, entry in bib.entries.items():
        assert entry.persons.get("author"), f"{key}: no authors"
        assert entry.fields.get("title"), f"{key}: no title"
        assert re.fullmatch(r"(19|20)\d\d", entry.fields.get("year", "")), f"{key}: no valid year"
        assert venue_fields & set(entry.fields), f"{key}: no venue"
        if "eprint" in entry.fields:
            assert re.fullmatch(r"\d{4}\.\d{4,5}", entry.fields["eprint"]), f"{key}: malformed arXiv id"
            assert entry.fields.get("archivePrefix", entry.fields.get("archiveprefix")) == "arXiv"


def test_notebook_pages_are_clean(html_dir, page):
    """No tracebacks, stderr blocks or progress bars in an executed page; every figure has its caption."""
    require_build()
    if page.source is None or page.source.suffix != ".ipynb":
        pytest.skip("not a notebook")
    body = article(soup_of(page.html))
    assert not body.select(".output.traceback, .output.stderr, .output.error"), f"{page.docname}: error output"
    text = body.get_text(" ")
    assert "Traceback (most recent call last)" not in text, f"{page.docname}: a traceback in the page"
    assert not re.search(r"\d+%\|", text), f"{page.docname}: progress-bar output in the page"
    for figure in body.select("figure"):
        assert figure.select_one("figcaption"), f"{page.docname}: a figure without caption"


def test_theory_versus_practice_table(html_dir):
    """At least eight claims, each with a measured number, a verdict of ``ddpm.book`` pasted from the notebooks, and
    the n of every FID."""
    require_build()
    page = HTML / "practice" / "theory_vs_practice.html"
    body = article(soup_of(page))
    rows = [row for table in body.select("table") for row in table.select("tbody tr")]
    assert len(rows) >= 8, f"only {len(rows)} claims in the table"
    for row in rows:
        cells = row.select("td")
        pasted = [span.get_text() for span in row.select("span.pasted-text")]
        assert any(re.search(r"\d", p) for p in pasted), f"no measured number in row {cells[0].get_text()[:60]!r}"
        assert pasted and pasted[-1] in VERDICTS, f"no verdict in row {cells[0].get_text()[:60]!r}"
        measured, setting = cells[1].get_text(" "), cells[2].get_text(" ")
        if "FID" in measured:  # every FID with its sample size, in the row or the one above it
            assert re.search(r"\bn = ", f"{measured} {setting}") or setting.startswith("as above"), (
                f"an FID without its n in row {cells[0].get_text()[:60]!r}")


def test_benchmark_page_shows_the_recorded_results(html_dir):
    """The reference page's tables come from benchmarks/results/unets_cpu.json: every network and every target."""
    require_build()
    results = json.loads((ROOT / "benchmarks" / "results" / "unets_cpu.json").read_text())
    page = HTML / "reference" / "benchmarks.html"
    body = article(soup_of(page))
    text = " ".join(table.get_text(" ") for table in body.select("table"))
    for name, info in results["networks"].items():
        assert name in text and f"{info['parameters']:,}" in text, name
    for target in results["targets"]:
        assert f"{target['ratio']:.2f}" in text, target
    median = results["ratios"]["diffusers-same"]["train_images_per_s"]["median"]
    pasted = [span.get_text() for span in body.select("span.pasted-text")]
    assert f"{median:.2f}" in pasted, "the prose does not paste the measured ratio"


def test_benchmark_page_shows_the_recipe_search_and_the_presets_targets(html_dir):
    """The recipe search (every recipe, the floor) and the mnist-cpu targets come from the recorded results."""
    require_build()
    results = ROOT / "benchmarks" / "results"
    search = json.loads((results / "recipe_search.json").read_text())
    final = json.loads((results / "train_mnist_cpu.json").read_text())
    body = article(soup_of(HTML / "reference" / "benchmarks.html"))
    text = " ".join(table.get_text(" ") for table in body.select("table"))
    for run in search["runs"]:
        assert run["name"] in text and f"{run['fid']:.1f}" in text, run["name"]
    for name, target in final["targets"].items():
        assert name in text and f"{target['value']:.3f}" in text, name
    figures = [f for f in body.select("figure") if "one point per recipe" in f.get_text()]
    assert figures and figures[0].select_one("img") is not None, "the search's figure is missing"
    pasted = [span.get_text() for span in body.select("span.pasted-text")]
    assert f"{search['floor']['fid']:.1f} ± {search['floor']['std']:.1f}" in pasted
