"""Import a LeRobot v2.1 or v3.0 dataset folder as X-WAM episodes (no dependency on `lerobot`).

Layouts read (see docs/sources/lerobot.md):
- v3.0: meta/info.json, meta/tasks.parquet, meta/episodes/chunk-*/file-*.parquet, data files and
  mp4 files holding several episodes each (an episode's frames start at its from_timestamp).
- v2.1: meta/info.json, meta/episodes.jsonl, meta/tasks.jsonl, one parquet and one mp4 per episode.

Everything that can be checked without decoding (info.json, features, the camera mapping, the
episode metadata, that every needed file exists) is checked in the constructor.
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.data.video import GRAY, GRAY16, RGB, VideoReader, pix_fmt_bits
from xwam_core.errors import DataError

SUPPORTED_VERSIONS = ("v2.1", "v3.0")
CAMERA_DTYPES = ("video", "image")
MM = 0.001  # default metres per unit of 16-bit depth (millimetres)


@dataclass
class _Stream:
    """One visual feature (RGB or depth) of one view."""

    key: str
    form: str  # "video" | "image"
    is_depth: bool = False
    # depth only: metres per stored unit (None: image depth, decided from the decoded bit depth)
    scale: float | None = None
    video_fmt: str = RGB  # decode format for video features


@dataclass
class _View:
    name: str
    rgb: _Stream
    depth: _Stream | None = None
    intrinsics_key: str | None = None
    extrinsics_key: str | None = None


@dataclass
class _DataFile:
    """The data parquet read last (a v3 file holds several consecutive episodes: read it once)."""

    path: str | None = None
    table: pa.Table | None = None
    episode_index: np.ndarray | None = None


@dataclass
class _EpisodeMeta:
    index: int
    length: int
    tasks: list[str]
    success: bool | None
    data_file: str  # absolute path
    videos: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> (abs path, from_timestamp)
    # view -> ((3, 3), (4, 4)) from meta/episodes `cameras/<name>/intrinsics|extrinsics` (xwam's stores keep
    # the cameras of views that do not move there, once per episode)
    cameras: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _is_depth(key: str, feat: dict) -> bool:
    info = feat.get("info") or {}
    return bool(isinstance(info, dict) and info.get("video.is_depth_map") is True) or "depth" in key.lower()


def _depth_base(key: str) -> str:
    """Camera name a depth key belongs to: observation.images.front_depth / observation.depth.front -> front."""
    parts = [p for p in key.split(".") if p.lower() != "depth"]
    name = parts[-1] if parts else key
    low = name.lower()
    for suffix in ("_depth", "-depth"):
        if low.endswith(suffix):
            return name[: -len(suffix)]
    for prefix in ("depth_", "depth-"):
        if low.startswith(prefix):
            return name[len(prefix) :]
    return name


def _int_cell(value: object, where: str, what: str) -> int:
    """A metadata cell that must be a whole number (an int, or a float without a fraction)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise DataError(f"{where}: {what} is {value!r}; expected a whole number")


def _time_cell(value: object, where: str, what: str) -> float:
    """A metadata cell that must be a finite time in seconds."""
    if (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)
    ):
        return float(value)
    raise DataError(f"{where}: {what} is {value!r}; expected a finite time in seconds")


def _fmt(template: str, where: str, **kw: object) -> str:
    try:
        return template.format(**kw)
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise DataError(
            f"{where}: path template '{template}' cannot be filled ({type(exc).__name__}: {exc})"
        ) from None


def _check_spans(spans: dict[str, list[tuple[float, float, int, str]]], tol: float) -> None:
    """Episodes sharing one mp4 must cover disjoint [from_timestamp, to_timestamp) ranges of it."""
    for path, items in spans.items():
        items = sorted(items)
        for (a0, a1, ea, _), (b0, b1, eb, wb) in itertools.pairwise(items):
            if b0 < a1 - tol:
                raise DataError(
                    f"{wb}: episode {eb} covers {b0:.3f}..{b1:.3f}s of {path}, overlapping episode {ea} "
                    f"({a0:.3f}..{a1:.3f}s); expected the episodes of one video not to overlap"
                )
        for a0, a1, e, where in items:
            if a1 < a0:
                raise DataError(
                    f"{where}: episode {e} ends at {a1:.3f}s before it starts at {a0:.3f}s in {path}"
                )


