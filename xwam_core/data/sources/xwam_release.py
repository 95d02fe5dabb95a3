"""Import the X-WAM authors' release dataset layout (see docs/sources/xwam_release.md).

Layout: data/chunk-*/episode_*.json (num_frames, prompt or instructions, observations per view with
rgb_path, depth_path, fps, type, start, end; proprios per arm; actions: per-arm target poses, optionally
raw_actions), RGB mp4s under video/ and 8-bit depth mp4s under depth/ (paths relative to the dataset
root). The depth is relative, not metric, and there are no cameras: the store is marked depth_kind
"relative", has_cameras false.

State per arm (8): xyz, quaternion wxyz (w >= 0), gripper. Action per arm (7), the release's with
action_skip 1: target xyz minus proprio xyz, rotvec(target R proprio R^T), proprio gripper[t + 1] minus
gripper[t] (0 on an episode's last frame, which no training window reads); or, from raw_actions, xyz
and axis-angle as given and the gripper sign-flipped. One arm fills the left slots (8-D state, 7-D action).

Relative depth is stored losslessly in the store's uint16 millimetre PNGs as mm = value + 1 (so
0..255 -> 1..256 mm; 0 stays "invalid"). The release reads it as value/127.5 - 1.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
from scipy.spatial.transform import Rotation

from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.data.video import GRAY, RGB, VideoReader
from xwam_core.errors import DataError

ARMS = ("left", "right")
RELATIVE_DEPTH_MM_OFFSET = 1  # stored mm = 8-bit value + 1
PER_ARM = ("ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz", "gripper")
PER_ARM_ACTION = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")
RAW_PER_ARM = 7  # the release's raw controller actions: xyz 3, axis-angle 3, gripper 1 per arm
STATE_NAMES = [f"{arm}_{n}" for arm in ARMS for n in PER_ARM]
ACTION_NAMES = [f"{arm}_{n}" for arm in ARMS for n in PER_ARM_ACTION]
STATE_DIM = len(STATE_NAMES)  # 16 for two arms; one-arm data stores the first 8

# how an episode's actions are read (every episode of a dataset must use the same)
POSE = "pose"  # `actions` maps <arm>_ee_pos / <arm>_ee_rotm to target poses: the release's delta actions
RAW = "raw"  # `actions.raw_actions` (T, 7 x arms): xyz, axis-angle as given, gripper sign-flipped
ARRAY = "array"  # a numeric (T, D) array (`actions`, or a top-level `raw_actions`), stored as it is


def relative_depth_to_metres(values: np.ndarray) -> np.ndarray:
    """8-bit relative depth values -> the 'metres' the store writes (mm = value + 1)."""
    return (np.asarray(values, np.float32) + RELATIVE_DEPTH_MM_OFFSET) / np.float32(1000.0)


def rotm_to_quat_wxyz(rotm: np.ndarray) -> np.ndarray:
    """(T, 3, 3) rotation matrices -> (T, 4) unit quaternions w, x, y, z with w >= 0."""
    xyzw = Rotation.from_matrix(rotm).as_quat()
    q = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    q[q[:, 0] < 0] *= -1
    return q


def as_rotation_matrices(arr: np.ndarray) -> np.ndarray | None:
    """The release's rotation encodings -> (T, 3, 3): rotation vectors (T, 3), flat (T, 9) or (T, 3, 3)."""
    if arr.ndim == 2 and arr.shape[1] == 3:
        return np.asarray(Rotation.from_rotvec(arr).as_matrix())
    if arr.ndim == 2 and arr.shape[1] == 9:
        return arr.reshape(-1, 3, 3)
    if arr.ndim == 3 and arr.shape[1:] == (3, 3):
        return arr
    return None


def delta_actions(
    p_pos: np.ndarray, p_rotm: np.ndarray, p_grip: np.ndarray, a_pos: np.ndarray, a_rotm: np.ndarray
) -> np.ndarray:
    """One arm's (T, 7) release action per frame t (action_skip 1): a_pos[t] - p_pos[t],
    rotvec(a_R[t] p_R[t]^T), p_grip[t + 1] - p_grip[t]; the last frame's gripper delta is 0 (no t + 1)."""
    d_pos = a_pos - p_pos
    d_rot = Rotation.from_matrix(np.einsum("tij,tkj->tik", a_rotm, p_rotm)).as_rotvec()
    d_grip = np.zeros((len(p_grip), 1))
    d_grip[:-1, 0] = p_grip[1:] - p_grip[:-1]
    return np.concatenate([d_pos, d_rot, d_grip], axis=1)


