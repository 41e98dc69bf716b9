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

Columnar files (Parquet, Arrow IPC files and streams, `datasets` save_to_disk folders) are read batch by
batch, only the columns the mapping names, never the whole file at once; a record is a row:
- A Parquet row group that cannot be read keeps the rows read before the damage; each of its other rows
  is a `corrupt_row_group` rejection naming the file, the row group and its byte offset. A Parquet file
  whose footer cannot be read (cut short, not Parquet) is one `corrupt_file` rejection.
- An Arrow file or stream that fails part way keeps the rows before the damage and adds one
  `corrupt_file` rejection at the next row number, as a damaged compressed line file does.
- A value of the wrong type (a number where text is mapped) is `wrong_type`, a null one is `wrong_type`
  with the detail "is null", bytes that are not UTF-8 (in a string or binary column) are `invalid_utf8`.

Field paths are dotted and a number indexes a list, so `conversation.0.content` is the first message's
content; a query source with `turn: first_user` takes the first message whose role is the user's (the
paper's choice), `turn: all_user` every user message, each its own query with the record's lineage.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Corpus, QuerySource, TemplateSource

MAX_SNIPPET = 200
JSON_ARRAY_HINT = "this looks like one JSON array: use format: json"
_CHUNK = 1 << 16
BATCH_ROWS = 4096  # rows per columnar batch: memory stays bounded whatever the file's size
USER_ROLES = ("user", "human")
ROLE_KEYS = ("role", "from")
CONTENT_KEYS = ("content", "value")


@dataclass
class Record:
    """One usable record: its text and where it came from."""

    file: str
    index: int
    text: str
    key: str | None = None
    title: str | None = None
    metadata: dict[str, Any] | None = field(default=None)


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
        return _ZstdReader(path, zstandard.ZstdDecompressor()), kind
    return open(path, "rb"), None


class _ZstdReader:
    """zstd frames one after another, decompressed; input that ends inside a frame raises EOFError
    (zstandard's own stream reader ends quietly there, which would drop the rest without a word)."""

    def __init__(self, path: Path, dctx: Any):
        self._file = open(path, "rb")
        self._dctx = dctx
        self._obj = dctx.decompressobj()
        self._fed = False  # has the current frame been given any input
        self._pending = b""  # input after the end of the last frame: the next frame's start

    def read1(self, size: int = _CHUNK) -> bytes:
        while True:
            raw, self._pending = (self._pending or self._file.read(size)), b""
            if not raw:
                if self._fed and not self._obj.eof:
                    raise EOFError("compressed data ended before the end of its zstd frame")
                return b""
            if self._obj.eof:
                self._obj, self._fed = self._dctx.decompressobj(), False
            self._fed = True
            out = self._obj.decompress(raw)
            if self._obj.eof:
                self._pending = self._obj.unused_data
            if out:
                return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _ZstdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    """Dotted field access, so a mapping can say `meta.question`; a number indexes a list, so a chat
    log's mapping can say `conversation.0.content`."""
    for part in name.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, list) and part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            obj = obj[int(part)]
        else:
            raise KeyError(name)
    return obj


class NoUserTurn(ValueError):
    """A conversation without a message from the user."""


def user_turns(messages: Any, first_only: bool = True) -> list[Any]:
    """The contents of the messages whose role is the user's (only the first when `first_only`, the
    paper's choice), whichever common spelling the file uses (`role`/`from`, `content`/`value`,
    `user`/`human`); the other turns are not queries."""
    if not isinstance(messages, list):
        raise TypeError(f"expected a list of messages, not {type(messages).__name__}")
    found: list[Any] = []
    for msg in messages:
        if not isinstance(msg, dict):
            continue
        role = next((msg[k] for k in ROLE_KEYS if msg.get(k) is not None), None)
        if isinstance(role, str) and role.lower() in USER_ROLES:
            content = next((msg[k] for k in CONTENT_KEYS if k in msg), _MISSING)
            if content is _MISSING:
                raise NoUserTurn(f"a user message has none of the keys {', '.join(CONTENT_KEYS)}")
            found.append(content)
            if first_only:
                break
    if not found:
        raise NoUserTurn(f"no message with role {' or '.join(USER_ROLES)} (keys {', '.join(ROLE_KEYS)})")
    return found


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
            yield from _query_from_obj(source, obj, rel, i, json.dumps(obj)[:MAX_SNIPPET])
        return
    if source.format == "jsonl":
        for item in _json_lines(path, rel):
            if isinstance(item, Rejected):
                yield item
            else:
                yield from _query_from_obj(source, item[1], rel, item[0], item[2])
        return
    if source.format in ("parquet", "arrow"):
        field_name = source.text_field or ""
        for item in _columnar_rows(path, rel, {"text": field_name}, fmt=source.format):
            if isinstance(item, Rejected):
                yield item
                continue
            i, row = item
            yield from _query_value(source, row["text"], rel, i, lambda row=row: _snippet(repr(row["text"])))
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


