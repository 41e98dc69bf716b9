"""Matching metrics on hand-made sets with known answers, threshold calibration, and the CLI report."""

import json
from pathlib import Path

import pytest

from fineinstructions_assets.cli import main
from fineinstructions_core.embed import Embedder
from fineinstructions_core.evaluation import (
    LabelledSet,
    _joined,
    calibrate_threshold,
    concatenated_articles,
    evaluate,
    ranking_metrics,
)


def test_ranking_metrics_by_hand():
    ranked = [[3, 1, 2, 0], [0, 1, 2, 3], [2, 3, 0, 1]]
    relevant = [{1}, {0, 1}, set()]  # the third query has no relevant item and is skipped
    m = ranking_metrics(ranked, relevant, depth=4)
    assert m["paragraphs"] == 2
    assert m["recall@1"] == pytest.approx((0 + 1) / 2)  # query 1 misses at rank 1; query 2 hits
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["mrr"] == pytest.approx((1 / 2 + 1) / 2)


TOPICS = {
    "bread": (
        "Baking",
        "Bread is made from flour, water, yeast and salt. The dough rises while the yeast "
        "ferments, then it is baked in a hot oven until the crust is brown.",
        ["How is bread made?", "What makes bread dough rise?"],
    ),
    "volcano": (
        "Geology",
        "A volcano is an opening in the crust of a planet through which lava, ash and gases "
        "escape. Eruptions happen when magma rises from the mantle.",
        ["What comes out of a volcano?", "Why do volcanoes erupt?"],
    ),
    "chess": (
        "Games",
        "Chess is a board game for two players on a checkered board of 64 squares. Each player "
        "starts with sixteen pieces and tries to checkmate the opposing king.",
        ["How many squares does a chess board have?", "How do you win at chess?"],
    ),
}


@pytest.fixture(scope="module")
def labelled():
    qs, qp, titles, pids, texts = [], [], [], [], []
    for pid, (title, text, questions) in TOPICS.items():
        pids.append(pid)
        texts.append(text)
        titles.append(title)
        qs += questions
        qp += [pid] * len(questions)
    qs.append("Which oven temperature burns bread?")  # an unanswerable question about the bread paragraph
    qp.append("bread")
    return LabelledSet(qs, qp, [False] * 6 + [True], pids, texts, titles)


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def test_evaluate_finds_each_paragraphs_own_questions(labelled, embedder):
    pooled = embedder.embed_documents(labelled.texts, 5, 0.05, 1.0)
    res = evaluate(labelled, labelled.questions, [True] * 7, embedder, pooled, threshold=0.25)
    for pooling in ("global", "gaussian"):
        m = res["metrics"][pooling]
        assert m["paragraphs"] == 3 and m["recall@5"] == 1.0 and m["mrr"] == 1.0
    assert res["unanswerable"]["gaussian"]["questions"] == 1
    assert res["metrics"]["templates"] == 7


def test_calibration_separates_own_from_other_articles(labelled, embedder):
    pooled = embedder.embed_documents(labelled.texts, 5, 0.05, 1.0)
    result = calibrate_threshold(labelled, labelled.questions, [True] * 7, embedder, pooled)
    assert result["positives"] == 6 and result["negatives"] == 12
    assert result["f1"] == 1.0
    th = result["proposed_threshold"]
    lower = [r for r in result["table"] if r["threshold"] <= th]
    higher = [r for r in result["table"] if r["threshold"] >= th]
    assert lower and all(r["recall"] == 1.0 for r in lower)  # no own paragraph lost below the proposal
    assert higher and all(r["false_positive_rate"] == 0.0 for r in higher)  # no other article above it


def test_eval_matching_cli_on_any_pair_of_files(tmp_path: Path, capsys):
    paras = tmp_path / "p.jsonl"
    ques = tmp_path / "q.jsonl"
    paras.write_text("\n".join(json.dumps({"id": k, "body": v[1], "title": v[0]}) for k, v in TOPICS.items()) + "\n")
    ques.write_text("\n".join(json.dumps({"q": q, "para": k}) for k, v in TOPICS.items() for q in v[2]) + "\n")
    root = Path(__file__).resolve().parent.parent
    rc = main(
        [
            "--config",
            str(root / "fineinstructions.yaml"),
            "eval-matching",
            "--questions",
            str(ques),
            "--paragraphs",
            str(paras),
            "--question-field",
            "q",
            "--link-field",
            "para",
            "--paragraph-id-field",
            "id",
            "--paragraph-text-field",
            "body",
            "--mode",
            "raw",
            "--json",
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["raw"]) == {"global", "gaussian", "templates"}
    assert set(report["raw"]["gaussian"]) == {"recall@1", "recall@5", "recall@10", "mrr", "paragraphs"}
    assert report["raw"]["gaussian"]["recall@10"] == 1.0
    assert (
        main(
            [
                "--config",
                str(root / "fineinstructions.yaml"),
                "eval-matching",
                "--questions",
                str(ques),
                "--paragraphs",
                str(paras),
                "--link-field",
                "missing",
            ]
        )
        == 2
    )


def test_articles_join_their_paragraphs_in_order_and_keep_each_ones_span():
    data = LabelledSet(
        ["q1", "q2", "q3"],
        ["p2", "p1", "p3"],
        [False, False, True],
        ["p1", "p2", "p3"],
        ["First part.", "Second part.", "Alone."],
        ["Rome", "Rome", None],
    )
    long = concatenated_articles(data)
    assert long.pids == long.titles == ["Rome", "p3"]  # a paragraph without a title is its own article
    assert long.texts == ["First part.\n\nSecond part.", "Alone."]
    assert long.question_pids == ["Rome", "Rome", "p3"]
    text, spans = _joined(data, [0, 1])
    assert text == long.texts[0]
    assert [text[a:b] for a, b in spans.values()] == ["First part.", "Second part."]


def test_spread_and_question_sample(tmp_path: Path):
    from fineinstructions_core.evaluation import load_labelled_set

    paras = tmp_path / "p.jsonl"
    ques = tmp_path / "q.jsonl"
    paras.write_text("\n".join(json.dumps({"pid": f"p{i}", "text": f"text {i}"}) for i in range(10)) + "\n{bad\n")
    ques.write_text(
        "\n".join(json.dumps({"question": f"q{i}-{j}", "pid": f"p{i}"}) for i in range(10) for j in range(3)) + "\n"
    )
    data = load_labelled_set(ques, paras, spread=5, max_questions=4)
    assert data.pids == ["p0", "p2", "p4", "p6", "p8"]
    assert len(data.questions) == 4 and set(data.question_pids) <= set(data.pids)
    again = load_labelled_set(ques, paras, spread=5, max_questions=4)
    assert again.questions == data.questions  # seeded
