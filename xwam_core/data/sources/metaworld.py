"""Meta-World episodes: scripted expert policies in the real simulator, RGB-D from calibrated cameras.

Rendering is offscreen on the CPU (Mesa through EGL). Every episode is reproducible from
(seed, task, episode index) alone; see docs/sources/metaworld.md for the conventions.
"""

from __future__ import annotations

import os

# The OpenGL backend is fixed when mujoco is first imported: pick the headless one before that.
# EGL works with Mesa's llvmpipe on a CPU and with the vendor driver on a GPU machine; OSMesa is
# CPU-only and no faster here (measured 36 ms vs 37 ms per 128 px frame).
os.environ.setdefault("MUJOCO_GL", "egl")

import difflib
import inspect
import math
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.errors import DataError

# Every Meta-World v3 scene includes the same Sawyer base file, hence the same cameras.
CAMERAS: dict[str, str] = {
    "topview": "fixed, 1.5 m above the table looking straight down; far edge of the table at the top",
    "corner": "fixed, low front-left corner looking across the table at the robot",
    "corner2": "fixed, high front-right corner, the usual Meta-World view (fovy 60)",
    "corner3": "fixed, high right side looking steeply down at the table (fovy 45)",
    "corner4": "fixed, like corner2 but closer to the table (fovy 60)",
    "behindGripper": "moves with the hand, 0.5 m behind it looking forward past the gripper",
    "gripperPOV": "moves with the hand, beside the fingers looking down at what they grasp (fovy 90)",
}
STATE_NAMES = ["ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz", "gripper_opening"]
# state = "task": the hand, then what Meta-World's own observation holds beyond it: the first object's
# position and orientation, and the goal position (docs/sources/metaworld.md, "State layouts").
TASK_STATE_NAMES = [
    *STATE_NAMES,
    *("obj_x", "obj_y", "obj_z", "obj_qw", "obj_qx", "obj_qy", "obj_qz"),
    *("goal_x", "goal_y", "goal_z"),
]
STATE_LAYOUTS: dict[str, list[str]] = {"hand": STATE_NAMES, "task": TASK_STATE_NAMES}
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper_effort"]
# the hand's mocap target moves by each xyz action (a change: summed when frames are dropped); the
# gripper effort is a level held until the next command
ACTION_KINDS = ["delta", "delta", "delta", "absolute"]
RENDER_QUALITIES = ("fast", "default")
MIN_SIZE, MAX_SIZE = 64, 256
MAX_STEPS_LIMIT = 500  # Meta-World's own horizon (max_path_length)
# After the first successful step keep this many frames, but never stop before MIN_FRAMES so that
# a 9-frame window at stride 4 (33 frames) always fits with room to slide.
FRAMES_AFTER_SUCCESS = 10
MIN_FRAMES = 40
# Meta-World normalizes the finger distance by 0.1 m to get the gripper opening in [0, 1].
_FINGER_SPAN_M = 0.1
# Depth beyond this fraction of the far plane is background (MuJoCo draws the skybox at ~0.54 zfar,
# about 60 m here; the 8 m floor keeps real surfaces within ~12 m of every camera): stored as 0.
_BACKGROUND_FRACTION_OF_FAR = 0.25
FrameHook = Callable[[Any, int], None]  # (Meta-World env, frame index)
_GL_TO_CV = np.diag([1.0, -1.0, -1.0])  # MuJoCo/OpenGL camera axes (y up, looks along -z) -> OpenCV
_ROTATE_180 = np.diag([-1.0, -1.0, 1.0])  # the camera turned half a turn about its optical axis


def _sim() -> Any:
    """Import the simulator lazily so that the rest of xwam works without the [sim] extra."""
    try:
        import metaworld  # noqa: F401  (registers the v3 envs)
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as exc:
        raise DataError(
            f"metaworld source: cannot import the simulator ({exc}); expected the [sim] extra: "
            "pip install 'xwam[sim]'"
        ) from exc

    return SimpleNamespace(mujoco=mujoco, envs=ALL_V3_ENVIRONMENTS, policies=ENV_POLICY_MAP)


