"""Damaged inputs, one table: each bad file goes through the `raw_queries` and `documents` stages, and
every record position comes out as a row or a counted rejection with the expected reason."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import make_tiny_project, record

from fineinstructions_core.config import load_config
from fineinstructions_core.io.lake import Lake
from fineinstructions_core.io.readers import JSON_ARRAY_HINT, count_corpus_records
from fineinstructions_core.plan import run_stage
from fineinstructions_core.shards import plan_shards


def _rec(i: int, **over) -> bytes:
    obj = {"id": f"r{i}", "question": f"how do I fix problem number {i}", "text": f"Document {i} explains it."}
    obj.update(over)
    return json.dumps({k: v for k, v in obj.items() if v is not None}).encode()


def _lines(*lines: bytes, end: bytes = b"\n") -> bytes:
    return end.join(lines) + end


def _truncated_gzip(data: bytes) -> bytes:
    gz = gzip.compress(data)
    return gz[: len(gz) * 2 // 3]


HUNDRED = _lines(*(_rec(i) for i in range(100)))
TSV = b"".join(f"{i}\thow do I fix problem number {i}\n".encode() for i in range(200))


@dataclass
class Case:
    name: str
    file: str
    data: bytes
    query_format: str | None  # None: not a query source case
    queries: dict[str, int]  # expected rejection reasons of raw_queries
    queries_out: int
    corpus: bool = True
    docs: dict[str, int] = field(default_factory=dict)  # expected rejection reasons of documents
    docs_out: int = 0


pytestmark = pytest.mark.fault

CASES = [
    Case(
        "malformed_json",
        "malformed.jsonl",
        _lines(_rec(0), b'{"question": "unterminated', _rec(2)),
        "jsonl",
        {"malformed_json": 1},
        2,
        docs={"malformed_json": 1},
        docs_out=2,
    ),
    Case(
        "invalid_utf8",
        "latin1.jsonl",
        _lines(_rec(0), b'{"question": "caf\xe9 au lait", "text": "caf\xe9"}', _rec(2)),
        "jsonl",
        {"invalid_utf8": 1},
        2,
        docs={"invalid_utf8": 1},
        docs_out=2,
    ),
    Case("bom", "bom.jsonl", b"\xef\xbb\xbf" + _lines(_rec(0), _rec(1)), "jsonl", {}, 2, docs_out=2),
    Case("crlf", "crlf.jsonl", _lines(_rec(0), _rec(1), _rec(2), end=b"\r\n"), "jsonl", {}, 3, docs_out=3),
    Case(
        "missing_text",
        "missing.jsonl",
        _lines(_rec(0), _rec(1, question=None, text=None)),
        "jsonl",
        {"missing_field": 1},
        1,
        docs={"missing_field": 1},
        docs_out=1,
    ),
    # An empty query is kept by raw_queries (query_set rejects it as `empty`); an empty document is not.
    Case(
        "empty_text",
        "empty.jsonl",
        _lines(_rec(0), _rec(1, question="", text="   ")),
        "jsonl",
        {},
        2,
        docs={"empty_document": 1},
        docs_out=1,
    ),
    # Blank lines between records are records (rejected); the blank lines at the end of the file are not.
    Case(
        "blank_lines",
        "blank.jsonl",
        _lines(_rec(0), b"", b"  \t", _rec(3), b"\r", _rec(5)) + b"\n\n",
        "jsonl",
        {"blank_line": 3},
        3,
        docs={"blank_line": 3},
        docs_out=3,
    ),
    Case(
        "blank_lines_tsv",
        "blank.tsv",
        b"1\tfirst query\n\n2\tsecond query\n\n",
        "tsv",
        {"blank_line": 1},
        2,
        corpus=False,
    ),
    Case("gzip_renamed", "packed.jsonl", gzip.compress(HUNDRED), "jsonl", {}, 100, docs_out=100),
    Case(
        "json_array_as_jsonl",
        "array.jsonl",
        json.dumps([json.loads(_rec(i)) for i in range(3)], indent=1).encode() + b"\n",
        "jsonl",
        {"malformed_json": 17},
        0,
        docs={"malformed_json": 17},
        docs_out=0,
    ),
    # One object a line, as some exporters write an array: its last element alone would parse as JSON.
    Case(
        "json_array_one_per_line",
        "array2.jsonl",
        _lines(b"[", _rec(0) + b",", _rec(1) + b",", _rec(2), b"]"),
        "jsonl",
        {"malformed_json": 5},
        0,
        docs={"malformed_json": 5},
        docs_out=0,
    ),
    Case("truncated_tsv_gz", "cut.tsv.gz", _truncated_gzip(TSV), "tsv.gz", {"truncated_file": 1}, -1, corpus=False),
    Case(
        "truncated_jsonl_gz",
        "cut.jsonl.gz",
        _truncated_gzip(HUNDRED),
        "jsonl",
        {"truncated_file": 1},
        -1,
        docs={"truncated_file": 1},
        docs_out=-1,
    ),
]


@pytest.fixture(scope="module")
def bad_project(tmp_path_factory) -> Path:
    """A project whose query sources and corpora are the table's files, one source and corpus each."""
    root = tmp_path_factory.mktemp("bad")
    config = make_tiny_project(root)
    bad = root / "bad"
    bad.mkdir()
    for case in CASES:
        (bad / case.file).write_bytes(case.data)
    raw = yaml.safe_load(config.read_text())
    raw["query_sources"] = [
        {"name": c.name, "path": f"bad/{c.file}", "format": c.query_format}
        | ({"text_column": 1} if c.query_format.startswith("tsv") else {"text_field": "question"})
        for c in CASES
        if c.query_format
    ]
    raw["corpora"] = [
        {"name": f"c_{c.name}", "path": f"bad/{c.file}", "format": "jsonl", "id_field": "id"}
        | {"shard_size": 7}  # several shards per file: record numbers must line up across shard borders
        for c in CASES
        if c.corpus
    ]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def _check_truncation(rej, kept: int, file: str) -> None:
    (cut,) = rej[rej["reason"] == "truncated_file"].to_dict("records")
    assert kept > 0, "the records before the damage are kept"
    assert cut["record"] == kept and file in cut["detail"] and "decompressed bytes" in cut["detail"]


