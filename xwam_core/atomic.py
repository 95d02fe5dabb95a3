"""Atomic writes: the one place outputs are written so a crash never leaves half a file or folder.

Every writer makes a temporary sibling named `.NAME.tmp-<hex8>` (recognisable, hidden) and renames
it onto the target only when complete. Replacing an existing folder moves the old one aside first
(`.NAME.old-<hex8>`), swaps the new one in, then deletes the old one, so there is never a moment
without a complete target on disk.

    with atomic_folder(Path("out/run"), overwrite=True) as tmp:
        (tmp / "a.txt").write_text("...")
    write_json_atomic(Path("out/metrics.json"), {"psnr": 22.0})
    with atomic_file(Path("out/video.mp4")) as tmp:   # tmp keeps the suffix, for writers that read it
        encode_video(tmp, frames, fps)

Two more duties live here, so every writer gets them:
- Disk failures (read-only file system, permission denied, no space left, quota exceeded: as an OSError
  or as a library error quoting the OS error, e.g. safetensors' "os error 28") become one `DiskError`
  line naming the path and, for a full disk, how much was needed and how much is free (`disk_error`).
- Temporaries left by a killed writer are removed when the next write targets the same place
  (`remove_stale_temporaries`). A writer holds a shared `flock` on its temporary folder while it
  writes: the kernel drops it when the process dies, so "nobody holds the lock" means "its writer is
  gone" with no pid or host bookkeeping (pids are reused and differ between containers). Where the file
  system has no such locks, and for temporary files, a temporary is stale when nothing in it changed
  for STALE_AFTER_S. A moved-aside `.NAME.old-*` is stale once NAME exists again (it was superseded);
  without NAME it is the last complete copy and is kept.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from xwam_core.errors import XWAMError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, temporaries are judged by age alone
    fcntl = None  # type: ignore[assignment]

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
STALE_AFTER_S = 3600.0  # a temporary whose writer cannot be checked is stale after an hour untouched
_TAG = r"[0-9a-f]{8}"
_TEMPORARY = re.compile(rf"^\.(?P<name>.+)\.(?P<kind>tmp|old)-{_TAG}(?P<suffix>\.[^.]+)?$")

logger = logging.getLogger("xwam")
Notify = Callable[[str], None]


class TargetExists(XWAMError):
    """The target of a write exists and may not be replaced (no --overwrite, or it appeared meanwhile)."""


class DiskError(XWAMError):
    """A write failed because the disk refused it: read-only, no permission, full, or over quota."""

    REASONS: ClassVar[dict[int, str]] = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "cannot write: read-only file system",
        errno.EACCES: "cannot write: permission denied",
    }

    def __init__(
        self, code: int, path: Path, needed: int | None = None, written: int | None = None, hint: str = ""
    ) -> None:
        self.code, self.path, self.needed, self.written, self.hint = code, Path(path), needed, written, hint
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.path}: {self.REASONS[self.code]}"
        if self.code in (errno.ENOSPC, errno.EDQUOT):
            parts = []
            if self.needed:
                parts.append(f"needed about {_mb(self.needed)}")
            elif self.written:
                parts.append(f"needed more than the {_mb(self.written)} written before it filled")
            free = free_bytes(self.path)
            if free is not None:
                parts.append(f"{_mb(free)} free")
            if parts:
                text += f" ({', '.join(parts)})"
        return text + (f"; {self.hint}" if self.hint else "")

    def with_hint(self, hint: str) -> DiskError:
        return DiskError(self.code, self.path, self.needed, self.written, hint)


# ------------------------------------------------------------------------------------ disk errors
_ERRNO_IN_TEXT = re.compile(r"(?:errno|os error)\s*(\d+)", re.IGNORECASE)
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile/np.save on a full disk


def disk_errno(exc: BaseException) -> int | None:
    """ENOSPC, EDQUOT, EROFS or EACCES behind `exc`, else None.

    Libraries report the same failures differently: an OSError with errno (Python, pyarrow, PyAV), an
    error quoting it ("os error 28": safetensors), or numpy's short-write OSError without errno.
    """
    if isinstance(exc, XWAMError):
        return None
    if isinstance(exc, OSError) and exc.errno in DiskError.REASONS:
        return int(exc.errno)
    if not isinstance(exc, Exception):
        return None
    text = str(exc)
    for match in _ERRNO_IN_TEXT.finditer(text):
        if int(match.group(1)) in DiskError.REASONS:
            return int(match.group(1))
    if isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(text):
        return errno.ENOSPC
    return None


def disk_error(
    exc: BaseException, target: Path, written: int | None = None, needed: int | None = None
) -> DiskError | None:
    """The one-line DiskError for `exc` raised while writing `target`, or None if `exc` is not a disk
    failure. The path shown is the one the user knows: temporaries are named by their targets."""
    if isinstance(exc, DiskError):  # from a nested write: recount what was written, and what is free now
        return DiskError(exc.code, exc.path, needed or exc.needed, written or exc.written, exc.hint)
    code = disk_errno(exc)
    if code is None:
        return None
    filename = getattr(exc, "filename", None)
    path = Path(os.fsdecode(filename)) if isinstance(filename, (str, bytes, os.PathLike)) else target
    return DiskError(code, user_path(path), needed=needed, written=written)


@contextmanager
def disk_errors(path: Path | str, hint: str = "") -> Iterator[None]:
    """Turn a disk failure inside the block into one DiskError line about `path` (for writes that do
    not go through atomic_folder/atomic_file, e.g. creating a folder or a lock file)."""
    try:
        yield
    except Exception as exc:
        err = disk_error(exc, Path(path))
        if err is None:
            raise
        raise (err.with_hint(hint) if hint else err) from exc


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent); None if unknown."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return shutil.disk_usage(candidate).free
        except OSError:
            return None
    return None


def check_free_space(path: Path, needed: int, hint: str = "") -> None:
    """Refuse, before writing anything, a write of `needed` bytes to `path` that cannot fit (the free
    space is that of its nearest existing folder)."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise DiskError(errno.ENOSPC, path, needed=needed, hint=hint)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def user_path(path: Path) -> Path:
    """`path` with every temporary in it named by its target: out/.run.tmp-1a2b3c4d/.a.tmp-5e6f7a8b.mp4
    -> out/run/a.mp4 (the temporary is gone by the time the user reads the message)."""
    parts = []
    for part in path.parts:
        match = _TEMPORARY.match(part)
        parts.append(match.group("name") + (match.group("suffix") or "") if match else part)
    return Path(*parts) if parts else path


