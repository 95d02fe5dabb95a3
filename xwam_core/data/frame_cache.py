"""The decoded-frame cache: a store's frames decoded once into memory-mapped .npy arrays.

Training windows are then slices of arrays, not PNG decodes. The cache lives outside the store, so a
store can sit on read-only or shared media:

    $XWAM_CACHE, else $XDG_CACHE_HOME/xwam, else ~/.cache/xwam
      frames-v1/NAME-PATHHASH/CONTENTHASH/   rgb.VIEW.npy, depth_mm.VIEW.npy, state.npy, ..., done.json

PATHHASH identifies the store by its resolved path; CONTENTHASH by its fingerprint (metadata bytes and
data file names and sizes, xwam_core.runs.store_fingerprint) and its data files' modification times,
so a store that changed never reuses a stale cache. Building a new version removes the caches of the
store's earlier versions. One process builds (atomically, through xwam_core.atomic) while others wait
on a lock on NAME-PATHHASH and then reuse it; without locks (some network file systems) concurrent
builders each build and the first complete cache is kept. Deleting any of it is always safe.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xwam_core.atomic import (
    DiskError,
    Notify,
    TargetExists,
    atomic_folder,
    disk_errors,
    find_temporaries,
    make_parents,
    remove_empty,
    remove_temporary,
    report,
)
from xwam_core.data.store import decode_png, depth_key, extrinsics_key, intrinsics_key, rgb_key
from xwam_core.errors import DataError

try:
    import fcntl
except ImportError:  # not POSIX: no build lock
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from xwam_core.data.reader import EpisodeStore

CACHE_ENV = "XWAM_CACHE"
FORMAT = "frames-v1"
DONE = "done.json"
HINT = f"set {CACHE_ENV} to a writable folder with room for the frame cache"
_NPY_HEADER = 128  # bytes of a .npy header, for the size estimate


def cache_root() -> Path:
    """$XWAM_CACHE, else $XDG_CACHE_HOME/xwam, else ~/.cache/xwam."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "xwam"
    return Path.home() / ".cache" / "xwam"