@pytest.mark.parametrize("case", [c for c in CASES if c.query_format], ids=lambda c: c.name)
def test_damaged_query_files(bad_project, case):
    cfg = load_config(bad_project)
    res = run_stage(cfg, "raw_queries", case.name, [case.name], [])
    acc = Lake(cfg.lake_dir).read_accounting("raw_queries", case.name)
    assert acc["balanced"] and acc["rows_in"] == acc["rows_out"] + acc["rows_rejected"]
    assert acc["rejected"] == case.queries, res.rejections[["record", "reason", "detail"]]
    if case.queries_out >= 0:
        assert acc["rows_out"] == case.queries_out
    else:
        _check_truncation(res.rejections, len(res.output), case.file)
    assert not res.output["text"].str.contains("\r|\ufeff").any()
    assert sorted([*res.output["record"], *res.rejections["record"]]) == list(range(acc["rows_in"]))
    if case.name.startswith("json_array"):
        assert set(res.rejections["detail"]) == {JSON_ARRAY_HINT}
    reasons = ", ".join(f"{n} `{r}`" for r, n in sorted(acc["rejected"].items())) or "no rejection"
    record(f"query file: {case.name.replace('_', ' ')}", f"{acc['rows_out']} kept, {reasons}; accounting balances")


@pytest.mark.parametrize("case", [c for c in CASES if c.corpus], ids=lambda c: c.name)
def test_damaged_corpus_files(bad_project, case):
    cfg = load_config(bad_project)
    corpus = cfg.corpus(f"c_{case.name}")
    shards = plan_shards(cfg, corpus)
    results = [run_stage(cfg, "documents", s.key, [], [x.key for x in shards]) for s in shards]
    accs = [Lake(cfg.lake_dir).read_accounting("documents", s.key) for s in shards]
    assert all(a["balanced"] for a in accs)
    rows_in = sum(a["rows_in"] for a in accs)
    assert rows_in == count_corpus_records(corpus, cfg.root / "bad" / case.file) == sum(s.size for s in shards)
    rejected = Counter()
    for a in accs:
        rejected.update(a["rejected"])
    assert dict(rejected) == case.docs
    out = sum(len(r.output) for r in results)
    if case.docs_out >= 0:
        assert out == case.docs_out
    else:
        _check_truncation(pd.concat([r.rejections for r in results]), out, case.file)
    records = sorted(x for r in results for x in [*r.output["record"], *r.rejections["record"]])
    assert records == list(range(rows_in))
    if case.name.startswith("json_array"):
        assert {d for r in results for d in r.rejections["detail"]} == {JSON_ARRAY_HINT}
    reasons = ", ".join(f"{n} `{r}`" for r, n in sorted(rejected.items())) or "no rejection"
    record(f"corpus file: {case.name.replace('_', ' ')}", f"{out} kept, {reasons}; accounting balances")
