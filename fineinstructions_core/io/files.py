"""Files and folders written under a temporary name and renamed into place: their modes, and the
atomic swap of a whole folder.

`tempfile.mkstemp` creates files readable by their owner only (0600) and `mkdtemp` folders 0700, on
purpose, whatever the umask. A data directory shared by a team needs its lake, accounting, catalog,
exports and models to get the modes a normal `open()` or `mkdir()` would give them (0666 / 0777 less
the umask), so every such file is chmod-ed to that before it is renamed into place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the OS or the
    file system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the finished folder `tmp` at `target`, replacing what is there, so that a reader in another
    process finds at `target` at every moment one whole folder, the old or the new: never a missing
    or half-deleted one. The old folder is deleted once it is out of the way."""
    honour_umask(tmp, directory=True)  # mkdtemp made it 0700
    if not target.exists():
        try:
            os.replace(tmp, target)
            return
        except OSError as exc:  # another writer put one there meanwhile: swap with theirs
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")  # no atomic swap here: a brief gap
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
