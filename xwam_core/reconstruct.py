"""`xwam reconstruct`: a run's predicted RGB-D -> one world-frame point cloud per window and future step.

For window w and future step t (1..F), every view's depth is unprojected with its intrinsics and
camera-to-world pose and the views are concatenated (geometry.fuse_views), coloured by the RGB:
    prediction   pred_depth / pred_rgb with pred_extrinsics (see infer_run: fixed views keep their
                 pose, wrist views follow the predicted end-effector pose)
    truth        true_depth / true_rgb with the recorded extrinsics
    repeat       the observed frame's truth (frame 0) with frame 0's cameras: the repeat-the-current-frame
                 baseline, a world where nothing moves
A pixel takes part when 0 < depth <= max_depth (default 0.9 x the model's far plane, in the manifest):
the model is trained to put missing depth (background) at the far plane, and truth beyond its range
cannot be predicted. The same rule builds all three clouds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xwam_core.atomic import atomic_folder, write_json_atomic
from xwam_core.errors import XWAMError
from xwam_core.geometry import fuse_views
from xwam_core.progress import SILENT, Progress, ProgressTask
from xwam_core.runs import RunData, load_run

WHICH = ("pred", "true", "repeat")
PREVIEW_SIZE = (360, 480)  # (H, W) of each panel of a side-by-side preview
OVERVIEW_SIZE = (180, 240)


def require_geometry(run: RunData, command: str) -> None:
    """One line unless the run has predicted depth, recorded depth and cameras."""
    run.require_world(command)
    if not run.has_pred_depth:
        raise XWAMError(
            f"{run.path}: the checkpoint predicts no depth (it has no depth branch: num_depth_blocks = 0), "
            f"so there is nothing to unproject for {command}"
        )
    if run.depth_kind == "relative":
        raise XWAMError(
            f"{run.path}: depth is relative (imported from the xwam release): point clouds need metric depth"
        )
    if not run.has_cameras:
        raise XWAMError(
            f"{run.path}: the run's store {run.manifest['store']} has no cameras (intrinsics/extrinsics), "
            f"so its depth cannot be unprojected for {command}"
        )
    if not run.has_depth:
        raise XWAMError(
            f"{run.path}: the run's store {run.manifest['store']} has no depth: there is no true geometry "
            f"to compare with, and the depth branch was never trained, for {command}"
        )


# Open3D's voxel grid counts a cloud's extent in voxels with 32-bit integers and refuses a voxel that makes
# more than 2**31 - 1 of them a side ("voxel_size is too small"): at 1 micrometre that is 2 km, beyond any
# scene a camera's depth covers, and no depth map resolves anything finer.
MIN_VOXEL_SIZE = 1e-6


def check_voxel_size(voxel_size: float | None, flag: str = "--voxel-size") -> None:
    """One line, before any work, unless `voxel_size` is None or a finite length >= MIN_VOXEL_SIZE metres."""
    if voxel_size is not None and not (math.isfinite(voxel_size) and voxel_size >= MIN_VOXEL_SIZE):
        raise XWAMError(
            f"{flag} {voxel_size}: expected a finite length > 0 in metres, at least {MIN_VOXEL_SIZE:g} "
            "(1 micrometre: Open3D cannot grid a scene finer)"
        )


def check_max_depth(max_depth: float | None, flag: str = "--max-depth") -> None:
    """One line, before any work, unless `max_depth` is None or a finite depth > 0 metres."""
    if max_depth is not None and not (math.isfinite(max_depth) and max_depth > 0):
        raise XWAMError(f"{flag} {max_depth}: expected a finite depth > 0 in metres")


def cloud_depth(depth: np.ndarray, max_depth: float) -> np.ndarray:
    """Depth with the pixels that do not take part (<= 0, non-finite, beyond max_depth) set to 0."""
    depth = np.asarray(depth, dtype=np.float32)
    keep = np.isfinite(depth) & (depth > 0) & (depth <= max_depth)
    return np.where(keep, depth, np.float32(0))


def step_cloud(
    run: RunData,
    window: int,
    step: int,
    which: str,
    max_depth: float | None = None,
    voxel_size: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The fused world-frame cloud (N, 3) and its colours (N, 3) uint8 of one window and step."""
    if which not in WHICH:
        raise XWAMError(f"step_cloud: which={which!r}, expected one of {WHICH}")
    limit = run.max_depth if max_depth is None else max_depth
    frame = 0 if which == "repeat" else step
    prefix = "pred" if which == "pred" else "true"
    depths = run[f"{prefix}_depth"][window, :, frame]  # (V, H, W)
    rgbs = run[f"{prefix}_rgb"][window, :, frame]  # (V, H, W, 3)
    poses = run["pred_extrinsics" if which == "pred" else "extrinsics"][window, :, frame]  # (V, 4, 4)
    Ks = run["intrinsics"][window, :, frame]  # (V, 3, 3)
    try:
        points, colors = fuse_views(
            [cloud_depth(d, limit) for d in depths], list(Ks), list(poses), list(rgbs), voxel_size=voxel_size
        )
    except RuntimeError as e:  # Open3D's grid limit, for a cloud over 2 km across at the smallest voxel
        if voxel_size is None or "voxel_size is too small" not in str(e):
            raise
        raise XWAMError(
            f"--voxel-size {voxel_size}: too small for the cloud of window {window}, step {step} (Open3D "
            "grids at most 2**31 - 1 voxels a side); expected a larger voxel or a smaller --max-depth"
        ) from None
    assert colors is not None
    return points, colors


