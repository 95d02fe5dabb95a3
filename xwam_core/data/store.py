"""The episode store: a LeRobot v3.0 dataset folder with RGB-D and cameras for every view.

Layout (LeRobot's own reader opens it):
    meta/info.json                      codebase_version "v3.0", fps, features (every key), xwam section
    meta/stats.json                     per key: min, max, mean, std, count, q01, q99
    meta/tasks.parquet                  task text (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet   per episode: length, tasks, success, row range
    data/chunk-NNN/file-NNN.parquet     one row per frame
Per frame: index, episode_index, frame_index, timestamp, task_index, observation.state, action, and per
view `observation.images.<view>` (PNG), `observation.depth.<view>` (16-bit PNG, millimetres, 0 =
invalid), `observation.cameras.<view>.intrinsics` (3x3), `observation.cameras.<view>.extrinsics`
(4x4 camera-to-world, OpenCV axes).

Writing is atomic: the store is built in a hidden temporary folder next to the target and renamed
(xwam_core.atomic.atomic_folder, which also removes what an interrupted earlier run left there and turns
a full or read-only disk into one line).
"""

from __future__ import annotations

import io
import json
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
from xwam_core.data.stats import RunningStats
from xwam_core.errors import DataError

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000
DATA_FILE_MB = 100
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
DEPTH_MAX_MM = 65535


def rgb_key(view: str) -> str:
    return f"observation.images.{view}"


def depth_key(view: str) -> str:
    return f"observation.depth.{view}"


def intrinsics_key(view: str) -> str:
    return f"observation.cameras.{view}.intrinsics"


def extrinsics_key(view: str) -> str:
    return f"observation.cameras.{view}.extrinsics"


# ------------------------------------------------------------------------------------------ codecs
def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres; beyond the 16-bit range or non-positive -> 0 (invalid)."""
    mm = np.rint(depth_m * 1000.0)
    mm[(mm <= 0) | (mm > DEPTH_MAX_MM)] = 0
    return mm.astype(np.uint16)


# ------------------------------------------------------------------------------------------ schema
def _features(info: SourceInfo) -> dict[str, dict[str, Any]]:
    h, w = info.image_size
    feats: dict[str, dict[str, Any]] = {}
    for view in info.views:
        feats[rgb_key(view)] = {"dtype": "image", "shape": [h, w, 3], "names": ["height", "width", "channel"]}
        if info.has_depth:
            feats[depth_key(view)] = {
                "dtype": "image",
                "shape": [h, w, 1],
                "names": ["height", "width", "channel"],
                "info": {"is_depth_map": True, "unit": "mm", "encoding": "png-uint16", "invalid_value": 0},
            }
        if info.has_cameras:
            feats[intrinsics_key(view)] = {"dtype": "float32", "shape": [3, 3], "names": None}
            feats[extrinsics_key(view)] = {
                "dtype": "float32",
                "shape": [4, 4],
                "names": None,
                "info": {"convention": "camera-to-world, OpenCV axes (x right, y down, z forward)"},
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
        if feat["dtype"] == "image":
            hf[key] = datasets.Image()
        elif len(shape) == 2:
            hf[key] = datasets.Array2D(shape=tuple(shape), dtype=feat["dtype"])
        elif key in ("observation.state", "action"):
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
    ):
        self.out = Path(out)
        self.info = info
        self.overwrite = overwrite
        self.notify = notify
        self.source_options = source_options or {}
        if self.out.exists() and not overwrite:
            raise DataError(f"{self.out}: already exists; pass --overwrite to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise DataError(f"{self.out}: exists and is not a folder")
        self.features = _features(info)
        self.schema = _arrow_schema(self.features)
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
        index = len(self._episodes)
        episode.validate(f"episode {index} ({episode.task!r})")
        self._check_matches_info(episode, index)
        task_index = self._tasks.setdefault(episode.task, len(self._tasks))
        n = episode.length
        columns: dict[str, Any] = {
            "observation.state": episode.state.astype(np.float32).tolist(),
            "action": episode.action.astype(np.float32).tolist(),
            "timestamp": (np.arange(n, dtype=np.float32) / np.float32(self.info.fps)).tolist(),
            "frame_index": list(range(n)),
            "episode_index": [index] * n,
            "index": list(range(self._frames, self._frames + n)),
            "task_index": [task_index] * n,
        }
        for view_name in self.info.views:
            view = episode.views[view_name]
            columns[rgb_key(view_name)] = [{"bytes": encode_png(f), "path": None} for f in view.rgb]
            if self.info.has_depth:
                assert view.depth is not None
                columns[depth_key(view_name)] = [
                    {"bytes": encode_png(depth_to_mm(d)), "path": None} for d in view.depth
                ]
            if self.info.has_cameras:
                assert view.intrinsics is not None and view.extrinsics is not None
                columns[intrinsics_key(view_name)] = view.intrinsics.astype(np.float32).tolist()
                columns[extrinsics_key(view_name)] = view.extrinsics.astype(np.float32).tolist()
        table = pa.Table.from_pydict({k: columns[k] for k in self.schema.names}, schema=self.schema)
        self._write_rows(table)
        self._stats.update(episode, self.info)
        chunk, file = divmod(self._file_index, CHUNKS_SIZE)
        self._episodes.append(
            {
                "episode_index": index,
                "tasks": [episode.task],
                "length": n,
                "success": bool(episode.success),
                "dataset_from_index": self._frames,
                "dataset_to_index": self._frames + n,
                "data/chunk_index": chunk,
                "data/file_index": file,
            }
        )
        self._frames += n

    def _check_matches_info(self, episode: Episode, index: int) -> None:
        where = f"episode {index} ({episode.task!r})"
        missing = [v for v in self.info.views if v not in episode.views]
        if missing:
            raise DataError(f"{where}: lacks view(s) {missing}; expected views {self.info.views}")
        if episode.image_size != tuple(self.info.image_size):
            raise DataError(
                f"{where}: images are {episode.image_size}, expected {tuple(self.info.image_size)}"
            )
        for key, arr, names in (
            ("observation.state", episode.state, self.info.state_names),
            ("action", episode.action, self.info.action_names),
        ):
            if arr.shape[1] != len(names):
                raise DataError(f"{where}: {key} has {arr.shape[1]} dimensions, expected {len(names)}")
        for name in self.info.views:
            view: ViewFrames = episode.views[name]
            if self.info.has_depth and view.depth is None:
                raise DataError(f"{where}: view '{name}' has no depth but the source declares depth")
            if self.info.has_cameras and (view.intrinsics is None or view.extrinsics is None):
                raise DataError(f"{where}: view '{name}' has no cameras but the source declares cameras")

    def _write_rows(self, table: pa.Table) -> None:
        if self._parquet is not None and self._file_bytes > DATA_FILE_MB * 1024 * 1024:
            self._close_parquet()
            self._file_index += 1
        if self._parquet is None:
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
            "video_files_size_in_mb": 500,
            "fps": self.info.fps,
            "splits": {"train": f"0:{n_eps}"},
            "data_path": DATA_PATH,
            "video_path": None,
            "features": self.features,
            "xwam": {
                "source": self.info.name,
                "source_options": self.source_options,
                "views": list(self.info.views),
                "image_size": list(self.info.image_size),
                "has_depth": self.info.has_depth,
                "has_cameras": self.info.has_cameras,
                "depth_unit": "mm",
                "depth_kind": self.info.depth_kind,
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
