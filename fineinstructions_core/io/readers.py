"""Readers for query sources and corpora in their original formats.

A reader never drops a record silently: every record it cannot use comes back as a rejection with the
file, the record number and a reason (bad JSON, wrong encoding, missing field, empty text, too large).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Corpus, QuerySource

MAX_SNIPPET = 200


@dataclass
class Record:
    """One usable record: its text and where it came from."""

    file: str
    index: int
    text: str
    key: str | None = None
    title: str | None = None


@dataclass
class Rejected:
    file: str
    index: int
    reason: str
    detail: str
    snippet: str


def _snippet(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return raw[:MAX_SNIPPET]


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines as bytes with their record number; decoding happens per line."""
    opener = gzip.open if path.suffix == ".gz" else open
    index = 0
    with opener(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            yield index, line.rstrip(b"\r\n")
            index += 1


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8")
    return text[1:] if text.startswith("\ufeff") else text


def _field(obj: Any, name: str) -> Any:
    """Dotted field access, so a mapping can say `meta.question`."""
    for part in name.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(name)
        obj = obj[part]
    return obj


def read_query_source(source: QuerySource, root: Path, limit: int | None = None) -> Iterator[Record | Rejected]:
    files = source.files(root)
    if not files:
        raise FileNotFoundError(f"query source {source.name!r}: no file matches {source.path!r} under {root}")
    emitted = 0
    for path in files:
        rel = relative_path(path, root)
        for item in _read_query_file(source, path, rel):
            if limit is not None and emitted >= limit:
                return
            emitted += 1
            yield item


def _read_query_file(source: QuerySource, path: Path, rel: str) -> Iterator[Record | Rejected]:
    if source.format == "json":
        try:
            data = json.loads(_decode(path.read_bytes()))
        except UnicodeDecodeError as exc:
            yield Rejected(rel, 0, "invalid_utf8", str(exc), "")
            return
        except json.JSONDecodeError as exc:
            yield Rejected(rel, 0, "malformed_json", str(exc), "")
            return
        if not isinstance(data, list):
            yield Rejected(rel, 0, "malformed_json", "expected a JSON array of objects", "")
            return
        for i, obj in enumerate(data):
            yield _query_from_obj(source, obj, rel, i, json.dumps(obj)[:MAX_SNIPPET])
        return
    for i, raw in _lines(path):
        try:
            line = _decode(raw)
        except UnicodeDecodeError as exc:
            yield Rejected(rel, i, "invalid_utf8", str(exc), _snippet(raw))
            continue
        if source.format == "jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Rejected(rel, i, "malformed_json", str(exc), _snippet(line))
                continue
            yield _query_from_obj(source, obj, rel, i, line)
        else:  # tsv, tsv.gz
            cols = line.split("\t")
            col = source.text_column or 0
            if col >= len(cols):
                yield Rejected(rel, i, "missing_field", f"no column {col} (line has {len(cols)})", _snippet(line))
                continue
            yield Record(rel, i, cols[col])


def _query_from_obj(source: QuerySource, obj: Any, rel: str, i: int, raw: str) -> Record | Rejected:
    try:
        value = _field(obj, source.text_field or "")
    except KeyError:
        return Rejected(rel, i, "missing_field", f"no field {source.text_field!r}", _snippet(raw))
    if not isinstance(value, str):
        return Rejected(rel, i, "wrong_type", f"field {source.text_field!r} is {type(value).__name__}", _snippet(raw))
    return Record(rel, i, value)


def relative_path(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def count_corpus_records(corpus: Corpus, path: Path) -> int:
    if corpus.format == "text":
        return 1
    return sum(1 for _ in _lines(path))


def read_corpus_records(
    corpus: Corpus, path: Path, root: Path, start: int, stop: int, max_chars: int
) -> Iterator[Record | Rejected]:
    """Records [start, stop) of one corpus file, as documents or rejections."""
    rel = relative_path(path, root)
    if not path.exists():
        for i in range(start, stop):
            yield Rejected(rel, i, "file_missing", f"{path} no longer exists", "")
        return
    if corpus.format == "text":
        if start > 0:
            return
        raw = path.read_bytes()
        try:
            text = _decode(raw)
        except UnicodeDecodeError as exc:
            yield Rejected(rel, 0, "invalid_utf8", str(exc), _snippet(raw[:MAX_SNIPPET]))
            return
        yield _doc_or_reject(Record(rel, 0, text, key=path.name, title=path.stem), max_chars)
        return
    for i, raw in _lines(path):
        if i < start:
            continue
        if i >= stop:
            break
        try:
            obj = json.loads(_decode(raw))
        except UnicodeDecodeError as exc:
            yield Rejected(rel, i, "invalid_utf8", str(exc), _snippet(raw))
            continue
        except json.JSONDecodeError as exc:
            yield Rejected(rel, i, "malformed_json", str(exc), _snippet(raw))
            continue
        try:
            text = _field(obj, corpus.text_field)
        except KeyError:
            yield Rejected(rel, i, "missing_field", f"no field {corpus.text_field!r}", _snippet(raw))
            continue
        if not isinstance(text, str):
            yield Rejected(rel, i, "wrong_type", f"field {corpus.text_field!r} is not text", _snippet(raw))
            continue
        key = _optional(obj, corpus.id_field)
        title = _optional(obj, corpus.title_field)
        yield _doc_or_reject(Record(rel, i, text, key=key, title=title), max_chars)


def _optional(obj: Any, name: str | None) -> str | None:
    if not name:
        return None
    try:
        value = _field(obj, name)
    except KeyError:
        return None
    return None if value is None else str(value)


def _doc_or_reject(rec: Record, max_chars: int) -> Record | Rejected:
    stripped = rec.text.strip()
    if not stripped:
        return Rejected(rec.file, rec.index, "empty_document", "no text after stripping whitespace", "")
    if len(rec.text) > max_chars:
        return Rejected(
            rec.file,
            rec.index,
            "document_too_large",
            f"{len(rec.text)} chars > max {max_chars}",
            rec.text[:MAX_SNIPPET],
        )
    return rec
