"""Asynchronous denoising (docs/method.md section 4): policy mode and world mode.

One multistep UniPC solver per stream (video, actions, states), with the schedule of diffusers'
`UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5,
solver_order=2)`. Its sigmas run from ~1 (noise) to 0 (clean) with x_sigma = (1 - sigma) x_0 +
sigma eps, and it takes the model's velocity eps - x_0 as is (x0_pred = x - sigma v): no sign flip.
By default each step is applied by `FlowUniPC` (unipc.py: the same arithmetic with coefficients
computed once, in place); `unipc_impl="diffusers"` calls the scheduler's own `step` instead.

Async schedule: steps 1..T_action advance video, actions and states in the same denoiser call; then
actions and states are clean and frozen (t_action = 0) and the video continues alone to T_video.
Policy mode stops after T_action steps without depth; world mode runs everything and asks for
depth on the last call only. The sync schedule gives every stream T_video steps (the baseline).

Latent frame 0 of the video and state 0 are the clean condition: they are never noised or stepped.

Real-time chunking (rtc.py): given an `RTCGuidance`, each action step takes the action velocity guided
towards the previous chunk's remaining actions, and the first d actions are frozen to them after the last
action step (so world mode's later video steps see the frozen actions); video and states are not guided.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

from xwam_core.errors import require
from xwam_core.schedule.flow import NUM_TRAIN_TIMESTEPS
from xwam_core.schedule.rtc import RTCGuidance, guided_action_velocity, sampling_context
from xwam_core.schedule.unipc import FlowUniPC

SCHEDULES = ("async", "sync")
MODES = ("policy", "world")
UNIPC_IMPLS = ("precomputed", "diffusers")


class Denoiser(Protocol):
    """What the loop needs from a model: velocities for every stream, depth when asked.

    video (B, V, C, F, h, w) latents with frame 0 clean; actions (B, K, Da); states (B, S, Ds) with
    state 0 clean; t_video, t_action (B,) model timesteps (t * 1000). Returns (v_video, v_actions,
    v_states, depth or None) with the input shapes (depth: (B, V, C, F, h, w) latents).
    """

    def __call__(
        self,
        video: torch.Tensor,
        actions: torch.Tensor,
        states: torch.Tensor,
        t_video: torch.Tensor,
        t_action: torch.Tensor,
        run_depth: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


_FIELD_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"),
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
}


@dataclass
class InferenceScheduleConfig:
    """Recipe section for inference. Defaults are the paper's."""

    schedule: str = "async"  # "async" (ANS inference) | "sync" (every stream takes num_steps_video)
    num_steps_video: int = 50  # T_video
    num_steps_action: int = 10  # T_action (actions and states); async only
    shift: float = 5.0  # flow shift of every stream's sigmas
    solver_order: int = 2  # UniPC order
    unipc_impl: str = "precomputed"  # "precomputed" (FlowUniPC, same arithmetic) | "diffusers" (reference)
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = one pass, no null-prompt call
    actions_per_query: int = 0  # actions of each chunk executed open loop before the next query; 0: all
    # scale of the Gaussian noise the action and future-state streams start from: 1 samples the learned
    # distribution (the paper's); below 1 draws closer to its mode, 0 starts every query from the noise's mean
    action_noise_scale: float = 1.0

    def validate(self) -> None:
        """Raise RecipeError naming the first field outside its range (the recipe loader, checkpoint loading
        and the Policy call it)."""
        for f in dataclasses.fields(self):  # overrides and JSON arrive unchecked: the kind first
            value, kind = getattr(self, f.name), _FIELD_KINDS[str(f.type)]
            ok = not isinstance(value, bool) and isinstance(value, kind[0])
            require(ok, f"inference.{f.name}", kind[1], value)
        require(
            self.schedule in SCHEDULES, "inference.schedule", f"one of {', '.join(SCHEDULES)}", self.schedule
        )
        require(
            self.num_steps_video >= 1, "inference.num_steps_video", "an integer >= 1", self.num_steps_video
        )
        require(
            1 <= self.num_steps_action <= self.num_steps_video,
            "inference.num_steps_action",
            f"an integer in [1, num_steps_video={self.num_steps_video}]",
            self.num_steps_action,
        )
        require(
            self.unipc_impl in UNIPC_IMPLS,
            "inference.unipc_impl",
            f"one of {', '.join(UNIPC_IMPLS)}",
            self.unipc_impl,
        )
        require(
            self.shift > 0 and math.isfinite(self.shift), "inference.shift", "a finite number > 0", self.shift
        )
        require(self.solver_order in (1, 2, 3), "inference.solver_order", "1, 2 or 3", self.solver_order)
        require(
            self.actions_per_query >= 0,
            "inference.actions_per_query",
            "an integer >= 0 (0: the whole chunk)",
            self.actions_per_query,
        )
        require(
            0.0 <= self.action_noise_scale < math.inf,
            "inference.action_noise_scale",
            "a finite number >= 0 (1: the paper's sampler, 0: start from the noise's mean)",
            self.action_noise_scale,
        )
        require(
            1.0 <= self.guidance_scale < math.inf,
            "inference.guidance_scale",
            "a finite number >= 1",
            self.guidance_scale,
        )


