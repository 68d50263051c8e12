"""The prose of the built pages reads: every value a notebook glued into a sentence is there and finite, and the
sentences that templates assembled still have their verbs.

Checked on every notebook page and on the Theory-versus-practice page, which pastes the notebooks' values. A
failure names the page and the sentence, pasted values in [brackets]. The rules, and the limits of the verb rule,
are in ``prose.py``.
"""

from __future__ import annotations

import re

import pytest
from bookpages import article, require_build, soup_of, source_text
from prose import RAW_GLUE, glued_sentences, problems, readable

pytestmark = pytest.mark.book

GLUE_ROLE = re.compile(r"\{glue(?::\w*)?\}`([^`]+)`")
PRACTICE = "practice/theory_vs_practice"


def _glue_roles(page) -> list[str]:
    """The keys of the glue roles in a page's Markdown, comment lines (``%``) left out."""
    text = "\n".join(line for line in source_text(page).splitlines() if not line.lstrip().startswith("%"))
    return GLUE_ROLE.findall(text)


def test_glued_prose_reads(html_dir, page):
    require_build()
    if page.docname != PRACTICE and (page.source is None or page.source.suffix != ".ipynb"):
        pytest.skip("neither a notebook nor the Theory-versus-practice page")
    body = article(soup_of(page.html))
    failures = []
    roles, pasted = _glue_roles(page), body.select("span.pasted-text")
    if len(pasted) < len(roles):
        failures.append(f"{len(roles)} glue roles in the source but {len(pasted)} pasted values: MyST-NB renders a "
                        "key missing from the glue data as nothing (the build log names it)")
    for sentence, in_table in glued_sentences(body):
        failures += [f"{problem}: {readable(sentence)!r}" for problem in problems(sentence, judge_verbs=not in_table)]
    headings = [h.get_text(" ") for h in body.select("h1, h2, h3, h4, figcaption")]
    failures += [f"a {{glue}} role left as text: {text!r}" for text in headings if RAW_GLUE.search(text)]
    assert not failures, f"{page.docname}:\n  " + "\n  ".join(failures)
