"""The Parquet lake: one file per (asset, partition), written atomically.

A rerun replaces exactly its partition and a crash never leaves a half-written file, because every
file is written under a temporary name and renamed into place (with the mode the umask gives a normal
file, not the temporary file's 0600, so a data directory can be shared). Each stage also writes its rejections
(every rejected row with its reason) and an accounting record (rows in = rows out + rows rejected).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .files import honour_umask

UNPARTITIONED = "all"


class LakeError(RuntimeError):
    """An expected lake file is missing or unreadable; the message says which and what to run."""


@dataclass
class Accounting:
    """Rows in = rows out + rows rejected, with the unit the stage counts in."""

    asset: str
    partition: str
    unit: str
    rows_in: int
    rows_out: int
    rejected: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return int(sum(self.rejected.values()))

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.rows_out + self.rows_rejected


class Lake:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, asset: str, partition: str = UNPARTITIONED) -> Path:
        return self.root / asset / f"{partition}.parquet"

    def rejections_path(self, asset: str, partition: str = UNPARTITIONED) -> Path:
        return self.path(f"{asset}_rejections", partition)

    def accounting_path(self, asset: str, partition: str = UNPARTITIONED) -> Path:
        return self.root / "_accounting" / asset / f"{partition}.json"

    def exists(self, asset: str, partition: str = UNPARTITIONED) -> bool:
        return self.path(asset, partition).exists()

    def write(self, asset: str, partition: str, df: pd.DataFrame, schema: pa.Schema | None = None) -> Path:
        return _atomic_parquet(self.path(asset, partition), df, schema)

    def write_rejections(self, asset: str, partition: str, df: pd.DataFrame) -> Path:
        """Always written, even when empty, so the catalog's rejection view always exists."""
        if "reason" not in df.columns:
            raise ValueError("a rejections table needs a 'reason' column")
        return _atomic_parquet(self.rejections_path(asset, partition), df, None)

    def write_accounting(self, acc: Accounting) -> Path:
        path = self.accounting_path(acc.asset, acc.partition)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = asdict(acc) | {"rows_rejected": acc.rows_rejected, "balanced": acc.balanced}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            honour_umask(tmp, directory=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def read(self, asset: str, partition: str = UNPARTITIONED) -> pd.DataFrame:
        path = self.path(asset, partition)
        if not path.exists():
            raise LakeError(f"{asset}[{partition}] has not been materialized yet ({path} is missing)")
        return _read_table(path, asset, partition)

    def read_rejections(self, asset: str, partition: str = UNPARTITIONED) -> pd.DataFrame:
        path = self.rejections_path(asset, partition)
        return _read_table(path, asset, partition) if path.exists() else pd.DataFrame(columns=["reason"])

    def read_all(self, asset: str, partitions: list[str] | None = None) -> pd.DataFrame:
        folder = self.root / asset
        files = sorted(folder.glob("*.parquet")) if partitions is None else [self.path(asset, p) for p in partitions]
        frames = [_read_table(f, asset, f.stem) for f in files if f.exists()]
        frames = [f for f in frames if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def partitions(self, asset: str) -> list[str]:
        return sorted(p.stem for p in (self.root / asset).glob("*.parquet"))

    def read_accounting(self, asset: str, partition: str) -> dict[str, Any] | None:
        path = self.accounting_path(asset, partition)
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def all_accounting(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((self.root / "_accounting").glob("*/*.json"))]


def _read_table(path: Path, asset: str, partition: str) -> pd.DataFrame:
    """A lake file damaged on disk (truncated, overwritten) fails its readers with the file named and the
    way out, not with a bare Arrow error."""
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise LakeError(
            f"{asset}[{partition}] is damaged: {path} cannot be read ({exc}); delete it and run again "
            "to rebuild that partition"
        ) from exc


def _atomic_parquet(path: Path, df: pd.DataFrame, schema: pa.Schema | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df.reset_index(drop=True), schema=schema, preserve_index=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        honour_umask(tmp, directory=False)  # mkstemp made it 0600; a shared data dir needs the umask's mode
        _fault_point(path, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fault_point(path: Path, tmp: str) -> None:
    """Fault-suite hook: with FI_FAULT_PAUSE_BEFORE_RENAME=<asset folder>, stop between writing a file of
    that folder and renaming it into place (signalled by `<tmp>.paused`), so a test can kill the
    process at the worst moment. Unset, it costs one dictionary lookup."""
    folder = os.environ.get("FI_FAULT_PAUSE_BEFORE_RENAME")
    if folder and path.parent.name == folder:
        Path(f"{tmp}.paused").touch()
        time.sleep(3600)


def rejection_counts(rejections: pd.DataFrame) -> dict[str, int]:
    if rejections.empty:
        return {}
    return {str(k): int(v) for k, v in Counter(rejections["reason"]).most_common()}
