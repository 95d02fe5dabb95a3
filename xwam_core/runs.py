"""Run folders: what `xwam infer` writes and `xwam reconstruct` / `xwam evaluate` read.

    RUN/
      manifest.json     command, checkpoint, store (+ fingerprint), resolved recipe, mode, latency
      predictions.npz   prediction and truth per window (arrays below), read with allow_pickle=False
      videos/VIEW.mp4   world mode: truth | prediction, RGB over colour-mapped depth, window after window
      points/           `xwam reconstruct`: PLY clouds, PNG previews, optional TSDF meshes
      metrics.json      `xwam evaluate`

A run folder is written under a temporary name beside RUN and renamed when complete, so a crash or
Ctrl-C never leaves a half-written run. Arrays of predictions.npz (N windows, V views, T = F + 1 frames,
frame 0 the observed one, K actions):
    episode_index, frame_index (N,)            the window's episode and first frame in it
    task (N,)                                  task text
    pred_actions, true_actions (N, K, Da)      dataset units
    pred_states, true_states (N, T, Ds)        dataset units
    latency_s (N,)                             denoising (+ decoding) wall time per window
    mean_action (Da,)                          float64: the checkpoint's training mean (the mean-action baseline;
                                               absent when the checkpoint has no mean, e.g. a converted release one)
  world mode only:
    pred_rgb, true_rgb (N, V, T, H, W, 3)      uint8
    pred_depth, true_depth (N, V, T, H, W)     metres (truth: 0 = invalid); no pred_depth when the checkpoint
                                               has no depth branch (num_depth_blocks = 0)
    intrinsics (N, V, T, 3, 3)                 recorded
    extrinsics (N, V, T, 4, 4)                 recorded camera-to-world (the truth's cameras)
    pred_extrinsics (N, V, T, 4, 4)            the cameras the prediction is unprojected with (see infer_run)
  world mode, when the store has episodes besides the evaluated ones (the mean-frame baseline):
    mean_rgb (V, T, H, W, 3)                   float32: the average window of the other episodes
    mean_depth (V, T, H, W)                    float32 metres (stores with depth)
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xwam_core.errors import XWAMError

RUN_FORMAT = 1
MANIFEST = "manifest.json"
PREDICTIONS = "predictions.npz"
WORLD_ARRAYS = (  # and pred_depth, unless the checkpoint has no depth branch
    "pred_rgb",
    "true_rgb",
    "true_depth",
    "intrinsics",
    "extrinsics",
    "pred_extrinsics",
)
COMMON_ARRAYS = (
    "episode_index",
    "frame_index",
    "task",
    "pred_actions",
    "true_actions",
    "pred_states",
    "true_states",
    "latency_s",
)
# What evaluate and reconstruct read, checked once by load_run. Axes: N windows, V views (the manifest's),
# T = future_frames + 1 frames, K actions, A action dims, S state dims, H x W pixels; digits are fixed
# sizes. Kinds: "int", "float", "uint8", "str".
ARRAY_SPECS: dict[str, tuple[str, str]] = {
    "episode_index": ("N", "int"),
    "frame_index": ("N", "int"),
    "task": ("N", "str"),
    "pred_actions": ("N K A", "float"),
    "true_actions": ("N K A", "float"),
    "pred_states": ("N T S", "float"),
    "true_states": ("N T S", "float"),
    "latency_s": ("N", "float"),
    "mean_action": ("A", "float"),
    "pred_rgb": ("N V T H W 3", "uint8"),
    "true_rgb": ("N V T H W 3", "uint8"),
    "pred_depth": ("N V T H W", "float"),
    "true_depth": ("N V T H W", "float"),
    "intrinsics": ("N V T 3 3", "float"),
    "extrinsics": ("N V T 4 4", "float"),
    "pred_extrinsics": ("N V T 4 4", "float"),
    "mean_rgb": ("V T H W 3", "float"),
    "mean_depth": ("V T H W", "float"),
}
_KINDS = {"int": "iu", "float": "f", "str": "U"}  # numpy dtype kinds; uint8 is checked exactly
AXES = {"N": "windows", "V": "views", "T": "frames", "K": "actions", "A": "action dims", "S": "state dims"}
# manifest key -> (JSON type, what it holds); the keys evaluate and reconstruct read
MANIFEST_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "mode": (str, "'world' or 'policy'"),
    "views": (list, "a list of view names"),
    "store": (str, "the episode store's path"),
    "store_has_depth": (bool, "true/false"),
    "store_has_cameras": (bool, "true/false"),
    "max_depth": ((int, float), "a depth > 0 in metres"),
    "episodes": (list, "a list of episode indices"),
    "future_frames": (int, "an integer >= 1"),
}
OPTIONAL_MANIFEST_KEYS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "store_fingerprint": (str, "a string"),
    "checkpoint": (str, "the checkpoint's path"),
    "episodes_reason": (str, "a string"),
    "mean_frame": (dict, "a table"),
}


# ------------------------------------------------------------------------------------ store identity
def store_fingerprint(store_path: str | Path) -> str:
    """A content hash of a store's metadata (info, stats, tasks, episodes) and its data and video files'
    names and sizes.

    Re-preparing a store with other episodes or settings changes it; reading it does not (the frame
    cache is not part of it). Hashing the metadata rather than every frame keeps it instant.
    """
    from xwam_core.data.store import EPISODES_PATH

    root = Path(store_path)
    digest = hashlib.sha256()
    for rel in ("meta/info.json", "meta/stats.json", "meta/tasks.parquet", EPISODES_PATH):
        path = root / rel
        digest.update(rel.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    for folder, pattern in (("data", "*.parquet"), ("videos", "*.mp4")):
        if (root / folder).is_dir():
            for path in sorted((root / folder).rglob(pattern)):
                digest.update(f"{path.relative_to(root)}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def json_number(x: float | None) -> float | None:
    """NaN/inf -> None (JSON has no NaN); a float otherwise."""
    if x is None or not np.isfinite(x):
        return None
    return float(x)


# ------------------------------------------------------------------------------------ reading
@dataclass
class RunData:
    """A run folder in memory: its manifest and the arrays of predictions.npz."""

    path: Path
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def mode(self) -> str:
        return str(self.manifest["mode"])

    @property
    def views(self) -> list[str]:
        return list(self.manifest["views"])

    @property
    def num_windows(self) -> int:
        return len(self.arrays["episode_index"])

    @property
    def has_depth(self) -> bool:
        return bool(self.manifest["store_has_depth"])

    @property
    def has_pred_depth(self) -> bool:
        """Whether the model predicted depth (False: a checkpoint without a depth branch)."""
        return "pred_depth" in self.arrays

    @property
    def has_cameras(self) -> bool:
        return bool(self.manifest["store_has_cameras"])

    @property
    def depth_kind(self) -> str:
        """'metric', or 'relative' for a store imported from the xwam release (older runs: metric)."""
        return str(self.manifest.get("store_depth_kind", "metric"))

    @property
    def max_depth(self) -> float:
        return float(self.manifest["max_depth"])

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    def require_world(self, command: str) -> None:
        if self.mode != "world":
            raise XWAMError(
                f"{self.path}: a policy-mode run has no predicted RGB-D for {command}; "
                "rerun `xwam infer --mode world`"
            )


def load_run(path: str | Path) -> RunData:
    """Read a run folder written by `xwam infer`, or one XWAMError naming what is wrong with it: a missing
    or damaged file, a manifest key that is missing or of the wrong type, an array of the wrong shape or
    dtype. Checked once here, so evaluate and reconstruct can trust what they read."""
    path = Path(path)
    if not path.is_dir():
        raise XWAMError(f"{path}: run folder not found (expected a folder made by `xwam infer`)")
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise XWAMError(f"{manifest_path}: missing; is {path} a run folder made by `xwam infer`?") from None
    except json.JSONDecodeError as e:
        raise XWAMError(f"{manifest_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise XWAMError(
            f"{manifest_path}: unreadable ({_reason(e)}); expected the JSON `xwam infer` writes"
        ) from None
    if not isinstance(manifest, dict):
        raise XWAMError(
            f"{manifest_path}: a JSON {type(manifest).__name__}; expected an object of run settings"
        )
    if manifest.get("xwam_run") != RUN_FORMAT:
        raise XWAMError(f"{manifest_path}: run format {manifest.get('xwam_run')!r}, expected {RUN_FORMAT}")
    _check_manifest(manifest, manifest_path)
    npz_path = path / PREDICTIONS
    arrays = _read_predictions(npz_path)
    needed = COMMON_ARRAYS + (WORLD_ARRAYS if manifest["mode"] == "world" else ())
    if manifest["mode"] == "world" and manifest.get("predicts_depth", True):
        needed += ("pred_depth",)  # only a run whose manifest says the model has no depth branch lacks it
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise XWAMError(f"{npz_path}: lacks array(s) {missing}")
    _check_arrays(arrays, npz_path, views=len(manifest["views"]), frames=manifest["future_frames"] + 1)
    if "mean_rgb" in arrays:
        info = manifest.get("mean_frame")
        if not (
            isinstance(info, dict)
            and isinstance(info.get("windows"), int)
            and isinstance(info.get("episodes"), list)
        ):
            raise XWAMError(
                f"{manifest_path}: 'mean_frame' is {info!r}; expected a table with 'windows' (an integer) and "
                "'episodes' (a list), as predictions.npz has the mean-frame baseline"
            )
    return RunData(path, manifest, arrays)


def _reason(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def _check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """Every key evaluate and reconstruct read is there, with its JSON type (one line for the first that is not)."""

    def check(key: str, kind: type | tuple[type, ...], expected: str) -> None:
        value = manifest[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, (int, float)))
        if not ok:
            raise XWAMError(f"{where}: '{key}' is {value!r}; expected {expected}")

    for key, (kind, expected) in MANIFEST_KEYS.items():
        if key not in manifest:
            raise XWAMError(f"{where}: lacks '{key}' ({expected}); is it a run folder made by `xwam infer`?")
        check(key, kind, expected)
    for key, (kind, expected) in OPTIONAL_MANIFEST_KEYS.items():
        if key in manifest:
            check(key, kind, expected)
    checks = [
        ("mode", manifest["mode"] in ("world", "policy"), "'world' or 'policy'"),
        (
            "views",
            bool(manifest["views"]) and all(isinstance(v, str) for v in manifest["views"]),
            "view names",
        ),
        (
            "episodes",
            all(isinstance(e, int) and not isinstance(e, bool) for e in manifest["episodes"]),
            "episode indices",
        ),
        (
            "max_depth",
            np.isfinite(manifest["max_depth"]) and manifest["max_depth"] > 0,
            "a depth > 0 in metres",
        ),
        ("future_frames", manifest["future_frames"] >= 1, "an integer >= 1"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise XWAMError(f"{where}: '{key}' is {manifest[key]!r}; expected {expected}")


def _read_predictions(npz_path: Path) -> dict[str, np.ndarray]:
    """The arrays of predictions.npz; a missing, truncated or foreign file is one line."""
    if npz_path.is_dir():
        raise XWAMError(f"{npz_path}: is a folder; expected the .npz of predictions `xwam infer` writes")
    if not npz_path.is_file():
        raise XWAMError(f"{npz_path}: missing; the run folder is incomplete (rerun `xwam infer`)")
    if not zipfile.is_zipfile(npz_path):
        raise XWAMError(
            f"{npz_path}: not a zip archive (truncated, or not written by `xwam infer`); expected the .npz "
            "of predictions `xwam infer` writes"
        )
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as e:
        raise XWAMError(
            f"{npz_path}: unreadable ({_reason(e)}); expected the .npz `xwam infer` writes"
        ) from None


def _check_arrays(arrays: dict[str, np.ndarray], where: Path, views: int, frames: int) -> None:
    """Shapes and dtypes against ARRAY_SPECS: an axis letter has one length in every array (V and T come
    from the manifest). One line naming the first array that does not fit."""
    sizes: dict[str, int] = {"V": views, "T": frames}
    for name, (axes_text, kind) in ARRAY_SPECS.items():
        if name not in arrays:
            continue
        array, axes = arrays[name], axes_text.split()
        dtype_ok = array.dtype == np.uint8 if kind == "uint8" else array.dtype.kind in _KINDS[kind]
        if not dtype_ok:
            raise XWAMError(f"{where}: array '{name}' has dtype {array.dtype}; expected {kind}")
        fits = array.ndim == len(axes)
        for axis, n in zip(axes, array.shape, strict=False):
            fits = fits and n == (int(axis) if axis.isdigit() else sizes.setdefault(axis, n))
        if not fits:
            expected = ", ".join(
                axis if axis.isdigit() else f"{axis}={sizes[axis]}" if axis in sizes else axis
                for axis in axes
            )
            named = "; ".join(f"{a}: {AXES[a]}" for a in axes if a in AXES and a in sizes)
            raise XWAMError(
                f"{where}: array '{name}' has shape {tuple(array.shape)}; expected ({expected})"
                + (f" ({named})" if named else "")
            )
    if sizes.get("N", 1) < 1:
        raise XWAMError(f"{where}: no windows; expected at least one prediction")


def check_store(run: RunData, store: str | Path | None = None) -> Path:
    """The run's store (or `store`), refused with one line if it is missing or is not the store the run used."""
    path = Path(store) if store is not None else Path(run.manifest["store"])
    if not (path / "meta" / "info.json").is_file():
        hint = "" if store is not None else "; pass --data STORE if it moved"
        raise XWAMError(f"{path}: the run's episode store is not there (run {run.path}){hint}")
    expected = run.manifest.get("store_fingerprint")
    if expected is None:
        raise XWAMError(
            f"{run.path / MANIFEST}: has no 'store_fingerprint', so the store cannot be matched to the run; "
            "rerun `xwam infer`"
        )
    found = store_fingerprint(path)
    if found != expected:
        raise XWAMError(
            f"{path}: store fingerprint {found} differs from the run's {expected} ({run.path} was made "
            "from another or a changed store); rerun `xwam infer` on this store"
        )
    return path


def safe_name(name: str) -> str:
    """A file-name-safe version of a view or task name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"
