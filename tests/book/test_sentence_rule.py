"""The rules of ``prose.py`` on sentences whose answers are known: the broken sentences that templates produced,
and sound sentences of the book's kinds. These run with the unit tests (no built book needed)."""

from __future__ import annotations

import pytest
from bs4 import BeautifulSoup
from prose import GLUE_CLOSE, GLUE_OPEN, MATH, glued_sentences, lacks_a_verb, problems, split_sentences


def g(value: str) -> str:
    """A value as MyST-NB pasted it, marked as :func:`prose.glued_sentences` marks it."""
    return GLUE_OPEN + value + GLUE_CLOSE


BROKEN = [
    # a verdict that is no verb, pasted where the template needed one
    "the claim that Heun's second order pays off per evaluation therefore " + g("inconclusive"),
    "The claim that Heun's second order pays off per evaluation therefore " + g("inconclusive") + " by the rule above.",
    # a fragment with nothing after it
    g("within twice its paired error: ..."),
    "On the digit model, the claim that DPM-Solver++(2M) with 20 evaluations is as good as DDIM with 50 "
    + g("inconclusive") + ", and the claim that Heun's second order pays off per evaluation (19 against 20) "
    + g("held") + ".",
    "The difference is " + g("1.2") + ": with guidance the claim " + g("held") + ", and over both settings it "
    + g("inconclusive") + ".",
    "DPM-Solver++ with 20 evaluations minus DDIM with 50 is " + g("0.4") + " against a margin of " + g("2.0")
    + ": without guidance the claim " + g("inconclusive") + ".",
]

SOUND = [
    "The claim that Heun's second order pays off per evaluation therefore " + g("held") + " by the rule above.",
    "The claim that Heun's second order pays off per evaluation therefore " + g("did not hold") + " by the rule above.",
    "Paired, the EMA gains " + g("1.2") + " ± " + g("0.8") + ", which is "
    + g("within twice its paired error: this run cannot tell the two apart") + ".",
    "Both sets of weights draw from the same noise, so their difference is tested paired: "
    + g("within twice its paired error: this run cannot tell the two apart") + ".",
    "In all, " + g("1,034,123") + " parameters.",
    "The recipe: " + g("AdamW at 2e-3 with a cosine decay, Min-SNR-5 weighting, label dropout 0.3") + ".",
    "On record: " + g("6.6") + " minutes of training at " + g("120") + " images/s on " + g("2 threads of a Xeon")
    + "; " + g("1,000") + " unconditional DDIM-50 samples score " + g("21.3 ± 1.1") + " against a floor of "
    + g("5.2 ± 0.4") + ".",
    "The paired FID gain from 10 to 25 steps is " + g("3.1") + " ± " + g("1.0") + " (" + g("a real improvement")
    + "), and from 25 to " + g("50") + " steps " + g("0.2") + " ± " + g("0.9") + " ("
    + g("not distinguishable from zero") + ").",
    "Under classifier-free guidance, paired against " + MATH + ": " + g("w = 1: better; w = 3: worse") + ".",
    "Paired, DDIM is " + g("better") + " by " + g("2.0") + " ± " + g("1.0") + ", against a margin of " + g("5.0")
    + ": " + g("inconclusive") + ".",
    "Ten DDIM steps reach " + g("0.31") + "; here " + g("the deterministic DDIM update keeps more of the roll's "
                                                         "shape than ancestral sampling") + ", as Song et al. found.",
    "With few steps the samplers part ways: the samples " + g("spread") + " over the plane.",
    "The claim is " + g("inconclusive") + ".",
    "After the scale factor, its values spread with a standard deviation of " + g("0.98") + ".",
    "Its arrows point at the data, and " + g("its average spans only about the last 400 of 3,000 steps") + ".",
]


@pytest.mark.parametrize("sentence", BROKEN)
def test_broken_sentences_fail(sentence):
    assert problems(sentence), f"the rule passes a broken sentence: {sentence}"


@pytest.mark.parametrize("sentence", SOUND)
def test_sound_sentences_pass(sentence):
    assert problems(sentence) == [], sentence


def test_the_two_quoted_fragments_have_no_verb():
    assert lacks_a_verb("the claim that Heun's second order pays off per evaluation therefore inconclusive")
    assert lacks_a_verb("within twice its paired error: ...")
    assert not lacks_a_verb("the claim that Heun's second order pays off per evaluation therefore held")


def test_empty_and_non_finite_values():
    assert problems("The FID is " + g("") + " here.") == ["an empty glued value"]
    assert problems("The FID is " + g(" ") + ".") == ["an empty glued value"]
    assert problems(g("")) == []  # an optional sentence that a notebook left out
    assert problems("The FID is " + g("nan") + ".") == ["a glued value that is not a finite number"]
    assert problems("The ratio is " + g("-inf") + ".") == ["a glued value that is not a finite number"]
    assert problems("It is " + g("nan ± 1.0") + ".") == ["a glued value that is not a finite number"]
    assert problems("The page gives " + g("information") + " and " + g("1.5") + ".") == []
    assert problems("The FID is {glue:text}`fid:.1f` here.") == ["a {glue} role left as text"]
    assert problems("A table cell: " + g("inconclusive"), judge_verbs=False) == []


def test_sentences_split_at_full_stops_only():
    text = (f"Ho et al. (2020) use Eq. 12 of the paper, i.e. the bound. The FID is 3.5 against 2.1. {g('held')} "
            f"by the rule. A claim {g('did not hold')}.")
    assert split_sentences(text) == [
        "Ho et al. (2020) use Eq. 12 of the paper, i.e. the bound.",
        "The FID is 3.5 against 2.1.",
        f"{g('held')} by the rule.",
        f"A claim {g('did not hold')}.",
    ]


def test_glued_sentences_reads_the_prose_of_a_page():
    html = """<article>
      <p>The model scores <span class="pasted-text">3.2</span> against <span class="math">\\(x_0\\)</span>.
         The claim <strong><span class="pasted-text">inconclusive</span></strong>.</p>
      <ul><li><p>The item <span class="pasted-text">holds</span>.</p></li><li>Plain item.</li></ul>
      <div class="cell docutils container"><div class="cell_output docutils container">
        <p>Output <span class="pasted-text"></span></p></div></div>
      <table><tr><td><p><span class="pasted-text">held</span></p></td></tr></table>
    </article>"""
    sentences = glued_sentences(BeautifulSoup(html, "html.parser"))
    assert sentences == [
        (f"The model scores {g('3.2')} against {MATH} .", False),
        (f"The claim {g('inconclusive')}.", False),
        (f"The item {g('holds')}.", False),
        ("Plain item.", False),
        (g("held"), True),
    ]
    flagged = [s for s, in_table in sentences if problems(s, judge_verbs=not in_table)]
    assert flagged == [f"The claim {g('inconclusive')}."]
