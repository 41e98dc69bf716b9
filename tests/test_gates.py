"""The gates beside the judge, and the measured judging (`eval-judge`), in plain pytest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fineinstructions_core import gates, judge_eval
from fineinstructions_core.config import GateSettings

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "sample_data" / "eval" / "judge_labels.jsonl"

BOUNCE = (
    "Turn on bounce keys to ignore key presses that are rapidly repeated. For example, if you have hand tremors "
    "which cause you to press a key multiple times when you only want to press it once, you should turn on "
    "bounce keys."
)


@pytest.mark.parametrize(
    "instruction",
    [
        "How do prime numbers give rise to generalizations in other mathematical domains?",
        "what is the boiling point of water",
        "Explain how bounce keys help people with hand tremors",
        "I need to stop my keyboard repeating letters when I press a key once",
        "In GNOME, how do I ignore repeated key presses?",
        "Can you list the symptoms of diabetes",
    ],
)
def test_requests_pass(instruction: str):
    assert gates.request_problem(instruction) is None


@pytest.mark.parametrize(
    "instruction, why",
    [
        ("i3 mirrors a screen on a monitor.", "statement"),
        ("Turn on bounce keys.", "statement"),
        ("Bounce keys, slow keys and sticky keys", "statement"),
        ("what is the", "fragment"),
        ("prime numbers", "fragment"),
    ],
)
def test_non_requests_fail_with_why(instruction: str, why: str):
    assert why in gates.request_problem(instruction)


@pytest.mark.parametrize(
    "instruction, at",
    [
        ("how did the Meuse end up in the North Sea? The of the Mesozoic", "The of"),
        ("What are the in the IPCC consensus approach?", "the in"),
        ("what are the IPCC's 2001 report's  in the world's climate?", "'s  in"),
        ("Where does the, in the film, sleep?", "the,"),
    ],
)
def test_a_fill_that_left_a_word_out_is_a_fragment(instruction: str, at: str):
    problem = gates.request_problem(instruction)
    assert problem and problem.startswith("fragment: a word is missing") and at in problem


@pytest.mark.parametrize(
    "instruction",
    [
        "What is vitamin A in food?",  # a capital letter mid-sentence is a name, not an article
        "How does the in operator work in Python?",  # a code word after an article is a noun
        "Who pays for the in-laws' travel?",
        "Why didn't people enjoy Mary Bennet's playing as much as Elizabeth's?",
        "How do I turn high contrast on and off?  It is too dark.",  # two spaces after a sentence
    ],
)
def test_words_that_only_look_missing_pass(instruction: str):
    assert gates.request_problem(instruction) is None


def test_leaked_answer_is_measured_against_the_instruction():
    leaked = "Given that bounce keys ignore key presses that are rapidly repeated, what do bounce keys do?"
    assert gates.leaked_share(leaked, "Bounce keys ignore key presses that are rapidly repeated.") >= 0.8
    assert gates.leaked_share("What are bounce keys for?", BOUNCE) < 0.5
    assert gates.leaked_share("anything", "") == 1.0  # an empty answer adds nothing


def test_a_long_restatement_leaks_by_count_beyond_the_template():
    """A long answer keeps the share low; the count of its own words in the instruction does not."""
    answer = (
        "His sense of her inferiority, of its being a degradation, of the family obstacles which judgment had "
        "always opposed to inclination, were dwelt on with a warmth which seemed due to the consequence."
    )
    leaked = "Darcy dwelt warmly on her inferiority, the degradation and the family obstacles. What did he say?"
    template = "<fi>a character</fi> <fi>the answer restated</fi>. what did he say?"
    assert gates.leaked_share(leaked, answer) < 0.5
    assert gates.leaked_words(leaked, answer, template) >= 5
    assert gates.leaked_words("What did Darcy say?", answer, template) == 0
    o = gates.evaluate(leaked, answer, template, answer + " Darcy", 0.7, GateSettings(), 0.3)
    assert o.reason == "answer_leaked" and "of its own beyond the template's" in o.detail


def test_best_passage_rejects_an_answer_from_the_wrong_place():
    """With the embedded embedder: the document's own answering sentence beats an on-topic neighbour."""
    from fineinstructions_core.embed import Embedder

    embed = Embedder().embed_texts
    right = "Bounce keys ignore key presses that are rapidly repeated, so a key pressed once types once."
    wrong = "High contrast makes windows and buttons on the screen easier to see by drawing them in bold colours."
    document = f"{wrong} {right} You can turn these options on in the accessibility settings."
    question = "What stops a keyboard from typing twice when I tap it?"
    only = GateSettings(grounded_fill=False)  # no template here: every word of the question is a fill
    outcomes = gates.evaluate_all(
        [question, question], [right, wrong], [None, None], [document, document], embed, only, 0.0
    )
    assert outcomes[0].reason is None and outcomes[0].passage_gap <= 0
    assert outcomes[1].reason == "does_not_answer" and outcomes[1].passage_gap > 0.2
    assert "matches the instruction" in outcomes[1].detail
    off = gates.evaluate_all(
        [question], [wrong], [None], [document], embed, GateSettings(grounded_fill=False, best_passage=False), 0.0
    )
    assert off[0].reason is None and off[0].passage_gap == 0.0  # the gate off: no sentence embedded


