"""The persistent request cache: one row per (model identity, rendered prompt, parameters, seed).

Shared across runs and configuration changes, so a rerun, a resumed crash, or a config change that
leaves a request unchanged costs no generation. Failed requests are never stored as answers.
SQLite in WAL mode lets parallel run workers read and write it safely.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from .base import GenerationRequest, GenerationResult, LLMBackend, LLMStats, ProgressFn


def request_key(identity: str, rendered: str, request: GenerationRequest) -> str:
    blob = json.dumps({"model": identity, "prompt": rendered, "params": request.params()}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class RequestCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, model TEXT, text TEXT, "
                "prompt_tokens INTEGER, completion_tokens INTEGER, created REAL)"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def get_many(self, keys: Sequence[str]) -> dict[str, GenerationResult]:
        out: dict[str, GenerationResult] = {}
        with self._connect() as db:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                marks = ",".join("?" * len(chunk))
                for key, text, pt, ct in db.execute(
                    f"SELECT key, text, prompt_tokens, completion_tokens FROM responses WHERE key IN ({marks})", chunk
                ):
                    out[key] = GenerationResult(text=text, prompt_tokens=pt, completion_tokens=ct, cached=True)
        return out

    def put_many(self, rows: Sequence[tuple[str, str, GenerationResult]]) -> None:
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                [(k, m, r.text, r.prompt_tokens, r.completion_tokens, time.time()) for k, m, r in rows if not r.error],
            )

    def prune(self, older_than_days: float | None = None, model: str | None = None) -> int:
        """Delete entries older than a number of days and/or of one model identity; returns how many."""
        clauses, params = [], []
        if older_than_days is not None:
            clauses.append("created < ?")
            params.append(time.time() - older_than_days * 86400)
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        if not clauses:
            raise ValueError("prune needs older_than_days and/or model")
        with self._connect() as db:
            n = db.execute(f"DELETE FROM responses WHERE {' AND '.join(clauses)}", params).rowcount
        with sqlite3.connect(self.path) as db:
            db.execute("VACUUM")
        return int(n)

    def models(self) -> dict[str, int]:
        with self._connect() as db:
            return dict(db.execute("SELECT model, COUNT(*) FROM responses GROUP BY model").fetchall())

    def size(self) -> dict[str, int]:
        with self._connect() as db:
            n, chars = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(text)), 0) FROM responses").fetchone()
        return {"entries": int(n), "text_chars": int(chars), "bytes": self.path.stat().st_size}


class _CacheWriter:
    """Collects one backend call's finished answers and writes them in small groups."""

    def __init__(self, cache: RequestCache, identity: str, keys: list[str], every: int, seconds: float):
        self.cache, self.identity, self.keys = cache, identity, keys
        self.every, self.seconds = every, seconds
        self.pending: list[tuple[str, str, GenerationResult]] = []
        self.last = time.monotonic()

    def add(self, index: int, result: GenerationResult) -> None:
        self.pending.append((self.keys[index], self.identity, result))
        if len(self.pending) >= self.every or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.cache.put_many(self.pending)
            self.pending = []
        self.last = time.monotonic()


class CachedLLM:
    """Answers from the cache first and sends only the misses to the backend, in chunks.

    Each answer is written to the cache as soon as the backend finishes it (in groups of `flush_every`
    or every `flush_seconds`, and always before an error propagates), so a crash or a lost server
    mid-stage keeps everything generated so far and the rerun regenerates only what was missing.
    """

    def __init__(
        self,
        backend: LLMBackend,
        cache: RequestCache,
        chunk_size: int = 64,
        flush_every: int = 8,
        flush_seconds: float = 2.0,
    ):
        self.backend = backend
        self.cache = cache
        self.chunk_size = chunk_size
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.stats = LLMStats()

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressFn | None = None
    ) -> list[GenerationResult]:
        identity = self.backend.identity
        keys = [request_key(identity, self.backend.render(r), r) for r in requests]
        hits = self.cache.get_many(keys)
        results: list[GenerationResult | None] = [hits.get(k) for k in keys]
        missing = [i for i, r in enumerate(results) if r is None]
        self.stats.requests += len(requests)
        self.stats.cache_hits += len(requests) - len(missing)
        self.stats.cache_misses += len(missing)
        total, done, tokens = len(requests), len(requests) - len(missing), 0
        if progress:
            progress(done, total, tokens)
        start = time.perf_counter()
        for c in range(0, len(missing), self.chunk_size):
            idx = missing[c : c + self.chunk_size]
            base_done, base_tokens = done, tokens

            def inner(d: int, _t: int, tok: int, base_done: int = base_done, base_tokens: int = base_tokens) -> None:
                if progress:
                    progress(base_done + d, total, base_tokens + tok)

            writer = _CacheWriter(self.cache, identity, [keys[i] for i in idx], self.flush_every, self.flush_seconds)
            try:
                fresh = self.backend.generate([requests[i] for i in idx], progress=inner, on_result=writer.add)
            finally:  # a failed call (server gone, crash) still keeps every answer that was finished
                writer.flush()
            for i, r in zip(idx, fresh, strict=True):
                results[i] = r
                tokens += r.completion_tokens
                if r.error:
                    self.stats.errors += 1
                    kind = r.error.split(":", 1)[0]
                    self.stats.by_error[kind] = self.stats.by_error.get(kind, 0) + 1
            done += len(idx)
            if progress:
                progress(done, total, tokens)
        self.stats.generation_seconds += time.perf_counter() - start
        final = [r for r in results if r is not None]
        for r in final:
            self.stats.prompt_tokens += r.prompt_tokens
            self.stats.completion_tokens += 0 if r.cached else r.completion_tokens
        return final
