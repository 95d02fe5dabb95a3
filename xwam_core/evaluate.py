"""`xwam evaluate RUN`: offline metrics of a run folder, the model beside trivial baselines.

Only FUTURE frames count (window frames 1..F; frame 0 is the observed one the model is given).
Baselines, computed on the same windows, frames and pixels:
    repeat_frame   the observed frame repeated for every future frame: its RGB and depth, and so its
                   point cloud (frame 0's cloud for every step: a world where nothing moves)
    mean_frame     the average frame of the store's OTHER episodes (mean_frame.py), per view and window
                   frame: RGB and depth metrics only (an averaged depth map is no scene to compare clouds
                   with); present when `xwam infer` found other episodes to average
    zero_action    all-zero actions (dataset units)
    mean_action    the checkpoint's training mean action, for every step
Aggregation: RGB and depth metrics give one value per (window, view, future frame); a view's value is
their mean and `overall` the mean over every view. Chamfer compares the fused clouds of all views, one
value per (window, future step). Action metrics average every element of every chunk.
PSNR of identical images is +inf; each value is capped at PSNR_CAP_DB (100 dB, an MSE of 6.5e-6 grey
levels^2) before averaging, and the number of capped values is reported.
Depth metrics use the pixels with 0 < true depth <= max_depth (the run's, 0.9 x the model's far plane):
beyond it the truth is background the model cannot represent. NaN values (no valid pixel, empty cloud)
are left out of the means and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xwam_core.errors import XWAMError
from xwam_core.geometry import chamfer_distance
from xwam_core.metrics import METRICS, MetricSpec
from xwam_core.progress import SILENT, Progress
from xwam_core.reconstruct import check_max_depth, check_voxel_size, step_cloud
from xwam_core.runs import RunData, json_number

PSNR_CAP_DB = 100.0
IMAGE_BASELINES = ("repeat_frame", "mean_frame")
ACTION_BASELINES = ("zero_action", "mean_action")


def applicable_metrics(run: RunData, with_lpips: bool) -> list[MetricSpec]:
    """The default metric list of a run: every metric its data allows (LPIPS only with weights)."""
    out = []
    for spec in METRICS.values():
        if spec.needs_weights and not with_lpips:
            continue
        if _missing(run, spec) is None:
            out.append(spec)
    return out


def _missing(run: RunData, spec: MetricSpec) -> str | None:
    """Why `spec` cannot be computed on this run, or None."""
    if spec.kind == "action":
        if run.manifest.get("actions") == "recorded":
            return "its actions are the recorded ones, given (xwam infer --actions recorded)"
        return None
    if run.mode != "world":
        return "a policy-mode run has actions only; rerun `xwam infer --mode world`"
    if spec.kind in ("depth", "points") and not run.has_depth:
        return f"the run's store {run.manifest['store']} has no depth"
    if spec.kind in ("depth", "points") and not run.has_pred_depth:
        return "the checkpoint predicts no depth (it has no depth branch: num_depth_blocks = 0)"
    if spec.kind == "points" and not run.has_cameras:
        return f"the run's store {run.manifest['store']} has no cameras"
    return None


def check_metrics(run: RunData, specs: list[MetricSpec]) -> None:
    """One line naming the first metric this run cannot give, and why."""
    for spec in specs:
        reason = _missing(run, spec)
        if reason is not None:
            raise XWAMError(f"{run.path}: cannot compute {spec.name} ({spec.kind}): {reason}")


def _mean(values: np.ndarray) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def _summarise(values: np.ndarray, views: list[str] | None) -> dict[str, Any]:
    """values (N, V, F) or (N, F) -> overall, per view, per future step (means, NaN left out)."""
    out: dict[str, Any] = {"overall": _mean(values)}
    if views is not None:
        out["per_view"] = {v: _mean(values[:, i]) for i, v in enumerate(views)}
        per_step = values.transpose(2, 0, 1).reshape(values.shape[2], -1)
    else:
        per_step = values.T
    out["per_step"] = [_mean(s) for s in per_step]
    return out


def image_values(
    run: RunData, spec: MetricSpec, lpips: Any = None, max_depth: float | None = None
) -> dict[str, np.ndarray]:
    """Per (window, view, future frame) values (N, V, F) of the model and of the image baselines
    (repeat_frame; mean_frame when the run has it)."""
    limit = run.max_depth if max_depth is None else max_depth
    if spec.kind not in ("rgb", "depth"):
        raise XWAMError(f"image_values: {spec.name} is not an image metric")
    kind = spec.kind
    true = run[f"true_{kind}"][:, :, 1:]
    candidates = {
        "model": run[f"pred_{kind}"][:, :, 1:],
        "repeat_frame": np.repeat(run[f"true_{kind}"][:, :, :1], true.shape[2], axis=2),
    }
    if f"mean_{kind}" in run.arrays:  # (V, T, ...) -> every window
        candidates["mean_frame"] = np.repeat(run[f"mean_{kind}"][None, :, 1:], len(true), axis=0)
    if spec.name == "lpips":
        if lpips is None:
            raise XWAMError("lpips: no LPIPSMetric given (it needs local AlexNet weights)")
        return {k: lpips(v, true) for k, v in candidates.items()}
    if kind == "depth":
        valid = true <= limit
        return {k: spec.fn(v, true, valid=valid) for k, v in candidates.items()}
    out = {k: spec.fn(v, true, data_range=255.0) for k, v in candidates.items()}
    if spec.name == "psnr":
        out = {k: np.minimum(v, PSNR_CAP_DB) for k, v in out.items()}
    return out


def chamfer_values(
    run: RunData,
    max_depth: float | None = None,
    voxel_size: float | None = None,
    progress: Progress = SILENT,
) -> dict[str, np.ndarray]:
    """Chamfer distances (N, F) of the model's and the repeat-frame baseline's fused clouds to the truth's."""
    n, steps = run.num_windows, run["pred_depth"].shape[2] - 1
    bar = progress.task("chamfer clouds", total=n * steps)
    out = {"model": np.full((n, steps), np.nan), "repeat_frame": np.full((n, steps), np.nan)}
    for w in range(n):
        repeat, _ = step_cloud(run, w, 0, "repeat", max_depth, voxel_size)
        for t in range(1, steps + 1):
            true, _ = step_cloud(run, w, t, "true", max_depth, voxel_size)
            if len(true):
                pred, _ = step_cloud(run, w, t, "pred", max_depth, voxel_size)
                if len(pred):
                    out["model"][w, t - 1] = chamfer_distance(pred, true)
                if len(repeat):
                    out["repeat_frame"][w, t - 1] = chamfer_distance(repeat, true)
            bar.advance()
    return out


