"""Stable row ids derived from content, so lineage is a join and reruns give the same keys."""

from __future__ import annotations

import hashlib


def content_id(prefix: str, *parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}_{h[:16]}"
