"""Corpus shards: stable keys `<corpus>-<number>` that never move when files are added.

The manifest (one JSON file per corpus in the data directory) remembers which records of which file
each shard holds. New files only ever append new shards, so adding a file to a corpus leaves every
existing shard, and everything computed from it, untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import Config, Corpus
from .io.files import honour_umask
from .io.readers import count_corpus_records, relative_path


@dataclass(frozen=True)
class Segment:
    file: str
    start: int
    stop: int


@dataclass(frozen=True)
class Shard:
    key: str
    corpus: str
    segments: tuple[Segment, ...]

    @property
    def size(self) -> int:
        return sum(s.stop - s.start for s in self.segments)


def shard_key(corpus: str, number: int) -> str:
    return f"{corpus}-{number:05d}"


def parse_shard_key(key: str) -> tuple[str, int]:
    corpus, _, number = key.rpartition("-")
    if not corpus or not number.isdigit():
        raise ValueError(f"not a corpus shard key: {key!r} (expected '<corpus>-<number>')")
    return corpus, int(number)


def _manifest_path(cfg: Config, corpus: str) -> Path:
    return cfg.data_dir / "shards" / f"{corpus}.json"


def load_manifest(cfg: Config, corpus: str) -> dict:
    path = _manifest_path(cfg, corpus)
    if not path.exists():
        return {"corpus": corpus, "files": {}, "shards": []}  # no "demo_skipped" yet: first sight
    return json.loads(path.read_text(encoding="utf-8"))


def _save_manifest(cfg: Config, corpus: str, manifest: dict) -> None:
    path = _manifest_path(cfg, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    honour_umask(tmp, directory=False)
    os.replace(tmp, path)


def plan_shards(cfg: Config, corpus: Corpus) -> list[Shard]:
    """Cut any files not yet in the manifest into new shards and return all shards of the corpus."""
    manifest = load_manifest(cfg, corpus.name)
    size = int(corpus.shard_size or cfg.shard_size)
    changed = False
    files = corpus.files(cfg.root)
    files_limit = cfg.limit("files_per_corpus")
    if files_limit is not None:
        # The demo slice is fixed when the corpus is first seen; files added later are always taken.
        if "demo_skipped" not in manifest:
            manifest["demo_skipped"] = [relative_path(p, cfg.root) for p in files[files_limit:]]
            changed = True
        skipped = set(manifest["demo_skipped"])
        files = [p for p in files if relative_path(p, cfg.root) not in skipped]
    docs_limit = cfg.limit("docs_per_file")
    pending: list[Segment] = []
    for path in files:
        rel = relative_path(path, cfg.root)
        n = count_corpus_records(corpus, path)
        if docs_limit is not None:
            n = min(n, docs_limit)
        known = manifest["files"].get(rel, 0)
        if n > known:
            pending.append(Segment(rel, known, n))
            manifest["files"][rel] = n
            changed = True
    number = len(manifest["shards"])
    current: list[list] = []
    filled = 0
    for seg in pending:
        pos = seg.start
        while pos < seg.stop:
            take = min(size - filled, seg.stop - pos)
            current.append([seg.file, pos, pos + take])
            pos += take
            filled += take
            if filled == size:
                manifest["shards"].append({"key": shard_key(corpus.name, number), "segments": current})
                number, current, filled = number + 1, [], 0
    if current:
        manifest["shards"].append({"key": shard_key(corpus.name, number), "segments": current})
    if changed:
        _save_manifest(cfg, corpus.name, manifest)
    return [_shard(corpus.name, s) for s in manifest["shards"]]


def _shard(corpus: str, entry: dict) -> Shard:
    return Shard(entry["key"], corpus, tuple(Segment(f, a, b) for f, a, b in entry["segments"]))


def get_shard(cfg: Config, key: str) -> Shard:
    corpus, _ = parse_shard_key(key)
    for entry in load_manifest(cfg, corpus)["shards"]:
        if entry["key"] == key:
            return _shard(corpus, entry)
    raise KeyError(f"shard {key!r} is not in the manifest; register partitions first (fineinstructions register)")


def plan_all_shards(cfg: Config) -> list[Shard]:
    return [s for c in cfg.corpora for s in plan_shards(cfg, c)]


def manifest_shard_keys(cfg: Config) -> set[str]:
    """Shard keys of the corpora the config lists now (a removed corpus's shards are not among them)."""
    return {e["key"] for c in cfg.corpora for e in load_manifest(cfg, c.name)["shards"]}