def action_values(run: RunData, spec: MetricSpec) -> dict[str, float]:
    true = run["true_actions"]
    values = {
        "model": spec.fn(run["pred_actions"], true),
        "zero_action": spec.fn(np.zeros_like(true), true),
    }
    if "mean_action" in run.arrays:  # absent when the checkpoint has no training mean (converted release)
        values["mean_action"] = spec.fn(np.broadcast_to(run["mean_action"], true.shape).copy(), true)
    return values


def evaluate_run(
    run: RunData,
    specs: list[MetricSpec],
    lpips: Any = None,
    max_depth: float | None = None,
    voxel_size: float | None = None,
    progress: Progress = SILENT,
) -> dict[str, Any]:
    """metrics.json's content: every metric of `specs` for the model and its baselines."""
    check_max_depth(max_depth)
    check_voxel_size(voxel_size)
    check_metrics(run, specs)
    limit = run.max_depth if max_depth is None else max_depth
    result: dict[str, Any] = {}
    bar = progress.task("metrics", total=len(specs))
    for spec in specs:
        bar.advance(0, info=spec.name)  # the metric being computed, before its (possibly long) work
        entry: dict[str, Any] = {
            "kind": spec.kind,
            "unit": spec.unit,
            "higher_is_better": spec.higher_is_better,
            "baselines": {},
        }
        if spec.kind in ("rgb", "depth"):
            values = image_values(run, spec, lpips, limit)
            entry["model"] = _summarise(values["model"], run.views)
            for name in IMAGE_BASELINES:
                if name in values:
                    entry["baselines"][name] = _summarise(values[name], run.views)
            entry["count"] = int(values["model"].size)
            entry["nan"] = int(np.isnan(values["model"]).sum())
            if spec.name == "psnr":
                entry["capped_at_db"] = PSNR_CAP_DB
                entry["capped"] = {k: int((v >= PSNR_CAP_DB).sum()) for k, v in values.items()}
        elif spec.kind == "points":
            values = chamfer_values(run, limit, voxel_size, progress)
            entry["model"] = _summarise(values["model"], None)
            entry["baselines"]["repeat_frame"] = _summarise(values["repeat_frame"], None)
            entry["count"] = int(values["model"].size)
            entry["nan"] = int(np.isnan(values["model"]).sum())
            entry["voxel_size"] = voxel_size
        else:
            scalars = action_values(run, spec)
            entry["model"] = {"overall": json_number(scalars["model"])}
            for name in ACTION_BASELINES:
                if name in scalars:
                    entry["baselines"][name] = {"overall": json_number(scalars[name])}
            entry["count"] = int(run["true_actions"].size)
        result[spec.name] = entry
        bar.advance()
    m = run.manifest
    return {
        "run": str(run.path.resolve()),
        "checkpoint": m.get("checkpoint"),
        "store": m["store"],
        "store_fingerprint": m.get("store_fingerprint"),
        "mode": run.mode,
        "windows": run.num_windows,
        "episodes": m["episodes"],
        "episodes_reason": m.get("episodes_reason"),
        "future_frames": m["future_frames"],
        "views": run.views,
        "max_depth": limit,
        "metrics": result,
        "conventions": {
            "frames": "future frames 1..F only",
            "aggregation": "per (window, view, future frame) for RGB/depth, per (window, step) for chamfer; "
            "means leave NaN out; overall = mean over all views",
            "psnr": f"each value capped at {PSNR_CAP_DB} dB (identical images give +inf)",
            "depth_valid": "0 < true depth <= max_depth",
            "clouds": "all views fused; pixels with 0 < depth <= max_depth",
            "baselines": "repeat_frame: observed frame for every future frame; mean_frame: the average "
            "frame of the store's other episodes (RGB and depth metrics; "
            f"{_mean_frame_source(run)}); zero_action: zeros; mean_action: the checkpoint's training mean (when it has one)",
        },
    }