def _bytes_on_disk(path: Path) -> int:
    """Bytes a file or folder occupies (allocated blocks, so sparse files count what was written)."""
    try:
        if path.is_file():
            return path.stat().st_blocks * 512
        return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())
    except OSError:
        return 0


# ------------------------------------------------------------------------------------ temporaries
def temporary_sibling(final: Path, mark: str = TMP_MARK) -> Path:
    """`.NAME<mark><hex8>` beside `final` (keeps a file's suffix, so writers that read it still work).

    A temporary folder must be made by atomic_folder, which holds the lock that tells cleaners its
    writer is alive; one made by hand from this name looks abandoned to them.
    """
    tag = uuid.uuid4().hex[:8]
    if final.suffix and mark == TMP_MARK:
        return final.parent / f".{final.stem}{mark}{tag}{final.suffix}"
    return final.parent / f".{final.name}{mark}{tag}"


@dataclass
class Temporary:
    """An xwam temporary found on disk and the verdict on it."""

    path: Path
    target: Path  # the file or folder it was written for (`kind` "tmp") or moved aside from ("old")
    kind: str
    stale: bool
    why: str

    def describe(self) -> str:
        return f"{self.path} ({_mb(_bytes_on_disk(self.path))}): {self.why}"


def find_temporaries(folder: Path, target: Path | None = None) -> list[Temporary]:
    """The xwam temporaries directly in `folder` (only those of `target` when given), each judged."""
    found = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for path in entries:
        match = _TEMPORARY.match(path.name)
        if match is None:
            continue
        name = match.group("name") + (match.group("suffix") or "")
        if target is not None and name != target.name:
            continue
        found.append(_judge(path, folder / name, match.group("kind")))
    return found


