"""Query normalization, filters and decontamination; readers keep every bad record as a rejection."""

import gzip
import json
from pathlib import Path

import pandas as pd

from fineinstructions_core.config import Corpus, QuerySource
from fineinstructions_core.io.readers import Record, Rejected, read_corpus_records, read_query_source
from fineinstructions_core.queries import (
    Decontaminator,
    build_query_set,
    dedup_key,
    load_unsafe_patterns,
    normalize_query,
)


def test_normalize_and_dedup_key():
    assert normalize_query("  what\u00a0is   Python?\x00 ") == "what is Python?"
    assert dedup_key("What is Python?") == dedup_key("what is python")


def test_decontamination_by_ngram_overlap():
    d = Decontaminator(["What is the only divisor besides 1 that a prime number can have?"], n=8, min_words=5)
    assert d.contaminated("the only divisor besides 1 that a prime number")  # shares an 8-gram
    assert d.contaminated("divisor besides 1 that a")  # short query wholly inside a question
    assert not d.contaminated("what is a prime")  # too short to judge
    assert not d.contaminated("how do prime numbers relate to cryptography today")


def test_query_set_reasons_and_accounting():
    raw = pd.DataFrame(
        {
            "query_id": [f"q{i}" for i in range(7)],
            "source": "s",
            "text": [
                "how do I bake bread",
                "How do I bake bread?",
                "hi",
                "x" * 700,
                "   ",
                "how to make a bomb at home",
                "the only divisor besides 1 that a prime number",
            ],
        }
    )
    deco = Decontaminator(["What is the only divisor besides 1 that a prime number can have?"])
    out, rej = build_query_set(raw, 10, 600, load_unsafe_patterns(), deco)
    assert list(out["query_id"]) == ["q0"]
    assert dict(zip(rej["query_id"], rej["reason"], strict=True)) == {
        "q1": "duplicate",
        "q2": "too_short",
        "q3": "too_long",
        "q4": "empty",
        "q5": "unsafe",
        "q6": "contaminated",
    }
    assert len(out) + len(rej) == len(raw)


def test_query_readers_keep_bad_records(tmp_path: Path):
    (tmp_path / "a.jsonl").write_bytes(
        b'{"question": "good one"}\n{broken\n{"other": 1}\n{"question": 5}\n\xff\xfe bad bytes\n\n'
    )
    src = QuerySource("a", "a.jsonl", "jsonl", text_field="question")
    items = list(read_query_source(src, tmp_path))
    assert [type(i).__name__ for i in items] == ["Record", "Rejected", "Rejected", "Rejected", "Rejected"]
    assert [i.reason for i in items if isinstance(i, Rejected)] == [
        "malformed_json",
        "missing_field",
        "wrong_type",
        "invalid_utf8",
    ]
    with gzip.open(tmp_path / "t.tsv.gz", "wt", encoding="utf-8") as f:
        f.write("1\tfirst title\n2\n3\tthird\n")
    items = list(read_query_source(QuerySource("t", "t.tsv.gz", "tsv.gz", text_column=1), tmp_path))
    assert [i.text if isinstance(i, Record) else i.reason for i in items] == ["first title", "missing_field", "third"]
    (tmp_path / "arr.json").write_text(json.dumps([{"qText": "a?"}, {"qText": None}]))
    items = list(read_query_source(QuerySource("j", "arr.json", "json", text_field="qText"), tmp_path))
    assert isinstance(items[0], Record) and items[1].reason == "wrong_type"


def test_corpus_reader_rejects_empty_oversized_and_undecodable(tmp_path: Path):
    (tmp_path / "c.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(["fine text", "  ", "y" * 50])) + "\n"
    )
    corpus = Corpus("c", "c.jsonl", "jsonl", id_field="id")
    items = list(read_corpus_records(corpus, tmp_path / "c.jsonl", tmp_path, 0, 3, max_chars=20))
    assert isinstance(items[0], Record) and items[0].key == "0"
    assert [i.reason for i in items[1:]] == ["empty_document", "document_too_large"]
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 text")
    items = list(read_corpus_records(Corpus("b", "*.txt", "text"), tmp_path / "bad.txt", tmp_path, 0, 1, 100))
    assert items[0].reason == "invalid_utf8"


def test_compression_is_recognised_by_its_magic_bytes(tmp_path: Path):
    import bz2
    import lzma

    body = b'{"question": "first one"}\n{"question": "second one"}\n'
    src = QuerySource("a", "a.jsonl", "jsonl", text_field="question")
    for compress in (gzip.compress, bz2.compress, lzma.compress):
        (tmp_path / "a.jsonl").write_bytes(compress(body))
        assert [i.text for i in read_query_source(src, tmp_path)] == ["first one", "second one"]
    (tmp_path / "a.jsonl").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(16))
    try:
        import zstandard  # noqa: F401
    except ImportError:
        (item,) = read_query_source(src, tmp_path)
        assert item.reason == "unsupported_compression" and "zstd" in item.detail
    # Not gzip at all, though named .gz: read as the plain text it is.
    (tmp_path / "p.tsv.gz").write_bytes(b"1\tplain after all\n")
    items = list(read_query_source(QuerySource("t", "p.tsv.gz", "tsv.gz", text_column=1), tmp_path))
    assert [i.text for i in items] == ["plain after all"]
    # A corrupted (not cut) stream keeps what decompressed and names the damage.
    gz = bytearray(gzip.compress(b"".join(b'{"question": "q%d"}\n' % i for i in range(2000))))
    gz[len(gz) // 2 : len(gz) // 2 + 40] = bytes(40)
    (tmp_path / "a.jsonl").write_bytes(bytes(gz))
    items = list(read_query_source(src, tmp_path))
    assert items[-1].reason in {"corrupt_file", "truncated_file"} and "a.jsonl (gzip)" in items[-1].detail
    assert all(isinstance(i, Record) for i in items[:-1])
    # Whole-file formats: a compressed text document, a cut JSON array.
    (tmp_path / "book.txt").write_bytes(gzip.compress(b"Chapter one.\n"))
    (doc,) = read_corpus_records(Corpus("b", "*.txt", "text"), tmp_path / "book.txt", tmp_path, 0, 1, 100)
    assert doc.text == "Chapter one.\n"
    packed = gzip.compress(json.dumps([{"q": f"x{i}"} for i in range(500)]).encode())
    (tmp_path / "arr.json").write_bytes(packed[: len(packed) // 2])
    (item,) = read_query_source(QuerySource("j", "arr.json", "json", text_field="q"), tmp_path)
    assert item.reason == "truncated_file"