def valid_tasks() -> list[str]:
    """The Meta-World v3 tasks that have a scripted expert policy."""
    sim = _sim()
    return [name for name in sim.envs if name in sim.policies]


def _gl_context(width: int, height: int) -> Any:
    """An offscreen OpenGL context for the backend named by MUJOCO_GL (egl or osmesa)."""
    backend = os.environ.get("MUJOCO_GL", "egl").lower()
    try:
        if backend == "egl":
            from mujoco.egl import GLContext
        elif backend == "osmesa":
            from mujoco.osmesa import GLContext
        else:
            from mujoco import GLContext  # type: ignore[assignment]
        return GLContext(width, height)
    except Exception as exc:
        raise DataError(
            f"metaworld source: cannot create an offscreen OpenGL context with MUJOCO_GL={backend} ({exc}); "
            "expected Mesa's libEGL (apt install libegl1) or MUJOCO_GL=osmesa with libosmesa6"
        ) from exc


@dataclass(frozen=True)
class _Camera:
    name: str
    cam_id: int
    rotate_180: bool  # image and camera turned together so that world up points up in the image


class _ViewRenderer:
    """One MuJoCo render context for one model at one image size, reused for every frame and view."""

    def __init__(self, mujoco: Any, model: Any, height: int, width: int, quality: str) -> None:
        self.mujoco = mujoco
        self.model = model
        self.fast = quality == "fast"
        if self.fast:
            model.vis.quality.offsamples = 0  # no multisampling; must be set before the MjrContext
        self.context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_50)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self.context)
        self.context.readDepthMap = mujoco.mjtDepthMap.mjDEPTH_ZEROFAR
        self.scene = mujoco.MjvScene(model, maxgeom=2000)
        if self.fast:
            self.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
            self.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self.option = mujoco.MjvOption()
        self.camera = mujoco.MjvCamera()
        self.camera.type = mujoco.mjtCamera.mjCAMERA_FIXED
        self.rect = mujoco.MjrRect(0, 0, width, height)
        self.rgb_buffer = np.empty((height, width, 3), np.uint8)  # OpenGL rows: bottom row first
        self.depth_buffer = np.empty((height, width), np.float32)
        # Depth-buffer value -> metres along the optical axis, exactly as mujoco.Renderer does it.
        extent = model.stat.extent
        z_near = np.float32(model.vis.map.znear * extent)
        z_far = np.float32(model.vis.map.zfar * extent)
        c_coef = -(z_far + z_near) / (z_far - z_near)
        d_coef = -(np.float32(2) * z_far * z_near) / (z_far - z_near)
        self.c_coef = float(np.float32(-0.5) * c_coef - np.float32(0.5))
        self.d_coef = float(np.float32(-0.5) * d_coef)
        self.background_depth = _BACKGROUND_FRACTION_OF_FAR * float(z_far)

    def render(self, data: Any, camera: _Camera, rgb_out: np.ndarray, depth_out: np.ndarray) -> None:
        """Render one view into rgb_out (H, W, 3) uint8 and depth_out (H, W) float32 metres."""
        mujoco = self.mujoco
        self.camera.fixedcamid = camera.cam_id
        mujoco.mjv_updateScene(
            self.model, data, self.option, None, self.camera, mujoco.mjtCatBit.mjCAT_ALL, self.scene
        )
        mujoco.mjr_render(self.rect, self.scene, self.context)
        if self.fast:
            # Without reflections or multisampling the colour pass's depth buffer is exactly the depth
            # pass's (tested), except the skybox, which the background threshold removes.
            mujoco.mjr_readPixels(self.rgb_buffer, self.depth_buffer, self.rect, self.context)
        else:
            # Reflections draw mirrored geometry into the depth buffer: take depth from a flat pass.
            mujoco.mjr_readPixels(self.rgb_buffer, None, self.rect, self.context)
            flags = self.scene.flags
            flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = True
            mujoco.mjr_render(self.rect, self.scene, self.context)
            flags[mujoco.mjtRndFlag.mjRND_SEGMENT] = flags[mujoco.mjtRndFlag.mjRND_IDCOLOR] = False
            mujoco.mjr_readPixels(None, self.depth_buffer, self.rect, self.context)
        depth = self.d_coef / (self.depth_buffer.astype(np.float64) + self.c_coef)  # (H, W) metres
        depth[depth > self.background_depth] = 0.0
        # OpenGL rows run bottom-up: a vertical flip puts row 0 at the top; a horizontal flip of the
        # bottom-up buffer is the same image turned 180 degrees.
        if camera.rotate_180:
            rgb_out[...] = self.rgb_buffer[:, ::-1]
            depth_out[...] = depth[:, ::-1]
        else:
            rgb_out[...] = self.rgb_buffer[::-1]
            depth_out[...] = depth[::-1]

    def free(self) -> None:
        self.context.free()


