"""The Policy: the one way observations become actions (and, in world mode, the imagined future).

    policy = Policy.from_checkpoint("out/demo/run")          # a checkpoint folder, or a run's newest
    policy.reset(seed=0)
    action = policy.select_action(obs)                       # one action; a chunk is queued behind it
    chunk = policy.predict_chunk(obs)                        # (K, D_action) in dataset units
    chunk = policy.predict_chunk(obs, prev_chunk=chunk[8:], inference_delay=3)   # real-time chunking
    pred = policy.predict(batch_obs, mode="world")           # + future RGB (uint8) and depth (metres)
    pred = policy.predict(batch_obs, mode="world", given_actions=a, given_states=s)   # the future they cause

An observation is a mapping, for one sample or a batch (leading B):
    images  {view: (H, W, 3) uint8}      every view the checkpoint names, at its image size
    state   (D_state,) float             dataset units (the Policy normalizes with its checkpoint's stats)
    task    str                          one of the checkpoint's tasks
    depth   {view: (H, W) float metres}  only for a depth_condition checkpoint in world mode
Actions and states come back in dataset units. The Policy owns normalization and conditioning:
`xwam infer`, the simulators and the policy server all go through it.

Real-time chunking (docs/rtc.md, xwam_core.schedule.rtc): `prev_chunk` (L, D_action) in dataset units is
what remains of the chunk now executing, aligned so that its row 0 runs at this observation's time (for a
chunk queried s steps ago: old_chunk[s:], L = K - s); `inference_delay` d <= L is how many control steps
this query takes. The new chunk's first d actions are then prev_chunk[:d] exactly (they run while it is
computed) and the rest is inpainted to continue it. `xwam_core.rtc_executor.ChunkExecutor` does this
bookkeeping for a control loop.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xwam_core.checkpoint import PolicyParts, load_policy_parts
from xwam_core.errors import XWAMError
from xwam_core.models.codecs import codec_from_description, depth_to_image, image_to_depth
from xwam_core.objective import pad_last
from xwam_core.schedule.inference import DenoisingSchedule, initial_latents, model_denoiser
from xwam_core.schedule.rtc import OVERLAPS, RTCGuidance, sampling_context

MODES = ("policy", "world")


@dataclass
class Prediction:
    actions: np.ndarray  # (B, K, D_action) dataset units
    states: np.ndarray  # (B, S, D_state) dataset units
    rgb: np.ndarray | None  # (B, V, T, H, W, 3) uint8, frame 0 the observed frame (world mode)
    depth: np.ndarray | None  # (B, V, T, H, W) metres (world mode; None for a model without a depth branch)
    latency_s: float  # wall time of the denoising (+ decoding in world mode) for the batch
    num_denoiser_calls: int


class Policy:
    """A checkpoint ready to act: model, text, codec, normalizer and the denoising schedule."""

    def __init__(
        self,
        parts: PolicyParts,
        device: str | torch.device = "cpu",
        vae: str | None = None,
        actions_per_query: int | None = None,
    ):
        self.device = torch.device(device)
        self.parts = parts
        self.spec = parts.data
        self.normalizer = parts.normalizer
        self.model = parts.model.to(self.device).eval()
        self.text = parts.text.to(self.device).eval()
        self.codec = codec_from_description(parts.codec, vae).to(self.device)
        self.depth_range = self.model.depth_range
        self.schedule_config = parts.inference
        self.schedule = DenoisingSchedule(self.schedule_config)
        k = self.spec.window.num_actions
        if actions_per_query is None:  # the checkpoint's inference.actions_per_query (0: the whole chunk)
            actions_per_query = getattr(self.schedule_config, "actions_per_query", 0) or k
        self.actions_per_query = actions_per_query
        if not (isinstance(actions_per_query, int) and not isinstance(actions_per_query, bool)) or not (
            1 <= actions_per_query <= k
        ):
            raise XWAMError(f"actions per query {actions_per_query}: expected 1 to the chunk's {k}")
        self._queue: deque[np.ndarray] = deque()
        self.generator = torch.Generator().manual_seed(0)
        self.query_latencies_s: list[float] = []  # one per model query since the last reset()

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        vae: str | None = None,
        num_steps_video: int | None = None,
        num_steps_action: int | None = None,
        actions_per_query: int | None = None,
        action_noise_scale: float | None = None,
    ) -> Policy:
        """Load a checkpoint folder (or a run folder's newest); step counts and the action noise scale
        (inference.action_noise_scale) override the checkpoint's."""
        parts = load_policy_parts(path)
        given = {
            "num_steps_video": num_steps_video,
            "num_steps_action": num_steps_action,
            "action_noise_scale": action_noise_scale,
        }
        parts.inference = replace(parts.inference, **{k: v for k, v in given.items() if v is not None})
        parts.inference.validate()
        return cls(parts, device, vae, actions_per_query)

    @property
    def predicts_depth(self) -> bool:
        """Whether world mode predicts depth (False for a model without a depth branch, num_depth_blocks = 0)."""
        return len(self.model.depth_blocks) > 0

    @property
    def depth_condition(self) -> bool:
        """Whether world mode reads the observed depth (an RGB-D depth branch)."""
        return bool(self.model.config.get("depth_condition", False))

    # ------------------------------------------------------------------------------------ acting
    def reset(self, seed: int | None = None) -> None:
        """Forget queued actions (a new episode); reseed the noise when `seed` is given."""
        self._queue.clear()
        self.query_latencies_s = []
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
                raise XWAMError(f"seed {seed!r}: expected an integer in [0, 2**64)")
            self.generator = torch.Generator().manual_seed(int(seed))

    @property
    def wants_observation(self) -> bool:
        """True when the next select_action queries the model (so the caller must render a fresh one)."""
        return not self._queue

    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """One action (D_action,) in dataset units. Queries the model when the queue is empty and queues
        the first `actions_per_query` actions of the new chunk (open loop between queries)."""
        if not self._queue:
            chunk = self.predict_chunk(obs)
            self._queue.extend(chunk[: self.actions_per_query])
        return self._queue.popleft()

    def predict_chunk(
        self,
        obs: Mapping[str, Any],
        prev_chunk: np.ndarray | None = None,
        inference_delay: int = 0,
        overlap: str = "exp",
    ) -> np.ndarray:
        """The action chunk (K, D_action) for one observation, in dataset units (policy mode).

        With `prev_chunk` (L, D_action), the remaining actions of the executing chunk in dataset units
        aligned to start now, the chunk is sampled by real-time chunking: its first `inference_delay`
        actions equal prev_chunk's, the overlap up to L is guided towards it (`overlap`: "exp", the
        paper's decaying weights, or "none": only the frozen prefix)."""
        prediction = self.predict(
            obs, mode="policy", prev_chunk=prev_chunk, inference_delay=inference_delay, overlap=overlap
        )
        self.query_latencies_s.append(prediction.latency_s)
        return prediction.actions[0]

    def predict(
        self,
        obs: Mapping[str, Any],
        mode: str = "policy",
        generator: torch.Generator | None = None,
        prev_chunk: np.ndarray | None = None,
        inference_delay: int = 0,
        overlap: str = "exp",
        given_actions: np.ndarray | None = None,
        given_states: np.ndarray | None = None,
    ) -> Prediction:
        """Actions (and in world mode the future RGB-D) for one observation or a batch of them;
        `prev_chunk` ((L, D_action), or (B, L, D_action) for a batch) and `inference_delay`: real-time
        chunking, as in predict_chunk.

        World mode with `given_actions` (K, D_action) and `given_states` (T, D_state) (leading B for a
        batch; dataset units; the window's states, the first being the observation's, which is used):
        the video and depth those actions lead to (the action-conditioned world model, as training's
        clean-action samples); they come back unchanged as the prediction's actions and states."""
        if mode not in MODES:
            raise XWAMError(f"mode {mode!r}: expected 'policy' or 'world'")
        if (given_actions is None) != (given_states is None):
            raise XWAMError("given_actions and given_states go together (training conditions on both)")
        if given_actions is not None and (mode != "world" or prev_chunk is not None):
            raise XWAMError("given_actions: only in world mode and without prev_chunk")
        given = None if given_actions is None else (given_actions, given_states)
        with sampling_context(guided=prev_chunk is not None):
            return self._predict(
                obs, mode, generator or self.generator, prev_chunk, inference_delay, overlap, given
            )

    def _real_time_chunking(
        self,
        prev_chunk: np.ndarray | None,
        inference_delay: int,
        overlap: str,
        batched: bool,
        batch_size: int,
    ) -> tuple[np.ndarray | None, RTCGuidance | None]:
        """Check the previous chunk (dataset units) and turn it into the sampler's guidance (normalized)."""
        k = self.spec.window.num_actions
        if prev_chunk is None:
            if inference_delay != 0:
                raise XWAMError(
                    f"inference_delay {inference_delay} needs prev_chunk (the actions that run meanwhile)"
                )
            return None, None
        prev = _numbers("prev_chunk", prev_chunk)
        prev = prev if batched else prev[None]
        da = self.normalizer.action_dim
        if prev.ndim != 3 or prev.shape[0] != batch_size or prev.shape[2] != da or prev.shape[1] > k:
            expected = f"({batch_size}, L, {da})" if batched else f"(L, {da})"
            raise XWAMError(
                f"prev_chunk has shape {np.asarray(prev_chunk).shape}; expected {expected} with L <= the chunk's {k}"
            )
        length = prev.shape[1]
        if isinstance(inference_delay, bool) or not isinstance(inference_delay, (int, np.integer)):
            raise XWAMError(
                f"inference_delay {inference_delay!r}: expected an integer number of control steps"
            )
        if not 0 <= inference_delay <= length:
            raise XWAMError(
                f"inference_delay {inference_delay}: expected 0 to the {length} actions of prev_chunk"
            )
        if overlap not in OVERLAPS:
            raise XWAMError(f"overlap {overlap!r}: expected one of {', '.join(OVERLAPS)}")
        normalized = torch.from_numpy(self.normalizer.action.normalize(prev).astype(np.float32))
        return prev, RTCGuidance(normalized.to(self.device), int(inference_delay), overlap)

    def _predict(
        self,
        obs: Mapping[str, Any],
        mode: str,
        generator: torch.Generator,
        prev_chunk: np.ndarray | None,
        inference_delay: int,
        overlap: str,
        given: tuple[Any, Any] | None = None,
    ) -> Prediction:
        rgb0, state0, tasks, depth0 = self._inputs(obs, with_depth=mode == "world" and self.depth_condition)
        batched = np.asarray(obs["state"]).ndim == 2
        prev, rtc = self._real_time_chunking(prev_chunk, inference_delay, overlap, batched, state0.shape[0])
        given_raw = None if given is None else self._given_streams(*given, batched, state0.shape[0])
        cfg = self.model.config
        window = self.spec.window
        start = time.perf_counter()
        context = self.codec.encode_views(rgb0)  # (B, V, C, 1, h, w)
        num_latent = self.codec.latent_shape(window.num_frames, *rgb0.shape[-2:])[1]
        video, actions, states = initial_latents(
            context,
            pad_last(state0, cfg.state_dim),
            num_latent,
            window.num_actions,
            cfg.action_dim,
            window.num_frames,
            generator=generator,
            action_noise_scale=self.schedule_config.action_noise_scale,
        )
        if given_raw is not None:  # clean from the start: the schedule keeps them at t = 0
            actions, states = self._given_latents(given_raw, actions, states)
        depth_context = None
        if depth0 is not None:
            depth_context = self.codec.encode_views(depth_to_image(depth0, self.depth_range))
        denoiser = model_denoiser(self.model, self.text(tasks), depth_context=depth_context)
        uncond = None
        if self.schedule_config.guidance_scale != 1.0:
            empty = self.text.empty(tasks.shape[0]).to(self.device)
            uncond = model_denoiser(self.model, empty, depth_context=depth_context)
        result = self.schedule(
            denoiser,
            video,
            actions,
            states,
            mode=mode,
            uncond_denoiser=uncond,
            rtc=rtc,
            actions_given=given_raw is not None,
        )
        rgb = depth = None
        if mode == "world":
            assert result.video is not None
            frames = self.codec.decode_views(result.video)  # (B, V, 3, T, H, W)
            rgb = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 5, 2)
            if result.depth is not None:  # None: the model has no depth branch (num_depth_blocks = 0)
                depth_image = self.codec.decode_views(result.depth)
                depth = image_to_depth(depth_image, self.depth_range)  # (B, V, T, H, W)
        latency = time.perf_counter() - start
        a = result.actions[..., : self.normalizer.action_dim].float().cpu().numpy()
        s = result.states[..., : self.normalizer.state_dim].float().cpu().numpy()
        actions_out = self.normalizer.action.denormalize(a)  # (B, K, D_action)
        if prev is not None:  # the delayed prefix exactly as it runs (the normalize round trip is not exact)
            actions_out[:, :inference_delay] = prev[:, :inference_delay]
        states_out = self.normalizer.state.denormalize(s)
        if not (np.isfinite(actions_out).all() and np.isfinite(states_out).all()):
            # never hand a robot NaN: a state far outside the training range can overflow the model
            raise XWAMError(
                "the model's prediction holds NaN or infinite values; is the observation far outside "
                "what the checkpoint was trained on (its state, in dataset units)?"
            )
        if given_raw is not None:  # exactly as given (the normalize round trip is not exact)
            actions_out = given_raw[0].copy()
            states_out = np.concatenate([states_out[:, :1], given_raw[1][:, 1:]], axis=1)
        return Prediction(
            actions=actions_out,
            states=states_out,
            rgb=rgb.cpu().numpy() if rgb is not None else None,
            depth=depth.float().cpu().numpy() if depth is not None else None,
            latency_s=latency,
            num_denoiser_calls=result.num_denoiser_calls,
        )

    def _given_streams(
        self, actions: Any, states: Any, batched: bool, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Check given actions (B, K, D_action) and window states (B, T, D_state), dataset units."""
        window = self.spec.window
        checked = []
        for name, value, length, dim in (
            ("given_actions", actions, window.num_actions, self.normalizer.action_dim),
            ("given_states", states, window.num_frames, self.normalizer.state_dim),
        ):
            array = _numbers(name, value)
            array = array if batched else array[None]
            if array.shape != (batch_size, length, dim):
                expected = f"({batch_size}, {length}, {dim})" if batched else f"({length}, {dim})"
                raise XWAMError(f"{name} has shape {np.asarray(value).shape}; expected {expected}")
            checked.append(array)
        return checked[0], checked[1]

    def _given_latents(
        self, given: tuple[np.ndarray, np.ndarray], actions: torch.Tensor, states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's action and state tensors holding the given streams (normalized, padded), state 0
        kept as the observation's."""
        cfg = self.model.config
        a = torch.from_numpy(self.normalizer.action.normalize(given[0]).astype(np.float32))
        s = torch.from_numpy(self.normalizer.state.normalize(given[1][:, 1:]).astype(np.float32))
        actions = pad_last(a, cfg.action_dim).to(device=actions.device, dtype=actions.dtype)
        future = pad_last(s, cfg.state_dim).to(device=states.device, dtype=states.dtype)
        return actions, torch.cat([states[:, :1], future], dim=1)

    # ------------------------------------------------------------------------------------ inputs
    def _inputs(
        self, obs: Mapping[str, Any], with_depth: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validate an observation and turn it into model inputs: images (B, V, 3, 1, H, W) in [-1, 1],
        the normalized state (B, D_state), task indices (B,), and the observed depth (B, V, 1, H, W)."""
        if not isinstance(obs, Mapping):
            raise XWAMError(
                f"observation is {type(obs).__name__}; expected a mapping with images, state and task"
            )
        for key in ("images", "state", "task"):
            if key not in obs:
                raise XWAMError(f"observation lacks {key!r} (expected images, state and task)")
        images = obs["images"]
        if not isinstance(images, Mapping):
            raise XWAMError("observation 'images' must map each view name to its (H, W, 3) uint8 image")
        state = _numbers("observation 'state'", obs["state"])
        batched = state.ndim == 2
        if state.ndim not in (1, 2) or state.shape[-1] != self.normalizer.state_dim:
            raise XWAMError(
                f"observation 'state' has shape {state.shape}; expected ({self.normalizer.state_dim},) "
                f"({', '.join(self.normalizer.state_names)}) or a batch of them"
            )
        states = state if batched else state[None]
        b = states.shape[0]
        if b == 0:
            raise XWAMError("observation 'state' is an empty batch; expected at least one state")
        h, w = self.spec.image_size
        views = []
        for view in self.spec.views:
            if view not in images:
                raise XWAMError(f"observation lacks view {view!r}; the checkpoint expects {self.spec.views}")
            image = np.asarray(images[view])
            expected = (b, h, w, 3) if batched else (h, w, 3)
            if image.dtype != np.uint8 or image.shape != expected:
                raise XWAMError(
                    f"observation image {view!r}: {image.dtype} {image.shape}, expected uint8 {expected}"
                )
            views.append(image if batched else image[None])
        rgb = torch.from_numpy(np.stack(views, axis=1)).to(self.device)  # (B, V, H, W, 3)
        rgb0 = rgb.permute(0, 1, 4, 2, 3)[:, :, :, None].float() / 127.5 - 1.0  # (B, V, 3, 1, H, W)
        task = obs["task"]
        tasks = [task] if isinstance(task, str) else list(task) if isinstance(task, (list, tuple)) else None
        if tasks is None or not all(isinstance(t, str) for t in tasks):
            raise XWAMError(
                f"observation 'task' is {task!r}; expected a task name, or a list of them for a batch"
            )
        if len(tasks) != b:
            raise XWAMError(f"observation has {len(tasks)} task(s) for {b} state(s)")
        unknown = [t for t in tasks if t not in self.spec.tasks]
        if unknown:
            raise XWAMError(
                f"task {unknown[0]!r} was not seen in training (the checkpoint knows {self.spec.tasks})"
            )
        task_index = torch.tensor([self.spec.tasks.index(t) for t in tasks], device=self.device)
        state0 = torch.from_numpy(self.normalizer.state.normalize(states)).to(self.device)
        depth0 = None
        if with_depth:
            depth_views = obs.get("depth")
            if not isinstance(depth_views, Mapping) or any(v not in depth_views for v in self.spec.views):
                raise XWAMError(
                    "this checkpoint's depth branch reads the observed depth (depth_condition): world mode "
                    f"needs observation 'depth' for views {self.spec.views} (metres)"
                )
            depth_shape = (b, h, w) if batched else (h, w)
            maps = []
            for view in self.spec.views:
                one = _numbers(f"observation depth {view!r}", depth_views[view])
                if one.shape != depth_shape:
                    raise XWAMError(
                        f"observation depth {view!r} has shape {one.shape}; expected {depth_shape} (metres)"
                    )
                maps.append(one)
            d = np.stack(maps, axis=-3)
            d = d if batched else d[None]  # (B, V, H, W)
            depth0 = torch.from_numpy(d).to(self.device)[:, :, None]  # (B, V, 1, H, W)
        return rgb0, state0, task_index, depth0


def _numbers(name: str, value: Any) -> np.ndarray:
    """`value` as a float32 array of finite real numbers, or one line naming `name`."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise XWAMError(f"{name} is not an array of numbers ({e})") from None
    if array.dtype.kind not in "biuf":
        raise XWAMError(f"{name} has dtype {array.dtype}; expected real numbers")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise XWAMError(f"{name} holds NaN or infinite values (or values beyond float32's range)")
    return array
