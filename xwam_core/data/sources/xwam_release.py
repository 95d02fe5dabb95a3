"""Import the X-WAM authors' release dataset layout (see docs/sources/xwam_release.md).

Layout: data/chunk-*/episode_*.json (num_frames, prompt, observations per view with rgb_path,
depth_path, fps, type, start, end; proprios per arm; actions, optionally raw_actions), RGB mp4s under
video/ and 8-bit depth mp4s under depth/ (paths relative to the dataset root). The depth is relative,
not metric, and there are no cameras: the store is marked depth_kind "relative", has_cameras false.

Relative depth is stored losslessly in the store's uint16 millimetre PNGs as mm = value + 1 (so
0..255 -> 1..256 mm; 0 stays "invalid"). The release reads it as value/127.5 - 1.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import numpy as np
from scipy.spatial.transform import Rotation

from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.data.video import GRAY, RGB, VideoReader
from xwam_core.errors import DataError

ARMS = ("left", "right")
STATE_DIM = 16
RELATIVE_DEPTH_MM_OFFSET = 1  # stored mm = 8-bit value + 1
PER_ARM = ("ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz", "gripper")
STATE_NAMES = [f"{arm}_{n}" for arm in ARMS for n in PER_ARM]


def relative_depth_to_metres(values: np.ndarray) -> np.ndarray:
    """8-bit relative depth values -> the 'metres' the store writes (mm = value + 1)."""
    return (np.asarray(values, np.float32) + RELATIVE_DEPTH_MM_OFFSET) / np.float32(1000.0)


def rotm_to_quat_wxyz(rotm: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotation matrices -> (T, 4) unit quaternions w, x, y, z with w >= 0."""
    xyzw = Rotation.from_matrix(rotm).as_quat()
    q = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    q[q[:, 0] < 0] *= -1
    return q


def _arms(proprios: dict) -> list[str]:
    """Arm names in the order they appear in `proprios` (keys <arm>_ee_pos)."""
    out: list[str] = []
    for key in proprios:
        if key.endswith("_ee_pos"):
            out.append(key[: -len("_ee_pos")])
    return out


