"""Closed-loop evaluation on Meta-World v3: the checkpoint drives the robot in policy mode.

    result = evaluate_metaworld(policy, tasks=["reach-v3"], episodes=10, seed=0)

Each query renders the checkpoint's views at its image size with the episode store's camera
conventions (xwam_core.data.sources.metaworld: same cameras, renderer, intrinsics) and reads the state
the way the store records it (hand xyz, quaternion wxyz, gripper opening), and hands both to the
Policy (xwam_core.policy), which normalizes with the checkpoint's statistics and queues the predicted
chunk: `policy.actions_per_query` actions run open loop before the next query (default: the whole
chunk, docs/method.md section 6). Actions are clipped to [-1, 1] as the environment applies them. An episode
succeeds if Meta-World's info["success"] is true after any step (then it stops), else it runs
`max_steps` steps.

Held-out starts: episode i of task T uses the simulator seed
SeedSequence([seed, crc32(T), i, EVAL_STREAM]).generate_state(1)[0]; the store's episodes use
SeedSequence([seed, crc32(T), i]) (MetaWorldSource.episode_seed), so no evaluation start is a training
start, whatever the seeds. When the checkpoint's training store is a Meta-World store on this machine,
the disjointness is also checked against its recorded seed and episode count.
Baselines on the same seeds: the scripted expert (the store's demonstrator) and a uniform random
policy (actions ~ U[-1, 1], seeded by the episode seed). The model's noise is seeded by the episode
seed as well, so the same seeds give the same result.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xwam_core.atomic import atomic_file
from xwam_core.errors import XWAMError
from xwam_core.policy import Policy
from xwam_core.progress import SILENT, Progress

EVAL_STREAM = 0x5EED  # appended to the seed entropy; nonzero, so never equal to a store's 3-word entropy
POLICIES = ("model", "expert", "random")
VIDEO_FPS = 30.0
VIDEO_MIN_HEIGHT = 192


def eval_episode_seed(seed: int, task: str, index: int) -> int:
    """The simulator seed of evaluation episode `index` of `task` (disjoint from store seeds)."""
    return int(
        np.random.SeedSequence([seed, zlib.crc32(task.encode()), index, EVAL_STREAM]).generate_state(1)[0]
    )


def training_seeds(store_path: str | Path, task: str) -> set[int] | None:
    """The simulator seeds of a Meta-World store's episodes of `task`, or None if unknown."""
    try:
        info = json.loads((Path(store_path) / "meta" / "info.json").read_text())
        x = info["xwam"]
        if x.get("source") != "metaworld":
            return None
        extra = x.get("source_extra") or {}
        seed, per_task = int(extra["seed"]), int(extra["episodes_per_task"])
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError):
        return None
    crc = zlib.crc32(task.encode())
    return {int(np.random.SeedSequence([seed, crc, i]).generate_state(1)[0]) for i in range(per_task)}


