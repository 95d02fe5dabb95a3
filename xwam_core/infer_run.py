"""`xwam infer`: run a checkpoint over windows of recorded episodes and write a run folder (see runs.py).

    summary = infer_run(InferOptions(checkpoint="runs/tiny/checkpoints/step-00002000",
                                     store="out/demo/store", out="out/demo/infer"))

Windows: `windows_per_episode` windows per chosen episode, evenly spaced over its valid start frames
(the first and the last included), in the checkpoint's window layout (views, F future frames, stride).
Episodes: by default the checkpoint's held-out ones (`data.val_episodes`, spread over tasks) when the store is
its training store, else every episode.

Inputs are normalized with the CHECKPOINT's statistics (not the store's), so a store other than the
training one is fed to the model the way it was trained.

Cameras of the prediction (`pred_extrinsics`): a fixed view keeps its recorded pose. A moving (wrist)
view's future poses follow the PREDICTED end-effector pose times the hand-eye transform measured at the
observed frame (docs/method.md section 7) when the state holds the pose (ee_x..ee_qz); otherwise the
recorded poses are used and the manifest says so (they reveal where the camera went).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xwam_core.atomic import atomic_folder, write_json_atomic
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, collate_windows, split_episodes
from xwam_core.errors import XWAMError
from xwam_core.mean_frame import mean_future_frames
from xwam_core.runs import (
    MANIFEST,
    PREDICTIONS,
    RUN_FORMAT,
    safe_name,
    store_fingerprint,
)

MODES = ("policy", "world")
EE_POSE_NAMES = ("ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz")
MAX_DEPTH_FRACTION = 0.9  # clouds keep depth <= 0.9 x the model's (farthest) far plane (beyond: background)
VIDEO_FPS = 4.0
VIDEO_MIN_HEIGHT = 192  # small frames are enlarged (nearest neighbour) to at least this many rows
_FIXED_TOLERANCE = 1e-5  # a view is fixed if its recorded pose never moves more than this


@dataclass
class InferOptions:
    checkpoint: str | Path
    store: str | Path
    out: str | Path
    episodes: list[int] | None = None  # None: held-out (training store) or all
    mode: str = "world"
    windows_per_episode: int = 4
    batch_size: int = 1
    seed: int = 0
    num_steps_video: int | None = None
    num_steps_action: int | None = None
    overwrite: bool = False
    videos: bool = True
    command: str = ""


@dataclass
class InferSummary:
    run_dir: Path
    mode: str
    windows: int
    episodes: list[int]
    episodes_reason: str
    latency_ms_mean: float
    latency_ms_median: float
    num_denoiser_calls: int
    files: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ helpers
def parse_episodes(text: str | None) -> list[int] | None:
    """'3,4' or '0-2,7' -> [3, 4] / [0, 1, 2, 7]; None/'' -> None."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                first, last = int(lo), int(hi)
                if last < first:
                    raise ValueError
                out.extend(range(first, last + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise XWAMError(f"--episodes {text!r}: expected episode indices like 3,4 or 0-2,7") from None
    return list(dict.fromkeys(out))


def evenly_spaced(count: int, k: int) -> list[int]:
    """k indices spread evenly over range(count), first and last included (all of them if k >= count)."""
    if k >= count:
        return list(range(count))
    if k == 1:
        return [0]
    return sorted({round(x) for x in np.linspace(0, count - 1, k)})


def quaternion_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions w, x, y, z (normalised here) -> (..., 3, 3) rotations."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def hand_poses(states: np.ndarray, indices: list[int]) -> np.ndarray:
    """(..., Ds) states -> (..., 4, 4) end-effector-to-world poses from the ee_x..ee_qz dimensions."""
    s = np.asarray(states, dtype=np.float64)[..., indices]
    pose = np.zeros((*s.shape[:-1], 4, 4))
    pose[..., :3, :3] = quaternion_matrix(s[..., 3:7])
    pose[..., :3, 3] = s[..., :3]
    pose[..., 3, 3] = 1.0
    return pose


def predicted_cameras(
    extrinsics: np.ndarray,
    moving: list[bool],
    pred_states: np.ndarray,
    true_state0: np.ndarray,
    pose_indices: list[int] | None,
) -> np.ndarray:
    """Camera-to-world poses (N, V, T, 4, 4) to unproject the prediction with (see the module docstring).

    extrinsics (N, V, T, 4, 4) recorded; pred_states (N, T, Ds); true_state0 (N, Ds) the observed state.
    """
    out = np.repeat(extrinsics[:, :, :1].astype(np.float64), extrinsics.shape[2], axis=2)  # frame 0's pose
    for v, is_moving in enumerate(moving):
        if not is_moving:
            continue
        if pose_indices is None:
            out[:, v] = extrinsics[:, v]
            continue
        hand_eye = np.linalg.inv(hand_poses(true_state0, pose_indices)) @ extrinsics[:, v, 0]  # (N, 4, 4)
        out[:, v] = hand_poses(pred_states, pose_indices) @ hand_eye[:, None]
        out[:, v, 0] = extrinsics[:, v, 0]
    return out.astype(np.float32)


def turbo(x: np.ndarray) -> np.ndarray:
    """Google's Turbo colour map (polynomial fit): values in [0, 1] -> uint8 RGB (..., 3)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    r = 0.13572138 + x * (
        4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943)))
    )
    g = 0.09140261 + x * (
        2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604)))
    )
    b = 0.10667330 + x * (
        12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973)))
    )
    return (np.clip(np.stack([r, g, b], -1), 0, 1) * 255).round().astype(np.uint8)


def colour_depth(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """Depth (..., H, W) metres -> RGB (..., H, W, 3): near red, far blue, invalid (<= 0) black."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    x = 1.0 - (np.where(valid, depth, far) - near) / max(far - near, 1e-9)
    rgb = turbo(x)
    rgb[~valid] = 0
    return rgb


def depth_display_range(
    true_depth: np.ndarray, pred_depth: np.ndarray, max_depth: float
) -> tuple[float, float]:
    """One colour scale per view for truth and prediction: the 1-99th percentile of the valid truth."""
    valid = true_depth[(true_depth > 0) & (true_depth <= max_depth)]
    source = valid if valid.size else pred_depth[(pred_depth > 0) & (pred_depth <= max_depth)]
    if not source.size:
        return 0.0, max_depth
    lo, hi = (float(v) for v in np.percentile(source, [1, 99]))
    return lo, hi if hi > lo else lo + 1e-3


def side_by_side_frames(
    true_rgb: np.ndarray,
    pred_rgb: np.ndarray,
    true_depth: np.ndarray,
    pred_depth: np.ndarray,
    depth_range: tuple[float, float],
) -> np.ndarray:
    """(T, H, W, 3) x 2 and (T, H, W) x 2 -> (T, 2H', 2W', 3): truth | prediction, RGB over depth."""
    gap = 2
    top = np.concatenate([true_rgb, np.full_like(true_rgb[:, :, :gap], 255), pred_rgb], axis=2)
    lo, hi = depth_range
    td, pd = colour_depth(true_depth, lo, hi), colour_depth(pred_depth, lo, hi)
    bottom = np.concatenate([td, np.full_like(td[:, :, :gap], 255), pd], axis=2)
    frames = np.concatenate([top, np.full_like(top[:, :gap], 255), bottom], axis=1)
    scale = max(1, math.ceil(VIDEO_MIN_HEIGHT / frames.shape[1]))
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2  # yuv420p needs even sizes
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=255)
    return frames


# ------------------------------------------------------------------------------------ the run
def _load_predictor(opts: InferOptions) -> tuple[Any, Any, Path]:
    """(predictor, its recipe with the CLI's inference steps, the checkpoint folder it came from)."""
    from xwam_core.finetune import check_checkpoint
    from xwam_core.infer import Predictor
    from xwam_core.recipe import load_recipe

    ckpt = check_checkpoint(Path(opts.checkpoint))  # a run folder means its newest checkpoint
    for name in ("layout.json", "stats.json", "recipe.toml"):
        if not (ckpt / name).is_file():
            raise XWAMError(f"{ckpt}: checkpoint lacks {name} (was it written by `xwam pretrain`?)")
    recipe = load_recipe(ckpt / "recipe.toml")
    if opts.num_steps_video is not None:
        recipe.inference = replace(recipe.inference, num_steps_video=opts.num_steps_video)
    if opts.num_steps_action is not None:
        recipe.inference = replace(recipe.inference, num_steps_action=opts.num_steps_action)
    recipe.inference.validate()
    try:
        predictor = Predictor.from_checkpoint(ckpt, schedule=recipe.inference)
    except XWAMError:
        raise
    except Exception as e:  # diffusers / safetensors raise many kinds for a broken folder
        raise XWAMError(f"{ckpt}: cannot load the checkpoint ({type(e).__name__}: {e})") from None
    return predictor, recipe, ckpt


def check_compatible(layout: Any, store: EpisodeStore, where: str) -> None:
    """One line if the store cannot feed this checkpoint (views, image size, dimensions)."""
    missing = [v for v in layout.views if v not in store.views]
    if missing:
        raise XWAMError(
            f"incompatible checkpoint {where}: it needs view(s) {missing}, the store {store.path} has {store.views}"
        )
    if tuple(store.image_size) != tuple(layout.image_size):
        raise XWAMError(
            f"incompatible checkpoint {where}: trained on {layout.image_size[0]}x{layout.image_size[1]} images, "
            f"the store {store.path} has {store.image_size[0]}x{store.image_size[1]}"
        )
    for key, names, dim in (
        ("action", store.action_names, layout.action_dim),
        ("state", store.state_names, layout.state_dim),
    ):
        if len(names) != dim:
            raise XWAMError(
                f"incompatible checkpoint {where}: {dim}-D {key}s, the store {store.path} has {len(names)}-D"
            )


def choose_episodes(
    store: EpisodeStore,
    layout: Any,
    ckpt_stats: dict[str, Any],
    val_episodes: int,
    requested: list[int] | None,
) -> tuple[list[int], str]:
    n = len(store.episodes)
    if requested is not None:
        bad = [e for e in requested if not 0 <= e < n]
        if bad:
            raise XWAMError(f"--episodes: {store.path} has no episode(s) {bad}; it has 0..{n - 1}")
        return requested, "chosen with --episodes"
    try:
        same_path = Path(layout.store).resolve() == store.path.resolve()
    except OSError:
        same_path = False
    if same_path or ckpt_stats == store.stats:
        if val_episodes <= 0:
            raise XWAMError(
                f"{store.path} is the checkpoint's training store and its recipe holds out no episodes "
                "(data.val_episodes=0); choose episodes with --episodes"
            )
        held_out = split_episodes(store, val_episodes)[1]
        return held_out, f"held out in training (data.val_episodes={val_episodes}, spread over tasks)"
    return list(range(n)), "all (not the checkpoint's training store)"


def moving_views(store: EpisodeStore, views: list[str]) -> list[bool]:
    """Whether each view's recorded camera ever moves in the store (a wrist camera)."""
    if not store.has_cameras:
        return [False] * len(views)
    cache = store.frame_cache(build=True)
    out = []
    for v in views:
        poses = cache.extrinsics[v]
        out.append(bool(len(poses) and np.abs(poses - poses[:1]).max() > _FIXED_TOLERANCE))
    return out


def infer_run(
    opts: InferOptions,
    on_start: Callable[[int], None] | None = None,
    on_window: Callable[[int, float], None] | None = None,
    on_mean_start: Callable[[int], None] | None = None,
    on_mean_window: Callable[[], None] | None = None,
) -> InferSummary:
    """Predict every chosen window and write the run folder atomically. Checks everything before any work.

    World mode also averages the store's other episodes into the mean-frame baseline (mean_frame.py):
    `on_mean_start(total)` and `on_mean_window()` report that pass."""
    if opts.mode not in MODES:
        raise XWAMError(f"--mode {opts.mode!r}: expected 'policy' or 'world'")
    if opts.windows_per_episode < 1:
        raise XWAMError(f"--windows-per-episode {opts.windows_per_episode}: expected an integer >= 1")
    if opts.batch_size < 1:
        raise XWAMError(f"--batch-size {opts.batch_size}: expected an integer >= 1")
    out = Path(opts.out)
    if out.exists() and not opts.overwrite:
        raise XWAMError(f"{out}: already exists; pass --overwrite to replace it")
    store = EpisodeStore(opts.store)
    predictor, recipe, ckpt = _load_predictor(opts)
    layout = predictor.layout
    check_compatible(layout, store, str(ckpt))
    if opts.mode == "world" and predictor.model.config.get("depth_condition", False) and not store.has_depth:
        raise XWAMError(
            f"{store.path}: has no depth, and {ckpt} reads the observed depth in world mode "
            "(depth_condition, RGB-D input); use --mode policy or a store with depth"
        )
    episodes, reason = choose_episodes(
        store, layout, predictor.stats, recipe.data.val_episodes, opts.episodes
    )

    dataset = WindowDataset(store, layout.window, views=layout.views, episodes=episodes, normalize=False)
    chosen: list[int] = []
    for e in episodes:
        rows = np.nonzero(dataset.windows[:, 0] == e)[0]
        chosen.extend(int(rows[i]) for i in evenly_spaced(len(rows), opts.windows_per_episode))
    if not chosen:
        raise XWAMError(
            f"{store.path}: episodes {episodes} are all shorter than a window of {layout.window.span} frames"
        )
    task_map: dict[int, int] = {}
    for row in chosen:
        e = int(dataset.windows[row, 0])
        task = store.episodes[e].task
        if task not in layout.tasks:
            raise XWAMError(
                f"incompatible checkpoint {ckpt}: episode {e} has task {task!r}, "
                f"unseen in training (the checkpoint knows {layout.tasks})"
            )
        task_map[store.tasks.index(task)] = layout.tasks.index(task)

    world = opts.mode == "world"
    moving = moving_views(store, layout.views) if world else [False] * len(layout.views)
    names = store.state_names
    pose_indices = [names.index(n) for n in EE_POSE_NAMES] if all(n in names for n in EE_POSE_NAMES) else None
    max_depth = MAX_DEPTH_FRACTION * predictor.depth_range.max_far
    if on_start is not None:
        on_start(len(chosen))

    generator = torch.Generator().manual_seed(opts.seed)
    collected: dict[str, list[np.ndarray]] = {}
    latencies: list[float] = []
    calls = 0
    warmed = False
    for start in range(0, len(chosen), opts.batch_size):
        items = [dataset[i] for i in chosen[start : start + opts.batch_size]]
        batch = collate_windows(items)
        true_states = batch["states"].numpy()  # (B, T, Ds) dataset units
        model_batch = {
            "rgb": batch["rgb"],
            "states": torch.from_numpy(predictor.state_norm.normalize(true_states)),
            "task_index": torch.tensor([task_map[int(t)] for t in batch["task_index"]]),
            # the observed frame's depth only (read by depth_condition models; none: they refuse world mode)
            "depth": batch["depth"][:, :, :1] if store.has_depth else None,
        }
        if not warmed:  # the first call pays one-off costs (allocations, kernels): keep it out of the latency
            predictor.predict(model_batch, mode="policy", generator=torch.Generator().manual_seed(0))
            warmed = True
        pred = predictor.predict(model_batch, mode=opts.mode, generator=generator)
        calls = pred.num_denoiser_calls
        b = len(items)
        per_window = pred.latency_s / b
        latencies.extend([per_window] * b)
        arrays = {
            "episode_index": batch["episode_index"].numpy(),
            "frame_index": batch["frame_index"].numpy(),
            "task": np.asarray([store.tasks[int(t)] for t in batch["task_index"]]),
            "pred_actions": pred.actions.numpy().astype(np.float32),
            "true_actions": batch["actions"].numpy().astype(np.float32),
            "pred_states": pred.states.numpy().astype(np.float32),
            "true_states": true_states.astype(np.float32),
            "latency_s": np.full(b, per_window),
        }
        if world:
            assert pred.rgb is not None and pred.depth is not None
            extrinsics = batch["extrinsics"].numpy()
            arrays.update(
                pred_rgb=pred.rgb.numpy(),
                true_rgb=batch["rgb"].numpy(),
                pred_depth=pred.depth.numpy().astype(np.float32),
                true_depth=batch["depth"].numpy(),
                intrinsics=batch["intrinsics"].numpy(),
                extrinsics=extrinsics,
                pred_extrinsics=predicted_cameras(
                    extrinsics, moving, arrays["pred_states"], true_states[:, 0], pose_indices
                ),
            )
        for k, v in arrays.items():
            collected.setdefault(k, []).append(v)
        if on_window is not None:
            for _ in range(b):
                on_window(1, per_window)
    result = {k: np.concatenate(v) for k, v in collected.items()}
    # the mean-action baseline, kept in float64 exactly as the checkpoint's stats.json has it
    result["mean_action"] = np.asarray(predictor.stats["action"]["mean"], dtype=np.float64)
    mean_info: dict[str, Any] = {}
    if world:  # the mean-frame baseline: the average window of the episodes not evaluated here
        mean_frames = mean_future_frames(
            store,
            layout.window,
            list(layout.views),
            episodes,
            on_start=on_mean_start,
            on_window=on_mean_window,
        )
        if mean_frames is None:
            mean_info = {"windows": 0, "reason": "the store has no other episode to average"}
        else:
            result["mean_rgb"] = mean_frames.rgb
            if mean_frames.depth is not None:
                result["mean_depth"] = mean_frames.depth
            mean_info = {"windows": mean_frames.windows, "episodes": mean_frames.episodes}

    lat_ms = [1000 * x for x in latencies]
    cameras = {}
    for v, is_moving in zip(layout.views, moving, strict=True):
        if not world:
            continue
        if not is_moving:
            cameras[v] = "fixed: recorded pose"
        elif pose_indices is not None:
            cameras[v] = "moving: predicted end-effector pose x hand-eye transform at the observed frame"
        else:
            cameras[v] = (
                "moving: recorded poses (the state has no end-effector pose; they reveal the camera path)"
            )
    from xwam_core.recipe import recipe_to_toml

    manifest: dict[str, Any] = {
        "xwam_run": RUN_FORMAT,
        "command": opts.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": str(ckpt.resolve()),
        "store": str(store.path.resolve()),
        "store_fingerprint": store_fingerprint(store.path),
        "store_has_depth": store.has_depth,
        "store_has_cameras": store.has_cameras,
        "mode": opts.mode,
        "views": list(layout.views),
        "tasks": list(layout.tasks),
        "episodes": [int(e) for e in episodes],
        "episodes_reason": reason,
        "windows": len(chosen),
        "windows_per_episode": opts.windows_per_episode,
        "future_frames": layout.window.future_frames,
        "frame_stride": layout.window.frame_stride,
        "image_size": list(layout.image_size),
        "action_names": store.action_names,
        "state_names": store.state_names,
        "fps": store.fps,
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "depth_range": predictor.depth_range.to_json(),  # [near, far]: numbers, or lists of one per view
        "max_depth": max_depth,
        "cameras": cameras,
        "latency_ms": {
            "mean": statistics.fmean(lat_ms),
            "median": statistics.median(lat_ms),
            "min": min(lat_ms),
            "max": max(lat_ms),
            "note": "per window: denoising (+ decoding in world mode) wall time / batch size; "
            "a warm-up call is excluded",
        },
        "num_denoiser_calls": calls,
        **({"mean_frame": mean_info} if world else {}),
        "device": f"{predictor.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "recipe": tomllib.loads(recipe_to_toml(recipe)),
        "files": [],
    }
    files = [MANIFEST, PREDICTIONS]
    with atomic_folder(out, overwrite=opts.overwrite) as tmp:
        np.savez(tmp / PREDICTIONS, **result)  # type: ignore[arg-type]
        if world and opts.videos:
            from xwam_core.data.video import encode_video

            for v, view in enumerate(layout.views):
                rng = depth_display_range(result["true_depth"][:, v], result["pred_depth"][:, v], max_depth)
                frames = np.concatenate(
                    [
                        side_by_side_frames(
                            result["true_rgb"][w, v],
                            result["pred_rgb"][w, v],
                            result["true_depth"][w, v],
                            result["pred_depth"][w, v],
                            rng,
                        )
                        for w in range(len(chosen))
                    ]
                )
                name = f"videos/{safe_name(view)}.mp4"
                encode_video(tmp / name, frames, VIDEO_FPS)
                files.append(name)
            manifest["videos"] = {
                "layout": "top: truth | prediction (RGB); bottom: truth | prediction (depth, turbo: near red, "
                "far blue, invalid black); windows one after another, observed frame first",
                "fps": VIDEO_FPS,
            }
        manifest["files"] = files
        write_json_atomic(tmp / MANIFEST, manifest)
    return InferSummary(
        run_dir=out,
        mode=opts.mode,
        windows=len(chosen),
        episodes=[int(e) for e in episodes],
        episodes_reason=reason,
        latency_ms_mean=manifest["latency_ms"]["mean"],
        latency_ms_median=manifest["latency_ms"]["median"],
        num_denoiser_calls=calls,
        files=files,
        manifest=manifest,
    )
