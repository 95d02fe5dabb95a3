"""The store's cache: per-frame arrays (states, actions, cameras) as memory-mapped .npy files, and, when
the decoded-frame cache is on, every frame decoded once (rgb.VIEW.npy, depth_mm.VIEW.npy).

With the frames decoded, training windows are slices of arrays, not video and PNG decodes (small stores:
the demo); without them (large stores) loader workers decode the windows they need
(xwam_core.data.decode) and only the per-frame numbers come from here. Every array is memory-mapped,
never loaded whole: a rank's memory holds what it touches. Cameras of views that do not move are kept
once per episode. The cache lives outside the store, so a store can sit on read-only or shared media:

    $XWAM_CACHE, else $XDG_CACHE_HOME/xwam, else ~/.cache/xwam
      frames-v2/NAME-PATHHASH/CONTENTHASH/   rgb.VIEW.npy, depth_mm.VIEW.npy, state.npy, ..., done.json
      arrays-v1/NAME-PATHHASH/CONTENTHASH/   state.npy, action.npy, intrinsics.VIEW.npy, ..., done.json

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
import pyarrow.compute as pc
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
FORMAT = "frames-v2"  # decoded frames + per-frame arrays
ARRAYS_FORMAT = "arrays-v1"  # per-frame arrays only (decode in the loader)
LEGACY_FORMAT = "frames-v1"  # the cache that lived inside the store (STORE/cache/frames-v1)
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


def cache_folder(store: EpisodeStore, root: Path | None = None, frames: bool = True) -> Path:
    """Where the cache of `store`, as it is now, lives (see the module docstring); `frames`: with the
    decoded frames, else the per-frame arrays only."""
    from xwam_core.runs import safe_name, store_fingerprint

    resolved = store.path.resolve()
    path_hash = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    content = hashlib.sha256(store_fingerprint(store.path).encode())
    for data_file in store.data_files() + (store.video_files() if frames else []):
        try:
            stat = data_file.stat()
            content.update(f"{data_file.relative_to(store.path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        except FileNotFoundError:
            raise DataError(f"{data_file}: file missing (meta/episodes lists episodes in it)") from None
    return (
        (root or cache_root())
        / (FORMAT if frames else ARRAYS_FORMAT)
        / f"{safe_name(resolved.name)}-{path_hash}"
        / content.hexdigest()[:16]
    )


def open_frame_cache(
    store: EpisodeStore, root: Path | None = None, notify: Notify | None = None, frames: bool = True
) -> FrameCache:
    """The store's cache (`frames`: with the decoded frames), built first if it is not there yet (or is
    incomplete), by one process while others wait."""
    folder = cache_folder(store, root, frames)
    if not is_complete(folder):
        _build_once(store, folder, notify, frames)
    return FrameCache(folder, store)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a complete cache: done.json lists every array with its size."""
    try:
        done = json.loads((folder / DONE).read_text())
        return all((folder / name).stat().st_size == size for name, size in done["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def needed_bytes(store: EpisodeStore, frames: bool = True) -> int:
    """Bytes the cache of `store` takes on disk (decoded frames dominate when they are in it)."""
    n, (h, w), views = store.num_frames, store.image_size, len(store.views)
    per_frame = views * h * w * (3 + (2 if store.has_depth else 0)) if frames else 0
    per_frame += 4 * (len(store.state_names) + len(store.action_names))
    total = n * per_frame
    if store.has_cameras:
        moving = len(store.moving_views)
        total += 4 * (9 + 16) * (n * moving + len(store.episodes) * (views - moving))
    files = (views * (1 + store.has_depth) if frames else 0) + 2 * views * store.has_cameras + 2
    return total + files * _NPY_HEADER


def _build_once(store: EpisodeStore, folder: Path, notify: Notify | None, frames: bool = True) -> None:
    """Build the cache under a lock on the store's cache folder; nothing is left behind on failure."""
    with disk_errors(folder.parent, HINT):
        made = make_parents(folder)
    try:
        with _build_lock(folder.parent, notify):
            if is_complete(folder):  # built by the process we waited for
                return
            if folder.exists():  # incomplete (e.g. an array deleted by hand): built again
                shutil.rmtree(folder)
            legacy = store.path / "cache" / LEGACY_FORMAT
            if legacy.is_dir():
                report(
                    [
                        f"{store.path / 'cache'} is not read any more (the frame cache now lives in "
                        f"{folder.parent.parent}); delete it to free its space"
                    ],
                    notify,
                )
            try:
                _build(store, folder, notify, frames)
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


def _build(store: EpisodeStore, folder: Path, notify: Notify | None, frames: bool = True) -> None:
    """Write the per-frame arrays (and with `frames` decode every frame) of the store into `folder`,
    atomically; damaged data files -> DataError."""
    with atomic_folder(folder, needed_bytes=needed_bytes(store, frames), notify=notify) as tmp:
        n, (h, w) = store.num_frames, store.image_size
        if frames:
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
        done = {"frames": n, "decoded": frames, "store": str(store.path.resolve()), "files": files}
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
        for i in range(len(store.episodes)):
            episode = store.episodes[i]
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
    """States, actions and moving views' cameras per frame, streamed from the data files into memory-mapped
    .npy arrays and checked against meta/ shapes; static views' cameras once per episode."""
    n = store.num_frames
    per_frame: dict[str, tuple[str, tuple[int, ...]]] = {
        "observation.state": ("state.npy", (len(store.state_names),)),
        "action": ("action.npy", (len(store.action_names),)),
    }
    if store.has_cameras:
        for v in store.moving_views:
            per_frame[intrinsics_key(v)] = (f"intrinsics.{v}.npy", (3, 3))
            per_frame[extrinsics_key(v)] = (f"extrinsics.{v}.npy", (4, 4))
    arrays = {
        key: _preallocated(folder / name, np.float32, (n, *shape)) for key, (name, shape) in per_frame.items()
    }
    columns = [*per_frame, "episode_index"]
    starts = store.episodes.start
    files = store.data_files()
    offset = 0
    for path in files:
        parquet = _open_parquet(path, columns)
        try:
            for batch in parquet.iter_batches(batch_size=65536, columns=columns):
                rows = batch.num_rows
                if offset + rows > n:
                    raise DataError(
                        f"{path}: the data files hold more than meta/info.json's total_frames={n} frames"
                    )
                for key, (_, shape) in per_frame.items():
                    values = _numbers(batch.column(key), shape, path, key, n)
                    _check_values(values, path, key, offset, starts)
                    arrays[key][offset : offset + rows] = values
                got = np.asarray(batch.column("episode_index").to_numpy(zero_copy_only=False), np.int64)
                expected = np.searchsorted(starts, np.arange(offset, offset + rows), side="right") - 1
                wrong = np.nonzero(got != expected)[0]
                if len(wrong):
                    i = int(wrong[0])
                    raise DataError(
                        f"{path}: frame {offset + i} belongs to episode {got[i]}, but meta/episodes puts "
                        f"episode {expected[i]} there; the store is inconsistent, re-run `xwam prepare`"
                    )
                offset += rows
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"{path}: data file unreadable ({reason_of(exc, path)}); re-run `xwam prepare`"
            ) from None
    if offset != n:
        where = files[0] if len(files) == 1 else store.path / "data"
        raise DataError(f"{where}: holds {offset} frames, meta/info.json's total_frames says {n}")
    for arr in arrays.values():
        arr.flush()  # type: ignore[attr-defined]
    if store.has_cameras:
        for v, (intrinsics, extrinsics) in store.episodes.cameras.items():  # static views: per episode
            np.save(folder / f"intrinsics.{v}.npy", intrinsics)
            np.save(folder / f"extrinsics.{v}.npy", extrinsics)


def _numbers(column: Any, shape: tuple[int, ...], path: Path, key: str, n: int) -> np.ndarray:
    """A batch's list column (flat, or nested as Array2D) as (rows, *shape) float32; wrong widths -> DataError."""
    rows, width = len(column), int(np.prod(shape))
    values = column
    ok = values.null_count == 0
    while ok and (pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type)):
        ok = ok and values.null_count == 0
        values = values.flatten()
    if ok and not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        raise DataError(
            f"{path}: column {key} holds {values.type} values, expected {shape} numbers a frame "
            "(from meta/info.json); re-run `xwam prepare`"
        )
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused by _check_values
        flat = (
            np.asarray(values.to_numpy(zero_copy_only=False), np.float32) if ok else np.zeros(0, np.float32)
        )
    if flat.size != rows * width or (
        pa.types.is_list(column.type) and (np.asarray(pc.list_value_length(column)) != shape[0]).any()
    ):
        raise DataError(
            f"{path}: column {key} holds ragged or missing values, expected {(n, *shape)} (from meta/info.json)"
        )
    return flat.reshape(rows, *shape)