@dataclass
class ReconstructSummary:
    out_dir: Path
    windows: int
    steps: int
    files: int
    points_pred: list[int] = field(default_factory=list)
    points_true: list[int] = field(default_factory=list)
    meshes: bool = False


def _core(points: np.ndarray, low: float = 3.0, high: float = 97.0) -> np.ndarray:
    """The points inside the per-axis 3rd-97th percentile box: previews frame the scene, not stray far
    surfaces (a floor seen at the edge of one view)."""
    if len(points) < 10:
        return points
    lo, hi = np.percentile(points, low, axis=0), np.percentile(points, high, axis=0)
    inside = np.all((points >= lo) & (points <= hi), axis=1)
    return points[inside] if inside.sum() >= 10 else points


def _overview(panels: list[list[np.ndarray]], titles: list[str], path: Path) -> None:
    """A grid: one column per step, prediction above truth."""
    from PIL import Image, ImageDraw

    h, w = OVERVIEW_SIZE
    gap, banner = 4, 16
    cols, rows = len(panels), 2
    canvas = Image.new("RGB", (cols * (w + gap), rows * (h + banner)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (pred, true) in enumerate(panels):
        for r, (img, label) in enumerate(((pred, "prediction"), (true, "truth"))):
            x, y = c * (w + gap), r * (h + banner)
            canvas.paste(Image.fromarray(img), (x, y + banner))
            draw.text((x + 4, y + 2), f"{titles[c]} {label}", fill=(0, 0, 0))
    canvas.save(path, format="PNG")


def reconstruct_run(
    run_path: str | Path,
    tsdf: bool = False,
    voxel_size: float | None = None,
    max_depth: float | None = None,
    overwrite: bool = False,
    progress: Progress = SILENT,
) -> ReconstructSummary:
    """Write RUN/points/: per window a folder with PLY clouds, previews and (tsdf) meshes; index.json."""
    run = load_run(run_path)
    require_geometry(run, "reconstruction")
    check_voxel_size(voxel_size)
    check_max_depth(max_depth)
    limit = run.max_depth if max_depth is None else max_depth
    out = run.path / "points"
    if out.exists() and not overwrite:
        raise XWAMError(f"{out}: already exists; pass --overwrite to replace it")
    n_windows = run.num_windows
    steps = list(range(1, run["pred_depth"].shape[2]))
    bar = progress.task("steps", total=n_windows * len(steps))
    index: dict[str, Any] = {
        "max_depth": limit,
        "voxel_size": voxel_size,
        "views": run.views,
        "note": "clouds fuse every view; pixels with 0 < depth <= max_depth; colours from the RGB",
        "windows": [],
    }
    summary = ReconstructSummary(out, n_windows, len(steps), 0, meshes=tsdf)
    with atomic_folder(out, overwrite=overwrite, replaces="index.json") as tmp:
        for w in range(n_windows):
            entry = _reconstruct_window(run, w, steps, limit, voxel_size, tsdf, tmp, summary, bar)
            index["windows"].append(entry)
        write_json_atomic(tmp / "index.json", index)
    return summary


def _preview_cameras(framing: np.ndarray) -> tuple[Any, Any]:
    """One camera for every step of a window, framing `framing`: full-size previews and the overview's."""
    from xwam_core.geometry import RenderView, auto_view

    view = auto_view(_core(framing), *PREVIEW_SIZE)
    small = RenderView(
        np.array(
            [
                [view.K[0, 0] / 2, 0, (OVERVIEW_SIZE[1] - 1) / 2],
                [0, view.K[1, 1] / 2, (OVERVIEW_SIZE[0] - 1) / 2],
                [0, 0, 1],
            ]
        ),
        view.cam_to_world,
        *OVERVIEW_SIZE,
    )
    return view, small


def _reconstruct_window(
    run: RunData,
    w: int,
    steps: list[int],
    limit: float,
    voxel_size: float | None,
    tsdf: bool,
    root: Path,
    summary: ReconstructSummary,
    bar: ProgressTask,
) -> dict[str, Any]:
    """Window `w`'s folder under `root`: per step the PLY clouds, a preview PNG and (tsdf) meshes, then
    an overview of all steps. Returns its entry of index.json and counts into `summary`."""
    from xwam_core.geometry import render_points, side_by_side_png, tsdf_mesh, write_ply

    folder = f"window-{w:03d}"
    (root / folder).mkdir()
    entry: dict[str, Any] = {
        "folder": folder,
        "episode": int(run["episode_index"][w]),
        "frame": int(run["frame_index"][w]),
        "steps": [],
    }
    clouds = {
        t: (
            step_cloud(run, w, t, "pred", limit, voxel_size),
            step_cloud(run, w, t, "true", limit, voxel_size),
        )
        for t in steps
    }
    framing = next((c[1][0] for c in clouds.values() if len(c[1][0])), None)
    if framing is None:
        framing = next((c[0][0] for c in clouds.values() if len(c[0][0])), np.zeros((1, 3)))
    view, small = _preview_cameras(framing)
    panels = []
    for t in steps:
        (pp, pc), (tp, tc) = clouds[t]
        files = {}
        for name, pts, col in (("pred", pp, pc), ("true", tp, tc)):
            if len(pts):
                write_ply(root / folder / f"t{t}_{name}.ply", pts, col)
                files[name] = f"{folder}/t{t}_{name}.ply"
        side_by_side_png(
            root / folder / f"t{t}.png",
            pp,
            pc,
            tp,
            tc,
            view=view,
            titles=(f"prediction t+{t}", f"truth t+{t}"),
        )
        files["preview"] = f"{folder}/t{t}.png"
        panels.append([render_points(pp, pc, small), render_points(tp, tc, small)])
        if tsdf:
            files.update(_meshes(run, w, t, limit, voxel_size, framing, root / folder, folder, tsdf_mesh))
        entry["steps"].append({"step": t, "points_pred": len(pp), "points_true": len(tp), "files": files})
        summary.points_pred.append(len(pp))
        summary.points_true.append(len(tp))
        summary.files += len(files)
        bar.advance(info=f"window {w + 1}/{run.num_windows} t+{t}")
    _overview(panels, [f"t+{t}" for t in steps], root / folder / "overview.png")
    entry["overview"] = f"{folder}/overview.png"
    summary.files += 1
    return entry


def _meshes(
    run: RunData,
    w: int,
    t: int,
    limit: float,
    voxel_size: float | None,
    framing: np.ndarray,
    folder_path: Path,
    folder: str,
    tsdf_mesh: Any,
) -> dict[str, str]:
    """TSDF meshes of prediction and truth (voxel: --voxel-size, else the larger of 1/100 of the truth's
    extent and 1.5 pixel footprints at its median depth)."""
    from xwam_core.geometry import _open3d

    lo, hi = np.percentile(framing, 1, axis=0), np.percentile(framing, 99, axis=0)
    # A voxel finer than a pixel's footprint leaves holes that TSDF fusion cannot close: take the larger.
    true_depth = run["true_depth"][w, :, t]
    valid = true_depth[(true_depth > 0) & (true_depth <= limit)]
    focal = float(np.median(run["intrinsics"][w, :, t, 0, 0]))
    footprint = 1.5 * float(np.median(valid)) / focal if valid.size and focal > 0 else 0.0
    voxel = voxel_size or max(float(np.max(hi - lo)) / 100.0, footprint, 1e-3)
    files = {}
    for name, prefix, poses_key in (("pred", "pred", "pred_extrinsics"), ("true", "true", "extrinsics")):
        depths = [cloud_depth(d, limit) for d in run[f"{prefix}_depth"][w, :, t]]
        mesh = tsdf_mesh(
            depths,
            list(run["intrinsics"][w, :, t]),
            list(run[poses_key][w, :, t]),
            list(run[f"{prefix}_rgb"][w, :, t]),
            voxel_size=voxel,
            trunc=4 * voxel,
        )
        if len(mesh.vertices):
            path = folder_path / f"t{t}_{name}_mesh.ply"
            if not _open3d().io.write_triangle_mesh(str(path), mesh):
                raise XWAMError(f"tsdf: open3d could not write {path}")
            files[f"{name}_mesh"] = f"{folder}/t{t}_{name}_mesh.ply"
    return files
