"""Cheap checks beside the LLM judge, for the failures a small judge does not see.

A 135M judge scores fluent text, not whether it is worth training on: it gives 5/5 to a statement
answered by an unrelated paragraph. These gates catch such pairs with no LLM call:

- `request`: the instruction is a question or an imperative (or says what the user wants), not a
  statement, a heading or a fragment;
- `relevance`: the cosine between the instruction's and the answer's embeddings is at least a threshold
  (a relevance gate, not a correctness judge: an on-topic wrong answer passes it);
- `grounded_fill`: the words that fill the template's slots come from the document (or the template);
- `answer_leak`: the answer says something the instruction does not already say (a share of its words,
  or a count of its own words beyond the template's);
- `best_passage`: no other sentence of the document matches the instruction much better than the answer
  does (an on-topic answer from the wrong place: the document answers elsewhere, or not at all);
- `complete_answer`: the answer is not cut mid-sentence.

A pair fails with the first failing gate's reason, in the order above; the detail names every gate
it failed, with its measured value. The final decision (`decide`): every enabled gate passes and the
judge's score >= min_score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .config import GateSettings

# Gate -> the rejection reason it writes (the labelled set's reasons).
REASONS = {
    "request": "not_a_request",
    "answer_leak": "answer_leaked",
    "grounded_fill": "ungrounded_fill",
    "relevance": "off_topic_answer",
    "best_passage": "does_not_answer",
    "complete_answer": "fragment",
}
ORDER = tuple(REASONS)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_CASED = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_TAG = re.compile(r"</?fi>")

QUESTION_WORDS = frozenset(
    "what what's whats how how's why who who's whom whose when where where's which is are was were am do does "
    "did can could should would will shall may might must has have had isn't aren't wasn't weren't don't "
    "doesn't didn't can't couldn't shouldn't wouldn't won't hasn't haven't".split()
)
# Verbs that ask for information or writing; UI actions ("turn on", "open") are page titles as often
# as requests, so they do not make an instruction a request on their own.
REQUEST_VERBS = frozenset(
    "explain describe list write give tell show compare contrast summarize summarise help find provide "
    "name define suggest recommend identify outline discuss analyze analyse calculate compute translate "
    "rewrite paraphrase generate draft prepare propose evaluate assess classify determine estimate "
    "illustrate interpret justify predict rank rate review solve teach guide detail elaborate clarify "
    "share offer imagine consider please quote cite mention enumerate "
    "characterize characterise infer argue demonstrate".split()
)
NEED_PHRASES = (
    "i need",
    "i want",
    "i'd like",
    "i would like",
    "i'm looking for",
    "i am looking for",
    "i'm trying to",
    "i am trying to",
    "can you",
    "could you",
    "would you",
    "help me",
    "tell me",
    "show me",
    "give me",
    "how to",
    "how do i",
    "how can i",
    "is there a way",
    "please",
)
DANGLING = frozenset("the a an of and or is are what which that my your their its".split())
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers herself him himself his how i if in into is it its itself just let me more most my myself
    no nor not now of off on once only or other our ours ourselves out over own same she should so some such
    than that the their theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your yours yourself
    yourselves s t don shall may might must one ones get got make made use used using way ways thing things
    many much well like also eg etc""".split()
)
_SUFFIXES = ("ingly", "edly", "ings", "ing", "ied", "ies", "ed", "ly", "s")
_END = re.compile(r"""[.!?]["'”’)\]]*\s*$|[:;]\s*$""")
# A word a slot's fill left out: an article or a possessive with a preposition, another article or a
# stop right after it ("The of the Mesozoic", "What are the in the ...", "the report's  in"), or two
# spaces mid-phrase where a fill was empty. The article is lower case, or capitalised where a sentence
# starts: "vitamin A in food" is a name. Code words follow an article as nouns ("the in operator").
_PREP = r"(?:of|in|on|at|to|for|by|with|from|into|the|a|an|and|or|is|are|was|were)"
_CODE_NOUN = r"(?:\s+(?:operator|keyword|statement|loop|clause|command|function|method|flag|option)\b)"
_MISSING_WORD = re.compile(
    rf"(?:\b(?:the|a|an)|(?:^|(?<=[.?!]\s))(?:The|A|An))(?:\s+{_PREP}\b(?![-/'])(?!{_CODE_NOUN})|[?,.;:!])"
    r"|\w's\s+(?:of|in|on|at|to|for|by|with|from|into)\b"
    r"|[^\s.?!] {2,}\S"
)


def words(text: str) -> list[str]:
    return _WORD.findall(_TAG.sub(" ", text.lower()))


def stem(word: str) -> str:
    """A crude suffix strip, enough to match `keys`/`key`, `repeated`/`repeat` and `files`/`file`."""
    word = word.removesuffix("'s")
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            return word[: -len(suffix)]
    return word.removesuffix("e") if len(word) > 4 else word


def content_stems(text: str) -> list[str]:
    """The words that carry meaning (no stopwords, no single digits), stemmed."""
    return [stem(w) for w in words(text) if (w not in STOPWORDS and not w.isdigit()) or (w.isdigit() and len(w) > 1)]