def _check_values(values: np.ndarray, path: Path, key: str, offset: int, starts: np.ndarray) -> None:
    """Finite numbers in every row; intrinsics (rows, 3, 3) also invertible. `offset`: the first row's frame."""
    rows = len(values)
    bad = ~np.isfinite(values.reshape(rows, -1)).all(axis=1)
    what = "NaN/inf (or a value beyond float32's range)"
    if not bad.any() and key.endswith(".intrinsics") and values.shape[1:] == (3, 3):
        bad = np.abs(np.linalg.det(values.astype(np.float64))) < 1e-12
        what = "singular intrinsics (expected fx, fy > 0)"
    if bad.any():
        frame = offset + int(np.flatnonzero(bad)[0])
        episode = int(np.searchsorted(starts, frame, side="right") - 1)
        raise DataError(
            f"{path}: {key} has {what} at frame {frame} (episode {episode}); re-run `xwam prepare`"
        )


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
    """A store's cache, indexed by global frame index: memory-mapped, each array opened on first use in
    each process (DataLoader workers map it themselves; the page cache is shared between them).

    state, action                (N, D) float32
    intrinsics[v], extrinsics[v] (N, 3, 3), (N, 4, 4): `cameras(v, frames, episode)` reads them (views that
                                 do not move keep one per episode; indexing by frames works either way)
    rgb(v, frames), depth_mm(v, frames)   decoded frames, when `decoded` (the frame cache is on)
    """

    def __init__(self, path: Path, store: EpisodeStore):
        self.path = path
        self.views = store.views
        self.has_depth = store.has_depth
        self.has_cameras = store.has_cameras
        try:
            self.decoded = bool(json.loads((path / DONE).read_text()).get("decoded", True))
        except (OSError, ValueError, AttributeError):
            self.decoded = False
        self.moving_views = set(store.moving_views) if self.has_cameras else set()
        self._starts = store.episodes.start  # (E,) first global frame of each episode
        self.num_frames = store.num_frames
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:  # workers re-open the maps themselves
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _map(self, name: str) -> np.ndarray:
        arr = self._maps.get(name)
        if arr is None:
            # a plain ndarray view of the map: indexing skips np.memmap's per-call Python overhead
            arr = self._maps[name] = np.load(self.path / name, mmap_mode="r").view(np.ndarray)
        return arr

    @property
    def state(self) -> np.ndarray:
        return self._map("state.npy")

    @property
    def action(self) -> np.ndarray:
        return self._map("action.npy")

    @property
    def intrinsics(self) -> dict[str, Any]:
        return {v: self._per_frame(f"intrinsics.{v}.npy", v) for v in self.views} if self.has_cameras else {}

    @property
    def extrinsics(self) -> dict[str, Any]:
        return {v: self._per_frame(f"extrinsics.{v}.npy", v) for v in self.views} if self.has_cameras else {}

    def _per_frame(self, name: str, view: str) -> Any:
        if view in self.moving_views:
            return self._map(name)
        return ByFrame(self._map(name), self._starts, self.num_frames)

    def cameras(self, view: str, frames: np.ndarray, episode: int) -> tuple[np.ndarray, np.ndarray]:
        """(T, 3, 3) intrinsics and (T, 4, 4) extrinsics of one view at global `frames` of `episode`."""
        if view in self.moving_views:
            return self._map(f"intrinsics.{view}.npy")[frames], self._map(f"extrinsics.{view}.npy")[frames]
        k = self._map(f"intrinsics.{view}.npy")[episode]
        e = self._map(f"extrinsics.{view}.npy")[episode]
        t = len(frames)
        return np.repeat(k[None], t, 0), np.repeat(e[None], t, 0)

    def rgb(self, view: str, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(T, H, W, 3) uint8 frames of one view, written into `out` when given."""
        return np.take(self._map(f"rgb.{view}.npy"), frames, axis=0, out=out)

    def depth_mm(self, view: str, frames: np.ndarray) -> np.ndarray:
        """(T, H, W) uint16 millimetres of one view."""
        return np.take(self._map(f"depth_mm.{view}.npy"), frames, axis=0)


class ByFrame:
    """Per-episode values read by global frame index: `by_frame[frames]` is the value of each frame's
    episode (a static camera kept once per episode, seen as if it were stored per frame)."""

    def __init__(self, per_episode: np.ndarray, starts: np.ndarray, total: int):
        self.per_episode, self.starts, self.total = per_episode, starts, total

    def __getitem__(self, frames: Any) -> np.ndarray:
        if isinstance(frames, slice):
            frames = np.arange(self.total)[frames]
        return self.per_episode[np.searchsorted(self.starts, frames, side="right") - 1]

    def __len__(self) -> int:
        return self.total

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        counts = np.diff(np.append(self.starts, self.total))
        out = np.repeat(self.per_episode, counts, axis=0)
        return out if dtype is None else out.astype(dtype)