def raw_arm_actions(raw: np.ndarray, n_arms: int) -> np.ndarray:
    """(T, W >= 7 n_arms) raw controller actions -> (T, 7 n_arms): xyz and axis-angle as given, the
    gripper sign-flipped (the release: -1 means open); columns past 7 per arm are ignored, as the release does."""
    out = np.array(raw[:, : RAW_PER_ARM * n_arms], dtype=np.float64)
    out[:, RAW_PER_ARM - 1 :: RAW_PER_ARM] *= -1
    return out


def _arms(proprios: dict) -> list[str]:
    """Arm names (keys <arm>_ee_pos) in state slot order: 'left' then 'right' where they are named so,
    then any other names in the order they appear in `proprios`."""
    found = [key[: -len("_ee_pos")] for key in proprios if key.endswith("_ee_pos")]
    return [a for a in ARMS if a in found] + [a for a in found if a not in ARMS]


def _prompt(m: dict) -> str:
    """The episode's `prompt`, else the first of its `instructions` (the release samples one at random)."""
    if isinstance(m.get("prompt"), str):
        return str(m["prompt"])
    return next(x.strip() for x in m["instructions"] if isinstance(x, str) and x.strip())


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
        self._arms = _arms(first["proprios"])
        self._mode, self._action_dim = self._action_kind(first)
        for p, m in zip(self._files, self._metas, strict=True):
            if sorted(m["observations"]) != self._views:
                raise DataError(f"{p}: views {sorted(m['observations'])}, expected {self._views} like {p0}")
            rates = {v: float(o["fps"]) for v, o in m["observations"].items()}
            if any(r != self._fps for r in rates.values()):
                raise DataError(
                    f"{p}: observations' fps {rates}; expected {self._fps} for every view, like {p0}"
                )
            if _arms(m["proprios"]) != self._arms:
                raise DataError(
                    f"{p}: proprios has arms {_arms(m['proprios'])}, expected {self._arms} like {p0}"
                )
            mode, dim = self._action_kind(m)
            if (mode, dim) != (self._mode, self._action_dim):
                raise DataError(
                    f"{p}: actions are {self._describe(mode, dim)}, expected {self._describe(self._mode, self._action_dim)} like {p0}"
                )
        self._image_size = self._probe_size(first, p0)

    @staticmethod
    def _describe(mode: str, dim: int) -> str:
        return {POSE: "target poses", RAW: "actions.raw_actions", ARRAY: "a numeric array"}[
            mode
        ] + f" ({dim}-D)"

    def _action_kind(self, m: dict) -> tuple[str, int]:
        """(mode, stored action width) of a checked episode json."""
        acts = m.get("actions")
        n_arms = len(_arms(m["proprios"]))
        if isinstance(acts, dict):
            return (RAW if self.raw_actions else POSE), RAW_PER_ARM * n_arms
        key = "raw_actions" if self.raw_actions else "actions"
        return ARRAY, int(np.asarray(m[key]).reshape(m["num_frames"], -1).shape[1])

    def _load_json(self, p: str) -> dict:
        try:
            with open(p, encoding="utf-8") as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{p}: cannot read episode json ({type(exc).__name__}: {exc})") from None
        if not isinstance(m, dict):
            raise DataError(f"{p}: expected a JSON object, got {type(m).__name__}")
        for key in ("num_frames", "observations", "proprios"):
            if key not in m:
                raise DataError(f"{p}: missing key '{key}'")
        n = m["num_frames"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"{p}: num_frames is {n!r}; expected an integer >= 1")
        self._check_prompt(p, m)
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
            self._array(p, prop, "proprios", f"{arm}_ee_pos", n, (3,))
            self._array(p, prop, "proprios", f"{arm}_ee_rotm", n, "rotation")
            self._array(p, prop, "proprios", f"{arm}_gripper_pos", n, (1,))
        self._check_actions(p, m, arms, n)
        return m

    @staticmethod
    def _check_prompt(p: str, m: dict) -> None:
        if "prompt" in m:
            if not isinstance(m["prompt"], str):
                raise DataError(f"{p}: prompt is {m['prompt']!r}; expected a string")
            return
        if "instructions" not in m:
            raise DataError(f"{p}: missing key 'prompt' (or an 'instructions' list)")
        ins = m["instructions"]
        if not isinstance(ins, list) or not any(isinstance(x, str) and x.strip() for x in ins):
            raise DataError(
                f"{p}: instructions is {ins!r}; expected a list with at least one non-empty string"
            )

    @staticmethod
    def _array(
        p: str, parent: dict, where: str, key: str, n: int, shape: tuple[int, ...] | str
    ) -> np.ndarray:
        """parent[key] as float64 (n, *shape), or (n, 3, 3) for shape 'rotation'; one line otherwise."""
        expected = "(T, 3) rotation vectors, (T, 9) or (T, 3, 3)" if shape == "rotation" else str((n, *shape))
        if key not in parent:
            raise DataError(f"{p}: {where} is missing key '{key}'; expected {expected}")
        try:
            arr = np.asarray(parent[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{p}: {where}['{key}'] is not a numeric array; expected {expected}") from None
        if shape == "rotation":
            out = as_rotation_matrices(arr) if arr.ndim >= 1 and arr.shape[0] == n else None
            if out is None:
                raise DataError(
                    f"{p}: {where}['{key}'] has shape {arr.shape}; expected {expected} with T = num_frames {n}"
                )
        else:
            assert isinstance(shape, tuple)
            if arr.size != n * int(np.prod(shape)) or arr.ndim == 0 or arr.shape[0] != n:
                raise DataError(
                    f"{p}: {where}['{key}'] has shape {arr.shape}; expected {expected} for num_frames {n}"
                )
            out = arr.reshape(n, *shape)
        if not np.isfinite(out).all():
            raise DataError(f"{p}: {where}['{key}'] has NaN/inf; expected finite values")
        return out

    def _check_actions(self, p: str, m: dict, arms: list[str], n: int) -> None:
        acts = m.get("actions")
        if isinstance(acts, dict):
            if self.raw_actions:
                if "raw_actions" not in acts:
                    raise DataError(
                        f"{p}: actions has no 'raw_actions' (raw_actions = true); expected (T, 7 x arms) raw controller actions"
                    )
                raw = self._numeric(p, acts["raw_actions"], "actions.raw_actions", n)
                need = RAW_PER_ARM * len(arms)
                if raw.ndim != 2 or raw.shape[1] < need:
                    raise DataError(
                        f"{p}: 'actions.raw_actions' has shape {raw.shape}; expected ({n}, >= {need}): "
                        f"xyz, axis-angle, gripper for each of the arms {arms}"
                    )
                return
            for arm in arms:
                for key in (f"{arm}_ee_pos", f"{arm}_ee_rotm"):
                    if key not in acts and "raw_actions" in acts:
                        raise DataError(
                            f"{p}: actions is missing key '{key}' (target poses); it has 'raw_actions': "
                            "set prepare.xwam_release.raw_actions = true to import those"
                        )
                self._array(p, acts, "actions", f"{arm}_ee_pos", n, (3,))
                self._array(p, acts, "actions", f"{arm}_ee_rotm", n, "rotation")
            return
        key = "raw_actions" if self.raw_actions else "actions"
        if key not in m:
            raise DataError(
                f"{p}: missing key '{key}'"
                + (
                    " (raw_actions = true: 'actions.raw_actions' or a top-level 'raw_actions' array)"
                    if self.raw_actions
                    else ""
                )
            )
        self._numeric(p, m[key], key, n)

    @staticmethod
    def _numeric(p: str, value: object, key: str, n: int) -> np.ndarray:
        try:
            act = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(
                f"{p}: '{key}' is not a numeric array; expected (num_frames, D) or per-arm target poses"
            ) from None
        if act.ndim not in (1, 2) or act.shape[0] != n:
            raise DataError(f"{p}: '{key}' has shape {act.shape}; expected ({n}, D) for num_frames {n}")
        if not np.isfinite(act).all():
            raise DataError(f"{p}: '{key}' has NaN/inf; expected finite values")
        return act

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

    def _action_names(self) -> list[str]:
        if self._mode in (POSE, RAW):
            return ACTION_NAMES[: self._action_dim]
        names = self._metas[0].get("action_names")
        if (
            isinstance(names, list)
            and len(names) == self._action_dim
            and all(isinstance(x, str) for x in names)
        ):
            return list(names)
        return [f"action_{i}" for i in range(self._action_dim)]

    def info(self) -> SourceInfo:
        return SourceInfo(
            name="xwam_release",
            robot_type=str(self._metas[0].get("robot_type", "unknown")),
            fps=self._fps,
            views=list(self._views),
            image_size=self._image_size,
            state_names=STATE_NAMES[: 8 * len(self._arms)],
            action_names=self._action_names(),
            num_episodes=len(self._files),
            has_depth=True,
            has_cameras=False,
            depth_kind="relative",
            extra={
                "path": self.root,
                "actions": {
                    POSE: "delta: target poses minus proprios (action_skip 1)",
                    RAW: "actions.raw_actions (gripper sign-flipped)",
                    ARRAY: "raw_actions" if self.raw_actions else "actions",
                }[self._mode],
                "arms": list(self._arms),  # in state/action slot order (left_, right_)
                "view_types": {v: self._metas[0]["observations"][v]["type"] for v in self._views},
                "relative_depth": {"stored_mm": "value + 1", "release_reads": "value / 127.5 - 1"},
                "episode_files": [os.path.relpath(p, self.root) for p in self._files],
            },
        )

    def episodes(self) -> Iterator[Episode]:
        for p, m in zip(self._files, self._metas, strict=True):
            yield self._load_episode(p, m)

    def episodes_at(self, indices: Sequence[int]) -> Iterator[Episode]:
        """The episodes of these positions in the release's episode files (sorted), ascending."""
        for i in sorted(set(indices)):
            if not 0 <= i < len(self._files):
                raise DataError(f"{self.root}: episode position {i} of {len(self._files)} does not exist")
            yield self._load_episode(self._files[i], self._metas[i])

    def _actions(
        self, p: str, m: dict, proprio: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    ) -> np.ndarray:
        n = int(m["num_frames"])
        if self._mode == ARRAY:
            key = "raw_actions" if self.raw_actions else "actions"
            return np.asarray(m[key], np.float64).reshape(n, -1)
        acts = m["actions"]
        if self._mode == RAW:
            return raw_arm_actions(
                np.asarray(acts["raw_actions"], np.float64).reshape(n, -1), len(self._arms)
            )
        out = []
        for arm in self._arms:
            a_pos = self._array(p, acts, "actions", f"{arm}_ee_pos", n, (3,))
            a_rotm = self._array(p, acts, "actions", f"{arm}_ee_rotm", n, "rotation")
            try:
                out.append(delta_actions(*proprio[arm], a_pos, a_rotm))
            except ValueError as exc:
                raise DataError(f"{p}: actions['{arm}_ee_rotm'] is not a rotation matrix ({exc})") from None
        return np.concatenate(out, axis=1)

    def _load_episode(self, p: str, m: dict) -> Episode:
        n = int(m["num_frames"])
        prop = m["proprios"]
        state = np.zeros((n, 8 * len(self._arms)), np.float64)
        proprio = {}
        for i, arm in enumerate(self._arms):
            pos = self._array(p, prop, "proprios", f"{arm}_ee_pos", n, (3,))
            rotm = self._array(p, prop, "proprios", f"{arm}_ee_rotm", n, "rotation")
            grip = self._array(p, prop, "proprios", f"{arm}_gripper_pos", n, (1,))
            try:
                quat = rotm_to_quat_wxyz(rotm)
            except ValueError as exc:
                raise DataError(f"{p}: proprios['{arm}_ee_rotm'] is not a rotation matrix ({exc})") from None
            state[:, 8 * i : 8 * i + 8] = np.concatenate([pos, quat, grip], axis=1)
            proprio[arm] = (pos, rotm, grip[:, 0])
        action = self._actions(p, m, proprio).astype(np.float32)
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
        extra: dict[str, object] = {"source": "xwam_release", "file": os.path.relpath(p, self.root)}
        if isinstance(m.get("instructions"), list):
            extra["instructions"] = [x for x in m["instructions"] if isinstance(x, str)]
        ep = Episode(
            task=_prompt(m),
            views=views,
            state=state.astype(np.float32),
            action=action,
            fps=self._fps,
            success=bool(m.get("success", True)),
            extra=extra,
        )
        ep.validate(where=p)
        return ep