class _TaskSim:
    """The environment, expert policy and renderer of one task, reused for all its episodes."""

    def __init__(
        self,
        sim: Any,
        task: str,
        views: list[str],
        height: int,
        width: int,
        quality: str,
        state: str = "hand",
    ) -> None:
        if state not in STATE_LAYOUTS:
            raise DataError(f"metaworld: state layout {state!r}; expected one of {', '.join(STATE_LAYOUTS)}")
        self.sim = sim
        self.task = task
        self.state_layout = state  # what state() returns (STATE_LAYOUTS)
        env = sim.envs[task]()
        # Fresh, seeded start states instead of MT1's 50 presets: rand_vec comes from env.np_random.
        env._partially_observable = False  # the expert policies read the goal from the observation
        del env.sawyer_observation_space  # recomputed for the observable goal
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.max_path_length = MAX_STEPS_LIMIT + 1  # one spare step for the last recorded action
        self.env = env
        self.policy = sim.policies[task]()
        self.model, self.data = env.model, env.data
        self.quat_scalar_last = _scalar_last(env.__class__)
        self.hand_id = self.model.body("hand").id
        self.claw_ids = (self.model.body("rightclaw").id, self.model.body("leftclaw").id)
        self.fps = 1.0 / (env.frame_skip * self.model.opt.timestep)
        self.height, self.width = height, width
        self.renderer = _ViewRenderer(sim.mujoco, self.model, height, width, quality)
        cameras = []
        for name in views:
            cam_id = self.model.camera(name).id
            # World up (+z) in OpenCV camera axes has y component R_cv[2, 1]; y points down the image.
            # The corner cameras are defined upside down; tracking cameras keep a fixed world
            # orientation, so the decision made at the model's rest pose holds for every frame.
            rotation_cv = self.data.cam_xmat[cam_id].reshape(3, 3) @ _GL_TO_CV
            cameras.append(_Camera(name, cam_id, rotate_180=bool(rotation_cv[2, 1] > 0.0)))
        self.cameras = cameras
        tan_half_fovy = [math.tan(math.radians(self.model.cam_fovy[c.cam_id]) / 2) for c in cameras]
        self.intrinsics = []
        for tan_h in tan_half_fovy:
            focal = (height / 2) / tan_h  # fovy is vertical; pixels are square
            # Pixel centres at integer coordinates (OpenCV): the optical axis hits ((W-1)/2, (H-1)/2).
            self.intrinsics.append(
                np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]], np.float32)
            )

    def reset(self, seed: int) -> Any:
        """Start the episode of simulator seed `seed`; returns the first observation."""
        self.env.seed(seed)
        obs, _ = self.env.reset()
        self.sim.mujoco.mj_forward(self.model, self.data)  # reset moves the goal site last
        return obs

    def extrinsics(self, camera: _Camera) -> np.ndarray:
        """Camera-to-world (4, 4) in OpenCV axes at the current instant."""
        pose = np.eye(4)
        rotation = self.data.cam_xmat[camera.cam_id].reshape(3, 3) @ _GL_TO_CV
        if camera.rotate_180:
            rotation = rotation @ _ROTATE_180
        pose[:3, :3] = rotation
        pose[:3, 3] = self.data.cam_xpos[camera.cam_id]
        return pose

    def state(self, layout: str | None = None) -> np.ndarray:
        """The state of `layout` (default: this TaskSim's, STATE_LAYOUTS) at the current instant, float64.

        "hand" (8): hand position xyz, hand quaternion wxyz (w >= 0), gripper opening in [0, 1].
        "task" (18): that, then the first object's position and quaternion wxyz (w >= 0) and the goal
        position, read the way Meta-World builds its observation (_get_pos_objects, _get_quat_objects,
        _get_pos_goal). The one definition used by the source and by the closed-loop harness.
        """
        data = self.data
        quat = _positive_w(data.xquat[self.hand_id])
        right, left = (data.xpos[i] for i in self.claw_ids)
        opening = np.clip(np.linalg.norm(right - left) / _FINGER_SPAN_M, 0.0, 1.0)
        hand = np.concatenate([data.xpos[self.hand_id], quat, [opening]])
        layout = layout or self.state_layout
        if layout == "hand":
            return hand
        if layout != "task":
            raise DataError(f"metaworld: state layout {layout!r}; expected one of {', '.join(STATE_LAYOUTS)}")
        env = self.env
        obj_pos = np.asarray(env._get_pos_objects(), np.float64)[:3]
        obj_quat = np.asarray(env._get_quat_objects(), np.float64)[:4]
        if self.quat_scalar_last:
            obj_quat = obj_quat[[3, 0, 1, 2]]  # scipy's x, y, z, w -> w, x, y, z
        goal = np.asarray(env._get_pos_goal(), np.float64)
        return np.concatenate([hand, obj_pos, _positive_w(obj_quat), goal])

    def free(self) -> None:
        self.renderer.free()
        self.env.close()


