"""File modes for files written under a temporary name and renamed into place.

`tempfile.mkstemp` creates files readable by their owner only (0600) and `mkdtemp` folders 0700, on
purpose, whatever the umask. A data directory shared by a team needs its lake, accounting, catalog,
exports and models to get the modes a normal `open()` or `mkdir()` would give them (0666 / 0777 less
the umask), so every such file is chmod-ed to that before it is renamed into place.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _LOCK:  # os.umask can only be read by setting it; keep other threads of ours out meanwhile
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike[str], directory: bool | None = None) -> None:
    """Give `path` the mode a normal open() (0666) or mkdir() (0777) would have under the umask."""
    path = Path(path)
    if directory is None:
        directory = path.is_dir()
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