class XWAMReleaseSource(EpisodeSource):
    """Episodes of a dataset folder in the X-WAM authors' release layout."""

    def __init__(self, path: str | os.PathLike, raw_actions: bool = False):
        self.root = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.root):
            raise DataError(f"{self.root}: xwam release dataset folder not found")
        self.raw_actions = bool(raw_actions)
        self._files = sorted(glob.glob(os.path.join(self.root, "data", "chunk-*", "episode_*.json")))
        if not self._files:
            raise DataError(
                f"{self.root}: no episode json; expected data/chunk-*/episode_*.json (the xwam release layout)"
            )
        self._metas = [self._load_json(p) for p in self._files]
        first, p0 = self._metas[0], self._files[0]
        self._views = sorted(first["observations"])
        self._fps = float(first["observations"][self._views[0]]["fps"])
        self._action_dim = int(np.asarray(first[self._action_key]).reshape(first["num_frames"], -1).shape[1])
        for p, m in zip(self._files, self._metas, strict=True):
            if sorted(m["observations"]) != self._views:
                raise DataError(f"{p}: views {sorted(m['observations'])}, expected {self._views} like {p0}")
            rates = {v: float(o["fps"]) for v, o in m["observations"].items()}
            if any(r != self._fps for r in rates.values()):
                raise DataError(
                    f"{p}: observations' fps {rates}; expected {self._fps} for every view, like {p0}"
                )
            dim = np.asarray(m[self._action_key]).reshape(m["num_frames"], -1).shape[1]
            if dim != self._action_dim:
                raise DataError(
                    f"{p}: {self._action_key} has {dim} values per frame, expected {self._action_dim}"
                )
        self._image_size = self._probe_size(first, p0)

    @property
    def _action_key(self) -> str:
        return "raw_actions" if self.raw_actions else "actions"

    def _load_json(self, p: str) -> dict:
        try:
            with open(p, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{p}: cannot read episode json ({type(exc).__name__}: {exc})") from None
        if not isinstance(m, dict):
            raise DataError(f"{p}: expected a JSON object, got {type(m).__name__}")
        for key in ("num_frames", "prompt", "observations", "proprios", self._action_key):
            if key not in m:
                raise DataError(f"{p}: missing key '{key}'")
        n = m["num_frames"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"{p}: num_frames is {n!r}; expected an integer >= 1")
        if not isinstance(m["prompt"], str):
            raise DataError(f"{p}: prompt is {m['prompt']!r}; expected a string")
        obs = m["observations"]
        if not isinstance(obs, dict) or not obs:
            raise DataError(f"{p}: 'observations' must map view names to objects")
        for view, o in obs.items():
            if not isinstance(o, dict):
                raise DataError(f"{p}: observations['{view}'] must be an object")
            for key in ("rgb_path", "depth_path", "fps", "type", "start", "end"):
                if key not in o:
                    raise DataError(f"{p}: observations['{view}'] is missing key '{key}'")
            fps = o["fps"]
            if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
                raise DataError(f"{p}: observations['{view}'].fps is {fps!r}; expected a number > 0")
            if o["type"] not in ("static", "dynamic"):
                raise DataError(
                    f"{p}: observations['{view}'].type is {o['type']!r}; expected static or dynamic"
                )
            s, e = o["start"], o["end"]
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (s, e)) or s < 0 or e - s != n:
                raise DataError(
                    f"{p}: observations['{view}'] clip start={s!r} end={e!r}; expected integers with end - start = num_frames {n}"
                )
            for key in ("rgb_path", "depth_path"):
                full = os.path.join(self.root, str(o[key]))
                if not os.path.isfile(full):
                    raise DataError(f"{p}: observations['{view}'].{key} {full} not found; expected an mp4")
        prop = m["proprios"]
        if not isinstance(prop, dict) or not _arms(prop):
            raise DataError(
                f"{p}: 'proprios' has no <arm>_ee_pos; expected <arm>_ee_pos, _ee_rotm, _gripper_pos"
            )
        arms = _arms(prop)
        if len(arms) > 2:
            raise DataError(f"{p}: proprios has {len(arms)} arms {arms}; expected one or two")
        for arm in arms:
            for suffix, shape in (("_ee_pos", (n, 3)), ("_ee_rotm", (n, 3, 3)), ("_gripper_pos", (n, 1))):
                key = arm + suffix
                if key not in prop:
                    raise DataError(f"{p}: proprios is missing key '{key}'")
                try:
                    arr = np.asarray(prop[key], dtype=np.float64)
                except (TypeError, ValueError):
                    raise DataError(
                        f"{p}: proprios['{key}'] is not a numeric array; expected {shape}"
                    ) from None
                if arr.size != int(np.prod(shape)) or arr.shape[0] != n:
                    raise DataError(
                        f"{p}: proprios['{key}'] has shape {arr.shape}; expected {shape} for num_frames {n}"
                    )
                if not np.isfinite(arr).all():
                    raise DataError(f"{p}: proprios['{key}'] has NaN/inf; expected finite values")
        try:
            act = np.asarray(m[self._action_key], dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(
                f"{p}: '{self._action_key}' is not a numeric array; expected (num_frames, D)"
            ) from None
        if act.ndim not in (1, 2) or act.shape[0] != n:
            raise DataError(
                f"{p}: '{self._action_key}' has shape {act.shape}; expected ({n}, D) for num_frames {n}"
            )
        return m

    def _probe_size(self, m: dict, p: str) -> tuple[int, int]:
        view = self._views[0]
        o = m["observations"][view]
        with VideoReader(os.path.join(self.root, o["rgb_path"]), float(o["fps"])) as r:
            frame = self._clip(r, o, 1, p, view, "rgb_path", RGB)
        return int(frame.shape[1]), int(frame.shape[2])

    def _clip(
        self, reader: VideoReader, o: dict, n: int, p: str, view: str, key: str, fmt: str
    ) -> np.ndarray:
        fps = float(o["fps"])
        times = (int(o["start"]) + np.arange(n)) / fps
        try:
            return reader.read(times, fmt=fmt)
        except DataError as exc:
            raise DataError(
                f"{p}: observations['{view}'].{key} clip frames {o['start']}..{o['end']} cannot be read "
                f"from {reader.path}; expected the clip inside the video ({exc})"
            ) from None

    def info(self) -> SourceInfo:
        names = self._metas[0].get("action_names")
        if not (
            isinstance(names, list)
            and len(names) == self._action_dim
            and all(isinstance(x, str) for x in names)
        ):
            names = [f"action_{i}" for i in range(self._action_dim)]
        return SourceInfo(
            name="xwam_release",
            robot_type=str(self._metas[0].get("robot_type", "unknown")),
            fps=self._fps,
            views=list(self._views),
            image_size=self._image_size,
            state_names=list(STATE_NAMES),
            action_names=list(names),
            num_episodes=len(self._files),
            has_depth=True,
            has_cameras=False,
            depth_kind="relative",
            extra={
                "path": self.root,
                "actions": self._action_key,
                "arms": _arms(self._metas[0]["proprios"]),  # in state slot order (left_, right_)
                "view_types": {v: self._metas[0]["observations"][v]["type"] for v in self._views},
                "relative_depth": {"stored_mm": "value + 1", "release_reads": "value / 127.5 - 1"},
                "episode_files": [os.path.relpath(p, self.root) for p in self._files],
            },
        )

    def episodes(self) -> Iterator[Episode]:
        for p, m in zip(self._files, self._metas, strict=True):
            yield self._load_episode(p, m)

    def _load_episode(self, p: str, m: dict) -> Episode:
        n = int(m["num_frames"])
        prop = m["proprios"]
        state = np.zeros((n, STATE_DIM), np.float64)
        for i, arm in enumerate(_arms(prop)):
            pos = np.asarray(prop[f"{arm}_ee_pos"], np.float64).reshape(n, 3)
            rotm = np.asarray(prop[f"{arm}_ee_rotm"], np.float64).reshape(n, 3, 3)
            grip = np.asarray(prop[f"{arm}_gripper_pos"], np.float64).reshape(n, 1)
            try:
                quat = rotm_to_quat_wxyz(rotm)
            except ValueError as exc:
                raise DataError(f"{p}: proprios['{arm}_ee_rotm'] is not a rotation matrix ({exc})") from None
            state[:, 8 * i : 8 * i + 8] = np.concatenate([pos, quat, grip], axis=1)
        action = np.asarray(m[self._action_key], np.float32).reshape(n, -1)
        views: dict[str, ViewFrames] = {}
        for view in self._views:
            o = m["observations"][view]
            frames = {}
            for key, fmt in (("rgb_path", RGB), ("depth_path", GRAY)):
                with VideoReader(os.path.join(self.root, o[key]), float(o["fps"])) as r:
                    frames[key] = self._clip(r, o, n, p, view, key, fmt)
            rgb, depth = frames["rgb_path"], frames["depth_path"]
            for key, arr in (("rgb_path", rgb), ("depth_path", depth)):
                if tuple(arr.shape[1:3]) != self._image_size:
                    raise DataError(
                        f"{p}: observations['{view}'].{key} frames are {arr.shape[1]}x{arr.shape[2]}, "
                        f"expected {self._image_size[0]}x{self._image_size[1]} like the first episode"
                    )
            views[view] = ViewFrames(rgb=rgb, depth=relative_depth_to_metres(depth))
        ep = Episode(
            task=m["prompt"],
            views=views,
            state=state.astype(np.float32),
            action=action,
            fps=self._fps,
            success=bool(m.get("success", True)),
            extra={"source": "xwam_release", "file": os.path.relpath(p, self.root)},
        )
        ep.validate(where=p)
        return ep