def _query_from_obj(source: QuerySource, obj: Any, rel: str, i: int, raw: str) -> Iterator[Record | Rejected]:
    try:
        value = _field(obj, source.text_field or "")
    except KeyError:
        value = _MISSING
    return _query_value(source, value, rel, i, lambda: _snippet(raw))


def _query_value(source: QuerySource, value: Any, rel: str, i: int, snippet: Any) -> Iterator[Record | Rejected]:
    """The queries in the value a record's field path found (`_MISSING` when none): one, or with
    `turn: all_user` one per user turn of the conversation, each kept or rejected on its own;
    `snippet()` for rejections."""
    name = source.text_field
    if value is _MISSING:
        yield Rejected(rel, i, "missing_field", f"no field {name!r}", snippet())
        return
    values = [value]
    if source.turn is not None:
        try:
            values = user_turns(value, first_only=source.turn == "first_user")
        except TypeError as exc:
            yield Rejected(rel, i, "wrong_type", f"field {name!r}: {exc}", snippet())
            return
        except NoUserTurn as exc:
            yield Rejected(rel, i, "no_user_turn", f"field {name!r}: {exc}", snippet())
            return
        name = f"{name} ({'first user' if source.turn == 'first_user' else 'user'} turn)"
    for value in values:
        problem = _text_problem(value, name)
        if problem is not None:
            yield Rejected(rel, i, problem[0], problem[1], snippet())
        else:
            yield Record(rel, i, value if isinstance(value, str) else value.decode("utf-8"))


def _text_problem(value: Any, name: str | None) -> tuple[str, str] | None:
    """Why a mapped value is not text (reason, detail), or None: text, or bytes that are UTF-8."""
    if isinstance(value, str):
        return None
    if isinstance(value, _BadText):
        return "invalid_utf8", f"field {name!r}: {value.error}"
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return "invalid_utf8", f"field {name!r}: {exc}"
        return None
    if value is None:
        return "wrong_type", f"field {name!r} is null"
    return "wrong_type", f"field {name!r} is {type(value).__name__}, not text"


# ------------------------------------------------------------------------------------ columnar files

_MISSING: Any = type("_Missing", (), {"__repr__": lambda self: "<missing>"})()


@dataclass(frozen=True)
class _BadText:
    """A string value whose bytes are not UTF-8 (a writer that did not check): kept to be rejected."""

    raw: bytes
    error: str


_ARROW_FILE_MAGIC = b"ARROW1"


class _ArrowDamage(Exception):
    """An Arrow file failed after `offset` bytes: `truncated` when it simply ends too soon."""

    def __init__(self, exc: Exception, offset: int):
        super().__init__(f"{type(exc).__name__}: {exc}")
        self.offset = offset
        self.truncated = "Expected to be able to read" in str(exc) or isinstance(exc, EOFError)


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """The record batches of an Arrow IPC file (random access) or stream (what `datasets` save_to_disk
    writes), memory-mapped, so a batch costs no copy; damage raises _ArrowDamage with the byte offset."""
    source = pa.memory_map(str(path), "r")
    offset = 0
    try:
        head = source.read(6)
        source.seek(0)
        if head == _ARROW_FILE_MAGIC:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)
        else:
            reader = pa.ipc.open_stream(source)
            offset = source.tell()
            for batch in reader:
                offset = source.tell()
                yield batch
    except _COLUMNAR_ERRORS as exc:
        raise _ArrowDamage(exc, offset) from None
    finally:
        source.close()


_COLUMNAR_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def columnar_row_count(fmt: str, path: Path) -> int:
    """Record positions of a Parquet or Arrow file, as `_columnar_rows` numbers them: Parquet's from its
    footer alone (nothing else is read); an Arrow file's batch lengths, plus one for damage."""
    if fmt == "parquet":
        try:
            with pq.ParquetFile(path) as pf:
                return int(pf.metadata.num_rows)
        except _COLUMNAR_ERRORS:
            return 1  # the one corrupt_file rejection
    n = 0
    try:
        for batch in _arrow_batches(path):
            n += batch.num_rows
    except _ArrowDamage:
        return n + 1
    return n