def _column_array(table: pa.Table, key: str, where: str) -> np.ndarray:
    """A (possibly nested) list column as a dense numpy array (rows, *dims)."""
    col = table.column(key).combine_chunks()
    if col.null_count:
        raise DataError(f"{where}: column '{key}' has null values; expected one value per frame")
    shape = [len(col)]
    arr: pa.Array = col
    if isinstance(arr, pa.ExtensionArray):  # Hugging Face Array2D/Array3D (3x3, 4x4 camera columns)
        arr = arr.storage
    while (
        pa.types.is_list(arr.type)
        or pa.types.is_large_list(arr.type)
        or pa.types.is_fixed_size_list(arr.type)
    ):
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
        else:
            lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                raise DataError(
                    f"{where}: column '{key}' has rows of different lengths {sorted(set(lengths.tolist()))}"
                )
            size = int(lengths[0]) if len(lengths) else 0
        arr = arr.flatten()
        if isinstance(arr, pa.ExtensionArray):
            arr = arr.storage
        if arr.null_count:
            raise DataError(f"{where}: column '{key}' has null values; expected finite numbers")
        shape.append(size)
    try:
        values = arr.to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{where}: column '{key}' of type {col.type} is not numeric ({exc})") from None
    if values.dtype.kind not in "biuf":
        raise DataError(f"{where}: column '{key}' holds {arr.type} values; expected numbers")
    return values.reshape(shape)


def _feature_dim(feat: dict, key: str, where: str) -> int:
    shape = feat.get("shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise DataError(f"{where}: features['{key}'].shape is {shape!r}; expected a list of ints")
    return int(np.prod(shape)) if shape else 1


def _feature_names(feat: dict, key: str, dim: int) -> list[str]:
    names = feat.get("names")
    flat: list[object] = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            flat.append(x)

    walk(names)
    if len(flat) == dim and all(isinstance(n, str) for n in flat):
        return [str(n) for n in flat]
    return [f"{key}.{i}" for i in range(dim)]


def _image_hw(feat: dict, key: str, where: str) -> tuple[int, int]:
    shape = feat.get("shape")
    names = feat.get("names")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise DataError(f"{where}: features['{key}'].shape is {shape!r}; expected [height, width, channels]")
    if isinstance(names, list) and len(names) == len(shape) and "height" in names and "width" in names:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[-1] in (1, 3, 4):
        return int(shape[0]), int(shape[1])
    if len(shape) == 3 and shape[0] in (1, 3, 4):
        return int(shape[1]), int(shape[2])
    raise DataError(f"{where}: features['{key}'].shape is {shape!r}; expected [height, width, channels]")


def _decode_image(cell: object, key: str, root: str, where: str) -> np.ndarray:
    """A LeRobot image cell ({bytes, path}) as a numpy array (H, W[, C])."""
    from PIL import Image

    data = path = None
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, (bytes, bytearray)):
        data = cell
    try:
        if data:
            img = Image.open(io.BytesIO(data))
        elif path:
            full = path if os.path.isabs(path) else os.path.join(root, path)
            if not os.path.isfile(full):
                raise DataError(f"{where}: '{key}' refers to image file {full}, which does not exist")
            img = Image.open(full)
        else:
            raise DataError(f"{where}: '{key}' has no image bytes and no path")
        img.load()
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        raise DataError(f"{where}: '{key}' image cannot be decoded ({type(exc).__name__}: {exc})") from None
    if img.mode in ("RGB", "L", "I", "F") or img.mode.startswith("I;16"):
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


