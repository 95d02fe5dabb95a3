"""Reading an episode store: its metadata, checked when the store is opened, and its frame cache.

Opening a store reads and checks only metadata (meta/info.json, stats.json, tasks and episodes) and that
every data and video file is there, so a damaged store is refused with one line naming the file and what
was expected before any work starts. Training reads frames through the decoded-frame cache
(xwam_core.data.frame_cache), which lives outside the store: a store can be read-only. `read_episode`
decodes one whole episode (both store formats: RGB from PNG cells or from the episode's video).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xwam_core.atomic import Notify
from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.frame_cache import FrameCache, open_frame_cache, reason_of
from xwam_core.data.store import (
    CODEBASE_VERSION,
    EPISODES_PATH,
    STORE_FORMATS,
    decode_png,
    depth_key,
    episode_camera_column,
    extrinsics_key,
    intrinsics_key,
    rgb_key,
)
from xwam_core.errors import DataError

__all__ = ["EpisodeMeta", "EpisodeStore", "EpisodeTable", "FrameCache"]

EPISODE_COLUMNS = (
    "episode_index",
    "tasks",
    "length",
    "success",
    "dataset_from_index",
    "data/chunk_index",
    "data/file_index",
)


@dataclass
class EpisodeMeta:
    index: int
    task: str
    length: int
    success: bool
    start: int  # global frame index of the episode's first frame
    chunk_index: int
    file_index: int
    # format 2: view -> (video chunk, video file, from_timestamp) of its RGB
    videos: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    # format 2, views that do not move: view -> ((3, 3) intrinsics, (4, 4) extrinsics), float32
    cameras: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


class EpisodeTable(Sequence[EpisodeMeta]):
    """meta/episodes as numpy columns, one entry per episode; `table[i]` makes episode i's EpisodeMeta.

    A store of 1.49 M episodes stays a few arrays (tens of MB), never a million Python objects: the
    window index, the held-out split and the loader read the columns.
    """

    def __init__(
        self,
        tasks: list[str],
        task_index: np.ndarray,
        length: np.ndarray,
        success: np.ndarray,
        start: np.ndarray,
        chunk_index: np.ndarray,
        file_index: np.ndarray,
        videos: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
        cameras: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ):
        self.tasks = tasks
        self.task_index = task_index  # (E,) int64, into `tasks`
        self.length = length  # (E,) int64
        self.success = success  # (E,) bool
        self.start = start  # (E,) int64: global frame index of each episode's first frame
        self.chunk_index, self.file_index = chunk_index, file_index  # (E,) int64: its data file
        self.videos = videos or {}  # view -> (chunk (E,), file (E,), from_timestamp (E,))
        self.cameras = cameras or {}  # static view -> ((E, 3, 3), (E, 4, 4)) float32

    def __len__(self) -> int:
        return len(self.length)

    @overload
    def __getitem__(self, i: int) -> EpisodeMeta: ...
    @overload
    def __getitem__(self, i: slice) -> list[EpisodeMeta]: ...
    def __getitem__(self, i: int | slice) -> EpisodeMeta | list[EpisodeMeta]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range ({n} episodes)")
        i = int(i) % n
        return EpisodeMeta(
            index=i,
            task=self.tasks[int(self.task_index[i])],
            length=int(self.length[i]),
            success=bool(self.success[i]),
            start=int(self.start[i]),
            chunk_index=int(self.chunk_index[i]),
            file_index=int(self.file_index[i]),
            videos={v: (int(c[i]), int(f[i]), float(t[i])) for v, (c, f, t) in self.videos.items()},
            cameras={v: (k[i], e[i]) for v, (k, e) in self.cameras.items()},
        )


class EpisodeStore:
    """An episode store on disk (see xwam_core.data.store for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: store not found (expected a folder made by `xwam prepare`)")
        self.info: dict[str, Any] = self._read_info()
        x = self.info["xwam"]
        self.views: list[str] = list(x["views"])
        self.image_size: tuple[int, int] = (int(x["image_size"][0]), int(x["image_size"][1]))
        self.has_depth: bool = bool(x["has_depth"])
        self.has_cameras: bool = bool(x["has_cameras"])
        # "relative" (imported from the xwam release): usable for training, not for point clouds
        self.depth_kind: str = str(x.get("depth_kind", "metric"))
        self.fps: float = float(self.info["fps"])
        self.store_format: int = int(x.get("store_format", 1))
        # views whose cameras are stored per frame (format 1: every view)
        self.moving_views: list[str] = (
            list(x.get("moving_views", [])) if self.store_format == 2 else self.views
        )
        self.stats: dict[str, Any] = self._read_stats()
        self.tasks: list[str] = self._read_tasks()
        self.episodes: EpisodeTable = read_episode_table(self.path, self.info, self.tasks)
        for data_file in self.data_files():
            if not data_file.is_file():
                raise DataError(f"{data_file}: data file missing (meta/episodes lists episodes in it)")
        for video_file in self.video_files():
            if not video_file.is_file():
                raise DataError(f"{video_file}: video file missing (meta/episodes lists episodes in it)")

    # ---------------------------------------------------------------------------------- checks
    def _read_info(self) -> dict[str, Any]:
        info_path = self.path / "meta" / "info.json"
        info = _read_json(info_path, f"is {self.path} an episode store?")
        if info.get("codebase_version") != CODEBASE_VERSION:
            raise DataError(
                f"{info_path}: not an xwam store (codebase_version {_short(info.get('codebase_version'))}, "
                f"expected {CODEBASE_VERSION!r}); import LeRobot datasets with "
                "`xwam prepare lerobot`"
            )
        if not isinstance(info.get("xwam"), dict):
            raise DataError(
                f"{info_path}: not an xwam store (no 'xwam' section with views, image size, depth and "
                "cameras); import LeRobot datasets with `xwam prepare lerobot`"
            )
        for key, check, expected in (
            ("fps", _positive_number, "a number > 0"),
            ("total_frames", _count, "an integer >= 0"),
            ("data_path", _data_path, "a path pattern with {chunk_index} and {file_index}"),
            ("features.observation.state.names", _names, "a list of state dimension names"),
            ("features.action.names", _names, "a list of action dimension names"),
            ("xwam.views", _views, "a non-empty list of distinct view names"),
            ("xwam.image_size", _image_size, "two sizes in pixels (height, width)"),
            ("xwam.has_depth", _bool, "true or false"),
            ("xwam.has_cameras", _bool, "true or false"),
            ("xwam.store_format", lambda v: v in STORE_FORMATS, f"one of {list(STORE_FORMATS)}"),
        ):
            if key == "xwam.store_format" and "store_format" not in info["xwam"]:
                continue  # stores written before format 2 have no store_format: format 1
            value = _lookup(info, key)
            if value is _MISSING:
                raise DataError(f"{info_path}: lacks {key!r}; expected {expected}")
            if not check(value):
                raise DataError(f"{info_path}: {key!r} is {_short(value)}, expected {expected}")
        if info["xwam"].get("store_format") == 2 and not _video_path(info.get("video_path")):
            raise DataError(
                f"{info_path}: 'video_path' is {_short(info.get('video_path'))}, expected a path pattern with "
                "{video_key}, {chunk_index} and {file_index}"
            )
        return info

    def _read_stats(self) -> dict[str, Any]:
        stats_path = self.path / "meta" / "stats.json"
        stats = _read_json(stats_path, "re-run `xwam prepare`")
        for key, names in (("action", self.action_names), ("observation.state", self.state_names)):
            entry = stats.get(key)
            if not isinstance(entry, dict):
                raise DataError(f"{stats_path}: lacks statistics of {key!r}; re-run `xwam prepare`")
            for stat in ("q01", "q99", "mean"):  # the normalization and the mean-action baseline
                values = entry.get(stat)
                expected = f"{len(names)} finite numbers (one per {key} dimension)"
                if not isinstance(values, list) or len(values) != len(names):
                    raise DataError(f"{stats_path}: {key}.{stat} is {_short(values)}, expected {expected}")
                bad = [i for i, v in enumerate(values) if not (_number(v) and math.isfinite(v))]
                if bad:
                    raise DataError(
                        f"{stats_path}: {key}.{stat} of dimension {bad[0]} is {values[bad[0]]!r}, expected {expected}"
                    )
        return stats

    def _read_tasks(self) -> list[str]:
        tasks = _read_parquet(self.path / "meta" / "tasks.parquet", ["task_index"])
        return [str(t) for t in tasks.sort_values("task_index").index]

    # ---------------------------------------------------------------------------------- meta
    @property
    def num_frames(self) -> int:
        return int(self.info["total_frames"])

    @property
    def state_names(self) -> list[str]:
        return list(self.info["features"]["observation.state"]["names"])

    @property
    def action_names(self) -> list[str]:
        return list(self.info["features"]["action"]["names"])

    def data_files(self) -> list[Path]:
        table = self.episodes
        pairs = np.unique(np.stack([table.chunk_index, table.file_index], 1), axis=0)
        return [
            self.path / self.info["data_path"].format(chunk_index=int(c), file_index=int(f)) for c, f in pairs
        ]

    def data_file(self, episode: EpisodeMeta) -> Path:
        """The data file holding `episode`'s rows."""
        return self.path / self.info["data_path"].format(
            chunk_index=episode.chunk_index, file_index=episode.file_index
        )

    def video_file(self, view: str, episode: EpisodeMeta) -> Path:
        """The video file holding the RGB of `view` in `episode` (format 2)."""
        chunk, file, _ = episode.videos[view]
        return self.path / self.info["video_path"].format(
            video_key=rgb_key(view), chunk_index=chunk, file_index=file
        )

    def video_files(self) -> list[Path]:
        """Every video file meta/episodes names (none in format 1)."""
        files = []
        for v, (chunks, file_indices, _) in self.episodes.videos.items():
            pairs = np.unique(np.stack([chunks, file_indices], 1), axis=0)
            files += [
                self.path
                / self.info["video_path"].format(video_key=rgb_key(v), chunk_index=int(c), file_index=int(f))
                for c, f in pairs
            ]
        return sorted(files)

    def read_episode(self, index: int) -> Episode:
        """One whole episode decoded from the store (not through the frame cache): RGB uint8, depth in
        metres, cameras per frame, as the source gave them (RGB within the video codec's tolerance)."""
        import pyarrow.parquet as pq

        from xwam_core.data.video import VideoReader

        if not 0 <= index < len(self.episodes):
            raise DataError(f"{self.path}: episode {index} out of range (the store has {len(self.episodes)})")
        meta = self.episodes[index]
        path = self.path / self.info["data_path"].format(
            chunk_index=meta.chunk_index, file_index=meta.file_index
        )
        table = pq.read_table(path, filters=[("episode_index", "=", index)])
        table = table.sort_by("frame_index")
        if table.num_rows != meta.length:
            raise DataError(
                f"{path}: episode {index} has {table.num_rows} rows, meta/episodes says {meta.length}"
            )
        n = meta.length

        def images(key: str) -> np.ndarray:
            return np.stack([decode_png(cell["bytes"]) for cell in table.column(key).to_pylist()])

        def numbers(key: str, shape: tuple[int, ...]) -> np.ndarray:
            return np.asarray(table.column(key).to_pylist(), dtype=np.float32).reshape(n, *shape)

        views = {}
        for v in self.views:
            if self.store_format == 1:
                rgb = images(rgb_key(v))
            else:
                with VideoReader(self.video_file(v, meta), self.fps) as reader:
                    rgb = reader.read(meta.videos[v][2] + np.arange(n) / self.fps)
            frames = ViewFrames(rgb=rgb)
            if self.has_depth:
                frames.depth = images(depth_key(v)).astype(np.float32) / np.float32(1000.0)
            if self.has_cameras and v in self.moving_views:
                frames.intrinsics = numbers(intrinsics_key(v), (3, 3))
                frames.extrinsics = numbers(extrinsics_key(v), (4, 4))
            elif self.has_cameras:
                k, e = meta.cameras[v]
                frames.intrinsics = np.repeat(k[None], n, axis=0)
                frames.extrinsics = np.repeat(e[None], n, axis=0)
            views[v] = frames
        return Episode(
            task=meta.task,
            views=views,
            state=numbers("observation.state", (len(self.state_names),)),
            action=numbers("action", (len(self.action_names),)),
            fps=self.fps,
            success=meta.success,
        )

    def read_columns(self, columns: list[str]) -> dict[str, Any]:
        """Columns of the whole store, as pyarrow arrays in global frame order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for path in self.data_files():
            try:
                tables.append(pq.read_table(path, columns=columns))
            except FileNotFoundError:
                raise DataError(f"{path}: data file missing (meta/episodes lists episodes in it)") from None
            except (pa.ArrowException, OSError) as e:
                raise DataError(
                    f"{path}: data file unreadable ({reason_of(e, path)}); re-run `xwam prepare`"
                ) from None
        table = pa.concat_tables(tables)
        return {c: table.column(c) for c in columns}

    # ---------------------------------------------------------------------------------- frame cache
    def frame_cache(
        self, root: Path | None = None, notify: Notify | None = None, frames: bool = True
    ) -> FrameCache:
        """The store's cache (outside the store: see xwam_core.data.frame_cache), built on first use:
        memory-mapped per-frame arrays, and with `frames` every frame decoded."""
        return open_frame_cache(self, root, notify, frames)


# ------------------------------------------------------------------------------------ checks
_MISSING = object()


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" ({e.msg} at line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{path}: not valid JSON{where}; {hint}") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: holds {type(data).__name__}, expected a JSON object; {hint}")
    return data


def _read_parquet(path: Path, columns: list[str]) -> Any:
    """A metadata Parquet file as a DataFrame (every column, its index kept), checked to have `columns`."""
    with _parquet_errors(path):
        frame = pq.read_table(path).to_pandas()
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: lacks column(s) {missing}; re-run `xwam prepare`")
    return frame


@contextlib.contextmanager
def _parquet_errors(path: Path) -> Iterator[None]:
    """A missing or unreadable metadata Parquet file as one line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: missing; re-run `xwam prepare`") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(
            f"{path}: not a readable Parquet file ({reason_of(e, path)}); re-run `xwam prepare`"
        ) from None


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    """info['features']['observation.state']['names'] for 'features.observation.state.names' (keys may
    hold dots: the longest key that matches is taken)."""
    value: Any = data
    rest = dotted
    while rest:
        if not isinstance(value, dict):
            return _MISSING
        for key in sorted(value, key=len, reverse=True):
            if rest == key or rest.startswith(key + "."):
                value, rest = value[key], rest[len(key) + 1 :]
                break
        else:
            return _MISSING
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_number(v: Any) -> bool:
    return _number(v) and math.isfinite(v) and v > 0


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


