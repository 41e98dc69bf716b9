"""Corpora, chat logs and template banks in the formats they ship in (Parquet, zstd JSONL, Arrow and
`datasets` save_to_disk folders), written by the libraries that write them and run through the
`documents`, `raw_queries`, `query_set` and `template_bank` stages."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
import zstandard
from conftest import make_tiny_project

from fineinstructions_core.config import ConfigError, load_config
from fineinstructions_core.io import readers
from fineinstructions_core.io.lake import Lake
from fineinstructions_core.plan import run_stage, signature
from fineinstructions_core.registry import REGISTRY
from fineinstructions_core.shards import plan_shards


def _corpus_table(first: int, n: int) -> pa.Table:
    return pa.table(
        {
            "id": [f"doc-{i}" for i in range(first, first + n)],
            "text": [f"Document {i} explains how to fix problem {i} in detail." for i in range(first, first + n)],
            "url": [f"https://example.org/{i}" for i in range(first, first + n)],
            "language": ["en"] * n,
            "score": [round(0.5 + i / 1000, 3) for i in range(first, first + n)],
            "dump": ["CC-MAIN-2024-10"] * n,
        }
    )


def _project(root: Path, **sections) -> Path:
    """The tiny project with its sources replaced by `sections` (query_sources, corpora, ...)."""
    config = make_tiny_project(root)
    raw = yaml.safe_load(config.read_text())
    raw.update(query_sources=[], corpora=[], template_sources=[])
    raw.update(sections)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def _run_shards(cfg, corpus_name: str):
    shards = plan_shards(cfg, cfg.corpus(corpus_name))
    keys = [s.key for s in shards]
    return shards, [run_stage(cfg, "documents", k, [], keys) for k in keys]


# ------------------------------------------------------------------------------------ Parquet corpora


def test_parquet_corpus_is_sharded_from_its_footer_and_read_by_row_group(tmp_path, monkeypatch):
    (tmp_path / "fw").mkdir()
    pq.write_table(_corpus_table(0, 100), tmp_path / "fw" / "000.parquet", row_group_size=10)
    corpus = {
        "name": "fineweb",
        "path": "fw/*.parquet",
        "format": "parquet",
        "id_field": "id",
        "metadata": ["url", "language", "score"],
        "shard_size": 25,
    }
    cfg = load_config(_project(tmp_path, corpora=[corpus]))

    # Cutting shards reads the footer only: reading any row here would fail.
    def no_rows(*args, **kwargs):
        raise AssertionError("planning shards read rows")

    with monkeypatch.context() as m:
        m.setattr(pq.ParquetFile, "iter_batches", no_rows)
        m.setattr(pq.ParquetFile, "read_row_group", no_rows)
        shards = plan_shards(cfg, cfg.corpus("fineweb"))
    assert [s.size for s in shards] == [25, 25, 25, 25]

    # A shard reads only the row groups its rows are in.
    groups_read: list[int] = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, row_groups=None, **kwargs):
        groups_read.extend(row_groups or [])
        return real(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    res = run_stage(cfg, "documents", shards[1].key, [], [s.key for s in shards])
    assert groups_read == [2, 3, 4]  # rows 25..49
    assert list(res.output["record"]) == list(range(25, 50))
    assert list(res.output["doc_key"]) == [f"doc-{i}" for i in range(25, 50)]
    meta = json.loads(res.output["metadata"].iloc[0])
    assert meta == {"url": "https://example.org/25", "language": "en", "score": 0.525}
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", real)

    # Appending a file adds shards only; the ones cut before keep their keys and rows.
    before = [(s.key, s.segments) for s in shards]
    pq.write_table(_corpus_table(100, 30), tmp_path / "fw" / "001.parquet", row_group_size=10)
    after = plan_shards(cfg, cfg.corpus("fineweb"))
    assert [(s.key, s.segments) for s in after[:4]] == before
    assert [s.size for s in after[4:]] == [25, 5] and {g.file for s in after[4:] for g in s.segments} == {
        "fw/001.parquet"
    }
    res = run_stage(cfg, "documents", after[5].key, [], [s.key for s in after])
    assert list(res.output["doc_key"]) == [f"doc-{i}" for i in range(125, 130)]


def test_metadata_columns_from_jsonl_zst_and_missing_ones_are_null(tmp_path):
    lines = b"".join(
        json.dumps({"id": i, "text": f"DCLM-style document {i}.", "meta": {"url": f"u{i}"}}).encode() + b"\n"
        for i in range(12)
    )
    (tmp_path / "dclm.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    corpus = {
        "name": "dclm",
        "path": "dclm.jsonl.zst",
        "format": "jsonl",
        "id_field": "id",
        "metadata": ["meta.url", "language"],
    }
    cfg = load_config(_project(tmp_path, corpora=[corpus]))
    shards, results = _run_shards(cfg, "dclm")
    docs = [row for r in results for row in r.output.to_dict("records")]
    assert len(docs) == 12 and docs[3]["doc_key"] == "3"
    assert json.loads(docs[3]["metadata"]) == {"meta.url": "u3", "language": None}


# ------------------------------------------------------------------------------------ Arrow / datasets


def _save_to_disk_layout(folder: Path, table: pa.Table, files: int = 2) -> None:
    """The folder `datasets.Dataset.save_to_disk` writes: Arrow stream files, dataset_info.json, state.json."""
    folder.mkdir(parents=True)
    per = (len(table) + files - 1) // files
    names = []
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        with pa.ipc.new_stream(folder / name, table.schema) as w:
            for batch in table.slice(k * per, per).to_batches(max_chunksize=7):
                w.write_batch(batch)
        names.append(name)
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))


def test_save_to_disk_folder_is_a_corpus_and_a_query_source(tmp_path):
    _save_to_disk_layout(tmp_path / "saved", _corpus_table(0, 40))
    chat = pa.table({"messages": [[{"role": "user", "content": f"how do I fix problem {i}?"}] for i in range(9)]})
    _save_to_disk_layout(tmp_path / "chats", chat, files=1)
    cfg = load_config(
        _project(
            tmp_path,
            corpora=[{"name": "saved", "path": "saved", "format": "arrow", "id_field": "id", "shard_size": 15}],
            query_sources=[
                {"name": "chats", "path": "chats", "format": "arrow", "text_field": "messages", "turn": "first_user"}
            ],
        )
    )
    shards, results = _run_shards(cfg, "saved")
    assert [s.size for s in shards] == [15, 15, 10]
    keys = [k for r in results for k in r.output["doc_key"]]
    assert keys == [f"doc-{i}" for i in range(40)]
    assert {g.file for s in shards for g in s.segments} == {
        "saved/data-00000-of-00002.arrow",
        "saved/data-00001-of-00002.arrow",
    }
    res = run_stage(cfg, "raw_queries", "chats", ["chats"], [])
    assert list(res.output["text"]) == [f"how do I fix problem {i}?" for i in range(9)]


def test_datasets_save_to_disk_when_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"saved document {i}" for i in range(20)], "id": list(range(20))})
    ds.save_to_disk(str(tmp_path / "hf"), num_shards=2)
    cfg = load_config(_project(tmp_path, corpora=[{"name": "hf", "path": "hf", "format": "arrow", "id_field": "id"}]))
    _, results = _run_shards(cfg, "hf")
    assert sorted(int(k) for r in results for k in r.output["doc_key"]) == list(range(20))


# ------------------------------------------------------------------------------------ chat query sources

WILDCHAT = [
    [
        {"role": "user", "content": "how do I repot a cactus without getting hurt?"},
        {"role": "assistant", "content": "a"},
    ],
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the best way to learn rust?"},
        {"role": "user", "content": "second turn, not a query"},
    ],
    [{"role": "assistant", "content": "an assistant that speaks first"}],
    [{"role": "user", "content": 42}],
]


def test_chat_sources_first_user_turn_and_list_index(tmp_path):
    pq.write_table(pa.table({"conversation": WILDCHAT[:3]}), tmp_path / "wildchat.parquet")
    sharegpt = b"".join(
        json.dumps({"conversations": c}).encode() + b"\n"
        for c in (
            [{"from": "human", "value": "write a haiku about autumn leaves"}, {"from": "gpt", "value": "..."}],
            [{"from": "system", "value": "x"}, {"from": "human", "value": "explain recursion to a child"}],
            [{"from": "gpt", "value": "no human here"}],
            "not a list",
        )
    )
    (tmp_path / "sharegpt.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(sharegpt))
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps({"conversation": c}) + "\n" for c in WILDCHAT))
    sources = [
        {"name": "wildchat", "path": "wildchat.parquet", "format": "parquet", "text_field": "conversation"}
        | {"turn": "first_user"},
        {"name": "sharegpt", "path": "sharegpt.jsonl.zst", "format": "jsonl", "text_field": "conversations"}
        | {"turn": "first_user"},
        {"name": "indexed", "path": "mixed.jsonl", "format": "jsonl", "text_field": "conversation.0.content"},
        {"name": "mixed", "path": "mixed.jsonl", "format": "jsonl", "text_field": "conversation", "turn": "first_user"},
    ]
    cfg = load_config(_project(tmp_path, query_sources=sources))
    names = [s["name"] for s in sources]
    out = {n: run_stage(cfg, "raw_queries", n, names, []) for n in names}
    assert list(out["wildchat"].output["text"]) == [
        "how do I repot a cactus without getting hurt?",
        "what is the best way to learn rust?",
    ]
    assert list(out["wildchat"].rejections["reason"]) == ["no_user_turn"]
    assert list(out["sharegpt"].output["text"]) == ["write a haiku about autumn leaves", "explain recursion to a child"]
    assert list(out["sharegpt"].rejections["reason"]) == ["no_user_turn", "wrong_type"]
    assert list(out["indexed"].output["text"]) == [
        "how do I repot a cactus without getting hurt?",
        "be brief",
        "an assistant that speaks first",
    ]
    assert list(out["indexed"].rejections["reason"]) == ["wrong_type"]
    assert list(out["mixed"].rejections["reason"]) == ["no_user_turn", "wrong_type"]
    for res in out.values():
        assert res.accounting.balanced
    # query_set takes them on as it takes any source.
    qs = run_stage(cfg, "query_set", "wildchat", names, [])
    assert len(qs.output) == 2


def test_all_user_turns_are_each_a_query_with_the_records_lineage(tmp_path):
    chats = WILDCHAT + [[{"role": "user", "content": "a good first turn"}, {"role": "user", "content": None}]]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps({"conversation": c}) + "\n" for c in chats))
    source = {"name": "chats", "path": "chats.jsonl", "format": "jsonl", "text_field": "conversation"}
    cfg = load_config(_project(tmp_path, query_sources=[source | {"turn": "all_user"}]))
    res = run_stage(cfg, "raw_queries", "chats", ["chats"], [])
    assert list(res.output["text"]) == [
        "how do I repot a cactus without getting hurt?",
        "what is the best way to learn rust?",
        "second turn, not a query",
        "a good first turn",
    ]
    # Both turns of record 1 point back to it, with distinct query ids.
    assert list(res.output["record"]) == [0, 1, 1, 4]
    assert res.output["query_id"].is_unique
    rej = res.rejections.set_index("record")
    assert list(rej["reason"]) == ["no_user_turn", "wrong_type", "wrong_type"]
    assert list(rej.index) == [2, 3, 4]
    assert "user turn" in rej.loc[4, "detail"]
    assert res.accounting.balanced


# ------------------------------------------------------------------------------------ template sources

GOOD = [
    ("How do I <fi>a task</fi> on <fi>an operating system</fi>?", "A how-to guide for a task on an OS."),
    ("what effects does <fi>a medical condition</fi> have on the eyes?", "A health article about a condition."),
    ("who wrote the <fi>title of a work</fi>", "A text about a work that names its author."),
]
BAD = [
    ("Tell me a joke.", "Any text.", "no_tag"),
    ("Explain <fi>a topic", "A text about a topic.", "unbalanced_tags"),
    ("Summarize <fi>a document</fi>", "   ", "empty_description"),
    ("<fi>anything</fi>", "Any text.", "no_literal_text"),
]


def _finetemplates(tmp_path: Path) -> Path:
    rows = [(t, d) for t, d in GOOD] + [(t, d) for t, d, _ in BAD] + [GOOD[0]]  # the last one repeats row 0
    n = len(rows)
    table = pa.table(
        {
            "template_id": [f"ft-{i}" for i in range(n)] + ["ft-null"],
            "source_name": ["wildchat"] * n + ["lmsys"],
            "template": [t for t, _ in rows] + [None],
            "compatible_document_description": [d for _, d in rows] + ["A description."],
            "qa_or_tasky": ["qa"] * (n + 1),
        }
    )
    path = tmp_path / "bank" / "finetemplates-000.parquet"
    path.parent.mkdir()
    pq.write_table(table, path, row_group_size=4)
    return path


def test_template_source_finetemplates_preset(tmp_path):
    path = _finetemplates(tmp_path)
    bank = {"name": "finetemplates", "path": "bank/*.parquet", "format": "parquet", "preset": "finetemplates"}
    cfg = load_config(_project(tmp_path, template_sources=[bank]))
    assert cfg.source_partitions == ["finetemplates"]
    # The partition runs the source chain like any query source: no queries, then the ready bank.
    raw = run_stage(cfg, "raw_queries", "finetemplates", ["finetemplates"], [])
    assert raw.output.empty and raw.accounting.rows_in == 0
    run_stage(cfg, "query_set", "finetemplates", ["finetemplates"], [])
    res = run_stage(cfg, "template_bank", "finetemplates", ["finetemplates"], [])
    out, rej, acc = res.output, res.rejections, res.accounting
    assert list(out["template"]) == [t for t, _ in GOOD]
    assert list(out["bank_template_id"]) == ["ft-0", "ft-1", "ft-2"]
    assert list(out["file"]) == ["bank/finetemplates-000.parquet"] * 3 and list(out["record"]) == [0, 1, 2]
    assert list(out["complexity"]) == [2, 1, 1] and set(out["source"]) == {"finetemplates"}
    assert json.loads(out["metadata"].iloc[0]) == {"source_name": "wildchat"}
    assert out["template_id"].is_unique and out["query_id"].is_unique
    assert dict(zip(rej["record"], rej["reason"], strict=True)) == {
        3: "no_tag",
        4: "unbalanced_tags",
        5: "empty_description",
        6: "no_literal_text",
        7: "duplicate_template",
        8: "wrong_type",
    }
    assert acc.balanced and acc.rows_in == 9
    assert acc.rejected == {r: 1 for r in rej["reason"]}
    # What the output meets is the stage's contract, as a genericized bank does.
    assert set(REGISTRY["template_bank"].contract.required) <= set(out.columns)
    # The bank file is an input: editing it makes the partition stale.
    sig = signature(cfg, "template_bank", "finetemplates", ["finetemplates"], [])
    pq.write_table(pa.table({"template": [GOOD[0][0]], "compatible_document_description": ["x"]}), path)
    assert signature(cfg, "template_bank", "finetemplates", ["finetemplates"], []) != sig
    assert Lake(cfg.lake_dir).exists("template_bank", "finetemplates")


def test_template_source_jsonl_with_column_mapping_and_damage(tmp_path):
    rows = [{"tpl": t, "doc": {"kind": d}, "origin": "mine"} for t, d in GOOD]
    body = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b'{"tpl": broken\n' + b'{"doc": {"kind": "x"}}\n'
    (tmp_path / "mine.jsonl").write_bytes(body)
    bank = {
        "name": "mine",
        "path": "mine.jsonl",
        "format": "jsonl",
        "template_column": "tpl",
        "description_column": "doc.kind",
        "metadata": ["origin"],
    }
    cfg = load_config(_project(tmp_path, template_sources=[bank]))
    res = run_stage(cfg, "template_bank", "mine", ["mine"], [])
    assert list(res.output["description"]) == [d for _, d in GOOD]
    assert list(res.rejections["reason"]) == ["malformed_json", "missing_field"]
    assert "'tpl'" in res.rejections["detail"].iloc[1]
    assert res.accounting.balanced and res.accounting.rows_in == 5


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"template_sources": [{"name": "t", "path": "x", "format": "parquet", "colum": "a"}]}, "unknown key"),
        ({"template_sources": [{"name": "t", "path": "x", "format": "csv"}]}, "template_sources[0].format"),
        ({"template_sources": [{"name": "t", "path": "x", "format": "jsonl", "preset": "other"}]}, "preset"),
        (
            {"template_sources": [{"name": "nq", "path": "x", "format": "jsonl"}], "query_sources": "keep"},
            "names must be unique",
        ),
        ({"query_sources": [{"name": "q", "path": "x", "format": "tsv", "turn": "first_user"}]}, "turn"),
        ({"query_sources": [{"name": "q", "path": "x", "format": "parquet"}]}, "needs text_field"),
        ({"query_sources": [{"name": "q", "path": "x", "format": "jsonl", "text_field": "a", "turn": "last"}]}, "turn"),
        ({"corpora": [{"name": "c", "path": "x", "format": "text", "metadata": ["url"]}]}, "corpora[0].metadata"),
        ({"corpora": [{"name": "c", "path": "x", "format": "parquet", "metadata": "url"}]}, "corpora[0].metadata"),
    ],
)
def test_new_keys_are_validated(tmp_path, section, message):
    config = make_tiny_project(tmp_path)
    raw = yaml.safe_load(config.read_text())
    for key, value in section.items():
        if value != "keep":
            raw[key] = value
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(config)


def test_zstd_stream_of_several_frames_and_a_cut_last_frame(tmp_path):
    frame = zstandard.ZstdCompressor().compress(b'{"q": "first frame"}\n')
    second = zstandard.ZstdCompressor().compress(b"".join(b'{"q": "q%d"}\n' % i for i in range(50_000)))
    (tmp_path / "f.jsonl").write_bytes(frame + second[: len(second) // 2])
    src = readers.QuerySource("a", "f.jsonl", "jsonl", text_field="q")
    items = list(readers.read_query_source(src, tmp_path))
    assert items[0].text == "first frame" and all(isinstance(i, readers.Record) for i in items[:-1])
    assert items[-1].reason == "truncated_file" and "f.jsonl (zstd)" in items[-1].detail
    assert items[-1].index == len(items) - 1 > 1


def test_template_index_takes_a_template_source_beside_a_genericized_bank(tmp_path):
    """The ready bank and a genericized one (written here as the genericizer writes it) index together."""
    _finetemplates(tmp_path)
    bank = {"name": "finetemplates", "path": "bank/*.parquet", "format": "parquet", "preset": "finetemplates"}
    config = make_tiny_project(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["template_sources"] = [bank]
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(config)
    sources = cfg.source_partitions
    assert sources == ["nq", "wf", "finetemplates"]
    run_stage(cfg, "template_bank", "finetemplates", sources, [])
    genericized = pd.DataFrame(
        {
            "template_id": ["tpl_generic"],
            "query_id": ["q_generic"],
            "source": ["nq"],
            "query": ["who wrote hamlet"],
            "template": ["who wrote <fi>a play</fi>"],
            "description": ["A text about a play that names its author."],
            "variables": [["a play"]],
            "complexity": [1],
        }
    )
    Lake(cfg.lake_dir).write("template_bank", "nq", genericized)
    res = run_stage(cfg, "template_index", "all", ["nq", "finetemplates"], [])
    out = res.output.set_index("template")
    assert len(out) == 4 and sorted(out["index_row"]) == [0, 1, 2, 3]
    assert out.loc[GOOD[1][0], "bank_template_id"] == "ft-1" and out.loc[GOOD[1][0], "record"] == 1
    assert out.loc["who wrote <fi>a play</fi>", "source"] == "nq"


def test_a_released_bank_can_be_indexed_compressed_and_found_again(tmp_path):
    """template_index with the compressed index (what `auto` picks at the released bank's 18M): the
    re-ranking codes reach the lake's index file, and a template's own description finds it."""
    from fineinstructions_core.embed import Embedder
    from fineinstructions_core.index import load_index, search

    topics = [
        f"{a} {b}"
        for a in ("river", "violin", "tax", "volcano", "bread", "orbit", "poem", "virus")
        for b in ("history", "repair", "cost", "safety", "science")
    ]
    rows = [
        (f"what is the <fi>aspect</fi> of {t} number {i}?", f"A text about {t}, part {i}.")
        for i in range(10)
        for t in topics
    ]
    table = pa.table(
        {
            "template_id": [f"ft-{i}" for i in range(len(rows))],
            "source_name": ["wildchat"] * len(rows),
            "template": [t for t, _ in rows],
            "compatible_document_description": [d for _, d in rows],
        }
    )
    (tmp_path / "bank").mkdir()
    pq.write_table(table, tmp_path / "bank" / "bank.parquet")
    bank = {"name": "finetemplates", "path": "bank/*.parquet", "format": "parquet", "preset": "finetemplates"}
    config = _project(tmp_path, template_sources=[bank])
    raw = yaml.safe_load(config.read_text())
    raw["matching"] = {**raw.get("matching", {}), "exact_below": 0, "index_factory": "compressed", "k_factor": 8}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(config)
    run_stage(cfg, "template_bank", "finetemplates", ["finetemplates"], [])
    res = run_stage(cfg, "template_index", "all", ["finetemplates"], [])
    assert len(res.output) == len(rows)
    assert res.extra["factory"].endswith("x4fs,Refine(SQ8)")
    assert (res.extra["index"]["type"], res.extra["index"]["k_factor"]) == ("IndexRefine", 8.0)
    folder = cfg.lake_dir / "template_index"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no codes or temp file left
    index = load_index(folder / "index.faiss", k_factor=cfg.matching.k_factor)
    picks = res.output.sample(20, random_state=0)
    vectors = Embedder(cfg.embedder).embed_texts(list(picks["description"]))
    _, ids = search(index, vectors, 1)
    assert list(ids[:, 0]) == list(picks["index_row"])


def test_template_sources_are_source_partitions_for_dagster(tmp_path):
    from fineinstructions_assets.partitions import desired_partitions

    _finetemplates(tmp_path)
    bank = {"name": "finetemplates", "path": "bank/*.parquet", "format": "parquet", "preset": "finetemplates"}
    cfg = load_config(_project(tmp_path, template_sources=[bank]))
    assert desired_partitions(cfg)["query_sources"] == ["finetemplates"]
