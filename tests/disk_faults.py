"""Disk faults for tests: a folder made read-only by injection (everywhere) or by a mount (where allowed).

`read_only(folder)` makes every write that Python issues inside `folder` fail with EROFS (an audit hook:
open for writing, mkdir, rename, remove, ...), the way a read-only file system answers. Writes issued
by native code (pyarrow, safetensors, ffmpeg) are not seen by it; the mount helpers cover those, and
skip the test with the reason where mounting is impossible (no root, no CAP_SYS_ADMIN, a sandbox).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {  # audit event -> indices of its path arguments
    "os.mkdir": (0,),
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.utime": (0,),
    "os.link": (0, 1),
    "os.symlink": (1,),
    "shutil.rmtree": (0,),
}
_read_only: list[str] = []  # folders made read-only now
_refused: list[str] = []  # writes refused, for the tests to inspect
_hook_added = False


def _inside(path: Any) -> str | None:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    full = os.path.abspath(os.fsdecode(path))
    for root in _read_only:
        if full == root or full.startswith(root + os.sep):
            return full
    return None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _read_only:
        return
    paths: tuple[Any, ...] = ()
    if event == "open":
        path, mode, flags = (*args, None, None, None)[:3]
        writing = (isinstance(flags, int) and flags & _WRITE_FLAGS) or (
            isinstance(mode, str) and any(c in mode for c in "wax+")
        )
        paths = (path,) if writing else ()
    elif event in _PATH_EVENTS:
        paths = tuple(args[i] for i in _PATH_EVENTS[event] if i < len(args))
    for path in paths:
        full = _inside(path)
        if full is not None:
            _refused.append(f"{event} {full}")
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), full)


@contextmanager
def read_only(folder: Path) -> Iterator[list[str]]:
    """Inside the block, Python writes inside `folder` fail with EROFS; yields the refused writes."""
    global _hook_added
    if not _hook_added:
        sys.addaudithook(_hook)  # hooks cannot be removed: this one is idle outside the block
        _hook_added = True
    root = os.path.abspath(folder)
    _read_only.append(root)
    _refused.clear()
    try:
        yield _refused
    finally:
        _read_only.remove(root)


def _mount(*args: str) -> None:
    try:
        result = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount here ({exc})")
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(args)}: {result.stderr.strip() or result.returncode})")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=60)


def remount_read_only(path: Path) -> None:
    """Make the tmpfs mounted at `path` read-only (after filling it)."""
    _mount("-o", "remount,ro", str(path))


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "256k") mounted at `path` (made), read-only if asked; skips if impossible."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        if read_only:
            remount_read_only(path)
        yield path
    finally:
        _umount(path)


@contextmanager
def read_only_bind(source: Path, path: Path) -> Iterator[Path]:
    """`source` seen read-only at `path` (a read-only bind mount); skips where mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        _umount(path)
