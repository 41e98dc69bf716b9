"""judged_corpus through Dagster with the gates on: each gate's rejection counted with its reason, the
judge asked only about pairs that pass them, the relevance threshold calibrated on a labelled dev split,
and the judge's scores per label plotted in the asset's metadata.

The documents are the real stage's output on three SQuAD paragraphs; the template index and the pairs
are written into the lake (the LLM stages that make them run in `test_end_to_end.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from conftest import squad_project, write_config
from dagster import DagsterInstance, materialize

from fineinstructions_assets.assets import documents, judged_corpus
from fineinstructions_assets.partitions import register_partitions
from fineinstructions_assets.resources import FineInstructionsResource
from fineinstructions_core.config import load_config
from fineinstructions_core.ids import content_id
from fineinstructions_core.io.lake import UNPARTITIONED, Lake

OFF_TOPIC = "Turn on bounce keys to ignore key presses that are rapidly repeated."


def _project(root: Path) -> Path:
    path, base = squad_project(root, 3)
    base["judge"]["labelled_set"] = "labels.jsonl"
    # The good pair is a definition, which repeats its subject: half its words are the instruction's.
    base["gates"] = {"relevance_threshold": "calibrated", "relevance_keep_good": 1.0, "max_leaked_share": 0.6}
    return write_config(path, base)


def _labels(root: Path, text: str) -> None:
    first = text.split(". ")[0] + "."
    rows = [
        ("l1", "dev", "What is a prime number?", first, "good"),
        ("l2", "dev", "What is a composite number?", text.split(". ")[1] + ".", "good"),
        ("l3", "dev", "Prime numbers and composite numbers.", first, "not_a_request"),
        ("l4", "heldout", "What is a prime number?", OFF_TOPIC, "off_topic_answer"),
    ]
    with open(root / "labels.jsonl", "w", encoding="utf-8") as f:
        for i, split, instruction, answer, reason in rows:
            row = {
                "id": i,
                "split": split,
                "origin": "constructed",
                "corpus": "wikipedia",
                "document_id": "Prime_number#0",
                "document_excerpt": text,
                "template": "what is a <fi>kind of number</fi>?",
                "instruction": instruction,
                "answer": answer,
                "label": "good" if reason == "good" else "bad",
                "reason": reason,
            }
            f.write(json.dumps(row) + "\n")


def _pairs(doc: pd.Series) -> pd.DataFrame:
    first = doc.text.split(". ")[0] + "."
    cases = [
        ("good", "What is a prime number?", first),
        ("statement", "A prime number is a natural number.", first),
        ("off_topic", "What is a prime number?", OFF_TOPIC),
        ("ungrounded", "What is a Klingon warbird?", first),
        ("cut", "What is a prime number?", first[: first.index(" other") + 3]),  # cut mid-word, adds words
    ]
    rows = []
    for name, instruction, answer in cases:
        rows.append(
            {
                "pair_id": content_id("pair", name),
                "match_id": content_id("match", name),
                "document_id": doc.document_id,
                "template_id": "tpl_number",
                "corpus": doc.corpus,
                "instruction": instruction,
                "answer": answer,
                "excerpt_spans": [[0, len(answer)]],
                "excerpt_ratio": 1.0,
                "status": "ok",
                "raw_output": "",
            }
        )
    return pd.DataFrame(rows)


def test_gates_reject_with_reasons_and_the_judge_sees_only_the_rest(tmp_path: Path, dagster_home: Path):
    project = _project(tmp_path)
    cfg = load_config(project)
    instance = DagsterInstance.get()
    register_partitions(cfg, instance)
    fi = {"fi": FineInstructionsResource(config_path=str(project))}
    shard = "wiki-00000"
    assert materialize([documents], partition_key=shard, instance=instance, resources=fi).success
    lake = Lake(cfg.lake_dir)
    doc = lake.read("documents", shard).iloc[0]
    _labels(tmp_path, doc.text)
    lake.write(
        "template_index",
        UNPARTITIONED,
        pd.DataFrame({"template_id": ["tpl_number"], "template": ["what is a <fi>kind of number</fi>?"]}),
    )
    lake.write("instruction_pairs", shard, _pairs(doc))

    result = materialize([judged_corpus], partition_key=shard, instance=instance, resources=fi)
    assert result.success
    rej = lake.read("judged_corpus_rejections", shard)
    out = lake.read("judged_corpus", shard)
    reason = dict(zip(rej["pair_id"], rej["reason"], strict=True))
    assert reason[content_id("pair", "statement")] == "not_a_request"
    assert reason[content_id("pair", "off_topic")] == "off_topic_answer"
    assert reason[content_id("pair", "ungrounded")] == "ungrounded_fill"
    # The cut answer fails more than one gate; every failure is in its detail, the first is its reason.
    detail = dict(zip(rej["pair_id"], rej["detail"], strict=True))
    assert "fragment: " in detail[content_id("pair", "cut")]
    gated = rej[rej["reason"] != "score_below_4"]
    assert gated["score"].isna().all() and gated["detail"].str.len().gt(0).all()
    assert set(out["pair_id"]) | set(rej["pair_id"]) == set(_pairs(doc)["pair_id"])  # none lost

    meta = result.asset_materializations_for_node("judged_corpus")[0].metadata
    acc = json.loads(lake.accounting_path("judged_corpus", shard).read_text())
    assert acc["extra"]["llm"]["requests"] == 1  # only the good pair reached the judge
    # Calibrated on the two good dev rows, keeping both: the lower of their cosines.
    assert 0 < meta["relevance_threshold"].value < 1
    assert meta["labelled_scores_plot"].value.startswith("![plot](data:image/svg+xml;base64,")
    dist = meta["labelled_scores"].value
    assert set(dist) == {"good", "not_a_request"} and sum(dist["good"].values()) == 2
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks.values()), checks
