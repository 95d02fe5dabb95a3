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
    mean_action (Da,)                          float64: the checkpoint's training mean (the mean-action baseline)
  world mode only:
    pred_rgb, true_rgb (N, V, T, H, W, 3)      uint8
    pred_depth, true_depth (N, V, T, H, W)     metres (truth: 0 = invalid)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xwam_core.errors import XWAMError

RUN_FORMAT = 1
MANIFEST = "manifest.json"
PREDICTIONS = "predictions.npz"
WORLD_ARRAYS = (
    "pred_rgb",
    "true_rgb",
    "pred_depth",
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
    "mean_action",
)


# ------------------------------------------------------------------------------------ store identity
def store_fingerprint(store_path: str | Path) -> str:
    """A content hash of a store's metadata (info, stats, tasks, episodes) and its data files' names and sizes.

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
    data = root / "data"
    if data.is_dir():
        for path in sorted(data.rglob("*.parquet")):
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
    def has_cameras(self) -> bool:
        return bool(self.manifest["store_has_cameras"])

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
    """Read a run folder written by `xwam infer`, or one XWAMError naming what is wrong with it."""
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
    if manifest.get("xwam_run") != RUN_FORMAT:
        raise XWAMError(f"{manifest_path}: run format {manifest.get('xwam_run')!r}, expected {RUN_FORMAT}")
    npz_path = path / PREDICTIONS
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise XWAMError(f"{npz_path}: missing; the run folder is incomplete") from None
    except (ValueError, OSError) as e:
        raise XWAMError(f"{npz_path}: unreadable ({e})") from None
    needed = COMMON_ARRAYS + (WORLD_ARRAYS if manifest.get("mode") == "world" else ())
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise XWAMError(f"{npz_path}: lacks array(s) {missing}")
    return RunData(path, manifest, arrays)


def check_store(run: RunData, store: str | Path | None = None) -> Path:
    """The run's store (or `store`), refused with one line if it is missing or is not the store the run used."""
    path = Path(store) if store is not None else Path(run.manifest["store"])
    if not (path / "meta" / "info.json").is_file():
        hint = "" if store is not None else "; pass --data STORE if it moved"
        raise XWAMError(f"{path}: the run's episode store is not there (run {run.path}){hint}")
    found = store_fingerprint(path)
    expected = run.manifest["store_fingerprint"]
    if found != expected:
        raise XWAMError(
            f"{path}: store fingerprint {found} differs from the run's {expected} ({run.path} was made "
            "from another or a changed store); rerun `xwam infer` on this store"
        )
    return path


def safe_name(name: str) -> str:
    """A file-name-safe version of a view or task name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "_"
