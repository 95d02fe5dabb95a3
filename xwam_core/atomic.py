"""Atomic writes: the one place outputs are written so a crash never leaves half a file or folder.

Every writer makes a temporary sibling named `.NAME.tmp-XXXXXXXX` (recognisable, hidden) and renames
it onto the target only when complete. Replacing an existing folder moves the old one aside first
(`.NAME.old-XXXXXXXX`), swaps the new one in, then deletes the old one, so there is never a moment
without a complete target on disk.

    with atomic_folder(Path("out/run"), overwrite=True) as tmp:
        (tmp / "a.txt").write_text("...")
    write_json_atomic(Path("out/metrics.json"), {"psnr": 22.0})
    with atomic_file(Path("out/video.mp4")) as tmp:   # tmp keeps the suffix, for writers that read it
        encode_video(tmp, frames, fps)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xwam_core.errors import XWAMError

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


def temporary_sibling(final: Path, mark: str = TMP_MARK) -> Path:
    """`.NAME<mark>XXXXXXXX` beside `final` (keeps a file's suffix, so writers that read it still work)."""
    tag = uuid.uuid4().hex[:8]
    if final.suffix and mark == TMP_MARK:
        return final.parent / f".{final.stem}{mark}{tag}{final.suffix}"
    return final.parent / f".{final.name}{mark}{tag}"


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` onto `final`; an existing `final` is moved aside, then deleted."""
    old = None
    if final.exists():
        old = temporary_sibling(final, OLD_MARK)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(final: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success it replaces `final`.

    Refuses an existing `final` unless `overwrite`; on any error the temporary folder is removed and
    `final` is untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise XWAMError(f"{final}: already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yield a temporary file path beside `final` (same suffix); on success it is renamed onto `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