def store_render_quality(store_path: str | Path) -> str | None:
    try:
        info = json.loads((Path(store_path) / "meta" / "info.json").read_text())
        return str(info["xwam"]["source_extra"]["render_quality"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return None


@dataclass
class Rollout:
    task: str
    episode: int
    seed: int
    policy: str
    success: bool
    steps: int
    queries: int = 0
    latency_ms: float | None = None  # model: mean policy-mode latency per query
    video: str | None = None
    final_state: list[float] = field(default_factory=list)  # the state when the episode ended


@dataclass
class SimResult:
    tasks: list[str]
    episodes: int
    seed: int
    max_steps: int
    rollouts: list[Rollout] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def success_rate(self, policy: str, task: str | None = None) -> float | None:
        rs = [r for r in self.rollouts if r.policy == policy and (task is None or r.task == task)]
        return sum(r.success for r in rs) / len(rs) if rs else None

    def to_json(self) -> dict[str, Any]:
        policies = [p for p in POLICIES if any(r.policy == p for r in self.rollouts)]
        per_task = {t: {p: self.success_rate(p, t) for p in policies} for t in self.tasks}
        lat = [r.latency_ms for r in self.rollouts if r.latency_ms is not None]
        return {
            "simulator": "metaworld",
            "tasks": self.tasks,
            "episodes_per_task": self.episodes,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "success_rate": {"per_task": per_task, "mean": {p: self.success_rate(p) for p in policies}},
            "model_latency_ms_mean": float(np.mean(lat)) if lat else None,
            "notes": self.notes,
            "rollouts": [r.__dict__ for r in self.rollouts],
        }


def state_layout(policy: Policy) -> str:
    """The Meta-World state layout ('hand' or 'task') the checkpoint was trained on, from its state names."""
    from xwam_core.data.sources import metaworld as mw

    names = list(policy.normalizer.state_names)
    for layout, expected in mw.STATE_LAYOUTS.items():
        if names == expected:
            return layout
    expected_text = "; ".join(f"{k}: {', '.join(v)}" for k, v in mw.STATE_LAYOUTS.items())
    raise XWAMError(
        f"incompatible checkpoint for Meta-World: state names {names} match no Meta-World state layout; "
        f"expected {expected_text}"
    )


def _check(policy: Policy, tasks: list[str], episodes: int, max_steps: int) -> None:
    from xwam_core.data.sources import metaworld as mw

    layout = policy.spec
    if episodes < 1:
        raise XWAMError(f"--episodes {episodes}: expected an integer >= 1 (episodes per task)")
    if not 1 <= max_steps <= mw.MAX_STEPS_LIMIT:
        raise XWAMError(f"--max-steps {max_steps}: expected 1 to {mw.MAX_STEPS_LIMIT} (Meta-World's horizon)")
    if not tasks:
        raise XWAMError("--tasks is empty; expected Meta-World tasks like reach-v3,push-v3")
    bad_views = [v for v in layout.views if v not in mw.CAMERAS]
    if bad_views:
        raise XWAMError(
            f"incompatible checkpoint for Meta-World: views {bad_views} are not Meta-World cameras "
            f"({', '.join(mw.CAMERAS)})"
        )
    h, w = layout.image_size
    if not (mw.MIN_SIZE <= h <= mw.MAX_SIZE and mw.MIN_SIZE <= w <= mw.MAX_SIZE):
        raise XWAMError(
            f"incompatible checkpoint for Meta-World: {h}x{w} images; the renderer makes {mw.MIN_SIZE} to {mw.MAX_SIZE} px"
        )
    action_dim = policy.normalizer.action_dim
    if action_dim != len(mw.ACTION_NAMES):
        raise XWAMError(
            f"incompatible checkpoint for Meta-World: {action_dim}-D actions, "
            f"Meta-World has {len(mw.ACTION_NAMES)} ({', '.join(mw.ACTION_NAMES)})"
        )
    state_layout(policy)  # refuses state names that match no layout the source records
    known = mw.valid_tasks()
    for task in tasks:
        if task not in known:
            raise XWAMError(f"--tasks: unknown Meta-World task {task!r} (e.g. reach-v3, push-v3)")
        if task not in layout.tasks:
            raise XWAMError(
                f"--tasks: {task!r} was not seen in training (the checkpoint knows {layout.tasks})"
            )


class _VideoWriter:
    """Frames of every view side by side, enlarged, written atomically to an mp4."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frames: list[np.ndarray] = []

    def add(self, views_rgb: np.ndarray) -> None:  # (V, H, W, 3)
        frame = np.concatenate(list(views_rgb), axis=1)
        scale = max(1, math.ceil(VIDEO_MIN_HEIGHT / frame.shape[0]))
        frame = frame.repeat(scale, 0).repeat(scale, 1)
        self.frames.append(np.pad(frame, ((0, frame.shape[0] % 2), (0, frame.shape[1] % 2), (0, 0))))

    def close(self) -> str:
        from xwam_core.data.video import encode_video

        with atomic_file(self.path) as tmp:
            encode_video(tmp, np.stack(self.frames), VIDEO_FPS)
        return str(self.path)


def evaluate_metaworld(
    policy: Policy,
    tasks: list[str],
    episodes: int,
    seed: int = 0,
    max_steps: int = 150,
    render_quality: str | None = None,
    video_dir: str | Path | None = None,
    baselines: bool = True,
    progress: Progress = SILENT,
) -> SimResult:
    """Roll the policy (and the baselines) out on `episodes` held-out starts per task; each finished
    rollout's outcome is the progress bar's status text."""
    from xwam_core.data.sources import metaworld as mw

    _check(policy, tasks, episodes, max_steps)
    layout = policy.spec
    quality = render_quality or store_render_quality(layout.store) or "fast"
    if quality not in mw.RENDER_QUALITIES:
        raise XWAMError(f"--render-quality {quality!r}: expected 'fast' or 'default'")
    seeds = {t: [eval_episode_seed(seed, t, i) for i in range(episodes)] for t in tasks}
    checked = []
    for t in tasks:
        train = training_seeds(layout.store, t)
        if train is not None:
            overlap = train & set(seeds[t])
            if overlap:  # cannot happen with EVAL_STREAM; kept as the guarantee's test
                raise XWAMError(
                    f"evaluation seeds {sorted(overlap)} of {t} are training seeds of {layout.store}"
                )
            checked.append(t)
    policies = ["model", *(["expert", "random"] if baselines else [])]
    result = SimResult(
        list(tasks),
        episodes,
        seed,
        max_steps,
        notes={
            "held_out": "SeedSequence([seed, crc32(task), i, EVAL_STREAM]) vs the store's SeedSequence([seed, crc32(task), i])",
            "checked_against_training_store": checked,
            "render_quality": quality,
            "chunk": f"{policy.actions_per_query} of {layout.window.num_actions} actions executed open loop per query",
            "views": list(layout.views),
            "image_size": list(layout.image_size),
        },
    )
    bar = progress.task("rollouts", total=len(tasks) * episodes * len(policies))
    sim = mw._sim()
    height, width = layout.image_size
    gl = mw.gl_context(width, height)
    try:
        for task in tasks:
            gl.make_current()
            # observe() builds the state of the layout the checkpoint was trained on
            task_sim = mw.TaskSim(sim, task, list(layout.views), height, width, quality, state_layout(policy))
            try:
                for i, episode_seed in enumerate(seeds[task]):
                    for which in policies:
                        video = None
                        if video_dir is not None and which == "model":
                            video = _VideoWriter(Path(video_dir) / f"{task}_ep{i:03d}_model.mp4")
                        rollout = _rollout(
                            policy, task_sim, gl, task, i, episode_seed, which, max_steps, video
                        )
                        result.rollouts.append(rollout)
                        outcome = "success" if rollout.success else "fail"
                        bar.advance(info=f"{task} #{i} {which}: {outcome} ({rollout.steps} steps)")
            finally:
                gl.make_current()
                task_sim.free()
    finally:
        gl.free()
    return result


def _render(task_sim: Any, gl: Any, rgb: np.ndarray, depth: np.ndarray) -> None:
    gl.make_current()
    for v, camera in enumerate(task_sim.cameras):
        task_sim.renderer.render(task_sim.data, camera, rgb[v], depth[v])


def observe(task_sim: Any, gl: Any) -> tuple[np.ndarray, np.ndarray]:
    """What the policy sees now, as the store records a frame: RGB (V, H, W, 3) uint8 and the state (Ds,)."""
    n_views = len(task_sim.cameras)
    rgb = np.empty((n_views, task_sim.height, task_sim.width, 3), np.uint8)
    depth = np.empty((n_views, task_sim.height, task_sim.width), np.float32)
    _render(task_sim, gl, rgb, depth)
    return rgb, task_sim.state().astype(np.float32)


def _rollout(
    policy: Policy,
    task_sim: Any,
    gl: Any,
    task: str,
    index: int,
    episode_seed: int,
    which: str,
    max_steps: int,
    video: _VideoWriter | None,
) -> Rollout:
    """One episode driven by `which`: the model (through the Policy), the scripted expert, or random."""
    n_views = len(task_sim.cameras)
    rgb = np.empty((n_views, task_sim.height, task_sim.width, 3), np.uint8)
    depth = np.empty((n_views, task_sim.height, task_sim.width), np.float32)
    obs = task_sim.reset(episode_seed)
    rng = np.random.default_rng(episode_seed)
    policy.reset(seed=episode_seed)  # the model's noise is seeded by the episode seed
    success, steps = False, 0
    observation: dict[str, Any] = {}
    if video is not None:
        _render(task_sim, gl, rgb, depth)
        video.add(rgb)
    while steps < max_steps:
        if which == "model":
            if policy.wants_observation:  # render only when the model is queried
                views_rgb, raw_state = observe(task_sim, gl)
                images = dict(zip(policy.spec.views, views_rgb, strict=True))
                observation = {"images": images, "state": raw_state, "task": task}
            chosen = policy.select_action(observation)
        elif which == "expert":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the experts warn whenever the env clips their gains
                chosen = np.asarray(task_sim.policy.get_action(obs), dtype=np.float64)
        else:
            chosen = rng.uniform(-1.0, 1.0, 4)
        action = np.clip(chosen, -1.0, 1.0).astype(np.float32)
        obs, _, _, _, info = task_sim.env.step(action)
        steps += 1
        if video is not None:
            _render(task_sim, gl, rgb, depth)
            video.add(rgb)
        if info["success"]:
            success = True
            break
    path = video.close() if video is not None else None
    latencies = policy.query_latencies_s if which == "model" else []
    return Rollout(
        task=task,
        episode=index,
        seed=episode_seed,
        policy=which,
        success=bool(success),
        steps=steps,
        queries=len(latencies),
        latency_ms=1000 * float(np.mean(latencies)) if latencies else None,
        video=path,
        final_state=[float(x) for x in task_sim.state()],
    )
