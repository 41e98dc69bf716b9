"""Readers for query sources and corpora in their original formats.

A reader never drops a record silently: every record it cannot use comes back as a rejection with the
file, the record number and a reason (bad JSON, wrong encoding, missing field, empty text, too large).

Line-based files (JSONL, TSV), our rules, all tested:
- A record is one line. A blank (or whitespace-only) line between records is a record too, rejected as
  `blank_line`; blank lines at the very end of a file (after its last record) are not records, as the
  empty "line" after a final newline is not.
- Compression is recognised by its magic bytes, whatever the file is called: gzip, bz2 and xz (standard
  library) and zstd (when the `zstandard` module is installed; otherwise the file is one
  `unsupported_compression` rejection that says so).
- A compressed file that ends early keeps every record read before the damage and adds one
  `truncated_file` rejection at the next record number (the detail names the file and the byte offset in
  the decompressed data); data that fails to decompress is a `corrupt_file` rejection the same way.
- A `jsonl` file whose first non-blank character is `[` is one JSON array, not JSON lines: each of its
  lines is rejected as `malformed_json` with the detail "this looks like one JSON array: use format:
  json" (never read half as records, half as errors), so the fix is one config change away.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..config import Corpus, QuerySource

MAX_SNIPPET = 200
JSON_ARRAY_HINT = "this looks like one JSON array: use format: json"
_CHUNK = 1 << 16


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


class UnreadableFile(Exception):
    """The bytes of a file could not all be read: `reason` is the rejection reason, `detail` says why."""

    def __init__(self, reason: str, detail: str, offset: int = 0):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.offset = reason, detail, offset
        self.partial = b""


def compression_of(head: bytes) -> str | None:
    """The compression a file's first bytes announce: gzip, bz2, xz, zstd, or None for plain bytes."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"BZh") and head[3:4] in b"123456789" and len(head) > 3:
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return None


def _open_decompressed(path: Path) -> tuple[IO[bytes], str | None]:
    with open(path, "rb") as f:
        kind = compression_of(f.read(6))
    if kind == "gzip":
        return gzip.open(path, "rb"), kind
    if kind == "bz2":
        return bz2.open(path, "rb"), kind
    if kind == "xz":
        return lzma.open(path, "rb"), kind
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise UnreadableFile(
                "unsupported_compression",
                f"{path.name} is zstd-compressed (magic bytes 28 b5 2f fd) and the zstandard module is not "
                "installed: pip install zstandard, or decompress the file",
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), kind
    return open(path, "rb"), None


_DAMAGE = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, OSError)


