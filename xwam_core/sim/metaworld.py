"""Closed-loop evaluation on Meta-World v3: the checkpoint drives the robot in policy mode.

    result = evaluate_metaworld(policy, tasks=["reach-v3"], episodes=10, seed=0)

Each query renders the checkpoint's views at its image size with the episode store's camera
conventions (xwam_core.data.sources.metaworld: same cameras, renderer, intrinsics) and reads the state
the way the store records it (hand xyz, quaternion wxyz, gripper opening), and hands both to the
Policy (xwam_core.policy), which normalizes with the checkpoint's statistics and queues the predicted
chunk: `policy.actions_per_query` actions run open loop before the next query (default: the whole
chunk, docs/method.md section 6; `xwam evaluate --actions-per-query N`). A simulated inference delay of
d control steps (`--inference-delay`) keeps the executing chunk running for d steps after each query before
the new chunk takes over, switched naively or by real-time chunking (`--chunking naive|rtc`,
xwam_core.rtc_executor, docs/rtc.md). Actions are clipped to [-1, 1] as the environment applies them. An episode
succeeds if Meta-World's info["success"] is true after any step (then it stops), else it runs
`max_steps` steps.

The model's actor is anything with the Policy's acting interface (`SimActor`): the in-process Policy, or a
client of a policy server that mirrors its spec and normalizer.

Held-out starts: episode i of task T uses the simulator seed
SeedSequence([seed, crc32(T), i, EVAL_STREAM]).generate_state(1)[0]; the store's episodes use
SeedSequence([seed, crc32(T), i]) (MetaWorldSource.episode_seed), so no evaluation start is a training
start, whatever the seeds. When the checkpoint's training store is a Meta-World store on this machine,
the disjointness is also checked against its recorded seed and episode count.
Baselines on the same seeds: the scripted expert (the store's demonstrator), a uniform random
policy (actions ~ U[-1, 1], seeded by the episode seed) and, when given, a behaviour-cloning policy
trained on the model's own training episodes (xwam_core.sim.bc), executing the same actions per query.
The model's noise is seeded by the episode seed as well, so the same seeds give the same result.

Beside each success rate: its 95% Wilson score interval (xwam_core.sim.scores). Goal following: from each
held-out start, the first chunk a learned policy predicts (the model's, BC's) is summed over its xyz
actions, clipped as the environment applies them, over the steps the scripted expert takes from the same
start within one chunk (up to K, or the first `goal_steps` actions when given; fewer when it succeeds
sooner); the Pearson correlation across starts
with the expert's summed actions, per axis, and both spreads show whether the policy moves towards this
episode's goal or makes the same move from every start. Summed commanded actions, not the hand's
displacement after executing the chunk: they are what the policy decides from this observation alone,
whatever the actions-per-query setting, with no extra open-loop rollout in which contacts and the arm's
limits blur the comparison; Meta-World's mocap moves the hand target by action x 1 cm per step, so the
sums read as centimetres of commanded motion.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from xwam_core.atomic import atomic_file
from xwam_core.errors import XWAMError
from xwam_core.progress import SILENT, Progress
from xwam_core.rtc_executor import ChunkExecutor, check_chunking
from xwam_core.sim.scores import MIN_STARTS, goal_following, wilson_interval

if TYPE_CHECKING:
    from xwam_core.sim.bc import BCPolicy

EVAL_STREAM = 0x5EED  # appended to the seed entropy; nonzero, so never equal to a store's 3-word entropy
POLICIES = ("model", "bc", "expert", "random")  # the table's columns, in order
BASELINES = ("expert", "random", "bc")
LEARNED = ("model", "bc")  # policies with a predicted first chunk (the goal-following check)
VIDEO_FPS = 30.0
VIDEO_MIN_HEIGHT = 192


class SimActor(Protocol):
    """What the closed loop needs from the model's actor: the Policy's acting interface.

    spec: the checkpoint's data spec (views, image_size, tasks, window.num_actions, store, val_episodes);
    normalizer: its state_names, state_dim and action_dim; actions_per_query: executed per query.
    predict_chunk(obs, prev_chunk=None, inference_delay=0) -> (K, D_action) in dataset units, obs as the
    Policy takes it (images per view, state in dataset units, task); reset(seed) starts an episode and seeds
    the noise. Optional: query_latencies_s (seconds per query since reset) for the latency column.
    """

    spec: Any
    normalizer: Any
    actions_per_query: int

    def reset(self, seed: int | None = None) -> None: ...

    def predict_chunk(
        self, obs: Any, prev_chunk: np.ndarray | None = None, inference_delay: int = 0
    ) -> np.ndarray: ...


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
    switch_jump: float | None = None  # learned: mean |new chunk's first action run - old chunk's, same step|
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
    actions_per_query: int | None = None  # executed per query by the model and BC
    chunk: int | None = None  # actions the model predicts per query (K)
    inference_delay: int = 0  # simulated control steps per query (the executing chunk runs meanwhile)
    chunking: str = "naive"  # how the model's new chunk takes over: naive | rtc (BC: always naive)
    goal_steps: int | None = None  # goal following: actions of the first chunk summed (the chunk, K, if None)
    # goal following: task -> policy ("expert", "model", "bc") -> one summed xyz per start (episode order)
    displacements: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    displacement_steps: dict[str, list[int]] = field(default_factory=dict)  # task -> steps summed per start
    bc: dict[str, Any] | None = None  # the BC baseline's training record (BCPolicy.info)

    def policies(self) -> list[str]:
        return [p for p in POLICIES if any(r.policy == p for r in self.rollouts)]

    def counts(self, policy: str, task: str | None = None) -> tuple[int, int]:
        """(successes, episodes) of `policy`, on one task or pooled over all."""
        rs = [r for r in self.rollouts if r.policy == policy and (task is None or r.task == task)]
        return sum(r.success for r in rs), len(rs)

    def success_rate(self, policy: str, task: str | None = None) -> float | None:
        k, n = self.counts(policy, task)
        return k / n if n else None

    def interval(self, policy: str, task: str | None = None) -> tuple[float, float] | None:
        """The 95% Wilson score interval of the success rate (None without rollouts)."""
        k, n = self.counts(policy, task)
        return wilson_interval(k, n) if n else None

    def goal_following(self, task: str) -> dict[str, dict[str, Any]]:
        """Per learned policy: the correlation of its first chunk's displacement with the expert's
        across the task's starts (xwam_core.sim.scores.goal_following)."""
        d = self.displacements.get(task, {})
        if "expert" not in d:
            return {}
        expert = np.asarray(d["expert"], np.float64).reshape(-1, 3)
        return {
            p: goal_following(np.asarray(d[p], np.float64).reshape(-1, 3), expert) for p in LEARNED if p in d
        }

    def to_json(self) -> dict[str, Any]:
        policies = self.policies()
        per_task = {t: {p: self.success_rate(p, t) for p in policies} for t in self.tasks}
        lat = [r.latency_ms for r in self.rollouts if r.latency_ms is not None and r.policy == "model"]

        def pair(x: tuple[float, float] | None) -> list[float] | None:
            return None if x is None else [x[0], x[1]]

        following = {t: self.goal_following(t) for t in self.tasks}
        mean_r = {}
        for p in LEARNED:
            values = [g[p]["r_mean"] for g in following.values() if p in g and g[p]["r_mean"] is not None]
            if any(p in g for g in following.values()):
                mean_r[p] = float(np.mean(values)) if values else None
        return {
            "simulator": "metaworld",
            "tasks": self.tasks,
            "episodes_per_task": self.episodes,
            "seed": self.seed,
            "max_steps": self.max_steps,
            "actions_per_query": self.actions_per_query,
            "chunk": self.chunk,
            "inference_delay": self.inference_delay,
            "chunking": self.chunking,
            "model_switch_jump_mean": _mean(
                [r.switch_jump for r in self.rollouts if r.policy == "model" and r.switch_jump is not None]
            ),
            "success_rate": {
                "per_task": per_task,
                "mean": {p: self.success_rate(p) for p in policies},
                "successes": {
                    "per_task": {t: {p: list(self.counts(p, t)) for p in policies} for t in self.tasks},
                    "mean": {p: list(self.counts(p)) for p in policies},
                },
                "interval_95": {
                    "method": "Wilson score interval, z = 1.96 (the mean: pooled over tasks)",
                    "per_task": {t: {p: pair(self.interval(p, t)) for p in policies} for t in self.tasks},
                    "mean": {p: pair(self.interval(p)) for p in policies},
                },
            },
            "goal_following": {
                "method": (
                    "per held-out start: the sum of the first predicted chunk's xyz actions (clipped to "
                    "[-1, 1]) over the steps the scripted expert takes from the same start within the first "
                    "goal_steps actions (the chunk's), against the expert's summed xyz actions; Pearson r "
                    "across starts per axis (null: n/a, "
                    f"fewer than {MIN_STARTS} starts or no variation), r_mean over the axes, std across starts "
                    "(action units; x 1 cm of commanded hand motion in Meta-World)"
                ),
                "per_task": {
                    t: {
                        **following[t],
                        "steps": self.displacement_steps.get(t, []),
                        "displacements": self.displacements.get(t, {}),
                    }
                    for t in self.tasks
                },
                "goal_steps": self.goal_steps,
                "r_mean": mean_r,
            },
            "bc": self.bc,
            "model_latency_ms_mean": float(np.mean(lat)) if lat else None,
            "notes": self.notes,
            "rollouts": [r.__dict__ for r in self.rollouts],
        }


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def state_layout(policy: SimActor) -> str:
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