# ------------------------------------------------------------------------------------ the gates


def request_problem(instruction: str) -> str | None:
    """None for a question, an imperative or a stated need; else why it is not a request."""
    text = instruction.strip()
    ws = words(text)
    if len(ws) < 3:
        return f"fragment: {len(ws)} word(s)"
    if ws[-1] in DANGLING and not text.rstrip().endswith((".", "!")):
        return f"fragment: ends with {ws[-1]!r}"
    if m := _MISSING_WORD.search(text):
        return f"fragment: a word is missing at {m.group(0)!r}"
    lowered = " ".join(ws)
    if text.endswith("?") or ws[0] in QUESTION_WORDS or ws[0] in REQUEST_VERBS:
        return None
    if any(f" {p} " in f" {lowered} " for p in NEED_PHRASES):
        return None
    # A question that is not the first clause: "For a beginner, what is ...", "In Linux, how do I ...".
    for clause in re.split(r"[,:;]\s*", text.lower())[1:]:
        cw = _WORD.findall(clause)
        if cw and (cw[0] in QUESTION_WORDS or cw[0] in REQUEST_VERBS):
            return None
    return "a statement, not a question or an imperative"


def leaked_share(instruction: str, answer: str) -> float:
    """The share of the answer's content words the instruction already holds (1.0: it adds nothing)."""
    ans = content_stems(answer)
    if not ans:
        return 1.0
    held = set(content_stems(instruction))
    return sum(w in held for w in ans) / len(ans)


def leaked_words(instruction: str, answer: str, template: str | None) -> int:
    """How many of the answer's distinct content words the instruction holds beyond the template's: a
    long restatement leaks the answer even when the answer is long enough to keep the share low."""
    own = set(content_stems(instruction)) - set(content_stems(template or ""))
    return len(own & set(content_stems(answer)))


_SLOT = re.compile(r"<fi>.*?</fi>", re.DOTALL)


def slot_fills(instruction: str, template: str) -> str | None:
    """What fills the template's slots in the instruction, when the instruction follows the template's
    fixed text (case and spacing aside); None when it does not."""
    parts = _SLOT.split(template)
    if len(parts) < 2:
        return None
    fixed = [r"\s+".join(re.escape(w) for w in part.split()) for part in parts]
    pattern = r"\s*(.+?)\s*".join(fixed)
    m = re.fullmatch(r"\s*" + pattern + r"\s*", instruction.strip(), flags=re.IGNORECASE | re.DOTALL)
    return " ".join(m.groups()) if m else None


def _names(text: str) -> set[str]:
    """Stems of the words written as names or numbers (capitalised after the first word, or with a
    digit): an invented entity is what an ungrounded fill usually adds."""
    tokens = _CASED.findall(text)
    return {stem(t.lower()) for i, t in enumerate(tokens) if any(c.isdigit() for c in t) or (i > 0 and t[0].isupper())}


def grounded_share(instruction: str, template: str | None, document: str) -> tuple[float, list[str], list[str]]:
    """The share of the words that fill the template's slots (or, when the instruction does not follow
    the template, of its words the template does not hold) found in the document or the template's fixed
    text (a slot's own example words are not a fill); the words that were not; and those of them
    written as names or numbers. A word counts as found when its stem is, or (from 6 letters) its first 5."""
    # the template's fixed text only: a slot's own words copied into the instruction leave it unfilled
    template_words = set(content_stems(_SLOT.sub(" ", template or "")))
    fills = slot_fills(instruction, template) if template else None
    fill = [w for w in dict.fromkeys(content_stems(fills if fills is not None else instruction))]
    fill = [w for w in fill if w not in template_words]
    if not fill:
        return 1.0, [], []
    doc_words = set(content_stems(document))
    prefixes = {w[:5] for w in doc_words if len(w) >= 5}
    missing = [w for w in fill if w not in doc_words and not (len(w) >= 6 and w[:5] in prefixes)]
    names = _names(instruction)
    return 1 - len(missing) / len(fill), missing, [w for w in missing if w in names]


def answer_is_complete(answer: str) -> bool:
    """Ends like a sentence (or a list item's colon), and does not start mid-word in lower case."""
    text = answer.strip()
    if not text:
        return False
    return bool(_END.search(text))


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def passages(document: str, limit: int) -> list[str]:
    """The document's sentences of four words or more, at most `limit` of them, evenly spaced."""
    sents = [s for s in _SENTENCE.split(document) if len(s.split()) >= 4]
    if len(sents) > limit:
        step = len(sents) / limit
        sents = [sents[int(i * step)] for i in range(limit)]
    return sents