class LeRobotSource(EpisodeSource):
    """Episodes of a LeRobot v2.1 / v3.0 dataset folder.

    views: dataset camera key -> view name (default: every RGB camera, named by the key's last
    dotted component). Depth features are paired with views automatically (or map a depth key to
    the same view name explicitly). episodes: the episode indices to import (default: all), yielded
    in ascending order. depth_scale: metres per stored depth unit (default 0.001 for 16-bit depth;
    required for 8-bit depth video).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        views: dict[str, str] | None = None,
        episodes: list[int] | None = None,
        state_key: str = "observation.state",
        action_key: str = "action",
        depth_scale: float | None = None,
    ):
        self.root = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: LeRobot dataset folder not found")
        if depth_scale is not None and not (
            isinstance(depth_scale, (int, float)) and math.isfinite(depth_scale) and depth_scale > 0
        ):
            raise DataError(
                f"depth_scale={depth_scale!r}: expected a positive number of metres per depth unit"
            )
        self.depth_scale = None if depth_scale is None else float(depth_scale)
        self.state_key, self.action_key = state_key, action_key
        self._info_path = os.path.join(self.root, "meta", "info.json")
        self._info = self._load_info()
        self.version = self._info["codebase_version"]
        self.fps = float(self._info["fps"])
        self.features: dict[str, dict] = self._info["features"]
        for key in (state_key, action_key):
            if key not in self.features:
                raise DataError(
                    f"{self._info_path}: no feature '{key}'; expected it for {'state' if key == state_key else 'actions'} "
                    f"(features: {sorted(self.features)})"
                )
        self._state_dim = _feature_dim(self.features[state_key], state_key, self._info_path)
        self._action_dim = _feature_dim(self.features[action_key], action_key, self._info_path)
        self._views = self._select_views(views)
        self._image_size = self._check_sizes()
        self._find_cameras()
        self._tasks = self._load_tasks()
        all_meta = self._load_episodes_v3() if self.version == "v3.0" else self._load_episodes_v21()
        self._selected = self._select_episodes(all_meta, episodes)
        self._check_files()

    # ------------------------------------------------------------------ metadata
    def _load_info(self) -> dict:
        p = self._info_path
        if not os.path.isfile(p):
            raise DataError(f"{p}: not found; expected a LeRobot dataset folder with meta/info.json")
        try:
            with open(p, encoding="utf-8") as f:
                info = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{p}: not valid JSON ({exc})") from None
        if not isinstance(info, dict):
            raise DataError(f"{p}: expected a JSON object, got {type(info).__name__}")
        for key in ("codebase_version", "fps", "features", "data_path"):
            if key not in info:
                raise DataError(f"{p}: missing key '{key}'")
        version = info["codebase_version"]
        if version not in SUPPORTED_VERSIONS:
            raise DataError(
                f"{p}: codebase_version {version!r} is not supported; expected one of {list(SUPPORTED_VERSIONS)}"
            )
        fps = info["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise DataError(f"{p}: fps is {fps!r}; expected a positive number")
        feats = info["features"]
        if not isinstance(feats, dict) or not all(
            isinstance(v, dict) and "dtype" in v for v in feats.values()
        ):
            raise DataError(f"{p}: 'features' must map each key to an object with a 'dtype'")
        for key, feature in feats.items():  # LeRobot encodes every video at the dataset's rate
            rate = feature.get("info", {}).get("video.fps") if isinstance(feature.get("info"), dict) else None
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and abs(rate - fps) > 1e-3 * fps:
                raise DataError(
                    f"{p}: features.{key}.info.video.fps is {rate}, but fps is {fps}; expected the videos at the "
                    "dataset's frame rate"
                )
        if not isinstance(info["data_path"], str):
            raise DataError(f"{p}: data_path is {info['data_path']!r}; expected a path template string")
        return info

    def _select_views(self, views: dict[str, str] | None) -> list[_View]:
        p = self._info_path
        cams = {k: f for k, f in self.features.items() if f["dtype"] in CAMERA_DTYPES}
        rgb_keys = [k for k, f in cams.items() if not _is_depth(k, f)]
        depth_keys = [k for k, f in cams.items() if _is_depth(k, f)]
        if views is None:
            if not rgb_keys:
                raise DataError(
                    f"{p}: no RGB camera feature (dtype video or image) in features {sorted(self.features)}"
                )
            views = {k: k.split(".")[-1] for k in rgb_keys}
        if not isinstance(views, dict) or not views:
            raise DataError(f"views={views!r}: expected a non-empty dict of dataset camera key -> view name")
        by_name: dict[str, _View] = {}
        explicit_depth: dict[str, str] = {}
        for key, name in views.items():
            if key not in self.features:
                raise DataError(
                    f"{p}: camera key '{key}' is not a feature of this dataset; camera keys: {sorted(cams)}"
                )
            if key not in cams:
                raise DataError(
                    f"{p}: '{key}' has dtype {self.features[key]['dtype']!r}; expected a camera (video or image)"
                )
            if not isinstance(name, str) or not name:
                raise DataError(f"views['{key}'] = {name!r}: expected a non-empty view name")
            if "/" in name or "\\" in name or name in (".", "..") or name != name.strip():
                raise DataError(
                    f"views['{key}'] = {name!r}: expected a plain view name (no '/' or '\\', not '.' or '..')"
                )
            if key in depth_keys:
                if name in explicit_depth:
                    raise DataError(
                        f"views: '{key}' and '{explicit_depth[name]}' are both depth for view '{name}'"
                    )
                explicit_depth[name] = key
                continue
            if name in by_name:
                raise DataError(f"views: '{key}' and '{by_name[name].rgb.key}' both map to view '{name}'")
            by_name[name] = _View(name, _Stream(key, cams[key]["dtype"]))
        for name, key in explicit_depth.items():
            if name not in by_name:
                raise DataError(
                    f"views: depth key '{key}' maps to view '{name}', which has no RGB camera key"
                )
        used = set(explicit_depth.values())
        for view in by_name.values():
            dkey = explicit_depth.get(view.name)
            if dkey is None:
                wanted = {view.name, view.rgb.key.split(".")[-1]}
                matches = [k for k in depth_keys if k not in used and _depth_base(k) in wanted]
                dkey = matches[0] if matches else None
            if dkey is not None:
                used.add(dkey)
                view.depth = self._depth_stream(dkey, cams[dkey])
        unitless = [
            v.rgb.key
            for v in by_name.values()
            if v.depth is not None and v.depth.scale is None and v.depth.form == "video"
        ]
        if unitless:
            dropped = [v.depth.key for v in by_name.values() if v.depth is not None and v.rgb.key in unitless]
            warnings.warn(
                f"{p}: depth video {dropped} is 8-bit and LeRobot defines no depth unit; pass "
                "depth_scale=<metres per unit> to use it. Depth marked missing.",
                UserWarning,
                stacklevel=3,
            )
            for v in by_name.values():
                if v.rgb.key in unitless:
                    v.depth = None
        return list(by_name.values())

    def _depth_stream(self, key: str, feat: dict) -> _Stream:
        if feat["dtype"] == "image":
            return _Stream(key, "image", is_depth=True, scale=self.depth_scale)
        info = feat.get("info") or {}
        pix_fmt = info.get("video.pix_fmt") if isinstance(info, dict) else None
        if pix_fmt_bits(pix_fmt) > 8:
            return _Stream(key, "video", is_depth=True, scale=self.depth_scale or MM, video_fmt=GRAY16)
        # 8-bit: usable only with depth_scale (scale None here makes _select_views drop it with a warning)
        return _Stream(key, "video", is_depth=True, scale=self.depth_scale, video_fmt=GRAY)

    def _check_sizes(self) -> tuple[int, int]:
        p = self._info_path
        first = self._views[0].rgb.key
        size = _image_hw(self.features[first], first, p)
        for view in self._views:
            for stream in (view.rgb, view.depth):
                if stream is None:
                    continue
                hw = _image_hw(self.features[stream.key], stream.key, p)
                if hw != size:
                    raise DataError(
                        f"{p}: features['{stream.key}'] frames are {hw[0]}x{hw[1]} but '{first}' frames are "
                        f"{size[0]}x{size[1]}; all views must share one image size (select views with `views=`)"
                    )
        uses_video = any(v.rgb.form == "video" or (v.depth and v.depth.form == "video") for v in self._views)
        if uses_video and not isinstance(self._info.get("video_path"), str):
            raise DataError(f"{p}: video features present but video_path is {self._info.get('video_path')!r}")
        return size

    def _find_cameras(self) -> None:
        p = self._info_path
        for view in self._views:
            for name in dict.fromkeys((view.name, view.rgb.key.split(".")[-1])):
                ik, ek = f"observation.cameras.{name}.intrinsics", f"observation.cameras.{name}.extrinsics"
                if view.intrinsics_key is None and ik in self.features:
                    if _feature_dim(self.features[ik], ik, p) != 9:
                        raise DataError(
                            f"{p}: features['{ik}'].shape is {self.features[ik]['shape']}; expected [3, 3] or [9]"
                        )
                    view.intrinsics_key = ik
                if view.extrinsics_key is None and ek in self.features:
                    if _feature_dim(self.features[ek], ek, p) != 16:
                        raise DataError(
                            f"{p}: features['{ek}'].shape is {self.features[ek]['shape']}; expected [4, 4] or [16]"
                        )
                    view.extrinsics_key = ek

    def _load_tasks(self) -> dict[int, str]:
        meta = os.path.join(self.root, "meta")
        tasks: dict[int, str] = {}
        if self.version == "v3.0":
            p = os.path.join(meta, "tasks.parquet")
            if not os.path.isfile(p):
                return tasks
            table = self._read_parquet(p)
            names = table.column_names
            if "task_index" not in names:
                raise DataError(f"{p}: missing column 'task_index'")
            text_col = next(
                (c for c in ("task", "__index_level_0__") if c in names),
                next(
                    (
                        c
                        for c in names
                        if c != "task_index" and pa.types.is_string(table.schema.field(c).type)
                    ),
                    None,
                ),
            )
            if text_col is None:
                raise DataError(f"{p}: no task text column (expected the index or a 'task' column)")
            for r, (i, t) in enumerate(
                zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist(), strict=True)
            ):
                tasks[_int_cell(i, f"{p}: row {r}", "task_index")] = str(t)
        else:
            p = os.path.join(meta, "tasks.jsonl")
            if not os.path.isfile(p):
                return tasks
            for row in self._read_jsonl(p):
                if "task_index" not in row or "task" not in row:
                    raise DataError(f"{p}:{row['__line__']}: lacks 'task_index' or 'task'")
                tasks[_int_cell(row["task_index"], f"{p}:{row['__line__']}", "task_index")] = str(row["task"])
        return tasks

    def _read_jsonl(self, p: str) -> list[dict]:
        rows = []
        with open(p, encoding="utf-8") as f:
            try:
                lines = f.readlines()
            except UnicodeDecodeError as exc:
                raise DataError(f"{p}: not UTF-8 text ({exc}); expected JSON lines") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{n}: expected a JSON object")
            row["__line__"] = n
            rows.append(row)
        return rows

    @staticmethod
    def _read_parquet(p: str, columns: list[str] | None = None) -> pa.Table:
        if not os.path.isfile(p):
            raise DataError(f"{p}: parquet file not found")
        try:
            return pq.read_table(p, columns=columns)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{p}: cannot read parquet ({type(exc).__name__}: {exc})") from None

    def _video_keys(self) -> list[str]:
        keys = []
        for v in self._views:
            keys += [s.key for s in (v.rgb, v.depth) if s is not None and s.form == "video"]
        return keys

    def _load_episodes_v3(self) -> dict[int, _EpisodeMeta]:
        ep_dir = os.path.join(self.root, "meta", "episodes")
        files = sorted(glob.glob(os.path.join(ep_dir, "chunk-*", "file-*.parquet")))
        if not files:
            raise DataError(
                f"{ep_dir}: no chunk-*/file-*.parquet episode metadata; expected LeRobot v3.0 meta/episodes"
            )
        vkeys = self._video_keys()
        out: dict[int, _EpisodeMeta] = {}
        seen: dict[int, str] = {}  # episode -> "file row r" where it was first listed
        spans: dict[str, list[tuple[float, float, int, str]]] = {}  # mp4 -> (from, to, episode, where)
        for p in files:
            table = self._read_parquet(p)
            need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
            for k in vkeys:
                need += [f"videos/{k}/chunk_index", f"videos/{k}/file_index", f"videos/{k}/from_timestamp"]
            for c in need:
                if c not in table.column_names:
                    raise DataError(f"{p}: missing column '{c}'")
            col = {c: table.column(c).to_pylist() for c in need}
            tasks = (
                table.column("tasks").to_pylist()
                if "tasks" in table.column_names
                else [None] * table.num_rows
            )
            succ = (
                table.column("success").to_pylist()
                if "success" in table.column_names
                else [None] * table.num_rows
            )
            ends = {
                k: table.column(f"videos/{k}/to_timestamp").to_pylist()
                if f"videos/{k}/to_timestamp" in table.column_names
                else [None] * table.num_rows
                for k in vkeys
            }
            for r in range(table.num_rows):
                e = _int_cell(col["episode_index"][r], f"{p}: row {r}", "episode_index")
                if e in seen:
                    raise DataError(
                        f"{p}: episode_index {e} appears in {seen[e]} and in row {r}; expected each episode once"
                    )
                seen[e] = f"row {r}" if len(files) == 1 else f"{p} row {r}"
                where = f"{p}: row {r} (episode {e})"
                length = _int_cell(col["length"][r], where, "length")
                data_file = os.path.join(
                    self.root,
                    _fmt(
                        self._info["data_path"],
                        self._info_path,
                        chunk_index=_int_cell(col["data/chunk_index"][r], where, "data/chunk_index"),
                        file_index=_int_cell(col["data/file_index"][r], where, "data/file_index"),
                        episode_index=e,
                    ),
                )
                videos = {}
                for k in vkeys:
                    rel = _fmt(
                        self._info["video_path"],
                        self._info_path,
                        video_key=k,
                        episode_index=e,
                        chunk_index=_int_cell(
                            col[f"videos/{k}/chunk_index"][r], where, f"videos/{k}/chunk_index"
                        ),
                        file_index=_int_cell(
                            col[f"videos/{k}/file_index"][r], where, f"videos/{k}/file_index"
                        ),
                    )
                    start = _time_cell(
                        col[f"videos/{k}/from_timestamp"][r], where, f"videos/{k}/from_timestamp"
                    )
                    videos[k] = (os.path.join(self.root, rel), start)
                    end = ends[k][r]
                    end = (
                        start + length / self.fps
                        if end is None
                        else _time_cell(end, where, f"videos/{k}/to_timestamp")
                    )
                    spans.setdefault(videos[k][0], []).append((start, end, e, where))
                t = tasks[r]
                out[e] = _EpisodeMeta(
                    index=e,
                    length=length,
                    tasks=[str(x) for x in t] if isinstance(t, list) else ([str(t)] if t else []),
                    success=None if succ[r] is None else bool(succ[r]),
                    data_file=data_file,
                    videos=videos,
                    cameras=self._episode_cameras(table, r, p, e),
                )
        _check_spans(spans, 0.5 / self.fps)
        return out

    def _episode_cameras(
        self, table: pa.Table, row: int, path: str, episode: int
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The cameras meta/episodes holds for views without per-frame camera columns."""
        out = {}
        for view in self._views:
            if view.intrinsics_key and view.extrinsics_key:
                continue
            for name in dict.fromkeys((view.name, view.rgb.key.split(".")[-1])):
                ik, ek = f"cameras/{name}/intrinsics", f"cameras/{name}/extrinsics"
                if ik in table.column_names and ek in table.column_names:
                    k = np.asarray(table.column(ik)[row].as_py(), np.float32)
                    x = np.asarray(table.column(ek)[row].as_py(), np.float32)
                    if k.size != 9 or x.size != 16 or not (np.isfinite(k).all() and np.isfinite(x).all()):
                        raise DataError(
                            f"{path}: episode {episode}: '{ik}' / '{ek}' hold {k.size} and {x.size} values, "
                            "expected 9 and 16 finite numbers"
                        )
                    out[view.name] = (k.reshape(3, 3), x.reshape(4, 4))
                    break
        return out

    def _load_episodes_v21(self) -> dict[int, _EpisodeMeta]:
        p = os.path.join(self.root, "meta", "episodes.jsonl")
        if not os.path.isfile(p):
            raise DataError(f"{p}: not found; expected LeRobot v2.1 episode metadata")
        chunks = self._info.get("chunks_size", 1000)
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise DataError(f"{self._info_path}: chunks_size is {chunks!r}; expected a positive integer")
        vkeys = self._video_keys()
        out: dict[int, _EpisodeMeta] = {}
        seen: dict[int, int] = {}  # episode -> the line that listed it
        for row in self._read_jsonl(p):
            line = row["__line__"]
            if "episode_index" not in row or "length" not in row:
                raise DataError(f"{p}:{line}: lacks 'episode_index' or 'length'")
            e = _int_cell(row["episode_index"], f"{p}:{line}", "episode_index")
            if e in seen:
                raise DataError(
                    f"{p}: episode_index {e} appears on lines {seen[e]} and {line}; expected each episode once"
                )
            seen[e] = line
            length = _int_cell(row["length"], f"{p}:{line} (episode {e})", "length")
            chunk = e // chunks
            data_file = os.path.join(
                self.root,
                _fmt(self._info["data_path"], self._info_path, episode_chunk=chunk, episode_index=e),
            )
            videos = {
                k: (
                    os.path.join(
                        self.root,
                        _fmt(
                            self._info["video_path"],
                            self._info_path,
                            episode_chunk=chunk,
                            video_key=k,
                            episode_index=e,
                        ),
                    ),
                    0.0,
                )
                for k in vkeys
            }
            t = row.get("tasks") or []
            out[e] = _EpisodeMeta(
                index=e,
                length=length,
                tasks=[str(x) for x in t] if isinstance(t, list) else [str(t)],
                success=None if row.get("success") is None else bool(row["success"]),
                data_file=data_file,
                videos=videos,
            )
        return out

    def _select_episodes(
        self, all_meta: dict[int, _EpisodeMeta], episodes: list[int] | None
    ) -> list[_EpisodeMeta]:
        if episodes is None:
            return [all_meta[e] for e in sorted(all_meta)]
        try:
            wanted = sorted({int(e) for e in episodes})
        except (TypeError, ValueError):
            raise DataError(f"episodes={episodes!r}: expected a list of episode indices") from None
        missing = [e for e in wanted if e not in all_meta]
        if missing:
            have = sorted(all_meta)
            span = f"{have[0]}..{have[-1]}" if have else "none"
            raise DataError(
                f"episodes: {missing} not in {self.root} (it has {len(have)} episodes, indices {span})"
            )
        return [all_meta[e] for e in wanted]

    def _check_files(self) -> None:
        for meta in self._selected:
            if not os.path.isfile(meta.data_file):
                raise DataError(f"{meta.data_file}: parquet file not found (episode {meta.index})")
            for key, (path, _) in meta.videos.items():
                if not os.path.isfile(path):
                    raise DataError(f"{path}: video file not found (episode {meta.index}, camera '{key}')")

    # ------------------------------------------------------------------ interface
    def info(self) -> SourceInfo:
        return SourceInfo(
            name="lerobot",
            robot_type=str(self._info.get("robot_type") or "unknown"),
            fps=self.fps,
            views=[v.name for v in self._views],
            image_size=self._image_size,
            state_names=_feature_names(self.features[self.state_key], self.state_key, self._state_dim),
            action_names=_feature_names(self.features[self.action_key], self.action_key, self._action_dim),
            num_episodes=len(self._selected),
            has_depth=all(v.depth is not None for v in self._views),
            has_cameras=all(
                (v.intrinsics_key and v.extrinsics_key) or all(v.name in m.cameras for m in self._selected)
                for v in self._views
            ),
            extra={
                "path": self.root,
                "codebase_version": self.version,
                "camera_keys": {v.name: v.rgb.key for v in self._views},
                "depth_keys": {v.name: v.depth.key for v in self._views if v.depth is not None},
                "episode_indices": [m.index for m in self._selected],
            },
        )

    def episodes(self) -> Iterator[Episode]:
        return self.episodes_at(range(len(self._selected)))

    def episodes_at(self, indices: Sequence[int]) -> Iterator[Episode]:
        """The selected episodes at these positions (0 = the first selected), ascending."""
        wanted = sorted(set(indices))
        bad = [i for i in wanted if not 0 <= i < len(self._selected)]
        if bad:
            raise DataError(
                f"{self.root}: episode position {bad[0]} of {len(self._selected)} selected does not exist"
            )
        readers: dict[str, VideoReader] = {}  # camera key -> the open mp4 of the current episode
        cache = _DataFile()
        try:
            for i in wanted:
                yield self._load_episode(self._selected[i], readers, cache)
        finally:
            for reader in readers.values():
                reader.close()

    # ------------------------------------------------------------------ decoding
    def _data_columns(self) -> list[str]:
        cols = [self.state_key, self.action_key]
        for v in self._views:
            cols += [s.key for s in (v.rgb, v.depth) if s is not None and s.form == "image"]
            cols += [k for k in (v.intrinsics_key, v.extrinsics_key) if k]
        return cols

    def _episode_rows(self, meta: _EpisodeMeta, cache: _DataFile) -> pa.Table:
        p = meta.data_file
        if cache.path != p:
            cache.path = cache.table = cache.episode_index = None
            try:
                schema = pq.read_schema(p)
            except FileNotFoundError:
                raise DataError(f"{p}: parquet file not found (episode {meta.index})") from None
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise DataError(f"{p}: cannot read parquet ({type(exc).__name__}: {exc})") from None
            required = self._data_columns()
            for c in required:
                if c not in schema.names:
                    raise DataError(f"{p}: missing column '{c}' (declared in meta/info.json features)")
            optional = [
                c
                for c in ("episode_index", "frame_index", "timestamp", "task_index", "next.success")
                if c in schema.names
            ]
            table = self._read_parquet(p, columns=list(dict.fromkeys(required + optional)))
            if "episode_index" in table.column_names:
                cache.episode_index = _column_array(table, "episode_index", p).astype(np.int64)
            cache.path, cache.table = p, table
        table = cache.table
        assert table is not None
        ep_col = cache.episode_index
        if ep_col is not None:
            rows = np.flatnonzero(ep_col == meta.index)
            if len(rows) == 0:
                raise DataError(f"{p}: no rows with episode_index {meta.index}")
            sub = table.take(pa.array(rows))
        elif self.version == "v2.1":
            sub = table
        else:
            raise DataError(f"{p}: missing column 'episode_index' (needed: the file holds several episodes)")
        if "frame_index" in sub.column_names:
            order = np.argsort(_column_array(sub, "frame_index", p), kind="stable")
            if (order != np.arange(len(order))).any():
                sub = sub.take(pa.array(order))
        if sub.num_rows != meta.length:
            raise DataError(
                f"{p}: episode {meta.index} has {sub.num_rows} frames, expected length {meta.length} from meta/episodes"
            )
        return sub

    def _load_episode(self, meta: _EpisodeMeta, readers: dict[str, VideoReader], cache: _DataFile) -> Episode:
        p, e = meta.data_file, meta.index
        where = f"{p}: episode {e}"
        table = self._episode_rows(meta, cache)
        n = table.num_rows
        if n == 0:
            raise DataError(f"{where}: has no frames")
        frames = (
            _column_array(table, "frame_index", p).astype(np.int64)
            if "frame_index" in table.column_names
            else np.arange(n)
        )

        def numeric(key: str, dim: int | None, label: str) -> np.ndarray:
            with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused below
                arr = _column_array(table, key, where).astype(np.float32).reshape(n, -1)
            if dim is not None and arr.shape[1] != dim:
                raise DataError(
                    f"{where}: '{key}' has {arr.shape[1]} values per frame, expected {dim} from info.json"
                )
            bad = ~np.isfinite(arr)
            if bad.any():
                r = int(np.argwhere(bad)[0][0])
                raise DataError(
                    f"{where} frame {int(frames[r])}: {label} '{key}' has NaN/inf (or a value beyond float32's "
                    "range); expected finite values"
                )
            return arr

        state = numeric(self.state_key, self._state_dim, "state")
        action = numeric(self.action_key, self._action_dim, "action")
        if "timestamp" in table.column_names:
            ts = _column_array(table, "timestamp", where).astype(np.float64).reshape(n)
            bad_ts = np.flatnonzero(~np.isfinite(ts))
            if len(bad_ts):
                raise DataError(
                    f"{where} frame {int(frames[bad_ts[0]])}: timestamp is {ts[bad_ts[0]]}; "
                    "expected a finite time in seconds"
                )
        else:
            ts = frames / self.fps

        views: dict[str, ViewFrames] = {}
        for view in self._views:
            rgb = self._read_stream(view.rgb, meta, table, ts, frames, readers)
            vf = ViewFrames(rgb=rgb)
            if view.depth is not None:
                vf.depth = self._read_stream(view.depth, meta, table, ts, frames, readers)
            if view.intrinsics_key:
                vf.intrinsics = numeric(view.intrinsics_key, 9, "intrinsics").reshape(n, 3, 3)
            if view.extrinsics_key:
                vf.extrinsics = numeric(view.extrinsics_key, 16, "extrinsics").reshape(n, 4, 4)
            if view.name in meta.cameras and not (view.intrinsics_key and view.extrinsics_key):
                k, x = meta.cameras[view.name]
                vf.intrinsics, vf.extrinsics = np.repeat(k[None], n, axis=0), np.repeat(x[None], n, axis=0)
            views[view.name] = vf

        if meta.success is not None:
            success = meta.success
        elif "next.success" in table.column_names:
            success = bool(np.asarray(table.column("next.success").to_pylist(), dtype=bool).any())
        else:
            success = False
        task = meta.tasks[0] if meta.tasks else ""
        if not task and "task_index" in table.column_names:
            ti = int(_column_array(table, "task_index", where).reshape(-1)[0])
            task = self._tasks.get(ti, "")
        ep = Episode(
            task=task,
            views=views,
            state=state,
            action=action,
            fps=self.fps,
            success=success,
            extra={"source": "lerobot", "episode_index": e, "tasks": list(meta.tasks) or [task]},
        )
        ep.validate(where=where)
        return ep

    def _read_stream(
        self,
        stream: _Stream,
        meta: _EpisodeMeta,
        table: pa.Table,
        ts: np.ndarray,
        frames: np.ndarray,
        readers: dict[str, VideoReader],
    ) -> np.ndarray:
        h, w = self._image_size
        is_depth = stream.is_depth
        if stream.form == "video":
            path, start = meta.videos[stream.key]
            reader = readers.get(stream.key)
            if reader is None or reader.path != path:
                if reader is not None:
                    reader.close()
                reader = readers[stream.key] = VideoReader(path, self.fps)
            arr = reader.read(start + ts, fmt=stream.video_fmt)
            if arr.shape[1:3] != (h, w):
                raise DataError(
                    f"{path}: frames are {arr.shape[1]}x{arr.shape[2]}, expected {h}x{w} from info.json features['{stream.key}']"
                )
            if not is_depth:
                return arr
            return arr.astype(np.float32) * np.float32(stream.scale)
        # image form: one PNG/JPEG per frame in the parquet
        cells = table.column(stream.key).to_pylist()
        out = np.empty(
            (len(cells), h, w) if is_depth else (len(cells), h, w, 3), np.float32 if is_depth else np.uint8
        )
        for i, cell in enumerate(cells):
            where = f"{meta.data_file}: episode {meta.index} frame {int(frames[i])}"
            img = _decode_image(cell, stream.key, self.root, where)
            if img.shape[:2] != (h, w):
                raise DataError(
                    f"{where}: '{stream.key}' image is {img.shape[0]}x{img.shape[1]}, expected {h}x{w}"
                )
            if not is_depth:
                if img.ndim == 2:
                    img = np.repeat(img[..., None], 3, axis=-1)
                out[i] = img[..., :3]
                continue
            if img.ndim == 3:
                raise DataError(
                    f"{where}: depth '{stream.key}' has {img.shape[2]} channels; expected a single-channel image"
                )
            if np.issubdtype(img.dtype, np.floating):
                out[i] = img  # float depth images are metres
            elif img.dtype == np.uint8 and stream.scale is None:
                raise DataError(
                    f"{where}: depth '{stream.key}' is 8-bit with no known unit; pass depth_scale=<metres per unit>"
                )
            else:
                out[i] = img.astype(np.float32) * np.float32(stream.scale if stream.scale is not None else MM)
        return out