def cache_folder(store: EpisodeStore, root: Path | None = None) -> Path:
    """Where the frame cache of `store`, as it is now, lives (see the module docstring)."""
    from xwam_core.runs import safe_name, store_fingerprint

    resolved = store.path.resolve()
    path_hash = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    content = hashlib.sha256(store_fingerprint(store.path).encode())
    for data_file in store.data_files() + store.video_files():
        try:
            stat = data_file.stat()
            content.update(f"{data_file.relative_to(store.path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        except FileNotFoundError:
            raise DataError(f"{data_file}: file missing (meta/episodes lists episodes in it)") from None
    return (
        (root or cache_root()) / FORMAT / f"{safe_name(resolved.name)}-{path_hash}" / content.hexdigest()[:16]
    )


def open_frame_cache(
    store: EpisodeStore, root: Path | None = None, notify: Notify | None = None
) -> FrameCache:
    """The store's frame cache, built first if it is not there yet (or is incomplete)."""
    folder = cache_folder(store, root)
    if not is_complete(folder):
        _build_once(store, folder, notify)
    return FrameCache(folder, store)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a complete cache: done.json lists every array with its size."""
    try:
        done = json.loads((folder / DONE).read_text())
        return all((folder / name).stat().st_size == size for name, size in done["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def needed_bytes(store: EpisodeStore) -> int:
    """Bytes the cache of `store` takes on disk (decoded frames dominate)."""
    n, (h, w), views = store.num_frames, store.image_size, len(store.views)
    per_frame = views * h * w * (3 + (2 if store.has_depth else 0))
    per_frame += 4 * (len(store.state_names) + len(store.action_names)) + 8
    if store.has_cameras:
        per_frame += views * 4 * (9 + 16)
    files = views * (1 + store.has_depth + 2 * store.has_cameras) + 3
    return n * per_frame + files * _NPY_HEADER


def _build_once(store: EpisodeStore, folder: Path, notify: Notify | None) -> None:
    """Build the cache under a lock on the store's cache folder; nothing is left behind on failure."""
    with disk_errors(folder.parent, HINT):
        made = make_parents(folder)
    try:
        with _build_lock(folder.parent, notify):
            if is_complete(folder):  # built by the process we waited for
                return
            if folder.exists():  # incomplete (e.g. an array deleted by hand): built again
                shutil.rmtree(folder)
            legacy = store.path / "cache" / FORMAT
            if legacy.is_dir():
                report(
                    [
                        f"{store.path / 'cache'} is not read any more (the frame cache now lives in "
                        f"{folder.parent.parent}); delete it to free its space"
                    ],
                    notify,
                )
            try:
                _build(store, folder, notify)
            except TargetExists:
                pass  # a concurrent builder (no lock on this file system) finished first: theirs is kept
            except DiskError as exc:
                raise exc.with_hint(HINT) from exc.__cause__
            _remove_other_versions(folder, notify)
    except BaseException:
        remove_empty(made)
        raise


@contextmanager
def _build_lock(folder: Path, notify: Notify | None) -> Iterator[None]:
    """An exclusive lock on `folder` while one process builds; others wait for it (with a line)."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report([f"waiting for another process building the frame cache in {folder}"], notify)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this file system
        yield
    finally:
        os.close(fd)


def _remove_other_versions(folder: Path, notify: Notify | None) -> None:
    """Remove the caches of the store's earlier versions (they can never match it again) and stale
    temporaries of any of them."""
    lines = []
    for other in folder.parent.iterdir():
        if other.name != folder.name and not other.name.startswith(".") and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
            lines.append(f"removed {other}: the frame cache of an earlier version of the store")
    for found in find_temporaries(folder.parent):
        if found.stale and remove_temporary(found):
            lines.append(f"removed {found.path}: {found.why}")
    report(lines, notify)


def _build(store: EpisodeStore, folder: Path, notify: Notify | None) -> None:
    """Decode every frame of the store into `folder`, atomically; damaged data files -> DataError."""
    with atomic_folder(folder, needed_bytes=needed_bytes(store), notify=notify) as tmp:
        n, (h, w) = store.num_frames, store.image_size
        arrays: dict[str, np.ndarray] = {}
        for v in store.views:
            arrays[rgb_key(v)] = _preallocated(tmp / f"rgb.{v}.npy", np.uint8, (n, h, w, 3))
            if store.has_depth:
                arrays[depth_key(v)] = _preallocated(tmp / f"depth_mm.{v}.npy", np.uint16, (n, h, w))
        _decode_frames(store, arrays)
        for arr in arrays.values():
            arr.flush()  # type: ignore[attr-defined]
        del arrays
        _save_small_arrays(store, tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.suffix == ".npy"}
        done = {"frames": n, "store": str(store.path.resolve()), "files": files}
        (tmp / DONE).write_text(json.dumps(done, indent=2))


def _preallocated(path: Path, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A writable .npy memory map whose blocks are allocated now: a full disk is an ENOSPC here, not a
    SIGBUS on some later write into a sparse map."""
    arr = np.lib.format.open_memmap(path, "w+", dtype, shape)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, path.stat().st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    return arr


def _decode_frames(store: EpisodeStore, arrays: dict[str, np.ndarray]) -> None:
    """Every image of the store, decoded into `arrays` (global frame order)."""
    if store.store_format == 2:
        _decode_videos(store, arrays)
        arrays = {k: a for k, a in arrays.items() if k not in {rgb_key(v) for v in store.views}}
        if not arrays:
            return
    n = store.num_frames
    offset = 0
    files = store.data_files()
    for path in files:
        parquet = _open_parquet(path, list(arrays))
        try:
            for batch in parquet.iter_batches(batch_size=256, columns=list(arrays)):
                rows = batch.num_rows
                if offset + rows > n:
                    raise DataError(
                        f"{path}: the data files hold more than meta/info.json's total_frames={n} frames"
                    )
                for key, arr in arrays.items():
                    for i, cell in enumerate(batch.column(key).to_pylist()):
                        arr[offset + i] = _decoded(cell, arr.shape[1:], path, key, offset + i)
                offset += rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{path}: data file unreadable ({reason_of(exc, path)}); re-run `xwam prepare`"
            ) from None
    if offset != n:
        where = files[0] if len(files) == 1 else store.path / "data"
        raise DataError(f"{where}: holds {offset} frames, meta/info.json's total_frames says {n}")


