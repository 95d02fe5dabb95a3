"""One process owns a training run folder at a time, and the owner tidies it before writing.

    RUN/xwam.lock    {"pid": 4242, "host": "gpu-07", "started": "2026-11-25T14:02:11", "command": "..."}

The exclusion itself is an flock(2) on that file, which the kernel drops when its owner dies, however it
dies: a lock file left by a killed run is recognised as stale and taken over (with a line saying so), a
live owner makes every other process refuse with one line naming the run, its pid and host. Within one
process, every Trainer of the same run shares the ownership (a notebook can build a new Trainer after an
interrupted one). Processes forked by the owner (DataLoader workers) do not keep the lock alive after
the owner is gone.

The owner, and only the owner, removes what interrupted runs of the folder left behind
(`remove_leftovers`) and replaces an old run with `--overwrite` (`clear_run`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from xwam_core.atomic import OLD_MARK, temporary_sibling
from xwam_core.errors import XWAMError

LOCK_NAME = "xwam.lock"
# what a training run writes at the top of its folder (xwam_core.train), in the order --overwrite removes it:
# checkpoints first, so an interrupted overwrite never leaves the old run resumable beside a new one
RUN_ENTRIES = ("checkpoints", "recipe.toml", "logs", "summary.json", "loss_curve.png")
# leftovers of interrupted writes: atomic temporaries of the run's files (xwam_core.atomic) and entries an
# interrupted --overwrite had moved aside
_RUN_LEFTOVER = re.compile(
    r"^\.(recipe\.tmp-[0-9a-f]{8}\.toml|summary\.tmp-[0-9a-f]{8}\.json|loss_curve\.tmp-[0-9a-f]{8}\.png"
    r"|(checkpoints|recipe\.toml|logs|summary\.json|loss_curve\.png)\.old-[0-9a-f]{8})$"
)


@dataclass(frozen=True)
class LockOwner:
    """Who holds (or last held) a run folder, as written in its lock file."""

    pid: int
    host: str
    started: str
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.started})"

    @classmethod
    def this_process(cls) -> LockOwner:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.datetime.now().isoformat(timespec="seconds"),
            command=" ".join(sys.argv),
        )


def _parse_owner(text: str) -> LockOwner | None:
    """The owner a lock file names; None for an empty or unreadable one (its writer died mid-write)."""
    try:
        data = json.loads(text)
        return LockOwner(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
    except (ValueError, KeyError, TypeError):
        return None


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


class RunLock:
    """The flock on RUN/xwam.lock, with the owner's description in the file."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.key = str(run_dir.resolve())  # how this process's registry knows the folder
        self.path = run_dir / LOCK_NAME
        self.taken_over: LockOwner | None = None  # the dead owner whose stale lock this one replaced
        self.users = 0
        self._fd: int | None = None
        self._created: list[Path] = []  # folders made for the lock, removed again if left empty

    def acquire(self) -> None:
        """Own the folder (creating it), or raise XWAMError naming the live owner."""
        self._created = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise XWAMError(f"{self.run_dir}: cannot create the run folder ({e.strerror})") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                self._remove_created()
                raise XWAMError(f"{self.path}: cannot create the run's lock file ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _parse_owner(_read_fd(fd))
                os.close(fd)
                self._remove_created()
                who = owner.describe() if owner is not None else "another process"
                raise XWAMError(
                    f"{self.run_dir}: in use by {who} (lock {self.path}); wait for that run to end, "
                    "or give this one another train.out"
                ) from None
            except OSError as e:
                os.close(fd)
                self._remove_created()
                raise XWAMError(
                    f"{self.path}: this file system cannot lock files ({errno.errorcode.get(e.errno or 0, '')}: "
                    f"{e.strerror}); put train.out on a local disk"
                ) from None
            # the previous owner unlinks the file before unlocking: make sure ours is still the one on disk
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _parse_owner(_read_fd(fd))
        me = LockOwner.this_process()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me.__dict__) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        self.taken_over = previous if previous is not None and previous != me else None

    def release(self) -> None:
        """Give the folder up: remove the lock file (while still holding it), then unlock."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def forget(self) -> None:
        """In a forked child: drop the inherited descriptor without unlocking the parent's lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; stops at the first that is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


_held: dict[str, RunLock] = {}
_held_guard = threading.Lock()


def acquire_run(run_dir: str | Path) -> RunLock:
    """This process's ownership of `run_dir` (one flock per process, counted over its users)."""
    run_dir = Path(run_dir)
    with _held_guard:
        lock = _held.get(str(run_dir.resolve()))
        if lock is None:
            lock = RunLock(run_dir)
            lock.acquire()
            _held[lock.key] = lock
        lock.users += 1
        return lock


def release_run(lock: RunLock) -> None:
    """One user fewer; the last one unlocks the folder."""
    with _held_guard:
        lock.users -= 1
        if lock.users > 0:
            return
        _held.pop(lock.key, None)
        lock.release()


def _forget_in_child() -> None:
    global _held_guard
    for lock in _held.values():
        lock.forget()
    _held.clear()
    _held_guard = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_in_child)


# ------------------------------------------------------------------------------------ what the owner tidies
def is_run(run_dir: Path) -> bool:
    """Whether `run_dir` already holds a training run (a recipe.toml or a complete checkpoint)."""
    from xwam_core.checkpoint import checkpoint_dirs

    return (run_dir / "recipe.toml").is_file() or bool(checkpoint_dirs(run_dir))


def remove_leftovers(run_dir: Path) -> str | None:
    """Remove what interrupted writes left in the run folder; returns a line saying what, or None.

    Call with the folder owned (acquire_run): only then is no temporary in use."""
    from xwam_core.checkpoint import remove_checkpoint_leftovers

    removed: list[tuple[Path, int]] = []  # (path, bytes)
    if run_dir.is_dir():
        for entry in sorted(run_dir.iterdir()):
            if _RUN_LEFTOVER.match(entry.name):
                removed.append((entry, tree_bytes(entry)))
                _remove(entry)
    in_checkpoints, restored = remove_checkpoint_leftovers(run_dir)
    deleted = removed + in_checkpoints
    parts = []
    if deleted:
        names = ", ".join(p.name for p, _ in deleted[:3]) + (", ..." if len(deleted) > 3 else "")
        parts.append(
            f"removed {len(deleted)} unfinished temporar{'y' if len(deleted) == 1 else 'ies'} of an interrupted "
            f"run ({format_bytes(sum(s for _, s in deleted))}: {names})"
        )
    if restored:
        parts.append(
            "restored " + ", ".join(p.name for p in restored) + " (its replacement was never completed)"
        )
    return f"{run_dir}: " + "; ".join(parts) if parts else None


def clear_run(run_dir: Path) -> list[str]:
    """--overwrite: remove the old run's entries (RUN_ENTRIES), each first renamed aside atomically.

    All are moved aside before any is deleted, checkpoints first: a kill part-way leaves part of the old run
    (and hidden `.NAME.old-*` entries the next owner removes), never a mix with the new one."""
    aside = []
    for name in RUN_ENTRIES:
        entry = run_dir / name
        if entry.exists():
            moved = temporary_sibling(entry, OLD_MARK)
            os.replace(entry, moved)
            aside.append((name, moved))
    for _, moved in aside:
        _remove(moved)
    return [name for name, _ in aside]


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (or of the file itself)."""
    if not path.is_dir():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