def test_passages_are_capped_evenly():
    doc = " ".join(f"Sentence number {i} is here." for i in range(100))
    sents = gates.passages(doc, 10)
    assert len(sents) == 10 and sents[0].startswith("Sentence number 0 ") and "number 90 " in sents[-1]
    assert gates.passages("Too short. Also short.", 10) == []


def test_filled_words_must_come_from_the_document_or_the_templates_fixed_text():
    template = "what effects does <fi>a medical condition</fi> have on the <fi>a body part</fi>?"
    doc = "Diabetic retinopathy is a complication of diabetes that damages the blood vessels of the eye."
    share, missing, names = gates.grounded_share("what effects does diabetes have on the eye?", template, doc)
    assert share == 1.0 and missing == [] == names
    share, missing, names = gates.grounded_share("what effects does malaria have on the liver?", template, doc)
    assert share == 0.0 and set(missing) == {"malaria", "liver"} and names == []
    # A slot's own words left in place are not a fill: "medical condition" is not in the document.
    share, missing, _ = gates.grounded_share("what effects does a medical condition have on the eye?", template, doc)
    assert share == pytest.approx(1 / 3) and set(missing) == {"medical", "condition"}
    # The pipeline's typical case: a template whose slots hold example values, copied unchanged.
    valley = "what does the <fi> valley</fi> in <fi>Los Angeles</fi>"
    fresno = "Fresno is the largest city in the San Joaquin Valley, in the Central Valley of California."
    share, missing, names = gates.grounded_share("what does the valley in Los Angeles?", valley, fresno)
    assert share == pytest.approx(1 / 3) and set(missing) == set(names) == {"los", "angele"}
    # One invented name among grounded words: the share passes, the name does not.
    share, missing, names = gates.grounded_share(
        "what effects does diabetes have on the eye in Queensland?", template.replace("?", " in <fi>a place</fi>?"), doc
    )
    assert share == pytest.approx(2 / 3) and names == ["queensland"]
    assert (
        gates.evaluate(
            "What effects does diabetes have on the eye in Queensland?", doc, None, doc, 0.9, GateSettings(), 0.3
        ).reason
        == "ungrounded_fill"
    )


def test_complete_answer():
    assert gates.answer_is_complete("Bounce keys ignore repeated presses.")
    assert gates.answer_is_complete('He said "no."')
    assert not gates.answer_is_complete("Bounce keys ignore repeated presses that")
    assert not gates.answer_is_complete("   ")


def test_relevance_separates_on_topic_from_off_topic_answers():
    """The issue's measurement, with the embedded embedder: good pairs score well above off-topic ones."""
    from fineinstructions_core.embed import Embedder

    embed = Embedder().embed_texts
    instructions = ["How do I stop my keyboard from repeating a key I press once?"] * 2
    answers = [BOUNCE, "A prime number is a natural number greater than 1 that has no positive divisors."]
    good, off = gates.relevance(embed, instructions, answers)
    assert good > off + 0.2


def test_evaluate_reports_every_failed_gate_and_the_first_reason():
    settings = GateSettings(relevance_threshold=0.3)
    o = gates.evaluate("i3 mirrors a screen on a monitor.", BOUNCE, None, BOUNCE, 0.05, settings, 0.3)
    assert o.reason == "not_a_request"
    assert "off_topic_answer: instruction-answer cosine 0.050 < 0.300" in o.detail
    assert "ungrounded_fill" in o.detail  # i3, mirrors, screen, monitor are not in the document
    template = "how do <fi>a feature</fi> help people with <fi>a condition</fi>?"
    ok = gates.evaluate(
        "How do bounce keys help people with hand tremors?", BOUNCE, template, BOUNCE, 0.6, settings, 0.3
    )
    assert ok.reason is None and ok.detail == ""
    assert gates.decide(ok, 4, 4) and not gates.decide(ok, 3, 4) and not gates.decide(ok, None, 4)
    assert not gates.decide(o, 5, 4)
    # A gate switched off is not applied.
    off = GateSettings(request=False, relevance=False, grounded_fill=False)
    assert gates.evaluate("i3 mirrors a screen.", BOUNCE, None, BOUNCE, 0.0, off, 0.3).reason is None


def test_relevance_calibration_keeps_the_share_of_good_pairs():
    good = np.linspace(0.1, 1.0, 100)
    t = gates.calibrate_relevance(good.tolist(), 0.95)
    assert (good >= t).mean() >= 0.95 and (good >= t + 0.01).mean() < 0.95 and t == round(t, 3)
    with pytest.raises(ValueError, match="dev split"):
        gates.calibrate_relevance([], 0.95)