def _mean_frame_source(run: RunData) -> str:
    info = run.manifest.get("mean_frame")
    if "mean_rgb" not in run.arrays or not info:
        reason = (info or {}).get("reason", "not in this run")
        return f"absent: {reason}"
    return (
        f"{info['windows']} windows of {len(info['episodes'])} other episodes, listed in the run's manifest"
    )


def model_ahead(entry: dict[str, Any], key: str = "overall") -> bool | None:
    """Whether the model beats every baseline on this metric (None if a number is missing)."""
    model = entry["model"].get(key)
    others = [b.get(key) for b in entry["baselines"].values()]
    if model is None or any(o is None for o in others):
        return None
    if entry["higher_is_better"]:
        return all(model > o for o in others)
    return all(model < o for o in others)


def default_out(run: RunData) -> Path:
    return run.path / "metrics.json"


# what `xwam evaluate` writes: offline metrics (evaluate_run) and the closed loop's results (--sim)
RESULT_KEYS = ("metrics", "success_rate")
_LARGEST_RESULT = 256 * 2**20  # bytes: larger is no results file of ours (and is not read to find out)


def check_results_file(path: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse, before any work, an existing results file unless `overwrite`; even then only a JSON that
    `xwam evaluate` wrote (offline metrics or a closed loop's results) is replaced, never another file."""
    if not path.exists():
        return
    if path.is_dir():
        raise XWAMError(f"{flag} {path}: is a folder; expected a file path")
    if not overwrite:
        raise XWAMError(f"{flag} {path}: already exists; pass --overwrite to replace it")
    content: Any = None
    try:
        if path.stat().st_size <= _LARGEST_RESULT:
            import json

            content = json.loads(path.read_bytes())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not ours
        pass
    if not (isinstance(content, dict) and any(key in content for key in RESULT_KEYS)):
        raise XWAMError(
            f"{flag} {path}: exists and is not a results JSON of `xwam evaluate`; refusing to replace it "
            "with --overwrite (give another --out)"
        )


def check_video_folder(path: Path, overwrite: bool, flag: str = "--video") -> None:
    """Refuse, before any work, a folder that already holds files unless `overwrite`: the rollouts'
    TASK_epNNN_model.mp4 would replace an earlier run's of the same name and sit among the others'."""
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise XWAMError(
            f"{flag} {path}: already holds files (an earlier run's videos?); pass --overwrite to replace "
            "the mp4s of the same names, or give an empty or new folder"
        )
