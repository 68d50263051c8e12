"""The sentences of a built page that MyST-NB glue filled in, and the checks that they still read.

The notebooks write numbers and verdict phrases into their prose with ``{glue:text}`` roles. MyST-NB renders a
pasted value as ``<span class="pasted-text">value</span>`` (an empty value as an empty span) and a key it cannot
find as nothing at all, with a warning. :func:`glued_sentences` cuts the prose of a page into sentences and marks
each pasted value with ``GLUE_OPEN`` and ``GLUE_CLOSE``; :func:`problems` lists what is wrong with one sentence.

The verb rule (:func:`lacks_a_verb`) is a heuristic, not a parser. It judges the sentences into which a template
pasted a phrase (a value with letters in it, outside parentheses; a pasted number cannot take a verb away), except
a label followed by a colon and the pasted value alone ("The recipe: ...") and a clause that opens with a short
label and a colon ("On record: ..."). Such a sentence passes when, with parentheses left out, it holds a finite
verb from :data:`VERBS`, or a word ending in "-s" or "-ed" after a noun-like word (a word that is not
a function word), once every subordinate clause that opens with a word of :data:`SUBORDINATORS` has claimed the
first such verb before the next comma, colon or semicolon. Main clauses joined by "; " or ", and" (", but", ", so",
", while", ", whereas") are judged one by one, each that holds a pasted phrase needing its own verb: "the claim
that A [inconclusive], and the claim that B [held]" fails. The verdict "inconclusive", unlike "held" and "did not
hold", is no verb: pasted where the template expects one ("the claim [inconclusive]"), with no copula ("is",
"remains", ...) among the three words before it and no colon right before it, it fails the sentence even when the
sentence has a verb elsewhere.
Its limits:

* a plural noun after a noun ("the model's samples") passes for a verb, so a sentence that lost its verb but kept
  such a pair goes unnoticed;
* a past participle used as an adjective ("FIDs computed from ...") passes for a finite verb;
* a verb that is neither in :data:`VERBS` nor marked by "-s" or "-ed" (a plural subject's "draw", "reach") makes a
  sound sentence fail: add it to :data:`VERBS`;
* a list whose last item follows ", and" and holds a pasted phrase is judged as if it were a clause;
* a sentence that never had a verb of its own and pastes a phrase ("In all, [a count in words] parameters.")
  fails, and a broken sentence written by hand without any pasted phrase is never judged.

An empty pasted value is a problem inside a sentence; a sentence that consists of nothing but empty values (an
optional sentence that a notebook left out) is not.
"""

from __future__ import annotations

import re

GLUE_OPEN, GLUE_CLOSE = "\u27e6", "\u27e7"  # marks around a pasted value in the extracted text
MATH = "\u2133"  # stands for a piece of mathematics, which reads as a noun
NON_FINITE = re.compile(r"(?<![\w.])[-+]?(?:nan|inf|infinity)(?![\w])", re.I)
RAW_GLUE = re.compile(r"\{glue(?::\w*)?\}")

# Finite verbs and auxiliaries of the book's prose (and the base forms that follow a plural subject), in one place.
VERBS = frozenset("""
    am is are was were be been being isn't aren't wasn't weren't
    has have had hasn't haven't hadn't do does did don't doesn't didn't
    can cannot can't could may might must shall should will would won't wouldn't
    add adds added agree agrees agreed aim aims beat beats become becomes became begin begins began buy buys bought
    carry carries carried change changes changed choose chooses chose come comes came compare compares
    cost costs cover covers covered cross crosses crossed cut cuts decide decides decided depend depends
    differ differs draw draws drew drop drops dropped end ends ended fall falls fell find finds found
    follow follows followed gain gains gained get gets got give gives gave go goes went grow grows grew
    help helps helped hold holds held improve improves improved keep keeps kept lag lags lagged land lands
    landed lead leads led learn learns learned leave leaves left lie lies lay lift lifts lifted look looks
    looked lose loses lost lower lowers lowered make makes made match matches matched matter matters mattered
    meet meets met miss misses missed move moves moved need needs needed pass passes passed pay pays paid
    point points pointed produce produces produced put puts reach reaches reached read reads remain remains
    remained rise rises rose run runs ran say says said score scores scored see sees saw seem seems seemed
    settle settles settled show shows showed sit sits sat spend spends spent spread spreads stay stays stayed
    stop stops
    stopped take takes took tell tells told tend tends trail trails trailed train trains trained turn turns
    turned use uses used wander wanders win wins won work works worked
""".split())