def check_request(
    policy: SimActor,
    tasks: list[str],
    episodes: int,
    max_steps: int,
    render_quality: str | None = None,
    inference_delay: int = 0,
    chunking: str = "naive",
    goal_steps: int | None = None,
) -> str:
    """Every check of a closed-loop request that needs no simulation (the CLI runs it before the minute of
    behaviour cloning); returns the render quality to use."""
    from xwam_core.data.sources import metaworld as mw

    _check(policy, tasks, episodes, max_steps)
    k = policy.spec.window.num_actions
    check_chunking(policy.actions_per_query, inference_delay, chunking, k)
    if goal_steps is not None and not 1 <= goal_steps <= k:
        raise XWAMError(
            f"--goal-steps {goal_steps}: expected 1 to the checkpoint's chunk of {k} actions "
            "(the first chunk's actions that goal following sums)"
        )
    quality = render_quality or store_render_quality(policy.spec.store) or "fast"
    if quality not in mw.RENDER_QUALITIES:
        raise XWAMError(f"--render-quality {quality!r}: expected 'fast' or 'default'")
    return quality


def _check(policy: SimActor, tasks: list[str], episodes: int, max_steps: int) -> None:
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


def _baselines(baselines: bool | Sequence[str], bc: BCPolicy | None) -> list[str]:
    """The baselines to roll out, in table order: True = expert and random (and BC when given)."""
    if baselines is True:
        chosen = ["expert", "random", *(["bc"] if bc is not None else [])]
    elif baselines is False:
        chosen = []
    else:
        chosen = list(baselines)
        unknown = [b for b in chosen if b not in BASELINES]
        if unknown:
            raise XWAMError(
                f"--baselines: unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}"
            )
    if "bc" in chosen and bc is None:
        raise XWAMError("the bc baseline needs a trained BCPolicy (xwam_core.sim.bc.train_bc)")
    return [p for p in POLICIES if p in chosen]