def _chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed, chunk by chunk; raises UnreadableFile after the last good chunk."""
    stream, kind = _open_decompressed(path)
    offset = 0
    with stream:
        while True:
            try:
                # read1: one decompression step at a time, so data before damage is never held back.
                chunk = stream.read1(_CHUNK) if hasattr(stream, "read1") else stream.read(_CHUNK)
            except Exception as exc:
                # Damage is a compressed stream's failure (zstandard raises its own ZstdError); a plain
                # file's read error is no property of its data.
                if kind is None or (not isinstance(exc, _DAMAGE) and kind != "zstd"):
                    raise
                truncated = isinstance(exc, EOFError) or "ended before" in str(exc)
                what = "ends before the end of its compressed data" if truncated else "fails to decompress"
                raise UnreadableFile(
                    "truncated_file" if truncated else "corrupt_file",
                    f"{path.name} ({kind}) {what} after {offset} decompressed bytes ({type(exc).__name__}: {exc})",
                    offset,
                ) from None
            if not chunk:
                return
            offset += len(chunk)
            yield chunk


@dataclass
class _Line:
    """One record position in a line-based file: a line, a blank line, or the damaged rest of the file."""

    index: int
    raw: bytes
    kind: str = "line"  # line | blank | damaged
    reason: str = ""
    detail: str = ""


def _physical_lines(path: Path) -> Iterator[bytes]:
    """Each line without its line break. On damage, the bytes after the last line break read before it
    (a record cut short) ride on the UnreadableFile as `partial`."""
    head: list[bytes] = []  # the start of a line that goes on in the next chunk
    try:
        for chunk in _chunks(path):
            *lines, rest = chunk.split(b"\n")
            if lines:
                yield b"".join([*head, lines[0]])
                yield from lines[1:]
                head = []
            head.append(rest)
    except UnreadableFile as err:
        err.partial = b"".join(head)
        raise
    if any(head):
        yield b"".join(head)  # a last line without a final newline


def _lines(path: Path) -> Iterator[_Line]:
    """Every record position of a line-based file, numbered (see the module docstring for the rules)."""
    index = 0
    pending: list[bytes] = []  # blank lines: records only if a record follows them
    try:
        for line in _physical_lines(path):
            line = line.rstrip(b"\r")
            if not line.strip():
                pending.append(line)
                continue
            for blank in pending:
                yield _Line(index, blank, "blank")
                index += 1
            pending = []
            yield _Line(index, line)
            index += 1
    except UnreadableFile as err:
        for blank in pending:
            yield _Line(index, blank, "blank")
            index += 1
        lost = f"; record {index} and any after it are lost" if err.reason != "unsupported_compression" else ""
        yield _Line(index, err.partial, "damaged", err.reason, err.detail + lost)


def _read_all(path: Path) -> bytes:
    """The whole file, decompressed; raises UnreadableFile."""
    return b"".join(_chunks(path))


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
            data = json.loads(_decode(_read_all(path)))
        except UnreadableFile as err:
            yield Rejected(rel, 0, err.reason, err.detail, "")
            return
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
    if source.format == "jsonl":
        for item in _json_lines(path, rel):
            yield item if isinstance(item, Rejected) else _query_from_obj(source, item[1], rel, item[0], item[2])
        return
    col = source.text_column or 0  # tsv, tsv.gz
    for item in _text_lines(path, rel):
        if isinstance(item, Rejected):
            yield item
            continue
        i, line = item
        cols = line.split("\t")
        if col >= len(cols):
            yield Rejected(rel, i, "missing_field", f"no column {col} (line has {len(cols)})", _snippet(line))
            continue
        yield Record(rel, i, cols[col])


def _line_rejection(rel: str, ln: _Line) -> Rejected | None:
    if ln.kind == "blank":
        return Rejected(rel, ln.index, "blank_line", "an empty line between records", _snippet(ln.raw))
    if ln.kind == "damaged":
        return Rejected(rel, ln.index, ln.reason, ln.detail, _snippet(ln.raw))
    return None


def _text_lines(path: Path, rel: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, str] | Rejected]:
    """(record number, decoded line) or a rejection, for every record position in [start, stop)."""
    for ln in _lines(path):
        if ln.index < start:
            continue
        if stop is not None and ln.index >= stop:
            return
        rejected = _line_rejection(rel, ln)
        if rejected is not None:
            yield rejected
            continue
        try:
            yield ln.index, _decode(ln.raw)
        except UnicodeDecodeError as exc:
            yield Rejected(rel, ln.index, "invalid_utf8", str(exc), _snippet(ln.raw))


def _json_lines(
    path: Path, rel: str, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, Any, str] | Rejected]:
    """(record number, parsed object, line) or a rejection, for every record position in [start, stop)."""
    array = _starts_json_array(path)
    for item in _text_lines(path, rel, start, stop):
        if isinstance(item, Rejected):
            yield item
            continue
        i, line = item
        if array:
            yield Rejected(rel, i, "malformed_json", JSON_ARRAY_HINT, _snippet(line))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Rejected(rel, i, "malformed_json", str(exc), _snippet(line))
            continue
        yield i, obj, line


def _starts_json_array(path: Path) -> bool:
    """Is the first non-blank character of the (decompressed) file `[`?"""
    try:
        for line in _physical_lines(path):
            head = line.lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
            if head:
                return head.startswith(b"[")
    except UnreadableFile:
        pass
    return False


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
    """Record positions in a corpus file, as `read_corpus_records` numbers them (rejections included)."""
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
        try:
            raw = _read_all(path)
        except UnreadableFile as err:
            yield Rejected(rel, 0, err.reason, err.detail, "")
            return
        try:
            text = _decode(raw)
        except UnicodeDecodeError as exc:
            yield Rejected(rel, 0, "invalid_utf8", str(exc), _snippet(raw[:MAX_SNIPPET]))
            return
        yield _doc_or_reject(Record(rel, 0, text, key=path.name, title=path.stem), max_chars)
        return
    for item in _json_lines(path, rel, start, stop):
        if isinstance(item, Rejected):
            yield item
            continue
        i, obj, line = item
        try:
            text = _field(obj, corpus.text_field)
        except KeyError:
            yield Rejected(rel, i, "missing_field", f"no field {corpus.text_field!r}", _snippet(line))
            continue
        if not isinstance(text, str):
            yield Rejected(rel, i, "wrong_type", f"field {corpus.text_field!r} is not text", _snippet(line))
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
