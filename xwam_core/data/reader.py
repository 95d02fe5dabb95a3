"""Reading an episode store: its metadata and the decoded frame cache that training and inference read.

The frame cache (`STORE/cache/frames-v1/`) holds every view's frames decoded once into memory-mapped
.npy arrays, so training windows are slices of arrays, not PNG decodes. It is built on first use,
atomically (temporary folder + rename); deleting it is always safe.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xwam_core.atomic import temporary_sibling
from xwam_core.data.store import (
    CODEBASE_VERSION,
    EPISODES_PATH,
    decode_png,
    depth_key,
    extrinsics_key,
    intrinsics_key,
    rgb_key,
)
from xwam_core.errors import DataError

CACHE_DIR = "cache/frames-v1"


@dataclass
class EpisodeMeta:
    index: int
    task: str
    length: int
    success: bool
    start: int  # global frame index of the episode's first frame
    chunk_index: int
    file_index: int


class EpisodeStore:
    """An episode store on disk (see xwam_core.data.store for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: store not found (expected a folder made by `xwam prepare`)")
        info_path = self.path / "meta" / "info.json"
        try:
            self.info: dict[str, Any] = json.loads(info_path.read_text())
        except FileNotFoundError:
            raise DataError(f"{info_path}: missing; is {self.path} an episode store?") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{info_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if self.info.get("codebase_version") != CODEBASE_VERSION or "xwam" not in self.info:
            raise DataError(
                f"{info_path}: not an xwam store (codebase_version {self.info.get('codebase_version')!r}, "
                f"expected {CODEBASE_VERSION!r} with an 'xwam' section); import LeRobot datasets with "
                "`xwam prepare lerobot`"
            )
        x = self.info["xwam"]
        self.views: list[str] = list(x["views"])
        self.image_size: tuple[int, int] = (int(x["image_size"][0]), int(x["image_size"][1]))
        self.has_depth: bool = bool(x["has_depth"])
        self.has_cameras: bool = bool(x["has_cameras"])
        self.fps: float = float(self.info["fps"])
        stats_path = self.path / "meta" / "stats.json"
        try:
            self.stats: dict[str, Any] = json.loads(stats_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise DataError(f"{stats_path}: missing or unreadable ({e})") from None
        try:
            import pandas as pd

            tasks = pd.read_parquet(self.path / "meta" / "tasks.parquet")
            episodes = pd.read_parquet(self.path / EPISODES_PATH)
        except Exception as e:
            raise DataError(f"{self.path / 'meta'}: tasks/episodes metadata unreadable ({e})") from None
        self.tasks: list[str] = [str(t) for t in tasks.sort_values("task_index").index]
        self.episodes: list[EpisodeMeta] = [
            EpisodeMeta(
                index=int(r["episode_index"]),
                task=str(r["tasks"][0]),
                length=int(r["length"]),
                success=bool(r["success"]),
                start=int(r["dataset_from_index"]),
                chunk_index=int(r["data/chunk_index"]),
                file_index=int(r["data/file_index"]),
            )
            for _, r in episodes.iterrows()
        ]

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
        pairs = sorted({(e.chunk_index, e.file_index) for e in self.episodes})
        return [self.path / self.info["data_path"].format(chunk_index=c, file_index=f) for c, f in pairs]

    def _read_columns(self, columns: list[str]) -> dict[str, Any]:
        """Columns of the whole store, as pyarrow arrays in global frame order."""
        import pyarrow as pa

        tables = []
        for path in self.data_files():
            try:
                tables.append(pq.read_table(path, columns=columns))
            except FileNotFoundError:
                raise DataError(f"{path}: data file missing") from None
            except (pa.ArrowInvalid, OSError) as e:
                raise DataError(f"{path}: data file unreadable ({e})") from None
        table = pa.concat_tables(tables)
        return {c: table.column(c) for c in columns}

    # ---------------------------------------------------------------------------------- frame cache
    def frame_cache(self) -> FrameCache:
        """The decoded-frame cache, built on first use."""
        cache_path = self.path / CACHE_DIR
        if not (cache_path / "done.json").exists():
            self._build_cache(cache_path)
        return FrameCache(cache_path, self)

    def _build_cache(self, cache_path: Path) -> None:
        tmp = temporary_sibling(cache_path)
        tmp.mkdir(parents=True)
        try:
            n = self.num_frames
            h, w = self.image_size
            arrays: dict[str, np.memmap] = {}
            for v in self.views:
                arrays[rgb_key(v)] = np.lib.format.open_memmap(
                    tmp / f"rgb.{v}.npy", "w+", np.uint8, (n, h, w, 3)
                )
                if self.has_depth:
                    arrays[depth_key(v)] = np.lib.format.open_memmap(
                        tmp / f"depth_mm.{v}.npy", "w+", np.uint16, (n, h, w)
                    )
            offset = 0
            for path in self.data_files():
                pf = pq.ParquetFile(path)
                for batch in pf.iter_batches(batch_size=256, columns=list(arrays)):
                    rows = batch.num_rows
                    for key, arr in arrays.items():
                        for i, cell in enumerate(batch.column(key).to_pylist()):
                            arr[offset + i] = decode_png(cell["bytes"])
                    offset += rows
            if offset != n:
                raise DataError(f"{self.path}: data files hold {offset} frames, meta/info.json says {n}")
            for arr in arrays.values():
                arr.flush()
            small = ["observation.state", "action", "episode_index", "frame_index"]
            if self.has_cameras:
                small += [intrinsics_key(v) for v in self.views] + [extrinsics_key(v) for v in self.views]
            cols = self._read_columns(small)
            np.save(tmp / "state.npy", np.asarray(cols["observation.state"].to_pylist(), np.float32))
            np.save(tmp / "action.npy", np.asarray(cols["action"].to_pylist(), np.float32))
            np.save(tmp / "episode_index.npy", np.asarray(cols["episode_index"].to_pylist(), np.int64))
            if self.has_cameras:
                for v in self.views:
                    np.save(
                        tmp / f"intrinsics.{v}.npy",
                        np.asarray(cols[intrinsics_key(v)].to_pylist(), np.float32),
                    )
                    np.save(
                        tmp / f"extrinsics.{v}.npy",
                        np.asarray(cols[extrinsics_key(v)].to_pylist(), np.float32),
                    )
            (tmp / "done.json").write_text(json.dumps({"frames": n}))
            # not atomic.replace_folder: a complete cache is never replaced. If another process built
            # it meanwhile, the rename fails on the non-empty folder and theirs (as good) is kept.
            try:
                os.replace(tmp, cache_path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


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