def test_roc_auc_and_binary_metrics():
    assert judge_eval.roc_auc([3, 4], [1, 2]) == 1.0
    assert judge_eval.roc_auc([1], [1]) == 0.5
    assert judge_eval.roc_auc([], [1]) is None
    m = judge_eval.binary_metrics([True, True, False, False], [True, False, True, False], [5, 1, 4, 2])
    assert (m["precision"], m["recall"], m["roc_auc"]) == (0.5, 0.5, 0.5)


def _row(**kw) -> dict:
    base = {
        "id": "r1",
        "split": "dev",
        "origin": "constructed",
        "corpus": "gnome_user_docs",
        "document_id": "d",
        "document_excerpt": BOUNCE,
        "template": "how do <fi>a feature</fi> help people with <fi>a condition</fi>?",
        "instruction": "How do bounce keys help people with hand tremors?",
        "answer": BOUNCE,
        "label": "good",
        "reason": "good",
        "note": "",
    }
    return base | kw


@pytest.mark.parametrize(
    "row, message",
    [
        (_row(reason="nice"), "reason 'nice' is not one of"),
        (_row(label="bad"), "does not fit reason 'good'"),
        (_row(split="test"), "split 'test'"),
        ({k: v for k, v in _row().items() if k != "answer"}, "['answer']"),
    ],
)
def test_labelled_set_errors_name_the_line(tmp_path: Path, row: dict, message: str):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(_row(id="r0")) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(judge_eval.LabelledSetError, match=rf"labels.jsonl:2: .*{__import__('re').escape(message)}"):
        judge_eval.load_labelled_pairs(path)


def test_labelled_set_duplicate_ids_and_bad_json(tmp_path: Path):
    path = tmp_path / "labels.jsonl"
    path.write_text(json.dumps(_row()) + "\n" + json.dumps(_row()) + "\n", encoding="utf-8")
    with pytest.raises(judge_eval.LabelledSetError, match="appears twice"):
        judge_eval.load_labelled_pairs(path)
    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(judge_eval.LabelledSetError, match=":1: not JSON"):
        judge_eval.load_labelled_pairs(path)


def test_report_per_configuration_and_reason():
    pairs = [
        judge_eval.LabelledPair(**{k: v for k, v in _row(id=str(i), **kw).items() if k != "note"})
        for i, kw in enumerate(
            [{}, {}, {"label": "bad", "reason": "not_a_request"}, {"label": "bad", "reason": "off_topic_answer"}]
        )
    ]
    ok = gates.GateOutcome(None, "", 0.6, 1.0, 0.1)
    statement = gates.GateOutcome("not_a_request", "not_a_request: ...", 0.6, 1.0, 0.1)
    off = gates.GateOutcome("off_topic_answer", "off_topic_answer: ...", 0.05, 1.0, 0.1)
    judgements = [
        judge_eval.Judgement(ok, 5),
        judge_eval.Judgement(ok, 3),
        judge_eval.Judgement(statement, 5),
        judge_eval.Judgement(off, 5),
    ]
    rep = judge_eval.report(pairs, judgements, 4)
    assert rep["judge"]["all"]["precision"] == round(1 / 3, 4)  # the judge accepts both bad pairs
    assert rep["gates"]["all"]["precision"] == 1.0 and rep["gates"]["all"]["recall"] == 1.0
    assert rep["gates+judge"]["all"]["accepted"] == 1 and rep["gates+judge"]["all"]["recall"] == 0.5
    assert rep["gates"]["per_reason"]["not_a_request"]["rejected_share"] == 1.0
    assert rep["judge"]["per_reason"]["off_topic_answer"]["rejected_share"] == 0.0
    table = judge_eval.report_table(rep)
    assert "| gates+judge | 1.000 | 0.500 |" in table
    assert judge_eval.score_distribution(pairs, [5, 3, 5, None]) == {
        "good": {"3": 1, "5": 1},
        "off_topic_answer": {"none": 1},
        "not_a_request": {"5": 1},
    }
    assert judge_eval.score_distribution_svg({"good": {"5": 2}}).startswith("<svg")


def test_shipped_labelled_set_is_complete_and_grounded():
    """Both splits hold every reason, the pipeline's own pairs are in it, and each excerpt is really in
    its shipped document."""
    pairs = judge_eval.load_labelled_pairs(LABELS)
    assert len(pairs) >= 300
    for split in judge_eval.SPLITS:
        reasons = {p.reason for p in pairs if p.split == split}
        assert reasons == set(judge_eval.REASONS), split
    assert {p.origin for p in pairs} >= {"constructed", "pipeline:embedded"}
    raw = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert all(r["document_file"] for r in raw)
    # No document straddles the splits, so nothing tuned on dev has seen a held-out document.
    split_of: dict[str, set[str]] = {}
    for p in pairs:
        split_of.setdefault(f"{p.corpus}/{p.document_id}", set()).add(p.split)
    assert all(len(s) == 1 for s in split_of.values())
    # Every row resolves its whole shipped document, and its excerpt is verbatim text of it.
    for p in pairs:
        assert p.document_excerpt in p.document, p.id