def _columnar_rows(
    path: Path, rel: str, fields: dict[str, str], start: int = 0, stop: int | None = None, fmt: str | None = None
) -> Iterator[tuple[int, dict[str, Any]] | Rejected]:
    """(row number, {name: value at its field path, or _MISSING}) or a rejection, for rows [start, stop)
    of a Parquet or Arrow file, batch by batch, reading only the columns the field paths start with."""
    for item in _columnar_batches(path, rel, fields, start, stop, fmt):
        if isinstance(item, Rejected):
            yield item
            continue
        first, values = item
        keys = list(values)
        for j, row in enumerate(zip(*(values[k] for k in keys), strict=True)):
            yield first + j, dict(zip(keys, row, strict=True))


def _columnar_batches(
    path: Path, rel: str, fields: dict[str, str], start: int = 0, stop: int | None = None, fmt: str | None = None
) -> Iterator[tuple[int, dict[str, list[Any]]] | Rejected]:
    """(first row number, {name: the batch's values at its field path}) or a rejection, in row order."""
    fmt = fmt or ("parquet" if _is_parquet(path) else "arrow")
    stop = stop if stop is not None else 1 << 62
    if fmt == "parquet":
        yield from _parquet_batches(path, rel, fields, start, stop)
        return
    cursor = _Cursor(0)
    try:
        yield from _window(_arrow_batches(path), cursor, start, stop, fields)
    except _ArrowDamage as err:
        index = cursor.index
        if start <= index < stop:
            what = "ends before the end of its data" if err.truncated else "cannot be read"
            yield Rejected(
                rel,
                index,
                "truncated_file" if err.truncated else "corrupt_file",
                f"{path.name} (arrow) {what} after row {index}, byte offset {err.offset} ({err}); "
                f"record {index} and any after it are lost",
                "",
            )


@dataclass
class _Cursor:
    """The row number of the next batch's first row, readable after a batch fails to decode."""

    index: int


def _window(
    batches: Iterable[Any], cursor: _Cursor, lo: int, hi: int, fields: dict[str, str]
) -> Iterator[tuple[int, dict[str, list[Any]]]]:
    """The rows [lo, hi) of consecutive batches, as (first row number, values); stops after row hi - 1."""
    for batch in batches:
        m = batch.num_rows
        if cursor.index + m > lo and cursor.index < hi:
            a, b = max(lo - cursor.index, 0), min(hi - cursor.index, m)
            yield cursor.index + a, _batch_values(batch.slice(a, b - a), fields)
        cursor.index += m
        if cursor.index >= hi:
            return


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _parquet_batches(
    path: Path, rel: str, fields: dict[str, str], start: int, stop: int
) -> Iterator[tuple[int, dict[str, list[Any]]] | Rejected]:
    try:
        pf = pq.ParquetFile(path)
        meta = pf.metadata
    except _COLUMNAR_ERRORS as exc:
        if start == 0:
            yield Rejected(
                rel,
                0,
                "corrupt_file",
                f"{path.name} is not a readable Parquet file: its footer cannot be read ({type(exc).__name__}: "
                f"{exc}); nothing in it can be read",
                "",
            )
        return
    with pf:
        yield from _row_groups(pf, meta, path, rel, fields, start, stop)


def _row_groups(
    pf: pq.ParquetFile, meta: Any, path: Path, rel: str, fields: dict[str, str], start: int, stop: int
) -> Iterator[tuple[int, dict[str, list[Any]]] | Rejected]:
    """The row groups that hold rows [start, stop), batch by batch; a damaged one's unread rows rejected."""
    columns = _columns_for(pf.schema_arrow.names, fields)
    rg_start = 0
    for rg in range(meta.num_row_groups):
        n = meta.row_group(rg).num_rows
        lo, hi = max(start, rg_start), min(stop, rg_start + n)
        if lo < hi:
            cursor = _Cursor(rg_start)
            try:
                # One thread: the work is mostly Python's; a pool only adds start-up and contention.
                batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[rg], columns=columns, use_threads=False)
                yield from _window(batches, cursor, lo, hi, fields)
            except _COLUMNAR_ERRORS as exc:
                index = cursor.index
                chunk = meta.row_group(rg).column(0)
                offset = chunk.dictionary_page_offset or chunk.data_page_offset
                detail = (
                    f"{path.name}: row group {rg} (rows {rg_start}-{rg_start + n - 1}, byte offset {offset}) "
                    f"cannot be read after row {index} ({type(exc).__name__}: {exc})"
                )
                for i in range(max(index, lo), hi):
                    yield Rejected(rel, i, "corrupt_row_group", detail, "")
        rg_start += n
        if rg_start >= stop:
            return