def _judge(path: Path, target: Path, kind: str) -> Temporary:
    if kind == "old":
        if target.exists():
            return Temporary(path, target, kind, True, f"an old copy of {target.name}, superseded")
        return Temporary(
            path,
            target,
            kind,
            False,
            f"the previous {target.name}, moved aside by an interrupted "
            f"replace; rename it to {target.name} to restore it",
        )
    held = _lock_held(path) if path.is_dir() else None
    if held is not None:
        why = "its writer is running" if held else "its writer is gone"
        return Temporary(path, target, kind, not held, why)
    age = time.time() - _newest_mtime(path)
    if age > STALE_AFTER_S:
        return Temporary(path, target, kind, True, f"unchanged for {age / 60:.0f} min")
    return Temporary(path, target, kind, False, f"changed {age:.0f} s ago; left to its writer")


def _newest_mtime(path: Path) -> float:
    try:
        newest = path.stat().st_mtime
        if path.is_dir():
            for p in path.rglob("*"):
                newest = max(newest, p.lstat().st_mtime)
        return newest
    except OSError:
        return time.time()


def _lock_held(path: Path) -> bool | None:
    """Whether a live writer holds its lock on the folder `path` (None: this file system cannot tell)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def remove_stale_temporaries(final: Path | str) -> list[str]:
    """Remove the stale temporaries of `final` beside it (see the module docstring for "stale").

    Returns one line per temporary removed or kept for a reason the user should know.
    """
    final = Path(final)
    lines = []
    for found in find_temporaries(final.parent, final):
        if not found.stale:
            if found.kind == "old":
                lines.append(f"kept {found.describe()}")
            continue
        size = _bytes_on_disk(found.path)
        if remove_temporary(found):
            lines.append(f"removed {found.path} ({_mb(size)}), left by an interrupted write: {found.why}")
    return lines


def remove_temporary(found: Temporary) -> bool:
    """Delete a stale temporary; a folder is deleted while holding its lock, so a writer that started
    using it meanwhile is never cut short (it sees its folder gone and takes another name)."""
    path = found.path
    if not path.is_dir():
        try:
            path.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only folder: the write that follows reports it
            return False
        return True
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # type: ignore[arg-type]
            return False
        except OSError:
            pass  # judged by age: no lock to hold
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)
    return not path.exists()


def report(lines: list[str], notify: Notify | None = None) -> None:
    """Show lines about the disk (temporaries removed) through `notify`, else the "xwam" logger."""
    for line in lines:
        (notify or logger.warning)(line)


# ------------------------------------------------------------------------------------ folders
def make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of `path`; returns those made (outermost first)."""
    made = [p for p in reversed(path.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove folders made by `make_parents` again, deepest first, as long as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            break


def replace_folder(tmp: Path, final: Path, overwrite: bool = True) -> None:
    """Move the complete folder `tmp` onto `final`; an existing `final` is moved aside, then deleted.

    Without `overwrite`, a `final` that appeared meanwhile (another process) is not replaced.
    """
    if not overwrite:
        try:
            os.rename(tmp, final)  # fails on an existing non-empty folder or a file
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise TargetExists(
                    f"{final}: appeared while this was being written (another process?); left as it is"
                ) from None
            raise
        return
    old = None
    if final.exists() or final.is_symlink():
        old = temporary_sibling(final, OLD_MARK)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)  # put the previous one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _owned_temporary(final: Path) -> tuple[Path, int | None]:
    """A new temporary folder for `final` and the fd of the shared lock held on it while writing."""
    for _ in range(5):
        tmp = temporary_sibling(final)
        tmp.mkdir()
        if fcntl is None:
            return tmp, None
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a cleaner is deleting it
        except OSError:
            os.close(fd)
            return tmp, None  # no locks here: the age rule protects it
        try:
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a cleaner took it between mkdir and lock: take another name
    raise XWAMError(f"{final}: could not claim a temporary folder beside it (removed 5 times while starting)")


def check_replaceable(final: Path, replaces: str) -> None:
    """Refuse to replace what this writer did not write (see atomic_folder's `replaces`)."""
    resolved, here = final.resolve(), Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise XWAMError(f"{final}: is the working directory or a folder above it; refusing to replace it")
    if final.exists() and not final.is_dir():
        raise XWAMError(
            f"{final}: is a file, and this command writes a folder there; refusing to replace it with "
            "--overwrite (give another path)"
        )
    if final.is_dir() and not (final / replaces).exists() and any(final.iterdir()):
        raise XWAMError(
            f"{final}: exists and holds no {replaces}, so it is not what this command writes; "
            "refusing to replace it with --overwrite (give another folder)"
        )


@contextmanager
def atomic_folder(
    final: Path | str,
    overwrite: bool = False,
    needed_bytes: int | None = None,
    notify: Notify | None = None,
    replaces: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`.

    Refuses an existing `final` unless `overwrite`; with `replaces` (a file this writer puts in its
    folders, e.g. "manifest.json"), `overwrite` only replaces an empty folder or one holding that file,
    and never the working directory or a folder above it, so a mistyped --out cannot delete a home or
    source folder. First removes the stale temporaries of `final` left
    by interrupted writes (a line each through `notify`). `needed_bytes`, when known, is checked against
    the free space before anything is written. On any error the temporary folder (and parent folders
    made for it) are removed, `final` is untouched, and a disk failure becomes one DiskError line.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise TargetExists(f"{final}: already exists; pass --overwrite to replace it")
    if final.exists() and replaces is not None:
        check_replaceable(final, replaces)
    made: list[Path] = []
    tmp: Path | None = None
    fd: int | None = None
    try:
        report(remove_stale_temporaries(final), notify)
        made = make_parents(final)
        if needed_bytes is not None:
            check_free_space(final, needed_bytes)
        tmp, fd = _owned_temporary(final)
        yield tmp
        replace_folder(tmp, final, overwrite=overwrite)
    except BaseException as exc:
        written = _bytes_on_disk(tmp) if tmp is not None else None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        err = disk_error(exc, final, written, needed_bytes)
        if err is not None and err is not exc:
            raise err from exc
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextmanager
def atomic_file(final: Path | str, notify: Notify | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside `final` (same suffix); on success it is renamed onto `final`.

    Stale temporaries of `final` are removed first; a disk failure becomes one DiskError line.
    """
    final = Path(final)
    tmp = temporary_sibling(final)
    made: list[Path] = []
    try:
        report(remove_stale_temporaries(final), notify)
        made = make_parents(final)
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        written = None
        if tmp.exists() or tmp.is_symlink():
            written = _bytes_on_disk(tmp)
            with suppress(OSError):  # cleaning up must not hide the failure itself
                tmp.unlink()
        remove_empty(made)
        err = disk_error(exc, final, written)
        if err is not None and err is not exc:
            raise err from exc
        raise


def write_text_atomic(path: Path | str, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: Path | str, content: Any, default: Callable[[Any], Any] | None = None) -> Path:
    """JSON (indented, no NaN) written atomically; `default` converts what json cannot (numpy values)."""
    return write_text_atomic(
        path, json.dumps(content, indent=2, allow_nan=False, default=default or _json_default) + "\n"
    )


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` to disk (before a rename that must survive a power cut)."""
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays as plain JSON numbers and lists; paths as strings."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, without importing numpy here
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
