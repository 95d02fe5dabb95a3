"""The episode store: a LeRobot v3.0 dataset folder with RGB-D and cameras for every view.

Format 2 (written by default; docs/data.md says why each codec):
    meta/info.json                      codebase_version "v3.0", fps, features, xwam section (store_format 2)
    meta/stats.json                     per key: min, max, mean, std, count, q01, q99
    meta/tasks.parquet                  task text (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet   per episode: length, tasks, success, row range, data and
                                        video files, LeRobot's meta/episodes/* and stats/* columns, and the
                                        cameras of views that do not move (cameras/<view>/intrinsics ...)
    data/chunk-NNN/file-NNN.parquet     one row per frame
    videos/observation.images.<view>/chunk-NNN/file-NNN.mp4   RGB, one file per episode (AV1)
Per frame: index, episode_index, frame_index, timestamp, task_index, observation.state, action, and per
view `observation.depth.<view>` (16-bit PNG, millimetres, 0 = invalid, at most 32767 so LeRobot's int16
tensors never wrap) and, for moving views only, `observation.cameras.<view>.intrinsics` (9 floats, 3x3
row-major) and `.extrinsics` (16 floats, 4x4 camera-to-world, OpenCV axes).

Format 1 (`store_format=1`, still read): RGB as PNG inside the data parquet and every view's cameras per
frame as 3x3/4x4 arrays.

Writing is atomic: the store is built in a hidden temporary folder next to the target and renamed
(xwam_core.atomic.atomic_folder, which also removes what an interrupted earlier run left there and turns
a full or read-only disk into one line).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from xwam_core.atomic import Notify, atomic_folder
from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.sources.base import SourceInfo
from xwam_core.data.stats import RunningStats, episode_stats_from, stats_samples
from xwam_core.data.video import StoreVideo, encode_store_video, store_video, video_feature_info
from xwam_core.errors import DataError

CODEBASE_VERSION = "v3.0"
STORE_FORMATS = (1, 2)
STORE_FORMAT = 2  # what `xwam prepare` writes
CHUNKS_SIZE = 1000
DATA_FILE_MB = 100
VIDEO_FILE_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
# LeRobot reads a 16-bit PNG as an int16 tensor: above 32767 mm it would wrap negative, so depth
# beyond 32.767 m is stored as 0 (invalid) in every format
DEPTH_MAX_MM = 32767


def rgb_key(view: str) -> str:
    return f"observation.images.{view}"


def depth_key(view: str) -> str:
    return f"observation.depth.{view}"


def intrinsics_key(view: str) -> str:
    return f"observation.cameras.{view}.intrinsics"


def extrinsics_key(view: str) -> str:
    return f"observation.cameras.{view}.extrinsics"


def episode_camera_column(view: str, which: str) -> str:
    """meta/episodes column of a static view's camera: cameras/<view>/intrinsics (9) or extrinsics (16)."""
    return f"cameras/{view}/{which}"


# ------------------------------------------------------------------------------------------ codecs
def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