# Words that open a subordinate clause, which claims the first verb that follows it within its clause.
SUBORDINATORS = frozenset("that which who whom whose where when whenever while whereas because if unless "
                          "although though since once until whether".split())

# Words after which an "-s" or "-ed" word is not a verb ("the samples", "of trained models", "two steps").
FUNCTION_WORDS = frozenset("""
    a an the this that these those its their his her our your my each every no any some all both either neither
    of in on at by for from to into onto with without within between against among over under about after
    before than as per via and or nor but not also only so very more most less least few many much several
    one two three four five six seven eight nine ten is are was were be been has have had do does did it they
    we he she you i there here what which who whose whom where when how why if then
""".split())

ABBREVIATIONS = ("e.g.", "i.e.", "et al.", "Eq.", "Eqs.", "Fig.", "Figs.", "Sec.", "Secs.", "vs.", "cf.", "approx.",
                 "resp.", "No.")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d)]*\s+(?=[\"'\u201c(\[]*[A-Z0-9" + GLUE_OPEN + MATH + r"])")
WORD = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*|" + MATH)
CLAUSE_BREAK = re.compile(r"[,;:\u2014]")
PARENTHESES = re.compile(r"\([^()]*\)")
ADJECTIVE_VERDICTS = frozenset({"inconclusive"})
COPULAS = frozenset("is are was were be been being remains remained stays stayed seems seemed looks looked "
                    "proves proved proven".split())
LABEL_OPENING = re.compile(r"^\W*[A-Z][\w'\u2019-]*(?: [\w'\u2019-]+){0,2}: ")
COORDINATION = re.compile(r";\s+|,\s+(?:and|but|so|while|whereas)\s+")
LABEL_THEN_VALUE = re.compile("^[^" + GLUE_OPEN + ":]+: " + GLUE_OPEN + "[^" + GLUE_CLOSE + "]*" + GLUE_CLOSE + r"\W*$")


def split_sentences(text: str) -> list[str]:
    """``text`` cut into sentences at ".", "!" or "?" followed by a capital, a digit or a pasted value."""
    protected = text
    for k, abbreviation in enumerate(ABBREVIATIONS):
        protected = protected.replace(abbreviation, abbreviation.replace(".", f"\x00{k}\x00"))
    parts = SENTENCE_END.split(re.sub(r"\s+", " ", protected).strip())
    restore = re.compile("\x00(\\d+)\x00")
    return [restore.sub(".", part).strip() for part in parts if part.strip()]


def _is_verb(words: list[str], i: int) -> bool:
    word = words[i].lower().strip("'\u2019")
    if word in VERBS:
        return True
    if i == 0 or len(word) < 4 or word.endswith(("ss", "us", "is", "'s", "\u2019s")):
        return False
    before = words[i - 1].lower()
    noun_like = before == MATH or (before not in FUNCTION_WORDS and before.isalpha())
    return noun_like and (word.endswith("ed") or word.endswith("s"))


def main_verbs(sentence: str) -> list[str]:
    """The finite verbs of ``sentence`` left to its main clause once each subordinate clause has taken its first."""
    found = []
    text = sentence.replace(GLUE_OPEN, " ").replace(GLUE_CLOSE, " ")
    while PARENTHESES.search(text):
        text = PARENTHESES.sub(" ", text)
    for clause in CLAUSE_BREAK.split(text):
        words = WORD.findall(clause)
        claimed = 0  # subordinate clauses still waiting for their verb
        for i, word in enumerate(words):
            if word.lower() in SUBORDINATORS:
                claimed += 1
            elif _is_verb(words, i):
                if claimed:
                    claimed -= 1
                else:
                    found.append(word)
    return found


def lacks_a_verb(sentence: str) -> bool:
    return not main_verbs(sentence)


def problems(sentence: str, judge_verbs: bool = True) -> list[str]:
    """What is wrong with one extracted sentence: an empty pasted value inside it, ``nan`` or ``inf`` pasted, a
    glue role left as text, or (with ``judge_verbs``, for a sentence into which a phrase was pasted) no finite
    verb."""
    found = []
    pasted = re.findall(GLUE_OPEN + "(.*?)" + GLUE_CLOSE, sentence, re.S)
    rest = re.sub(GLUE_OPEN + ".*?" + GLUE_CLOSE, " ", sentence, flags=re.S)
    if any(not value.strip() for value in pasted) and re.search(r"\w", rest):
        found.append("an empty glued value")
    if any(NON_FINITE.search(value) for value in pasted):
        found.append("a glued value that is not a finite number")
    if RAW_GLUE.search(sentence):
        found.append("a {glue} role left as text")
    if judge_verbs:
        for clause in COORDINATION.split(sentence):
            outside = clause
            while PARENTHESES.search(outside):
                outside = PARENTHESES.sub(" ", outside)
            values = re.findall(GLUE_OPEN + "(.*?)" + GLUE_CLOSE, outside, re.S)
            phrase = any(re.search(r"[A-Za-z]{2}", value) for value in values)
            label = LABEL_THEN_VALUE.match(clause.strip()) or LABEL_OPENING.match(clause.strip())
            if phrase and not label and lacks_a_verb(clause):
                found.append(f"no finite verb in {readable(clause.strip())!r}")
            for before, value in re.findall(r"([^" + GLUE_OPEN + "]*)" + GLUE_OPEN + "(.*?)" + GLUE_CLOSE, outside):
                if value.strip().lower() in ADJECTIVE_VERDICTS and not before.rstrip().endswith(":"):
                    if not COPULAS & {w.lower() for w in WORD.findall(before)[-3:]}:
                        found.append(f"the verdict {value.strip()!r} stands where a verb is needed")
    return found


def readable(sentence: str) -> str:
    """``sentence`` as a reader sees it, with the pasted values in [brackets]."""
    return sentence.replace(GLUE_OPEN, "[").replace(GLUE_CLOSE, "]").replace(MATH, "(math)")


def glued_sentences(body) -> list[tuple[str, bool]]:
    """``(sentence, in_table)`` for every sentence of the prose of ``body`` (a BeautifulSoup element: a page's
    article), pasted values marked. Prose is every ``<p>``, and every ``<li>`` without one, outside the code cells'
    inputs and outputs; mathematics becomes :data:`MATH`. ``in_table`` marks the cells of a table, which hold
    phrases rather than sentences."""
    from bs4 import BeautifulSoup

    body = BeautifulSoup(str(body), "html.parser")
    for node in body.select("div.cell_input, div.cell_output, div.output, pre, script, style"):
        node.decompose()
    for node in body.select(".math, mjx-container"):
        node.replace_with(f" {MATH} ")
    for node in body.select("span.pasted-text"):
        node.replace_with(GLUE_OPEN + node.get_text() + GLUE_CLOSE)
    out = []
    for node in body.find_all(["p", "li"]):
        if node.name == "li" and node.find("p") is not None:
            continue
        in_table = node.find_parent(["table"]) is not None
        out += [(sentence, in_table) for sentence in split_sentences(node.get_text())]
    return out