def _positive_w(quat: np.ndarray) -> np.ndarray:
    """The same rotation with w >= 0 (q and -q are one rotation), as a copy."""
    quat = np.array(quat, np.float64)
    return -quat if quat[0] < 0 else quat


@cache
def _scalar_last(env_class: Any) -> bool:
    """Whether the task's _get_quat_objects returns scipy's (x, y, z, w) rather than MuJoCo's (w, x, y, z).

    Meta-World mixes both: 22 v3 tasks (reach, push, pick-place, ...) return
    `Rotation.from_matrix(...).as_quat()` (scalar last), the others a body's `xquat` (scalar first) or
    zeros (no orientation: recorded as zeros). Read from the method's source, the only place that says.
    """
    try:
        return "as_quat" in inspect.getsource(env_class._get_quat_objects)
    except (OSError, TypeError):
        return False


class MetaWorldSource(EpisodeSource):
    """Expert episodes from Meta-World v3 tasks with RGB, metric depth and calibrated cameras.

    `episodes` is per task. Episodes run until `max_steps` or shortly after the first success.
    """

    def __init__(
        self,
        tasks: list[str],
        episodes: int,
        views: list[str],
        size: int = 64,
        seed: int = 0,
        max_steps: int = 150,
        render_quality: str = "fast",
        state: str = "hand",
    ) -> None:
        if isinstance(tasks, str) or not tasks:
            raise DataError(
                f"metaworld: tasks={tasks!r}; expected a non-empty list of task names like ['reach-v3']"
            )
        if isinstance(views, str) or not views:
            raise DataError(
                f"metaworld: views={views!r}; expected a non-empty list of camera names like ['corner2']"
            )
        for view in views:
            if view not in CAMERAS:
                raise DataError(
                    f"metaworld: unknown view {view!r}; expected one of the cameras {', '.join(CAMERAS)}"
                )
        if len(set(views)) != len(views) or len(set(tasks)) != len(tasks):
            raise DataError(f"metaworld: tasks {tasks} / views {views} repeat a name; expected each once")
        if not isinstance(size, int) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
            raise DataError(
                f"metaworld: size={size!r} is out of range; expected {MIN_SIZE} to {MAX_SIZE} pixels"
            )
        if not isinstance(episodes, int) or isinstance(episodes, bool) or episodes < 1:
            raise DataError(f"metaworld: episodes={episodes!r}; expected an integer >= 1 (episodes per task)")
        if (
            not isinstance(max_steps, int)
            or isinstance(max_steps, bool)
            or not 1 <= max_steps <= MAX_STEPS_LIMIT
        ):
            raise DataError(
                f"metaworld: max_steps={max_steps!r}; expected an integer from 1 to {MAX_STEPS_LIMIT}"
            )
        if render_quality not in RENDER_QUALITIES:
            raise DataError(f"metaworld: render_quality={render_quality!r}; expected 'fast' or 'default'")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise DataError(f"metaworld: seed={seed!r}; expected an integer >= 0")
        if state not in STATE_LAYOUTS:
            raise DataError(
                f"metaworld: state={state!r}; expected 'hand' (8-D hand state) or 'task' (hand, first "
                "object and goal, 18-D)"
            )
        known = valid_tasks()
        for task in tasks:
            if task not in known:
                close = difflib.get_close_matches(task, known, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise DataError(
                    f"metaworld: unknown task {task!r}; {hint}expected one of the {len(known)} v3 tasks "
                    f"({', '.join(known)})"
                )
        self.tasks = list(tasks)
        self.num_episodes_per_task = episodes
        self.views = list(views)
        self.height = self.width = size  # square images
        self.seed = seed
        self.max_steps = max_steps
        self.render_quality = render_quality
        self.state_layout = state

    def info(self) -> SourceInfo:
        return SourceInfo(
            name="metaworld",
            robot_type="sawyer",
            fps=_control_fps(),
            views=list(self.views),
            image_size=(self.height, self.width),
            state_names=list(STATE_LAYOUTS[self.state_layout]),
            action_names=list(ACTION_NAMES),
            num_episodes=len(self.tasks) * self.num_episodes_per_task,
            has_depth=True,
            has_cameras=True,
            action_kinds=list(ACTION_KINDS),
            extra={
                "tasks": list(self.tasks),
                "episodes_per_task": self.num_episodes_per_task,
                "seed": self.seed,
                "max_steps": self.max_steps,
                "render_quality": self.render_quality,
                "state": self.state_layout,
                "state_frame": "Meta-World 'hand' body (the policy's hand_pos); gripper_opening 0 closed .. 1 open"
                + (
                    "; obj_*: the first object of Meta-World's observation (_get_pos_objects, "
                    "_get_quat_objects as wxyz, w >= 0); goal_*: the goal position (_get_pos_goal)"
                    if self.state_layout == "task"
                    else ""
                ),
                "success": "info['success'] true after any executed step",
            },
        )

    def episode_seed(self, task: str, episode_index: int) -> int:
        """The simulator seed of one episode: depends only on (seed, task, episode index)."""
        sequence = np.random.SeedSequence([self.seed, zlib.crc32(task.encode()), episode_index])
        return int(sequence.generate_state(1)[0])

    def episodes(self, on_frame: FrameHook | None = None) -> Iterator[Episode]:
        """Yield the episodes task by task. on_frame(env, t) runs right after frame t is recorded, while
        the simulator still holds that instant (for tests and inspection; it must not step the env)."""
        return self.episodes_at(range(len(self.tasks) * self.num_episodes_per_task), on_frame)

    def episodes_at(self, indices: Sequence[int], on_frame: FrameHook | None = None) -> Iterator[Episode]:
        """Episodes by position (task `i // episodes`, episode `i % episodes` of it), ascending. Each is
        recorded from its own seed, so episode i is the same in any selection and any process."""
        wanted = sorted(set(indices))
        per_task = self.num_episodes_per_task
        bad = [i for i in wanted if not 0 <= i < len(self.tasks) * per_task]
        if bad:
            raise DataError(
                f"metaworld: episode {bad[0]} does not exist; expected 0 to {len(self.tasks) * per_task - 1}"
            )
        if not wanted:
            return
        sim = _sim()
        gl = _gl_context(self.width, self.height)
        try:
            for task_number, task in enumerate(self.tasks):
                in_task = [i - task_number * per_task for i in wanted if i // per_task == task_number]
                if not in_task:
                    continue
                gl.make_current()
                task_sim = _TaskSim(
                    sim, task, self.views, self.height, self.width, self.render_quality, self.state_layout
                )
                try:
                    for index in in_task:
                        yield self._record(task_sim, index, gl, on_frame)
                finally:
                    gl.make_current()
                    task_sim.free()
        finally:
            gl.free()

    def _record(self, task_sim: _TaskSim, episode_index: int, gl: Any, on_frame: FrameHook | None) -> Episode:
        """Run the expert for one episode from its own seed."""
        env, n_views = task_sim.env, len(self.views)
        seed = self.episode_seed(task_sim.task, episode_index)
        obs = task_sim.reset(seed)
        max_t, height, width = self.max_steps, self.height, self.width
        rgb = np.empty((n_views, max_t, height, width, 3), np.uint8)  # (V, T, H, W, 3)
        depth = np.empty((n_views, max_t, height, width), np.float32)  # (V, T, H, W)
        extrinsics = np.empty((n_views, max_t, 4, 4), np.float32)  # (V, T, 4, 4)
        state = np.empty((max_t, len(STATE_LAYOUTS[task_sim.state_layout])), np.float32)  # (T, 8 or 18)
        action = np.empty((max_t, len(ACTION_NAMES)), np.float32)  # (T, 4)
        success_frame = -1
        n_frames = 0
        for t in range(max_t):
            # Frame t: state, images and cameras all read from the same simulator instant.
            state[t] = task_sim.state()
            gl.make_current()
            for v, camera in enumerate(task_sim.cameras):
                task_sim.renderer.render(task_sim.data, camera, rgb[v, t], depth[v, t])
                extrinsics[v, t] = task_sim.extrinsics(camera)
            if on_frame is not None:
                on_frame(env, t)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the experts warn whenever the env clips their gains
                command = task_sim.policy.get_action(obs)
            # Recorded exactly as applied: the env clips xyz to [-1, 1] and the gripper ctrlrange is [-1, 1].
            action[t] = np.clip(command, -1.0, 1.0)
            obs, _, _, _, info = env.step(action[t].copy())
            n_frames = t + 1
            if success_frame < 0 and info["success"]:
                success_frame = t + 1  # the first frame that shows the task solved
            if success_frame >= 0 and n_frames >= max(MIN_FRAMES, success_frame + FRAMES_AFTER_SUCCESS):
                break
        views = {
            camera.name: ViewFrames(
                rgb=rgb[v, :n_frames],  # contiguous views; untouched pages were never allocated
                depth=depth[v, :n_frames],
                intrinsics=np.repeat(task_sim.intrinsics[v][None], n_frames, axis=0),
                extrinsics=extrinsics[v, :n_frames],
            )
            for v, camera in enumerate(task_sim.cameras)
        }
        return Episode(
            task=task_sim.task,
            views=views,
            state=state[:n_frames],
            action=action[:n_frames],
            fps=task_sim.fps,
            success=success_frame >= 0,
            extra={"episode_seed": seed, "success_frame": success_frame, "episode_index": episode_index},
        )


# Closed-loop evaluation (xwam_core.sim.metaworld) drives the same simulator, cameras and renderer.
TaskSim = _TaskSim
gl_context = _gl_context


@cache
def _control_fps() -> float:
    """Meta-World's control rate: every v3 scene steps 5 substeps of 2.5 ms (80 Hz), read from the model."""
    sim = _sim()
    env = sim.envs["reach-v3"]()
    try:
        return float(1.0 / (env.frame_skip * env.model.opt.timestep))
    finally:
        env.close()