def evaluate_metaworld(
    policy: SimActor,
    tasks: list[str],
    episodes: int,
    seed: int = 0,
    max_steps: int = 150,
    render_quality: str | None = None,
    video_dir: str | Path | None = None,
    baselines: bool | Sequence[str] = True,
    progress: Progress = SILENT,
    bc: BCPolicy | None = None,
    inference_delay: int = 0,
    chunking: str = "naive",
    goal_steps: int | None = None,
) -> SimResult:
    """Roll the policy (and the baselines) out on `episodes` held-out starts per task; each finished
    rollout's outcome is the progress bar's status text. `baselines`: True (expert, random and, when `bc`
    is given, BC), False, or names from BASELINES. BC executes the model's actions per query.
    `inference_delay` (control steps) and `chunking` (naive | rtc): how each new chunk takes over
    (xwam_core.rtc_executor); BC, which has no sampler to guide, always switches naively. `goal_steps`:
    goal following sums the first chunk's first this many actions (1 to the chunk; None: all of it)."""
    from xwam_core.data.sources import metaworld as mw

    quality = check_request(
        policy, tasks, episodes, max_steps, render_quality, inference_delay, chunking, goal_steps
    )
    policies = ["model", *_baselines(baselines, bc)]
    learner: dict[str, Any] = {"model": policy}
    if "bc" in policies:
        assert bc is not None
        if bc.normalizer.state_dim != policy.normalizer.state_dim:
            raise XWAMError(
                f"behaviour cloning: its store has {bc.normalizer.state_dim}-D states, the checkpoint "
                f"{policy.normalizer.state_dim}-D; train it on the checkpoint's store"
            )
        missing = [t for t in tasks if t not in bc.tasks]
        if missing:
            raise XWAMError(f"behaviour cloning: task {missing[0]!r} is not in its store ({bc.tasks})")
        if bc.chunk < policy.actions_per_query:
            raise XWAMError(
                f"behaviour cloning predicts {bc.chunk} actions per query; the model executes "
                f"{policy.actions_per_query}"
            )
        bc.actions_per_query = policy.actions_per_query  # the same open-loop horizon as the model
        learner["bc"] = bc
    layout = policy.spec
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
    k = layout.window.num_actions
    summed_steps = k if goal_steps is None else goal_steps
    result = SimResult(
        list(tasks),
        episodes,
        seed,
        max_steps,
        notes={
            "held_out": "SeedSequence([seed, crc32(task), i, EVAL_STREAM]) vs the store's SeedSequence([seed, crc32(task), i])",
            "checked_against_training_store": checked,
            "render_quality": quality,
            "chunk": f"{policy.actions_per_query} of {k} actions executed open loop per query",
            "inference_delay": f"{inference_delay} control steps simulated per query; {chunking} chunk switching"
            + (" (BC: naive)" if "bc" in policies and chunking != "naive" else ""),
            "views": list(layout.views),
            "image_size": list(layout.image_size),
        },
        actions_per_query=policy.actions_per_query,
        chunk=k,
        inference_delay=inference_delay,
        chunking=chunking,
        goal_steps=summed_steps,
        bc=bc.info if "bc" in policies and bc is not None else None,
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
                moves: dict[str, list[list[float]]] = {p: [] for p in ["expert", *learner]}
                summed: list[int] = []
                for i, episode_seed in enumerate(seeds[task]):
                    # goal following: the expert's first summed_steps actions from this start
                    expert_moved, n = expert_displacement(task_sim, episode_seed, summed_steps)
                    summed.append(n)
                    moves["expert"].append([float(x) for x in expert_moved])
                    for which in policies:
                        actor = learner.get(which)
                        if actor is not None:  # the first chunk, exactly as the rollout's first query
                            first = first_chunk_displacement(actor, task_sim, gl, task, episode_seed, n)
                            moves[which].append([float(x) for x in first])
                        video = None
                        if video_dir is not None and which == "model":
                            video = _VideoWriter(Path(video_dir) / f"{task}_ep{i:03d}_model.mp4")
                        executor = None
                        if actor is not None:
                            executor = ChunkExecutor(
                                actor,
                                actor.actions_per_query,
                                inference_delay,
                                chunking if which == "model" else "naive",
                            )
                        rollout = _rollout(
                            executor, task_sim, gl, task, i, episode_seed, which, max_steps, video
                        )
                        result.rollouts.append(rollout)
                        outcome = "success" if rollout.success else "fail"
                        bar.advance(info=f"{task} #{i} {which}: {outcome} ({rollout.steps} steps)")
                result.displacements[task] = moves
                result.displacement_steps[task] = summed
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


def expert_displacement(task_sim: Any, episode_seed: int, k: int) -> tuple[np.ndarray, int]:
    """Goal following's reference: the scripted expert's first `k` actions from `episode_seed` (fewer if it
    succeeds sooner), clipped as the environment applies them, summed over xyz: ((3,), n actions)."""
    actions = _expert_actions(task_sim, episode_seed, k)
    return actions[:, :3].sum(0), len(actions)


def first_chunk_displacement(
    actor: Any, task_sim: Any, gl: Any, task: str, episode_seed: int, n: int
) -> np.ndarray:
    """Goal following's measure: `actor`'s (the Policy or BC) first chunk at `episode_seed`, its first `n`
    xyz actions clipped as the environment applies them and summed: (3,)."""
    chunk = _first_chunk(actor, task_sim, gl, task, episode_seed)
    return np.clip(chunk[:n, :3], -1.0, 1.0).sum(0)


def _first_chunk(actor: Any, task_sim: Any, gl: Any, task: str, episode_seed: int) -> np.ndarray:
    """The chunk (K, Da) `actor` (the Policy or BC) predicts at the start of episode `episode_seed`: the
    same environment reset and noise seed as the rollout's first query, so the same chunk."""
    task_sim.reset(episode_seed)
    actor.reset(seed=episode_seed)
    return np.asarray(actor.predict_chunk(_observation(actor, task_sim, gl, task)))


def _observation(actor: Any, task_sim: Any, gl: Any, task: str) -> dict[str, Any]:
    """What `actor` is given now: the Policy the rendered views, state and task; BC (no `spec`: it reads no
    images) the state and task, without rendering."""
    spec = getattr(actor, "spec", None)
    if spec is None:
        return {"state": task_sim.state().astype(np.float32), "task": task}
    views_rgb, raw_state = observe(task_sim, gl)
    return {"images": dict(zip(spec.views, views_rgb, strict=True)), "state": raw_state, "task": task}


def _expert_actions(task_sim: Any, episode_seed: int, steps: int) -> np.ndarray:
    """The scripted expert's first `steps` actions (fewer if it succeeds sooner), clipped as the
    environment applies them: (n, Da)."""
    obs = task_sim.reset(episode_seed)
    actions = []
    for _ in range(steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            action = np.clip(np.asarray(task_sim.policy.get_action(obs), np.float64), -1.0, 1.0)
        actions.append(action)
        obs, _, _, _, info = task_sim.env.step(action.astype(np.float32))
        if info["success"]:
            break
    return np.asarray(actions, np.float64).reshape(len(actions), -1)


def _rollout(
    executor: ChunkExecutor | None,
    task_sim: Any,
    gl: Any,
    task: str,
    index: int,
    episode_seed: int,
    which: str,
    max_steps: int,
    video: _VideoWriter | None,
) -> Rollout:
    """One episode driven by `which`: a learned actor through its chunk executor (the model's actor or
    BC), the scripted expert, or random."""
    n_views = len(task_sim.cameras)
    rgb = np.empty((n_views, task_sim.height, task_sim.width, 3), np.uint8)
    depth = np.empty((n_views, task_sim.height, task_sim.width), np.float32)
    obs = task_sim.reset(episode_seed)
    rng = np.random.default_rng(episode_seed)
    if executor is not None:
        executor.reset(seed=episode_seed)  # the model's noise is seeded by the episode seed
    success, steps = False, 0
    observation: dict[str, Any] = {}
    if video is not None:
        _render(task_sim, gl, rgb, depth)
        video.add(rgb)
    while steps < max_steps:
        if executor is not None:
            if executor.wants_observation:  # render only when the actor is queried
                observation = _observation(executor.actor, task_sim, gl, task)
            chosen = executor.select_action(observation)
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
    latencies = list(getattr(executor.actor, "query_latencies_s", [])) if executor is not None else []
    return Rollout(
        task=task,
        episode=index,
        seed=episode_seed,
        policy=which,
        success=bool(success),
        steps=steps,
        queries=executor.queries if executor is not None else 0,
        latency_ms=1000 * float(np.mean(latencies)) if latencies else None,
        video=path,
        switch_jump=_mean(executor.switch_jumps) if executor is not None else None,
        final_state=[float(x) for x in task_sim.state()],
    )