@dataclass
class DenoiseResult:
    """Output of one denoising run. Video and depth are None in policy mode."""

    actions: torch.Tensor  # (B, K, Da) clean
    states: torch.Tensor  # (B, S, Ds) clean; state 0 is the given condition
    video: torch.Tensor | None  # (B, V, C, F, h, w) latents; frame 0 is the given condition
    depth: torch.Tensor | None  # (B, V, C, F, h, w) depth latents from the last denoiser call
    num_denoiser_calls: int


def make_flow_unipc(num_steps: int, shift: float = 5.0, solver_order: int = 2) -> UniPCMultistepScheduler:
    """A UniPC scheduler doing flow matching with `num_steps` steps; sigmas 1 -> 0, shifted."""
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        solver_order=solver_order,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


class _DiffusersStepper:
    """Steps with `UniPCMultistepScheduler.step` itself: the reference, ~20x the per-step overhead."""

    def __init__(self, scheduler: UniPCMultistepScheduler):
        self.scheduler = scheduler
        self.num_steps = len(scheduler.timesteps)

    def start(self, like: torch.Tensor) -> None:
        """Forget the previous trajectory; begin_index 0 skips the timestep lookup (and its .item())."""
        self.scheduler.set_timesteps(self.num_steps)
        self.scheduler.set_begin_index(0)

    def step(self, i: int, velocity: torch.Tensor, sample: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # The scheduler keeps a reference to `sample` for its corrector: hand it a copy, since `out`
        # may be `sample` and is overwritten below.
        prev = self.scheduler.step(velocity, self.scheduler.timesteps[i], sample.clone(), return_dict=False)[
            0
        ]
        return out.copy_(prev)


def _make_stepper(
    num_steps: int, config: InferenceScheduleConfig
) -> tuple[FlowUniPC | _DiffusersStepper, torch.Tensor]:
    """A stream's stepper and its sigmas (num_steps + 1,), both from diffusers' flow UniPC schedule."""
    scheduler = make_flow_unipc(num_steps, config.shift, config.solver_order)
    sigmas = scheduler.sigmas.clone()
    if config.unipc_impl == "diffusers":
        return _DiffusersStepper(scheduler), sigmas
    return FlowUniPC(sigmas, config.solver_order), sigmas


class DenoisingSchedule:
    """The asynchronous (or synchronous) denoising loop for one config. Build once, call per query.

    Holds its solvers' buffers between calls: use one instance per concurrent caller.
    """

    def __init__(self, config: InferenceScheduleConfig | None = None):
        config = config or InferenceScheduleConfig()
        config.validate()
        self.config = config
        self.num_steps_video = config.num_steps_video
        self.num_steps_action = (
            config.num_steps_action if config.schedule == "async" else config.num_steps_video
        )
        self.video, video_sigmas = _make_stepper(self.num_steps_video, config)
        self.actions, action_sigmas = _make_stepper(self.num_steps_action, config)
        self._action_sigmas = [float(x) for x in action_sigmas]  # (T_action + 1,) for RTC's guidance
        self.states, _ = _make_stepper(self.num_steps_action, config)
        # Model timesteps per denoiser call: sigma * 1000 exactly (diffusers' .timesteps are truncated
        # to integers); t_action is 0 once actions are clean.
        t_video = video_sigmas[:-1] * NUM_TRAIN_TIMESTEPS  # (T_video,)
        t_action = torch.zeros(self.num_steps_video)
        t_action[: self.num_steps_action] = action_sigmas[:-1] * NUM_TRAIN_TIMESTEPS
        self._timesteps = torch.stack([t_video, t_action])  # (2, T_video)
        self._timesteps_on: dict[tuple[torch.device, int, bool], torch.Tensor] = {}

    def num_denoiser_calls(self, mode: str) -> int:
        """Forward passes per query (without guidance): T_action in policy mode, T_video in world mode."""
        return self.num_steps_action if mode == "policy" else self.num_steps_video

    def _timesteps_for(self, device: torch.device, batch_size: int) -> torch.Tensor:
        key = (device, batch_size, torch.is_inference_mode_enabled())
        if key not in self._timesteps_on:  # (2, T_video, B), made once per device/batch size/grad mode
            self._timesteps_on[key] = (
                self._timesteps.to(device=device, dtype=torch.float32)[:, :, None]
                .expand(-1, -1, batch_size)
                .contiguous()
            )
        return self._timesteps_on[key]

    def __call__(
        self,
        denoiser: Denoiser,
        video: torch.Tensor,
        actions: torch.Tensor,
        states: torch.Tensor,
        *,
        mode: str = "world",
        uncond_denoiser: Denoiser | None = None,
        rtc: RTCGuidance | None = None,
        actions_given: bool = False,
    ) -> DenoiseResult:
        """Denoise from the initial tensors (see `initial_latents`) and return the clean streams.

        video (B, V, C, F, h, w): frame 0 the clean condition, frames 1.. the starting noise;
        actions (B, K, Da): starting noise; states (B, S, Ds): state 0 the clean condition, 1.. noise.
        `uncond_denoiser` (null prompt) is required when guidance_scale != 1. `rtc`: real-time chunking
        of the action stream towards the previous chunk (rtc.py); None samples as usual.
        `actions_given` (world mode): `actions` and all of `states` are clean, given (the recorded ones):
        they stay at t = 0 and untouched while the video is denoised, as in training's clean-action
        samples (the action-conditioned world model).
        """
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if actions_given and (mode != "world" or rtc is not None):
            raise ValueError("actions_given: only in world mode and without real-time chunking")
        if self.config.guidance_scale != 1.0 and uncond_denoiser is None:
            raise ValueError("guidance_scale != 1 needs an uncond_denoiser (the null-prompt model)")
        if rtc is not None:
            rtc.validate(actions)
        with sampling_context(guided=rtc is not None):
            return self._denoise(denoiser, video, actions, states, mode, uncond_denoiser, rtc, actions_given)

    def _denoise(
        self,
        denoiser: Denoiser,
        video: torch.Tensor,
        actions: torch.Tensor,
        states: torch.Tensor,
        mode: str,
        uncond_denoiser: Denoiser | None,
        rtc: RTCGuidance | None,
        actions_given: bool = False,
    ) -> DenoiseResult:
        guidance = self.config.guidance_scale
        batch_size = video.shape[0]
        timesteps = self._timesteps_for(video.device, batch_size)  # (2, T_video, B) float32
        action_steps = self.num_steps_action
        if actions_given:  # clean from the start: t_action = 0 at every call, never stepped
            timesteps = torch.stack([timesteps[0], torch.zeros_like(timesteps[1])])
            action_steps = 0
        # The model-input buffers are stepped in place; frame 0 / state 0 (the condition) are never written.
        video_in = video.clone()  # (B, V, C, F, h, w)
        actions_in = actions.clone()  # (B, K, Da)
        states_in = states.clone()  # (B, S, Ds)
        video_noisy = video_in[:, :, :, 1:]  # (B, V, C, F-1, h, w) view
        states_noisy = states_in[:, 1:]  # (B, S-1, Ds) view
        self.video.start(video_noisy)
        self.actions.start(actions_in)
        self.states.start(states_noisy)
        rtc_weights = rtc.weights(actions.shape[1]) if rtc is not None else None  # (K,)

        num_calls = self.num_denoiser_calls(mode)
        calls_per_step = 1 if guidance == 1.0 else 2
        depth = None
        for step in range(num_calls):
            run_depth = mode == "world" and step == num_calls - 1
            t_video, t_action = timesteps[0, step], timesteps[1, step]  # (B,), (B,)

            velocities = partial(
                _velocities,
                denoiser,
                uncond_denoiser,
                guidance,
                video_in,
                states_in,
                t_video,
                t_action,
                run_depth,
            )
            if rtc is not None and rtc_weights is not None and step < action_steps:
                sigma = self._action_sigmas[step]
                v_video, v_actions, v_states, depth = guided_action_velocity(
                    velocities, actions_in, sigma, rtc, rtc_weights
                )
            else:
                v_video, v_actions, v_states, depth = velocities(actions_in)

            if step < action_steps:
                self.actions.step(step, v_actions, actions_in, out=actions_in)
                self.states.step(step, v_states[:, 1:], states_noisy, out=states_noisy)
                if rtc is not None and step == self.num_steps_action - 1:
                    rtc.freeze(actions_in)  # the actions that run during the delay are the old chunk's
            if mode == "world" or step < num_calls - 1:
                self.video.step(step, v_video[:, :, :, 1:], video_noisy, out=video_noisy)
        calls = num_calls * calls_per_step

        return DenoiseResult(
            actions=actions_in,
            states=states_in,
            video=video_in if mode == "world" else None,
            depth=depth if mode == "world" else None,
            num_denoiser_calls=calls,
        )


def _velocities(
    denoiser: Denoiser,
    uncond_denoiser: Denoiser | None,
    guidance: float,
    video: torch.Tensor,
    states: torch.Tensor,
    t_video: torch.Tensor,
    t_action: torch.Tensor,
    run_depth: bool,
    actions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Every stream's velocity (and depth) at one step, with classifier-free guidance when guidance != 1."""
    v_video, v_actions, v_states, depth = denoiser(video, actions, states, t_video, t_action, run_depth)
    if guidance != 1.0:
        assert uncond_denoiser is not None
        u_video, u_actions, u_states, _ = uncond_denoiser(video, actions, states, t_video, t_action, False)
        v_video = torch.lerp(u_video, v_video, guidance)
        v_actions = torch.lerp(u_actions, v_actions, guidance)
        v_states = torch.lerp(u_states, v_states, guidance)
    return v_video, v_actions, v_states, depth


def initial_latents(
    video_context: torch.Tensor,
    state_context: torch.Tensor,
    num_latent_frames: int,
    num_actions: int,
    action_dim: int,
    num_states: int,
    generator: torch.Generator | None = None,
    action_noise_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Starting tensors for `DenoisingSchedule`: the clean condition followed by Gaussian noise.

    video_context (B, V, C, 1, h, w) is the current frame's latent, state_context (B, Ds) the
    current state; num_latent_frames and num_states count the condition too. The actions' and future
    states' noise is multiplied by `action_noise_scale` (inference.action_noise_scale); the same draws are
    made whatever the scale, so the video's noise does not depend on it.
    """
    b, v, c, _, h, w = video_context.shape
    device, dtype = video_context.device, video_context.dtype
    noise_video = torch.randn(
        b, v, c, num_latent_frames - 1, h, w, generator=generator, device=device, dtype=dtype
    )
    actions = torch.randn(b, num_actions, action_dim, generator=generator, device=device, dtype=dtype)
    noise_states = torch.randn(
        b, num_states - 1, state_context.shape[-1], generator=generator, device=device, dtype=dtype
    )
    if action_noise_scale != 1.0:
        actions, noise_states = actions * action_noise_scale, noise_states * action_noise_scale
    video = torch.cat([video_context, noise_video], dim=3)  # (B, V, C, F, h, w)
    states = torch.cat([state_context[:, None].to(dtype), noise_states], dim=1)  # (B, S, Ds)
    return video, actions, states


def model_denoiser(model: Any, text: Any, cache: Any = None, depth_context: Any = None) -> Denoiser:
    """Adapt `XWAMTransformer` to the `Denoiser` protocol for a fixed prompt (and, for a depth_condition
    model, the observed current depth latent `depth_context`).

    The step cache (RoPE tables, text keys/values: everything step-invariant) is built once, on the
    first call from its shapes unless given, and reused by every later step and query of that shape.
    Inputs are cast to the model's dtype and velocities back to the latents' dtype.
    """
    state: dict[str, Any] = {"cache": cache, "key": None}
    model_dtype = getattr(model, "dtype", None)

    def denoise(video, actions, states, t_video, t_action, run_depth):
        key = (tuple(video.shape), actions.shape[1], states.shape[1])
        if state["cache"] is None or (state["key"] is not None and state["key"] != key):
            state["cache"] = model.build_step_cache(
                text, tuple(video.shape), actions.shape[1], states.shape[1]
            )
        state["key"] = key
        dtype = model_dtype or video.dtype
        extra = {"depth_context": depth_context.to(dtype)} if run_depth and depth_context is not None else {}
        out = model(
            video.to(dtype),
            actions.to(dtype),
            states.to(dtype),
            t_video,
            t_action,
            text,
            run_depth=run_depth,
            cache=state["cache"],
            **extra,
        )
        depth = out.depth.to(video.dtype) if run_depth and out.depth is not None else None
        return out.video.to(video.dtype), out.actions.to(actions.dtype), out.states.to(states.dtype), depth

    return denoise
