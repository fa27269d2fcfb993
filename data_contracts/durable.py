"""Durable writes: a reader sees the old file or the new one, never half of either.

Every stage writes its outputs through these helpers (temp sibling, fsync, rename), so a
crash, a full disk or a kill -9 mid-write leaves what was already stored intact.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _tmp_sibling(path: Path) -> Path:
    """Unique per process and thread, so concurrent writers of one path never share a temp."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path if Path(path).is_dir() else Path(path).parent)
    return st.f_bavail * st.f_frsize


def disk_full(path: Path, detail: str = "") -> OSError:
    """ENOSPC as an error that names the file, the space left and what to do."""
    path = Path(path)
    return OSError(errno.ENOSPC, f"the disk is full ({free_bytes(path.parent)} bytes free) "
                   f"while writing {path.name}: nothing already stored was replaced; free "
                   f"space and run again{f' ({detail})' if detail else ''}", str(path))


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temp sibling of `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno != errno.ENOSPC:
            raise
        raise disk_full(path, str(err)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, payload: Any, indent: int | None = 1,
                      sort_keys: bool = True) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys,
                                              default=str))


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; swap it into place only if the block succeeds.

    The old directory is renamed aside (not deleted) before the new one is renamed in, so at
    every instant one complete version exists on disk.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        # FAISS's C++ writers raise RuntimeError and report errno only in the message
        if getattr(err, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err):
            raise disk_full(out, str(err)) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