def _views(v: Any) -> bool:
    return _names(v) and len(v) > 0 and len(set(v)) == len(v)


def _image_size(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_count(x) and x > 0 for x in v)


def _data_path(v: Any) -> bool:
    try:
        return isinstance(v, str) and v.format(chunk_index=0, file_index=0) != v
    except (KeyError, IndexError, ValueError):
        return False


def _video_path(v: Any) -> bool:
    try:
        return isinstance(v, str) and v.format(video_key="k", chunk_index=0, file_index=0) != v
    except (KeyError, IndexError, ValueError):
        return False


# ------------------------------------------------------------------------------------ meta/episodes
def read_episode_table(path: Path, info: dict[str, Any], tasks: list[str]) -> EpisodeTable:
    """A store's meta/episodes as an EpisodeTable, checked with numpy (no Python loop over episodes):
    episodes in order and back to back, their tasks in `tasks`, their frames adding up to total_frames."""
    x = info["xwam"]
    store_format = int(x.get("store_format", 1))
    views = list(x["views"])
    moving = list(x.get("moving_views", [])) if store_format == 2 else views
    has_cameras = bool(x["has_cameras"])
    file = path / EPISODES_PATH
    columns = list(EPISODE_COLUMNS)
    if store_format == 2:
        for v in views:
            columns += [f"videos/{rgb_key(v)}/{k}" for k in ("chunk_index", "file_index", "from_timestamp")]
            if has_cameras and v not in moving:
                columns += [episode_camera_column(v, "intrinsics"), episode_camera_column(v, "extrinsics")]
    table = _read_arrow(file, columns)
    n = table.num_rows
    row = 0  # the row a malformed value is reported at

    def ints(name: str) -> np.ndarray:
        column = table.column(name)
        if column.null_count:
            raise ValueError(f"{name} is null")
        return np.asarray(column.to_numpy(), np.int64)

    try:
        index, length, start = ints("episode_index"), ints("length"), ints("dataset_from_index")
        chunk_index, file_index = ints("data/chunk_index"), ints("data/file_index")
        success = np.asarray(table.column("success").to_numpy(zero_copy_only=False), bool)
        task_names = table.column("tasks").combine_chunks()
        counts = np.asarray(pc.list_value_length(task_names).to_numpy(zero_copy_only=False), float)
        empty = np.nonzero(~(counts >= 1))[0]  # NaN: a null list
        if len(empty):
            row = int(empty[0])
            raise ValueError("tasks is empty")
        first_task = pc.list_element(task_names, 0)
        task_index = np.asarray(
            pc.index_in(first_task, value_set=pa.array(tasks, pa.string())).to_numpy(zero_copy_only=False),
            float,
        )
        expected_start = np.concatenate([[0], np.cumsum(length)[:-1]]) if n else np.zeros(0, np.int64)
        bad = np.nonzero((index != np.arange(n)) | (start != expected_start) | (length < 1))[0]
        if len(bad):
            i = int(bad[0])
            raise DataError(
                f"{file}: row {i} is episode {index[i]} at frames {start[i]}..{start[i] + length[i] - 1}, "
                f"expected episode {i} starting at frame {expected_start[i]} (episodes are stored in order, "
                "back to back)"
            )
        unknown = np.nonzero(np.isnan(task_index))[0]
        if len(unknown):
            i = int(unknown[0])
            raise DataError(
                f"{file}: episode {i} has task {first_task[i].as_py()!r}, which meta/tasks.parquet lacks"
            )
        videos: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        cameras: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if store_format == 2:
            for v in views:
                key = f"videos/{rgb_key(v)}"
                times = table.column(f"{key}/from_timestamp")
                if times.null_count:
                    raise ValueError(f"{key}/from_timestamp is null")
                starts = np.asarray(times.to_numpy(), np.float64)
                bad_t = np.flatnonzero(~np.isfinite(starts))
                if len(bad_t):
                    i = int(bad_t[0])
                    raise DataError(
                        f"{file}: episode {i} {key}/from_timestamp is {starts[i]}; expected a finite time in "
                        "seconds (re-run `xwam prepare`)"
                    )
                videos[v] = (ints(f"{key}/chunk_index"), ints(f"{key}/file_index"), starts)
                if has_cameras and v not in moving:
                    k = _fixed_rows(table, episode_camera_column(v, "intrinsics"), 9, v)
                    singular = np.flatnonzero(
                        np.abs(np.linalg.det(k.reshape(n, 3, 3).astype(np.float64))) < 1e-12
                    )
                    if len(singular):
                        raise DataError(
                            f"{file}: episode {int(singular[0])}: the intrinsics of view '{v}' are singular "
                            f"({k[singular[0]].tolist()}); expected fx, fy > 0 (re-run `xwam prepare`)"
                        )
                    e = _fixed_rows(table, episode_camera_column(v, "extrinsics"), 16, v)
                    cameras[v] = (k.reshape(n, 3, 3), e.reshape(n, 4, 4))
    except DataError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, pa.ArrowException) as exc:
        raise DataError(f"{file}: row {row} is malformed ({type(exc).__name__}: {exc})") from None
    total = int(info["total_frames"])
    if not n or int(length.sum()) != total:
        raise DataError(
            f"{file}: {n} episodes of {int(length.sum())} frames in all, meta/info.json's total_frames "
            f"says {total}"
        )
    return EpisodeTable(
        tasks,
        task_index.astype(np.int64),
        length,
        success,
        start,
        chunk_index,
        file_index,
        videos,
        cameras,
    )


def _fixed_rows(table: Any, name: str, width: int, view: str) -> np.ndarray:
    """A list<float> column of `width` numbers a row as an (E, width) float32 array, every value finite."""
    column = table.column(name).combine_chunks()
    if column.null_count:
        raise ValueError(f"cameras of view '{view}' are missing ({name} is null)")
    lengths = np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False))
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32)
    if (lengths != width).any() or not np.isfinite(values).all():
        raise ValueError(f"cameras of view '{view}' are not {width} finite numbers in every row ({name})")
    return values.reshape(len(column), width)


def _read_arrow(path: Path, columns: list[str]) -> pa.Table:
    """Columns of a metadata Parquet file (only those: meta/episodes also holds LeRobot's stats/*)."""
    with _parquet_errors(path):
        schema = pq.read_schema(path)
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: lacks column(s) {missing}; re-run `xwam prepare`")
    with _parquet_errors(path):
        return pq.read_table(path, columns=columns)