def passage_gaps(
    embed: Callable[[list[str]], np.ndarray],
    instructions: Sequence[str],
    answers: Sequence[str],
    documents: Sequence[str],
    cosines: np.ndarray,
    limit: int,
) -> np.ndarray:
    """Per pair: the best cosine between the instruction and a sentence of its document outside the
    answer, minus the answer's own cosine (0 when the document has no other sentence). Each distinct
    document's sentences are embedded once."""
    gaps = np.zeros(len(instructions), dtype=np.float32)
    by_doc: dict[str, list[int]] = {}
    for i, d in enumerate(documents):
        by_doc.setdefault(d, []).append(i)
    queries = embed(list(instructions)) if len(instructions) else np.zeros((0, 1), dtype=np.float32)
    for doc, idx in by_doc.items():
        sents = passages(doc, limit)
        if not sents:
            continue
        vecs = embed(sents)
        for i in idx:
            outside = np.array([s[:40] not in answers[i] for s in sents], dtype=bool)
            if outside.any():
                gaps[i] = float((vecs[outside] @ queries[i]).max()) - float(cosines[i])
    return gaps


def relevance(
    embed: Callable[[list[str]], np.ndarray], instructions: Sequence[str], answers: Sequence[str]
) -> np.ndarray:
    """Cosine between each instruction and its answer (the embedder's vectors are L2-normalised)."""
    if not len(instructions):
        return np.zeros(0, dtype=np.float32)
    vecs = embed(list(instructions) + list(answers))
    n = len(instructions)
    return np.einsum("ij,ij->i", vecs[:n], vecs[n:])


# ------------------------------------------------------------------------------------ applying them


@dataclass(frozen=True)
class GateOutcome:
    reason: str | None  # the first failing gate's reason; None when every enabled gate passed
    detail: str
    relevance: float
    grounded_share: float
    leaked_share: float
    passage_gap: float = 0.0


def evaluate(
    instruction: str,
    answer: str,
    template: str | None,
    document: str,
    cosine: float,
    settings: GateSettings,
    relevance_threshold: float,
    passage_gap: float = 0.0,
) -> GateOutcome:
    """Every gate's measurement for one pair, and the first enabled gate it fails."""
    g = settings
    grounded, missing, names = grounded_share(instruction, template, document)
    leaked = leaked_share(instruction, answer)
    leaked_n = leaked_words(instruction, answer, template)
    failed: dict[str, str] = {}
    if g.request and (problem := request_problem(instruction)):
        failed["request"] = problem
    if g.answer_leak and (leaked >= g.max_leaked_share or leaked_n >= g.max_leaked_words):
        failed["answer_leak"] = (
            f"{leaked:.2f} of the answer's words, {leaked_n} of its own beyond the template's, are in the instruction"
        )
    if g.grounded_fill and (grounded < g.min_grounded_share or (names and g.names_grounded)):
        failed["grounded_fill"] = (
            f"{grounded:.2f} of the filled words are in the document (not: {', '.join(missing[:6])}"
            + (f"; names: {', '.join(names[:6])})" if names else ")")
        )
    if g.relevance and cosine < relevance_threshold:
        failed["relevance"] = f"instruction-answer cosine {cosine:.3f} < {relevance_threshold:.3f}"
    if g.best_passage and passage_gap > g.max_passage_gap:
        failed["best_passage"] = f"another sentence of the document matches the instruction {passage_gap:.3f} better"
    if g.complete_answer and not answer_is_complete(answer):
        failed["complete_answer"] = "the answer does not end like a sentence"
    first = next((REASONS[k] for k in ORDER if k in failed), None)
    detail = "; ".join(f"{REASONS[k]}: {v}" for k, v in failed.items())
    return GateOutcome(first, detail, float(cosine), grounded, leaked, float(passage_gap))


def evaluate_all(
    instructions: Sequence[str],
    answers: Sequence[str],
    templates: Sequence[str | None],
    documents: Sequence[str],
    embed: Callable[[list[str]], np.ndarray],
    settings: GateSettings,
    relevance_threshold: float,
) -> list[GateOutcome]:
    """`evaluate` for many pairs, their cosines embedded in one batch (kept even with the gate off); the
    document's sentences are embedded only when `best_passage` is on."""
    cosines = relevance(embed, instructions, answers)
    gaps = (
        passage_gaps(embed, instructions, answers, documents, cosines, settings.max_passages)
        if settings.best_passage
        else np.zeros(len(instructions), dtype=np.float32)
    )
    return [
        evaluate(i, a, t, d, float(c), settings, relevance_threshold, float(gap))
        for i, a, t, d, c, gap in zip(instructions, answers, templates, documents, cosines, gaps, strict=True)
    ]


def calibrate_relevance(good: Sequence[float], keep: float) -> float:
    """The highest threshold that keeps `keep` of the good pairs' cosines (the gate's job is to drop
    off-topic answers, not to rank good ones), rounded down to 0.001 so that the same pair embedded in
    another batch (a last-digit difference) still passes."""
    if not len(good):
        raise ValueError("calibrating the relevance gate needs good pairs in the labelled set's dev split")
    q = float(np.quantile(np.asarray(good, dtype=np.float64), 1 - keep, method="lower"))
    return math.floor(q * 1000) / 1000


def decide(outcome: GateOutcome, score: int | None, min_score: int) -> bool:
    """The documented decision: every enabled gate passes and the judge's score >= min_score."""
    return outcome.reason is None and score is not None and score >= min_score