def _decode_videos(store: EpisodeStore, arrays: dict[str, np.ndarray]) -> None:
    """Every episode's RGB video, decoded into `arrays` (format 2)."""
    from xwam_core.data.video import VideoReader

    readers: dict[str, VideoReader] = {}  # view -> the open file (LeRobot's merge puts episodes in one)
    try:
        for episode in store.episodes:
            for v in store.views:
                path = store.video_file(v, episode)
                times = episode.videos[v][2] + np.arange(episode.length) / store.fps
                reader = readers.get(v)
                if reader is None or reader.path != str(path):
                    if reader is not None:
                        reader.close()
                    reader = readers[v] = VideoReader(path, store.fps)
                frames = reader.read(times)
                if frames.shape[1:] != arrays[rgb_key(v)].shape[1:]:
                    raise DataError(
                        f"{path}: frames are {frames.shape[1]}x{frames.shape[2]}, expected "
                        f"{store.image_size[0]}x{store.image_size[1]} (meta/info.json image_size)"
                    )
                arrays[rgb_key(v)][episode.start : episode.start + episode.length] = frames
    finally:
        for reader in readers.values():
            reader.close()


def _open_parquet(path: Path, columns: list[str]) -> pq.ParquetFile:
    """A data file, checked to be Parquet and to have `columns`."""
    if not path.is_file():
        raise DataError(f"{path}: data file missing (meta/episodes lists episodes in it)")
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{path}: not a readable Parquet data file ({reason_of(exc, path)}); re-run `xwam prepare`"
        ) from None
    missing = [c for c in columns if c not in parquet.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: lacks column(s) {missing}; expected every feature of meta/info.json")
    return parquet


def _decoded(cell: Any, shape: tuple[int, ...], path: Path, key: str, frame: int) -> np.ndarray:
    try:
        image = decode_png(cell["bytes"])
    except Exception as exc:  # PIL raises several types for damaged bytes; None cells give TypeError
        raise DataError(
            f"{path}: frame {frame} {key}: not a readable PNG image ({reason_of(exc, path)})"
        ) from None
    if image.shape != shape:
        raise DataError(
            f"{path}: frame {frame} {key}: image is {image.shape}, expected {shape} (meta/info.json image_size)"
        )
    return image


def _save_small_arrays(store: EpisodeStore, folder: Path) -> None:
    """States, actions, episode indices and cameras as plain .npy, checked against meta/ shapes."""
    n = store.num_frames
    small: dict[str, tuple[int, ...]] = {
        "observation.state": (len(store.state_names),),
        "action": (len(store.action_names),),
        "episode_index": (),
    }
    if store.has_cameras:
        for v in store.moving_views:
            small[intrinsics_key(v)] = (3, 3)
            small[extrinsics_key(v)] = (4, 4)
    columns = store.read_columns(list(small))
    files = store.data_files()
    where = files[0] if len(files) == 1 else store.path / "data"
    values: dict[str, np.ndarray] = {}
    for key, shape in small.items():
        dtype = np.int64 if key == "episode_index" else np.float32
        try:
            array = np.asarray(columns[key].to_pylist(), dtype)
            if store.store_format == 2 and key.startswith("observation.cameras."):
                array = array.reshape(n, *shape)  # stored flat: 9 / 16 numbers a frame
        except (ValueError, TypeError):
            array = None
        if array is None or array.shape != (n, *shape):
            got = "ragged or missing values" if array is None else array.shape
            raise DataError(
                f"{where}: column {key} holds {got}, expected {(n, *shape)} (from meta/info.json)"
            )
        values[key] = array
    expected = np.repeat([e.index for e in store.episodes], [e.length for e in store.episodes])
    wrong = np.nonzero(values["episode_index"] != expected)[0]
    if len(wrong):
        i = int(wrong[0])
        raise DataError(
            f"{where}: frame {i} belongs to episode {values['episode_index'][i]}, but meta/episodes puts "
            f"episode {expected[i]} there; the store is inconsistent, re-run `xwam prepare`"
        )
    np.save(folder / "state.npy", values["observation.state"])
    np.save(folder / "action.npy", values["action"])
    np.save(folder / "episode_index.npy", values["episode_index"])
    if store.has_cameras:
        lengths = [e.length for e in store.episodes]
        for v in store.views:
            if v in store.moving_views:
                intrinsics, extrinsics = values[intrinsics_key(v)], values[extrinsics_key(v)]
            else:  # once per episode in meta/episodes: repeated over the episode's frames
                intrinsics = np.repeat(np.stack([e.cameras[v][0] for e in store.episodes]), lengths, axis=0)
                extrinsics = np.repeat(np.stack([e.cameras[v][1] for e in store.episodes]), lengths, axis=0)
            np.save(folder / f"intrinsics.{v}.npy", intrinsics)
            np.save(folder / f"extrinsics.{v}.npy", extrinsics)


def reason_of(exc: BaseException, path: Path | None = None) -> str:
    """A library error in a few words for a one-line message: its first sentence, without the path
    (the message names it already) and without the library's advice."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if path is not None:
        text = text.replace(f" '{path}'", "").replace(f"'{path}'", "it").replace(str(path), "it")
    text = re.sub(r" ?<[\w.]+ object at 0x[0-9a-f]+>", "", text)  # PIL names the BytesIO it read
    text = text.split(". ")[0].rstrip(".")
    if len(text) > 120:
        text = text[:117] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FrameCache:
    """Memory-mapped decoded frames of a store, indexed by global frame index.

    Arrays are opened lazily, once per process (each DataLoader worker maps them itself).
    """

    def __init__(self, path: Path, store: EpisodeStore):
        self.path = path
        self.views = store.views
        self.has_depth = store.has_depth
        self.has_cameras = store.has_cameras
        self.state = np.load(path / "state.npy")
        self.action = np.load(path / "action.npy")
        self.intrinsics = {}
        self.extrinsics = {}
        if self.has_cameras:
            for v in self.views:
                self.intrinsics[v] = np.load(path / f"intrinsics.{v}.npy")
                self.extrinsics[v] = np.load(path / f"extrinsics.{v}.npy")
        self._rgb: dict[str, np.ndarray] | None = None
        self._depth: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:  # workers re-open the maps themselves
        state = self.__dict__.copy()
        state["_rgb"] = state["_depth"] = None
        return state

    def _open(self) -> None:
        def load(name: str) -> np.ndarray:
            # a plain ndarray view of the map: indexing skips np.memmap's per-call Python overhead
            return np.load(self.path / name, mmap_mode="r").view(np.ndarray)

        self._rgb = {v: load(f"rgb.{v}.npy") for v in self.views}
        self._depth = {v: load(f"depth_mm.{v}.npy") for v in self.views} if self.has_depth else {}

    def rgb(self, view: str, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 frames of one view, written into `out` when given."""
        if self._rgb is None:
            self._open()
        assert self._rgb is not None
        return np.take(self._rgb[view], frames, axis=0, out=out)

    def depth_mm(self, view: str, frames: np.ndarray) -> np.ndarray:
        """(T, H, W) uint16 millimetres of one view."""
        if self._depth is None:
            self._open()
        assert self._depth is not None
        return np.take(self._depth[view], frames, axis=0)