# zlib level of the depth PNGs in format 2. Measured on Meta-World depth (3 views, 256x256, per
# view-frame): level 1 12.3 KB in 5 ms, level 6 9.2 KB in 10 ms, level 9 8.7 KB in 57 ms
DEPTH_PNG_LEVEL = 6


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres; beyond DEPTH_MAX_MM (32.767 m) or non-positive -> 0 (invalid)."""
    mm = np.rint(depth_m * 1000.0)
    mm[(mm <= 0) | (mm > DEPTH_MAX_MM)] = 0
    return mm.astype(np.uint16)


# ------------------------------------------------------------------------------------------ schema
def _features(
    info: SourceInfo, store_format: int, moving: list[str], video: StoreVideo | None
) -> dict[str, dict[str, Any]]:
    h, w = info.image_size
    feats: dict[str, dict[str, Any]] = {}
    convention = "camera-to-world, OpenCV axes (x right, y down, z forward)"
    for view in info.views:
        if store_format == 1:
            feats[rgb_key(view)] = {
                "dtype": "image",
                "shape": [h, w, 3],
                "names": ["height", "width", "channel"],
            }
        else:
            assert video is not None
            feats[rgb_key(view)] = {
                "dtype": "video",
                "shape": [h, w, 3],
                "names": ["height", "width", "channels"],
                "info": video_feature_info(video, h, w, info.fps),
            }
        if info.has_depth:
            feats[depth_key(view)] = {
                "dtype": "image",
                "shape": [h, w, 1],
                "names": ["height", "width", "channel"],
                "info": {
                    "is_depth_map": True,
                    "unit": "mm",
                    "encoding": "png-uint16",
                    "invalid_value": 0,
                    "max_value": DEPTH_MAX_MM,
                },
            }
        if info.has_cameras and store_format == 1:
            feats[intrinsics_key(view)] = {"dtype": "float32", "shape": [3, 3], "names": None}
            feats[extrinsics_key(view)] = {
                "dtype": "float32",
                "shape": [4, 4],
                "names": None,
                "info": {"convention": convention},
            }
        elif info.has_cameras and view in moving:  # flat vectors: LeRobot's tools copy them as they are
            feats[intrinsics_key(view)] = {
                "dtype": "float32",
                "shape": [9],
                "names": None,
                "info": {"layout": "3x3 row-major"},
            }
            feats[extrinsics_key(view)] = {
                "dtype": "float32",
                "shape": [16],
                "names": None,
                "info": {"layout": "4x4 row-major", "convention": convention},
            }
    feats["observation.state"] = {
        "dtype": "float32",
        "shape": [len(info.state_names)],
        "names": list(info.state_names),
    }
    feats["action"] = {
        "dtype": "float32",
        "shape": [len(info.action_names)],
        "names": list(info.action_names),
    }
    for key, dtype in (
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ):
        feats[key] = {"dtype": dtype, "shape": [1], "names": None}
    return feats


def _arrow_schema(features: dict[str, dict[str, Any]]) -> pa.Schema:
    """Arrow schema with Hugging Face `datasets` feature metadata, so datasets/LeRobot decode it."""
    import datasets

    hf: dict[str, Any] = {}
    for key, feat in features.items():
        shape = feat["shape"]
        if feat["dtype"] == "video":
            continue  # in videos/, not in the data files
        if feat["dtype"] == "image":
            hf[key] = datasets.Image()
        elif len(shape) == 2:
            hf[key] = datasets.Array2D(shape=tuple(shape), dtype=feat["dtype"])
        elif key in ("observation.state", "action") or shape[0] > 1:
            hf[key] = datasets.Sequence(datasets.Value(feat["dtype"]), length=shape[0])
        else:
            hf[key] = datasets.Value(feat["dtype"])
    return datasets.Features(hf).arrow_schema


# ------------------------------------------------------------------------------------------ writer
@dataclass
class StoreSummary:
    path: str
    episodes: int
    frames: int
    success_rate: float
    views: list[str]
    image_size: tuple[int, int]
    bytes_on_disk: int
    seconds: float
    has_depth: bool
    has_cameras: bool


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class StoreWriter:
    """Writes episodes into a new store. Use as a context manager: on error nothing is left behind.

    >>> with StoreWriter(out, source.info(), overwrite=False) as writer:
    ...     for episode in source.episodes():
    ...         writer.add(episode)
    >>> summary = writer.summary
    """

    tmp: Path  # the temporary folder the store is built in, while inside the `with` block

    def __init__(
        self,
        out: str | Path,
        info: SourceInfo,
        overwrite: bool = False,
        source_options: dict | None = None,
        notify: Notify | None = None,
        store_format: int = STORE_FORMAT,
        video: StoreVideo | None = None,
    ):
        if store_format not in STORE_FORMATS:
            raise DataError(f"store_format={store_format!r}: expected one of {list(STORE_FORMATS)}")
        self.store_format = store_format
        self.out = Path(out)
        self.info = info
        self.overwrite = overwrite
        self.notify = notify
        self.source_options = source_options or {}
        if self.out.exists() and not overwrite:
            raise DataError(f"{self.out}: already exists; pass --overwrite to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"{self.out}: exists and is not a folder")
        # format 2's RGB video (xwam_core.data.video.store_video: LeRobot's AV1 unless told otherwise)
        self.video = (video or store_video()) if store_format == 2 else None
        # format 2 decides which views move (per-frame cameras) before the first episode is written
        self.moving: list[str] | None = list(info.moving_views) if info.moving_views is not None else None
        if not info.has_cameras:
            self.moving = []
        if store_format == 1 and self.moving is None:
            self.moving = []
        self.features: dict[str, dict[str, Any]] = {}
        self.schema: pa.Schema | None = None
        if self.moving is not None:
            self._make_schema()
        self.summary: StoreSummary | None = None
        self._stack = ExitStack()
        self._t0 = time.perf_counter()
        self._tasks: dict[str, int] = {}
        self._episodes: list[dict[str, Any]] = []
        self._frames = 0
        self._file_index = 0
        self._file_bytes = 0
        self._parquet: pq.ParquetWriter | None = None
        self._stats = RunningStats()
        self._frame_schema: pa.Schema | None = None

    def _make_schema(self) -> None:
        assert self.moving is not None
        unknown = [v for v in self.moving if v not in self.info.views]
        if unknown:
            raise DataError(f"moving_views {unknown} are not views of the source {self.info.views}")
        self.features = _features(self.info, self.store_format, self.moving, self.video)
        self.schema = _arrow_schema(self.features)

    # context manager: the store is built in atomic_folder's temporary folder, which is renamed onto
    # `out` when complete and removed (with parent folders made for it) on any error, Ctrl-C included
    def __enter__(self) -> StoreWriter:
        self.tmp = self._stack.enter_context(
            atomic_folder(self.out, overwrite=self.overwrite, notify=self.notify, replaces="meta/info.json")
        )
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is not None:
            self._close_parquet()
            return bool(self._stack.__exit__(exc_type, exc, tb))
        self.finish()
        return False

    # -------------------------------------------------------------------------------- episodes
    def add(self, episode: Episode) -> None:
        """Encode `episode` here and append it (xwam_core.data.shards encodes in worker processes and
        appends with `add_encoded`)."""
        index = len(self._episodes)
        scratch = self.tmp / ".encoding"
        if self._frame_schema is None:
            self._frame_schema = frame_schema(self.info, self.store_format)
        encoded = encode_episode(
            episode, index, self.info, self.store_format, scratch, self._frame_schema, self.video
        )
        self.add_encoded(encoded, move=True)

    def add_encoded(self, encoded: EncodedEpisode, move: bool = False) -> None:
        """Append an episode encoded by `encode_episode`: give it its episode index, frame indices, task
        index and place in the data and video files. `move`: its video files are moved into the store
        (else hard-linked, or copied where links cannot be made, so the encoded episode stays intact)."""
        index = len(self._episodes)
        where = f"episode {index} ({encoded.task!r})"
        if self.moving is None:  # the views whose cameras change in the first episode
            self.moving = [v for v in self.info.views if v in encoded.cameras and _moves(*encoded.cameras[v])]
            self._make_schema()
        assert self.schema is not None
        task_index = self._tasks.setdefault(encoded.task, len(self._tasks))
        n = encoded.length
        columns: dict[str, Any] = {k: encoded.frames.column(k) for k in encoded.frames.column_names}
        columns.update(
            {
                "episode_index": [index] * n,
                "index": list(range(self._frames, self._frames + n)),
                "task_index": [task_index] * n,
            }
        )
        chunk, file = divmod(self._file_index, CHUNKS_SIZE)
        row: dict[str, Any] = {
            "episode_index": index,
            "tasks": [encoded.task],
            "length": n,
            "success": bool(encoded.success),
            "dataset_from_index": self._frames,
            "dataset_to_index": self._frames + n,
            "data/chunk_index": chunk,
            "data/file_index": file,
        }
        for view_name in self.info.views:
            if self.store_format == 2:
                key = rgb_key(view_name)
                row.update(self._place_video(key, index, encoded.videos[key], n, move))
            if not self.info.has_cameras:
                continue
            intrinsics, extrinsics = encoded.cameras[view_name]  # (T, 9), (T, 16)
            if self.store_format == 1:
                columns[intrinsics_key(view_name)] = intrinsics.reshape(n, 3, 3).tolist()
                columns[extrinsics_key(view_name)] = extrinsics.reshape(n, 4, 4).tolist()
            elif view_name in self.moving:
                columns[intrinsics_key(view_name)] = intrinsics.tolist()
                columns[extrinsics_key(view_name)] = extrinsics.tolist()
            else:
                if _moves(intrinsics, extrinsics):
                    raise DataError(
                        f"{where}: the camera of view '{view_name}' moves, but it did not in the first episode, "
                        "so the store keeps it once per episode; declare it in the source's moving_views"
                    )
                row[episode_camera_column(view_name, "intrinsics")] = intrinsics[0].tolist()
                row[episode_camera_column(view_name, "extrinsics")] = extrinsics[0].tolist()
        table = pa.Table.from_pydict({k: columns[k] for k in self.schema.names}, schema=self.schema)
        self._write_rows(table)
        self._stats.add(encoded.stats)
        if self.store_format == 2:
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
            row.update(episode_stats_from(encoded.stats))
        self._episodes.append(row)
        self._frames += n

    def _place_video(self, key: str, index: int, encoded: Path, n: int, move: bool) -> dict[str, Any]:
        """One episode's RGB of one view as its own video file; its meta/episodes columns."""
        chunk, file = divmod(index, CHUNKS_SIZE)
        path = self.tmp / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(encoded, path)
        else:
            link_or_copy(encoded, path)
        return {
            f"videos/{key}/chunk_index": chunk,
            f"videos/{key}/file_index": file,
            f"videos/{key}/from_timestamp": 0.0,
            f"videos/{key}/to_timestamp": n / self.info.fps,
        }

    def _write_rows(self, table: pa.Table) -> None:
        if self._parquet is not None and self._file_bytes > DATA_FILE_MB * 1024 * 1024:
            self._close_parquet()
            self._file_index += 1
        if self._parquet is None:
            assert self.schema is not None
            chunk, file = divmod(self._file_index, CHUNKS_SIZE)
            path = self.tmp / DATA_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._parquet = pq.ParquetWriter(path, self.schema)
            self._file_bytes = 0
        self._parquet.write_table(table)
        self._file_bytes += table.nbytes

    def _close_parquet(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None

    # -------------------------------------------------------------------------------- finish
    def finish(self) -> StoreSummary:
        """Write the metadata and move the store into place (called on leaving the `with` block)."""
        with self._stack:  # an error here discards the temporary folder like one while adding
            self._close_parquet()
            if (self.tmp / ".encoding").is_dir():
                shutil.rmtree(self.tmp / ".encoding")
            if not self._episodes:
                raise DataError(f"{self.out}: the source produced no episodes")
            self._write_meta()
        successes = sum(e["success"] for e in self._episodes)
        self.summary = StoreSummary(
            path=str(self.out),
            episodes=len(self._episodes),
            frames=self._frames,
            success_rate=successes / len(self._episodes),
            views=list(self.info.views),
            image_size=tuple(self.info.image_size),  # type: ignore[arg-type]
            bytes_on_disk=_dir_bytes(self.out),
            seconds=time.perf_counter() - self._t0,
            has_depth=self.info.has_depth,
            has_cameras=self.info.has_cameras,
        )
        return self.summary

    def _write_meta(self) -> None:
        import pandas as pd

        meta = self.tmp / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        n_eps = len(self._episodes)
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.info.robot_type,
            "total_episodes": n_eps,
            "total_frames": self._frames,
            "total_tasks": len(self._tasks),
            "chunks_size": CHUNKS_SIZE,
            "data_files_size_in_mb": DATA_FILE_MB,
            "video_files_size_in_mb": VIDEO_FILE_MB,
            "fps": self.info.fps,
            "splits": {"train": f"0:{n_eps}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.store_format == 2 else None,
            "features": self.features,
            "xwam": {
                "store_format": self.store_format,
                "source": self.info.name,
                "source_options": self.source_options,
                "views": list(self.info.views),
                "image_size": list(self.info.image_size),
                "has_depth": self.info.has_depth,
                "has_cameras": self.info.has_cameras,
                "depth_unit": "mm",
                "depth_kind": self.info.depth_kind,
                "depth_max_mm": DEPTH_MAX_MM,
                "moving_views": list(self.moving or []),
                "video_codec": self.video.codec if self.video else None,
                "video_crf": self.video.crf if self.video else None,
                "camera_convention": "extrinsics are camera-to-world with OpenCV camera axes",
                "source_extra": self.info.extra,
            },
        }
        (meta / "info.json").write_text(json.dumps(info, indent=2))
        (meta / "stats.json").write_text(json.dumps(self._stats.result(), indent=2))
        tasks = pd.DataFrame(
            {"task_index": list(self._tasks.values())}, index=pd.Index(list(self._tasks), name="task")
        )
        tasks.to_parquet(meta / "tasks.parquet")
        pd.DataFrame(self._episodes).to_parquet(self.tmp / EPISODES_PATH, index=False)


def _moves(intrinsics: np.ndarray, extrinsics: np.ndarray) -> bool:
    """Whether a camera changes within the episode (exactly: stored values are compared), from its
    (T, 9) intrinsics and (T, 16) extrinsics."""
    return bool((intrinsics != intrinsics[:1]).any() or (extrinsics != extrinsics[:1]).any())


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (instant, no space), or a copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ------------------------------------------------------------------------------------------ encoding
@dataclass
class EncodedEpisode:
    """One episode encoded for the store, before it has a place there: everything that costs time
    (video, PNG and statistics) is done, what depends on its position (episode, frame and task indices,
    file names, whether its cameras are stored per frame) is left to `StoreWriter.add_encoded`."""

    task: str
    length: int
    success: bool
    frames: (
        pa.Table
    )  # per frame: state, action, timestamp, frame_index, depth PNGs (and RGB PNGs in format 1)
    cameras: dict[
        str, tuple[np.ndarray, np.ndarray]
    ]  # view -> (T, 9) intrinsics, (T, 16) extrinsics, float32
    videos: dict[str, Path]  # RGB key -> its encoded video file (format 2)
    stats: dict[str, np.ndarray]  # xwam_core.data.stats.stats_samples


def frame_schema(info: SourceInfo, store_format: int) -> pa.Schema:
    """The Arrow schema of `EncodedEpisode.frames` (the store's columns that need no position in it)."""
    full = _arrow_schema(_features(info, store_format, [], store_video() if store_format == 2 else None))
    placed = {"index", "episode_index", "task_index"}
    return pa.schema([f for f in full if f.name not in placed and ".cameras." not in f.name])


def encode_episode(
    episode: Episode,
    index: int,
    info: SourceInfo,
    store_format: int,
    video_dir: Path,
    schema: pa.Schema | None = None,
    video: StoreVideo | None = None,
) -> EncodedEpisode:
    """Validate and encode episode number `index` of a store of `info`; its videos go into `video_dir`.
    `schema`: `frame_schema(info, store_format)`, when the caller keeps it for many episodes; `video`: how
    format 2 encodes RGB (default: `store_video()`)."""
    where = f"episode {index} ({episode.task!r})"
    episode.validate(where)
    check_matches_info(episode, info, where)
    n = episode.length
    columns: dict[str, Any] = {
        "observation.state": episode.state.astype(np.float32).tolist(),
        "action": episode.action.astype(np.float32).tolist(),
        "timestamp": (np.arange(n, dtype=np.float32) / np.float32(info.fps)).tolist(),
        "frame_index": list(range(n)),
    }
    videos: dict[str, Path] = {}
    cameras: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for view_name in info.views:
        view = episode.views[view_name]
        if store_format == 1:
            columns[rgb_key(view_name)] = [{"bytes": encode_png(f), "path": None} for f in view.rgb]
        else:
            video_dir.mkdir(parents=True, exist_ok=True)
            path = video_dir / f"{rgb_key(view_name)}.mp4"
            encode_store_video(path, view.rgb, info.fps, video)
            videos[rgb_key(view_name)] = path
        if info.has_depth:
            assert view.depth is not None
            level = 1 if store_format == 1 else DEPTH_PNG_LEVEL
            columns[depth_key(view_name)] = [
                {"bytes": encode_png(depth_to_mm(d), level), "path": None} for d in view.depth
            ]
        if info.has_cameras:
            assert view.intrinsics is not None and view.extrinsics is not None
            cameras[view_name] = (
                view.intrinsics.reshape(n, 9).astype(np.float32),
                view.extrinsics.reshape(n, 16).astype(np.float32),
            )
    schema = schema or frame_schema(info, store_format)
    frames = pa.Table.from_pydict({f.name: columns[f.name] for f in schema}, schema=schema)
    return EncodedEpisode(
        task=episode.task,
        length=n,
        success=bool(episode.success),
        frames=frames,
        cameras=cameras,
        videos=videos,
        stats=stats_samples(episode, info),
    )


def check_matches_info(episode: Episode, info: SourceInfo, where: str) -> None:
    """Refuse an episode whose views, image size, dimensions, depth or cameras differ from `info`."""
    missing = [v for v in info.views if v not in episode.views]
    if missing:
        raise DataError(f"{where}: lacks view(s) {missing}; expected views {info.views}")
    if episode.image_size != tuple(info.image_size):
        raise DataError(f"{where}: images are {episode.image_size}, expected {tuple(info.image_size)}")
    for key, arr, names in (
        ("observation.state", episode.state, info.state_names),
        ("action", episode.action, info.action_names),
    ):
        if arr.shape[1] != len(names):
            raise DataError(f"{where}: {key} has {arr.shape[1]} dimensions, expected {len(names)}")
    for name in info.views:
        view: ViewFrames = episode.views[name]
        if info.has_depth and view.depth is None:
            raise DataError(f"{where}: view '{name}' has no depth but the source declares depth")
        if info.has_cameras and (view.intrinsics is None or view.extrinsics is None):
            raise DataError(f"{where}: view '{name}' has no cameras but the source declares cameras")