def _columns_for(names: list[str], fields: dict[str, str]) -> list[str]:
    """The top-level columns the field paths need (a column whose name has dots counts whole)."""
    wanted = []
    for path in fields.values():
        if not path:
            continue
        col = path if path in names else path.split(".", 1)[0]
        if col in names and col not in wanted:
            wanted.append(col)
    return wanted


def _column_values(column: pa.Array) -> list[Any]:
    """A column as Python values; a string column whose bytes are not all UTF-8 is decoded value by
    value, the bad ones kept as `_BadText` so each is one rejection, not a failed batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
    out: list[Any] = []
    for raw in column.view(binary).to_pylist():
        if raw is None:
            out.append(None)
            continue
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            out.append(_BadText(raw, str(exc)))
    return out


def _batch_values(batch: pa.RecordBatch, fields: dict[str, str]) -> dict[str, list[Any]]:
    """Each field path's values in one batch: None for an unmapped field, _MISSING where a path finds none."""
    names = batch.schema.names
    values: dict[str, list[Any]] = {}
    for key, path in fields.items():
        if not path:
            values[key] = [None] * batch.num_rows
        elif path in names:
            values[key] = _column_values(batch.column(names.index(path)))
        else:
            head, _, rest = path.partition(".")
            if head not in names:
                values[key] = [_MISSING] * batch.num_rows
                continue
            column = _column_values(batch.column(names.index(head)))
            values[key] = [_walk(v, rest) for v in column] if rest else column
    return values


def _walk(value: Any, rest: str) -> Any:
    try:
        return _field(value, rest)
    except KeyError:
        return _MISSING


