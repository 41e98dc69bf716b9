"""Damaged inputs, one table: each bad file goes through the `raw_queries` and `documents` stages, and
every record position comes out as a row or a counted rejection with the expected reason. The files are
written in their real formats (gzip, zstd, Parquet, Arrow IPC) by the libraries that write them."""

from __future__ import annotations

import gzip
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
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


def _truncated_zstd(data: bytes) -> bytes:
    # A small window makes small blocks, so a cut stream still has whole blocks before the cut.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=10)
    z = zstandard.ZstdCompressor(compression_params=params).compress(data)
    return z[: len(z) * 2 // 3]


def _table(n: int, **columns) -> pa.Table:
    base = {
        "id": [f"r{i}" for i in range(n)],
        "question": [f"how do I fix problem number {i}" for i in range(n)],
        "text": [f"Document {i} explains it." for i in range(n)],
    }
    return pa.table(base | columns)


def _parquet(table: pa.Table, row_group_size: int = 10) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    return buf.getvalue()


def _corrupt_row_group(data: bytes, rg: int) -> bytes:
    """Random bytes over every column chunk of one row group; the footer stays readable."""
    meta = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(rg)
    chunks = [meta.column(c) for c in range(meta.num_columns)]
    lo = min(c.dictionary_page_offset or c.data_page_offset for c in chunks)
    hi = max((c.dictionary_page_offset or c.data_page_offset) + c.total_compressed_size for c in chunks)
    rnd = random.Random(0)
    return data[:lo] + bytes(rnd.randrange(256) for _ in range(hi - lo)) + data[hi:]


def _arrow(table: pa.Table, stream: bool = True, cut: bool = False) -> bytes:
    sink = io.BytesIO()
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=10):
            writer.write_batch(batch)
    data = sink.getvalue()
    return data[: len(data) * 2 // 3] if cut else data


def _not_utf8(*values: bytes) -> pa.Array:
    """A string column whose bytes are not all UTF-8, as a writer that does not check leaves one."""
    return pa.array(list(values), pa.binary()).view(pa.string())


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
    corpus_format: str = "jsonl"


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
    Case(
        "truncated_jsonl_zst",
        "cut.jsonl.zst",
        _truncated_zstd(HUNDRED),
        "jsonl",
        {"truncated_file": 1},
        -1,
        docs={"truncated_file": 1},
        docs_out=-1,
    ),
    # The middle one of three row groups is damaged: its 10 rows are rejected, the other 20 read.
    Case(
        "parquet_corrupt_row_group",
        "rg.parquet",
        _corrupt_row_group(_parquet(_table(30)), 1),
        "parquet",
        {"corrupt_row_group": 10},
        20,
        docs={"corrupt_row_group": 10},
        docs_out=20,
        corpus_format="parquet",
    ),
    Case(
        "parquet_wrong_type",
        "numbers.parquet",
        _parquet(_table(4, question=[1, 2, 3, 4], text=[1.5, 2.5, 3.5, 4.5])),
        "parquet",
        {"wrong_type": 4},
        0,
        docs={"wrong_type": 4},
        docs_out=0,
        corpus_format="parquet",
    ),
    Case(
        "parquet_null_text",
        "nulls.parquet",
        _parquet(_table(4, question=["q one", None, "q three", None], text=[None, "d two", "d three", None])),
        "parquet",
        {"wrong_type": 2},
        2,
        docs={"wrong_type": 2},
        docs_out=2,
        corpus_format="parquet",
    ),
    Case(
        "parquet_invalid_utf8",
        "latin1.parquet",
        _parquet(_table(3, question=_not_utf8(b"fine", b"caf\xe9?", b"ok"), text=_not_utf8(b"a", b"b", b"caf\xe9"))),
        "parquet",
        {"invalid_utf8": 1},
        2,
        docs={"invalid_utf8": 1},
        docs_out=2,
        corpus_format="parquet",
    ),
    # Text in a binary column is read when it is UTF-8, rejected when it is not.
    Case(
        "parquet_binary_text",
        "binary.parquet",
        _parquet(
            _table(
                3,
                question=pa.array([b"first q", b"\xff\xfe", b"third q"], pa.binary()),
                text=pa.array([b"first d", b"second d", b"\xc3("], pa.binary()),
            )
        ),
        "parquet",
        {"invalid_utf8": 1},
        2,
        docs={"invalid_utf8": 1},
        docs_out=2,
        corpus_format="parquet",
    ),
    Case(
        "parquet_cut",
        "cut.parquet",
        _parquet(_table(30))[:700],
        "parquet",
        {"corrupt_file": 1},
        0,
        docs={"corrupt_file": 1},
        docs_out=0,
        corpus_format="parquet",
    ),
    Case(
        "arrow_file",
        "whole.arrow",
        _arrow(_table(25), stream=False),
        "arrow",
        {},
        25,
        docs_out=25,
        corpus_format="arrow",
    ),
    Case(
        "arrow_stream_cut",
        "cut.arrow",
        _arrow(_table(30), cut=True),
        "arrow",
        {"truncated_file": 1},
        -1,
        docs={"truncated_file": 1},
        docs_out=-1,
        corpus_format="arrow",
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
        {"name": f"c_{c.name}", "path": f"bad/{c.file}", "format": c.corpus_format, "id_field": "id"}
        | {"shard_size": 7}  # several shards per file: record numbers must line up across shard borders
        for c in CASES
        if c.corpus
    ]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def _check_truncation(rej, kept: int, file: str) -> None:
    (cut,) = rej[rej["reason"] == "truncated_file"].to_dict("records")
    assert kept > 0, "the records before the damage are kept"
    assert cut["record"] == kept and file in cut["detail"]
    assert "decompressed bytes" in cut["detail"] or "byte offset" in cut["detail"]


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
