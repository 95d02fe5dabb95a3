"""`xwam infer`: run a checkpoint over windows of recorded episodes and write a run folder (see runs.py).

    summary = infer_run(InferOptions(checkpoint="runs/tiny/checkpoints/step-00002000",
                                     store="out/demo/store", out="out/demo/infer"))

Windows: `windows_per_episode` windows per chosen episode, evenly spaced over its valid start frames
(the first and the last included; full windows only, never padded past an episode's end), in the checkpoint's window layout (views, F future frames, stride).
Episodes: by default the checkpoint's held-out ones (`data.val_episodes`, spread over tasks) when the store is
its training store, else every episode.

Each window's observed frame, state and task go through the Policy (xwam_core.policy), which
normalizes with the CHECKPOINT's statistics, so a store other than the training one is fed to the model
the way it was trained. Cameras of the prediction: xwam_core.cameras. Preview videos: xwam_core.previews.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xwam_core.atomic import atomic_folder, check_replaceable, write_json_atomic
from xwam_core.cameras import moving_views, pose_indices, predicted_cameras
from xwam_core.checkpoint import resolve
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, collate_windows, split_episodes
from xwam_core.errors import XWAMError
from xwam_core.infer_options import EpisodeRanges, InferOptions
from xwam_core.mean_frame import mean_future_frames
from xwam_core.normalizer import Normalizer
from xwam_core.policy import Policy, Prediction
from xwam_core.previews import VIDEO_FPS, depth_display_range, side_by_side_frames
from xwam_core.progress import SILENT, Progress
from xwam_core.runs import (
    MANIFEST,
    PREDICTIONS,
    RUN_FORMAT,
    safe_name,
    store_fingerprint,
)

MODES = ("policy", "world")
ACTION_SOURCES = ("sampled", "recorded")  # world mode: the model's actions, or the episode's (given)
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 to 2**64 - 1
MAX_DEPTH_FRACTION = 0.9  # clouds keep depth <= 0.9 x the model's (farthest) far plane (beyond: background)


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
def evenly_spaced(count: int, k: int) -> list[int]:
    """k indices spread evenly over range(count), first and last included (all of them if k >= count)."""
    if k >= count:
        return list(range(count))
    if k == 1:
        return [0]
    return sorted({round(x) for x in np.linspace(0, count - 1, k)})


# ------------------------------------------------------------------------------------ the run
def check_compatible(policy: Policy, store: EpisodeStore, where: str) -> None:
    """One line if the store cannot feed this checkpoint (views, image size, dimensions)."""
    layout = policy.spec
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
        ("action", store.action_names, policy.normalizer.action_dim),
        ("state", store.state_names, policy.normalizer.state_dim),
    ):
        if len(names) != dim:
            raise XWAMError(
                f"incompatible checkpoint {where}: {dim}-D {key}s, the store {store.path} has {len(names)}-D"
            )


_STORE_OWN_STATS = ("mean", "std", "min", "max")


def requested_episodes(store: EpisodeStore, requested: list[int] | EpisodeRanges) -> list[int]:
    """--episodes checked against the store's episode count before it is expanded: one line naming the
    first few episodes the store lacks (a range like 0-10000000 is never built as a list)."""
    return EpisodeRanges.of(requested).resolve(len(store.episodes), str(store.path))


def choose_episodes(
    store: EpisodeStore, policy: Policy, requested: list[int] | EpisodeRanges | None
) -> tuple[list[int], str]:
    """The requested episodes; else the checkpoint's held-out ones when `store` is its training store
    (the same path, or a copy with the same action/state statistics); else all. Returns (episodes, why)."""
    spec = policy.spec
    n = len(store.episodes)
    if requested is not None:
        return requested_episodes(store, requested), "chosen with --episodes"
    try:
        same_path = bool(spec.store) and Path(spec.store).resolve() == store.path.resolve()
    except OSError:
        same_path = False
    # mean/std/min/max are the training store's under either data.normalization (q01/q99 are not
    # under "release"): equal ones mean a copy of the training store
    store_stats = Normalizer.from_store_stats(store.stats, store.action_names, store.state_names).stats
    same_stats = all(
        {k: v for k, v in store_stats.get(key, {}).items() if k in _STORE_OWN_STATS}
        == {k: v for k, v in policy.normalizer.stats.get(key, {}).items() if k in _STORE_OWN_STATS}
        for key in ("action", "state")
    )
    val_episodes = spec.val_episodes
    if same_path or same_stats:
        if val_episodes <= 0:
            raise XWAMError(
                f"{store.path} is the checkpoint's training store and its recipe holds out no episodes "
                "(data.val_episodes=0); choose episodes with --episodes"
            )
        held_out = split_episodes(store, val_episodes)[1]
        return held_out, f"held out in training (data.val_episodes={val_episodes}, spread over tasks)"
    return list(range(n)), "all (not the checkpoint's training store)"


class InferenceRun:
    """One `xwam infer`: check everything, choose the windows, predict, add baselines, write the folder.

    run = InferenceRun(InferOptions(checkpoint=..., store=..., out=...))   # checks, loads, chooses
    summary = run.execute(progress)
    """

    def __init__(self, opts: InferOptions) -> None:
        if opts.mode not in MODES:
            raise XWAMError(f"--mode {opts.mode!r}: expected 'policy' or 'world'")
        if opts.actions not in ACTION_SOURCES:
            raise XWAMError(f"--actions {opts.actions!r}: expected {' or '.join(map(repr, ACTION_SOURCES))}")
        if opts.actions == "recorded" and opts.mode != "world":
            raise XWAMError(
                "--actions recorded: only in world mode (it predicts the future the actions cause)"
            )
        if opts.windows_per_episode < 1:
            raise XWAMError(f"--windows-per-episode {opts.windows_per_episode}: expected an integer >= 1")
        if opts.batch_size < 1:
            raise XWAMError(f"--batch-size {opts.batch_size}: expected an integer >= 1")
        seed = opts.seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
            # torch.Generator takes 64-bit seeds: checked here, before the model loads
            raise XWAMError(f"--seed {opts.seed}: expected an integer from 0 to 2**64 - 1")
        self.opts = opts
        self.out = Path(opts.out)
        if self.out.exists() and not opts.overwrite:
            raise XWAMError(f"{self.out}: already exists; pass --overwrite to replace it")
        if self.out.exists():
            check_replaceable(self.out, MANIFEST)  # before any work: --overwrite replaces only a run
        self.world = opts.mode == "world"
        self.store = EpisodeStore(opts.store)
        if opts.episodes is not None:  # before the model loads
            requested_episodes(self.store, opts.episodes)
        self.checkpoint = resolve(opts.checkpoint)
        self.policy = Policy.from_checkpoint(
            self.checkpoint,
            num_steps_video=opts.num_steps_video,
            num_steps_action=opts.num_steps_action,
            action_noise_scale=opts.action_noise_scale,
        )
        spec = self.policy.spec
        check_compatible(self.policy, self.store, str(self.checkpoint))
        if self.world and self.policy.depth_condition and not self.store.has_depth:
            raise XWAMError(
                f"{self.store.path}: has no depth, and {self.checkpoint} reads the observed depth in world "
                "mode (depth_condition, RGB-D input); use --mode policy or a store with depth"
            )
        self.episodes, self.episodes_reason = choose_episodes(self.store, self.policy, opts.episodes)
        # full windows only, whatever the checkpoint trained with: the metrics compare true future frames
        self.dataset = WindowDataset(
            self.store,
            spec.window,
            views=spec.views,
            episodes=self.episodes,
            normalize=False,
            pad_episode_ends=False,
        )
        self.windows = self._choose_windows()
        unseen = sorted(
            {self.store.episodes[int(self.dataset.windows[w, 0])].task for w in self.windows}
            - set(spec.tasks)
        )
        if unseen:
            raise XWAMError(
                f"incompatible checkpoint {self.checkpoint}: task {unseen[0]!r} of {self.store.path} was "
                f"unseen in training (the checkpoint knows {spec.tasks})"
            )
        self.moving = moving_views(self.store, spec.views) if self.world else [False] * len(spec.views)
        self.pose_indices = pose_indices(self.store.state_names)
        self.max_depth = MAX_DEPTH_FRACTION * self.policy.depth_range.max_far

    def _choose_windows(self) -> list[int]:
        """`windows_per_episode` rows of the dataset per episode, evenly spaced, first and last included."""
        chosen: list[int] = []
        for e in self.episodes:
            rows = np.nonzero(self.dataset.windows[:, 0] == e)[0]
            chosen.extend(int(rows[i]) for i in evenly_spaced(len(rows), self.opts.windows_per_episode))
        if not chosen:
            raise XWAMError(
                f"{self.store.path}: episodes {self.episodes} are all shorter than a window of "
                f"{self.policy.spec.window.span} frames"
            )
        return chosen

    def observation(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The Policy's observation of a batch of windows: their observed frame, state and task."""
        views = self.policy.spec.views
        obs: dict[str, Any] = {
            "images": {v: batch["rgb"][:, j, 0].numpy() for j, v in enumerate(views)},
            "state": batch["states"][:, 0].numpy(),
            "task": [self.store.tasks[int(t)] for t in batch["task_index"]],
        }
        if self.store.has_depth:  # read only by depth_condition checkpoints in world mode
            obs["depth"] = {v: batch["depth"][:, j, 0].numpy() for j, v in enumerate(views)}
        return obs

    def predict(self, progress: Progress = SILENT) -> tuple[dict[str, np.ndarray], list[float], int]:
        """Every chosen window beside its truth: (arrays of predictions.npz, latency per window, calls)."""
        opts, policy = self.opts, self.policy
        bar = progress.task(f"windows ({opts.mode})", total=len(self.windows))
        generator = torch.Generator().manual_seed(opts.seed)
        collected: dict[str, list[np.ndarray]] = {}
        latencies: list[float] = []
        calls = 0
        recorded = opts.actions == "recorded"  # world mode given the episode's actions and states
        for start in range(0, len(self.windows), opts.batch_size):
            batch = collate_windows([self.dataset[i] for i in self.windows[start : start + opts.batch_size]])
            obs = self.observation(batch)
            if (
                not latencies
            ):  # the first call pays one-off costs (allocations, kernels): keep it out of the latency
                policy.predict(obs, mode="policy", generator=torch.Generator().manual_seed(0))
            pred = policy.predict(
                obs,
                mode=opts.mode,
                generator=generator,
                given_actions=batch["actions"].numpy() if recorded else None,
                given_states=batch["states"].numpy() if recorded else None,
            )
            calls = pred.num_denoiser_calls
            b = len(batch["task_index"])
            per_window = pred.latency_s / b
            latencies.extend([per_window] * b)
            arrays = self._arrays(batch, pred, per_window)
            for k, v in arrays.items():
                collected.setdefault(k, []).append(v)
            bar.advance(b, info=f"{1000 * per_window:.0f} ms/window")
        result = {k: np.concatenate(v) for k, v in collected.items()}
        # the mean-action baseline, kept in float64 exactly as the checkpoint's statistics have it
        if policy.normalizer.has_mean_action:  # a converted release checkpoint has only q01/q99
            result["mean_action"] = policy.normalizer.mean_action()
        return result, latencies, calls

    def _arrays(self, batch: dict[str, Any], pred: Prediction, per_window: float) -> dict[str, np.ndarray]:
        b = len(batch["task_index"])
        true_states = batch["states"].numpy()
        arrays = {
            "episode_index": batch["episode_index"].numpy(),
            "frame_index": batch["frame_index"].numpy(),
            "task": np.asarray([self.store.tasks[int(t)] for t in batch["task_index"]]),
            "pred_actions": pred.actions.astype(np.float32),
            "true_actions": batch["actions"].numpy().astype(np.float32),
            "pred_states": pred.states.astype(np.float32),
            "true_states": true_states.astype(np.float32),
            "latency_s": np.full(b, per_window),
        }
        if self.world:
            assert pred.rgb is not None
            extrinsics = batch["extrinsics"].numpy()
            if pred.depth is not None:  # None: the checkpoint has no depth branch (num_depth_blocks = 0)
                arrays["pred_depth"] = pred.depth.astype(np.float32)
            arrays.update(
                pred_rgb=pred.rgb,
                true_rgb=batch["rgb"].numpy(),
                true_depth=batch["depth"].numpy(),
                intrinsics=batch["intrinsics"].numpy(),
                extrinsics=extrinsics,
                pred_extrinsics=predicted_cameras(
                    extrinsics, self.moving, arrays["pred_states"], true_states[:, 0], self.pose_indices
                ),
            )
        return arrays

    def mean_frame_baseline(
        self, result: dict[str, np.ndarray], progress: Progress = SILENT
    ) -> dict[str, Any]:
        """World mode: add the average window of the episodes not evaluated here (mean_frame.py)."""
        spec = self.policy.spec
        mean_frames = mean_future_frames(
            self.store, spec.window, list(spec.views), self.episodes, progress=progress
        )
        if mean_frames is None:
            return {"windows": 0, "reason": "the store has no other episode to average"}
        result["mean_rgb"] = mean_frames.rgb
        if mean_frames.depth is not None:
            result["mean_depth"] = mean_frames.depth
        return {"windows": mean_frames.windows, "episodes": mean_frames.episodes}

    def manifest(self, latencies: list[float], calls: int, mean_info: dict[str, Any]) -> dict[str, Any]:
        """What the run is: command, checkpoint, store, settings, latency (manifest.json)."""
        opts, spec, store = self.opts, self.policy.spec, self.store
        lat_ms = [1000 * x for x in latencies]
        cameras = {}
        for v, is_moving in zip(spec.views, self.moving, strict=True):
            if not self.world:
                continue
            if not is_moving:
                cameras[v] = "fixed: recorded pose"
            elif self.pose_indices is not None:
                cameras[v] = "moving: predicted end-effector pose x hand-eye transform at the observed frame"
            else:
                cameras[v] = (
                    "moving: recorded poses (the state has no end-effector pose; they reveal the camera path)"
                )
        return {
            "xwam_run": RUN_FORMAT,
            "command": opts.command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "checkpoint": str(self.checkpoint.resolve()),
            "store": str(store.path.resolve()),
            "store_fingerprint": store_fingerprint(store.path),
            "store_has_depth": store.has_depth,
            "store_has_cameras": store.has_cameras,
            "store_depth_kind": store.depth_kind,
            "predicts_depth": self.policy.predicts_depth,
            "mode": opts.mode,
            "actions": opts.actions,  # "recorded": pred_actions/pred_states are the episode's, given
            "views": list(spec.views),
            "tasks": list(spec.tasks),
            "episodes": [int(e) for e in self.episodes],
            "episodes_reason": self.episodes_reason,
            "windows": len(self.windows),
            "windows_per_episode": opts.windows_per_episode,
            "future_frames": spec.window.future_frames,
            "frame_stride": spec.window.frame_stride,
            "image_size": list(spec.image_size),
            "action_names": store.action_names,
            "state_names": store.state_names,
            "fps": store.fps,
            "seed": opts.seed,
            "batch_size": opts.batch_size,
            "depth_range": self.policy.depth_range.to_json(),  # [near, far]: numbers, or lists per view
            "max_depth": self.max_depth,
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
            **({"mean_frame": mean_info} if self.world else {}),
            "device": f"{self.policy.device} ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)",
            "inference": dataclasses.asdict(self.policy.schedule_config),
            "files": [],
        }

    def write(self, result: dict[str, np.ndarray], manifest: dict[str, Any]) -> list[str]:
        """The run folder, atomically: predictions.npz, manifest.json and (world mode) a video per view."""
        files = [MANIFEST, PREDICTIONS]
        needed = sum(a.nbytes for a in result.values())  # predictions.npz; videos add a little
        with atomic_folder(
            self.out, overwrite=self.opts.overwrite, needed_bytes=needed, replaces=MANIFEST
        ) as tmp:
            np.savez(tmp / PREDICTIONS, **result)  # type: ignore[arg-type]
            if self.world and self.opts.videos:
                files += self._write_videos(tmp, result)
                manifest["videos"] = {
                    "layout": "top: truth | prediction (RGB); bottom: truth | prediction (depth, turbo: near "
                    "red, far blue, invalid black); windows one after another, observed frame first",
                    "fps": VIDEO_FPS,
                }
            manifest["files"] = files
            write_json_atomic(tmp / MANIFEST, manifest)
        return files

    def _write_videos(self, folder: Path, result: dict[str, np.ndarray]) -> list[str]:
        from xwam_core.data.video import encode_video

        names = []
        # no depth branch: the prediction's depth panel is black (invalid)
        pred_depth = result.get("pred_depth", np.zeros_like(result["true_depth"]))
        for v, view in enumerate(self.policy.spec.views):
            rng = depth_display_range(result["true_depth"][:, v], pred_depth[:, v], self.max_depth)
            frames = np.concatenate(
                [
                    side_by_side_frames(
                        result["true_rgb"][w, v],
                        result["pred_rgb"][w, v],
                        result["true_depth"][w, v],
                        pred_depth[w, v],
                        rng,
                    )
                    for w in range(len(self.windows))
                ]
            )
            name = f"videos/{safe_name(view)}.mp4"
            encode_video(folder / name, frames, VIDEO_FPS)
            names.append(name)
        return names

    def execute(self, progress: Progress = SILENT) -> InferSummary:
        result, latencies, calls = self.predict(progress)
        mean_info = self.mean_frame_baseline(result, progress) if self.world else {}
        manifest = self.manifest(latencies, calls, mean_info)
        files = self.write(result, manifest)
        return InferSummary(
            run_dir=self.out,
            mode=self.opts.mode,
            windows=len(self.windows),
            episodes=[int(e) for e in self.episodes],
            episodes_reason=self.episodes_reason,
            latency_ms_mean=manifest["latency_ms"]["mean"],
            latency_ms_median=manifest["latency_ms"]["median"],
            num_denoiser_calls=calls,
            files=files,
            manifest=manifest,
        )


def infer_run(opts: InferOptions, progress: Progress = SILENT) -> InferSummary:
    """Predict every chosen window and write the run folder atomically; checks everything before any work."""
    return InferenceRun(opts).execute(progress)