def relative_path(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def count_corpus_records(corpus: Corpus, path: Path) -> int:
    """Record positions in a corpus file, as `read_corpus_records` numbers them (rejections included);
    a Parquet file's come from its footer, so cutting a large file into shards reads none of its rows."""
    if corpus.format == "text":
        return 1
    if corpus.format in ("parquet", "arrow"):
        return columnar_row_count(corpus.format, path)
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
    if corpus.format in ("parquet", "arrow"):
        yield from _columnar_documents(corpus, path, rel, start, stop, max_chars)
        return
    for item in _json_lines(path, rel, start, stop):
        if isinstance(item, Rejected):
            yield item
            continue
        i, obj, line = item
        row = {
            "text": _walk(obj, corpus.text_field),
            "id": _walk(obj, corpus.id_field) if corpus.id_field else None,
            "title": _walk(obj, corpus.title_field) if corpus.title_field else None,
        } | {f"meta:{m}": _walk(obj, m) for m in corpus.metadata}
        yield _document(corpus, rel, i, row, max_chars, lambda line=line: _snippet(line))


def _document(corpus: Corpus, rel: str, i: int, row: dict[str, Any], max_chars: int, snippet: Any) -> Record | Rejected:
    """A document from the values its mapping found, or the reason it is none (every format alike)."""
    text = row["text"]
    if text is _MISSING:
        return Rejected(rel, i, "missing_field", f"no field {corpus.text_field!r}", snippet())
    problem = _text_problem(text, corpus.text_field)
    if problem is not None:
        return Rejected(rel, i, problem[0], problem[1], snippet())
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    meta = {m: _plain_value(row[f"meta:{m}"]) for m in corpus.metadata} if corpus.metadata else None
    record = Record(rel, i, text, key=_optional(row["id"]), title=_optional(row["title"]), metadata=meta)
    return _doc_or_reject(record, max_chars)


def _columnar_documents(
    corpus: Corpus, path: Path, rel: str, start: int, stop: int, max_chars: int
) -> Iterator[Record | Rejected]:
    """A Parquet or Arrow corpus file's documents, a batch at a time: the common row (text that is a
    string, ids and metadata that are plain values) takes a short path, every other one `_document`'s."""
    fields = {"text": corpus.text_field, "id": corpus.id_field or "", "title": corpus.title_field or ""}
    fields |= {f"meta:{m}": m for m in corpus.metadata}
    names = list(corpus.metadata)
    for item in _columnar_batches(path, rel, fields, start, stop, corpus.format):
        if isinstance(item, Rejected):
            yield item
            continue
        first, values = item
        texts, keys, titles = values["text"], values["id"], values["title"]
        metas = [_plain_column(values[f"meta:{m}"]) for m in names]
        rows = zip(*metas, strict=True) if names else None
        for j, text in enumerate(texts):
            meta = dict(zip(names, next(rows), strict=True)) if rows is not None else None
            key, title = keys[j], titles[j]
            if (
                type(text) is not str
                or not (key is None or type(key) in _PLAIN)
                or not (title is None or type(title) in _PLAIN)
            ):
                row = {"text": text, "id": key, "title": title} | {f"meta:{m}": v for m, v in (meta or {}).items()}
                yield _document(corpus, rel, first + j, row, max_chars, lambda text=text: _snippet(repr(text)))
                continue
            record = Record(
                rel,
                first + j,
                text,
                key=None if key is None else str(key),
                title=None if title is None else str(title),
                metadata=meta,
            )
            yield _doc_or_reject(record, max_chars)


_PLAIN = (str, int, float)


def _plain_column(values: list[Any]) -> list[Any]:
    """A metadata column as JSON can hold it, converted only where some value needs it."""
    if any(v is _MISSING or isinstance(v, bytes | _BadText) for v in values):
        return [_plain_value(v) for v in values]
    return values


def _optional(value: Any) -> str | None:
    if value is None or value is _MISSING:
        return None
    if isinstance(value, _BadText):
        return value.raw.decode("utf-8", errors="replace")
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _plain_value(value: Any) -> Any:
    """A metadata value as JSON can hold it (a missing field is null, bytes are text)."""
    if value is _MISSING:
        return None
    if isinstance(value, _BadText | bytes):
        return _optional(value)
    return value


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


# ------------------------------------------------------------------------------------ template banks


@dataclass
class TemplateRow:
    """One row of a ready template bank: its template, description and where it came from."""

    file: str
    index: int
    template: str
    description: str
    bank_id: str | None = None
    query: str | None = None
    metadata: dict[str, Any] | None = None


def read_template_source(source: TemplateSource, root: Path) -> Iterator[TemplateRow | Rejected]:
    """Every row of a template bank's files, or the reason it is unusable (missing column, wrong type,
    bad bytes, damaged file); whether the template is valid is the validator's business, not the reader's."""
    files = source.files(root)
    if not files:
        raise FileNotFoundError(f"template source {source.name!r}: no file matches {source.path!r} under {root}")
    fields = {
        "template": source.column("template_column"),
        "description": source.column("description_column"),
        "id": source.column("id_column") or "",
        "query": source.column("query_column") or "",
    } | {f"meta:{m}": m for m in source.column("metadata")}
    for path in files:
        rel = relative_path(path, root)
        if source.format == "parquet":
            rows: Iterator[Any] = _columnar_rows(path, rel, fields, fmt="parquet")
        else:
            rows = (
                item
                if isinstance(item, Rejected)
                else (item[0], {k: _walk(item[1], p) if p else None for k, p in fields.items()})
                for item in _json_lines(path, rel)
            )
        for item in rows:
            if isinstance(item, Rejected):
                yield item
                continue
            i, row = item
            yield _template_row(source, rel, i, row, fields)


def _template_row(
    source: TemplateSource, rel: str, i: int, row: dict[str, Any], fields: dict[str, str]
) -> TemplateRow | Rejected:
    texts = {}
    for key in ("template", "description"):
        value = row[key]
        snippet = _snippet(repr(row["template"]))
        if value is _MISSING:
            return Rejected(rel, i, "missing_field", f"no column {fields[key]!r}", snippet)
        problem = _text_problem(value, fields[key])
        if problem is not None:
            return Rejected(rel, i, problem[0], problem[1], snippet)
        texts[key] = value if isinstance(value, str) else value.decode("utf-8")
    metadata = {m: _plain_value(row[f"meta:{m}"]) for m in source.column("metadata")} or None
    return TemplateRow(
        rel,
        i,
        texts["template"],
        texts["description"],
        bank_id=_optional(row["id"]),
        query=_optional(row["query"]),
        metadata=metadata,
    )
