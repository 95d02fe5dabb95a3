"""Asynchronous denoising against an oracle velocity: pins the UniPC flow conventions (docs/method.md, 4).

The oracle knows x0 and eps of every stream and returns eps - x0 whatever it is fed, so an exact
solver must walk the straight path x_t = (1 - t) x0 + t eps from eps (t = 1) to x0 (t = 0). It also
checks that every input it sees lies on that path at the timestep it is given: a wrong sign or a
wrong timestep shows up at the first step, not only at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from xwam_core.errors import RecipeError
from xwam_core.schedule.inference import (
    DenoisingSchedule,
    InferenceScheduleConfig,
    initial_latents,
    make_flow_unipc,
    model_denoiser,
)

TOL = 1e-4
B, V, C, F, H, W = 2, 3, 4, 3, 2, 2
K, DA, S, DS = 8, 5, 3, 6


class Oracle:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x0 = {
            "video": torch.randn(B, V, C, F, H, W, generator=g),
            "actions": torch.randn(B, K, DA, generator=g),
            "states": torch.randn(B, S, DS, generator=g),
        }
        self.eps = {k: torch.randn(v.shape, generator=g) for k, v in self.x0.items()}
        self.depth = torch.randn(B, V, C, F, H, W, generator=g)
        self.calls: list[dict] = []
        self.path_error = 0.0  # largest distance of an input from the path at its timestep

    def start(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frame 0 and state 0 clean, the rest at pure noise (t = 1)."""
        x0, eps = self.x0, self.eps
        video = torch.cat([x0["video"][:, :, :, :1], eps["video"][:, :, :, 1:]], dim=3)
        states = torch.cat([x0["states"][:, :1], eps["states"][:, 1:]], dim=1)
        return video, eps["actions"].clone(), states

    def __call__(self, video, actions, states, t_video, t_action, run_depth):
        self.calls.append(
            {
                "t_video": t_video.clone(),
                "t_action": t_action.clone(),
                "run_depth": run_depth,
                "video": video.clone(),
                "actions": actions.clone(),
                "states": states.clone(),
            }
        )
        self.path_error = max(
            self.path_error,
            (video[:, :, :, 1:] - self._point("video", t_video)[:, :, :, 1:]).abs().max().item(),
            (actions - self._point("actions", t_action)).abs().max().item(),
            (states[:, 1:] - self._point("states", t_action)[:, 1:]).abs().max().item(),
        )
        v = {k: self.eps[k] - self.x0[k] for k in self.x0}
        # The clean condition's velocity is garbage on purpose: the loop must ignore it.
        v["video"][:, :, :, 0] = 1e3
        v["states"][:, 0] = 1e3
        return v["video"], v["actions"], v["states"], self.depth.clone() if run_depth else None

    def _point(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """x_t on the straight path, for model timesteps t (B,) in [0, 1000]."""
        t = (t / 1000).reshape(-1, *([1] * (self.x0[name].ndim - 1)))
        return (1 - t) * self.x0[name] + t * self.eps[name]


CONFIGS = [
    InferenceScheduleConfig(),  # the paper's: async, 50 / 10, shift 5, UniPC order 2
    InferenceScheduleConfig(schedule="sync"),
    InferenceScheduleConfig(num_steps_video=20, num_steps_action=20),
    InferenceScheduleConfig(num_steps_video=12, num_steps_action=1, shift=1.0),
    InferenceScheduleConfig(num_steps_video=30, num_steps_action=7, solver_order=3, shift=3.0),
    InferenceScheduleConfig(num_steps_video=16, num_steps_action=4, solver_order=1),
    # The same through diffusers' own UniPCMultistepScheduler.step (the reference implementation).
    InferenceScheduleConfig(unipc_impl="diffusers"),
    InferenceScheduleConfig(schedule="sync", num_steps_video=20, unipc_impl="diffusers"),
]


def ids(config: InferenceScheduleConfig) -> str:
    c = config
    return (
        f"{c.schedule}-{c.num_steps_video}-{c.num_steps_action}-o{c.solver_order}-s{c.shift}-{c.unipc_impl}"
    )


def assert_recovers(result_tensor: torch.Tensor, oracle: Oracle, name: str) -> None:
    err = (result_tensor - oracle.x0[name]).abs().max().item()
    assert err < TOL, f"{name}: max error {err:.2e}"


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_world_mode_recovers_every_stream(config):
    oracle = Oracle()
    schedule = DenoisingSchedule(config)
    result = schedule(oracle, *oracle.start(), mode="world")
    for name, tensor in (("video", result.video), ("actions", result.actions), ("states", result.states)):
        assert_recovers(tensor, oracle, name)
    assert torch.equal(result.video[:, :, :, 0], oracle.x0["video"][:, :, :, 0])
    assert torch.equal(result.states[:, 0], oracle.x0["states"][:, 0])
    assert oracle.path_error < TOL
    # One call per video step; depth asked for exactly once, on the last call, and returned.
    assert result.num_denoiser_calls == len(oracle.calls) == config.num_steps_video
    assert [c["run_depth"] for c in oracle.calls] == [False] * (config.num_steps_video - 1) + [True]
    assert torch.equal(result.depth, oracle.depth)
    # Timesteps: video from ~1000 down, strictly decreasing; the first at pure noise.
    t_video = torch.stack([c["t_video"][0] for c in oracle.calls])
    assert t_video[0] > 999 and (t_video[1:] < t_video[:-1]).all()


@pytest.mark.parametrize("config", CONFIGS, ids=ids)
def test_policy_mode_recovers_actions_and_states_without_depth(config):
    oracle = Oracle(seed=1)
    schedule = DenoisingSchedule(config)
    result = schedule(oracle, *oracle.start(), mode="policy")
    assert_recovers(result.actions, oracle, "actions")
    assert_recovers(result.states, oracle, "states")
    assert result.video is None and result.depth is None
    expected_calls = config.num_steps_action if config.schedule == "async" else config.num_steps_video
    assert result.num_denoiser_calls == len(oracle.calls) == expected_calls
    assert not any(c["run_depth"] for c in oracle.calls)
    assert oracle.path_error < TOL


ASYNC = [c for c in CONFIGS if c.schedule == "async" and c.num_steps_action < c.num_steps_video]


@pytest.mark.parametrize("config", ASYNC, ids=ids)
def test_async_actions_are_clean_and_frozen_while_video_is_still_noisy(config):
    oracle = Oracle(seed=2)
    DenoisingSchedule(config)(oracle, *oracle.start(), mode="world")
    t_a = config.num_steps_action
    seen = oracle.calls[t_a]  # what the model is fed after T_action steps
    assert_recovers(seen["actions"], oracle, "actions")
    assert_recovers(seen["states"], oracle, "states")
    # Video sits exactly where the shifted sigma schedule says, still far from clean.
    sigma = make_flow_unipc(config.num_steps_video, config.shift).sigmas[t_a]
    expected = (1 - sigma) * oracle.x0["video"] + sigma * oracle.eps["video"]
    assert (seen["video"][:, :, :, 1:] - expected[:, :, :, 1:]).abs().max() < TOL
    assert (seen["video"][:, :, :, 1:] - oracle.x0["video"][:, :, :, 1:]).abs().max() > 0.1
    # After step T_action the model sees t_action = 0 and the very same actions every call.
    for call in oracle.calls[t_a:]:
        assert (call["t_action"] == 0).all()
        assert torch.equal(call["actions"], seen["actions"])
    assert (oracle.calls[t_a - 1]["t_action"] > 0).all()


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1]], ids=ids)
def test_given_actions_stay_clean_while_the_video_is_denoised(config):
    """actions_given: the model sees the given actions and states at t = 0 on every call, as in training's
    clean-action samples; they come back untouched and the video still reaches its x0."""
    oracle = Oracle(seed=9)
    video, _, _ = oracle.start()
    actions, states = oracle.x0["actions"].clone(), oracle.x0["states"].clone()
    result = DenoisingSchedule(config)(oracle, video, actions, states, mode="world", actions_given=True)
    assert torch.equal(result.actions, oracle.x0["actions"])
    assert torch.equal(result.states, oracle.x0["states"])
    assert_recovers(result.video, oracle, "video")
    assert result.num_denoiser_calls == len(oracle.calls) == config.num_steps_video
    for call in oracle.calls:
        assert (call["t_action"] == 0).all() and (call["t_video"] > 0).all()
        assert torch.equal(call["actions"], oracle.x0["actions"])
        assert torch.equal(call["states"], oracle.x0["states"])
    assert oracle.path_error < TOL
    with pytest.raises(ValueError, match="only in world mode"):
        DenoisingSchedule(config)(oracle, video, actions, states, mode="policy", actions_given=True)


def test_sync_schedule_moves_all_streams_together():
    oracle = Oracle(seed=3)
    DenoisingSchedule(InferenceScheduleConfig(schedule="sync", num_steps_video=15))(oracle, *oracle.start())
    for call in oracle.calls:
        assert torch.equal(call["t_video"], call["t_action"])


def smooth_denoiser(video, actions, states, t_video, t_action, run_depth):
    """Not an oracle: a velocity that depends on x and t non-linearly, so the solvers' history terms matter."""
    tv = (t_video / 1000).reshape(-1, 1, 1, 1, 1, 1)
    ta = (t_action / 1000).reshape(-1, 1, 1)
    return torch.tanh(video) * (1 + tv), torch.sin(actions) - ta, torch.tanh(states) * ta, None


@pytest.mark.parametrize("schedule", ["async", "sync"])
def test_precomputed_unipc_matches_diffusers_in_the_loop(schedule):
    video, actions, states = Oracle(seed=8).start()
    results = {
        impl: DenoisingSchedule(InferenceScheduleConfig(schedule=schedule, unipc_impl=impl))(
            smooth_denoiser, video, actions, states, mode="world"
        )
        for impl in ("precomputed", "diffusers")
    }
    fast, ref = results["precomputed"], results["diffusers"]
    for name in ("video", "actions", "states"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert (a - b).abs().max() < 1e-4 * (1 + b.abs().max()), name


def test_schedule_is_reusable_across_queries():
    schedule = DenoisingSchedule()
    first = schedule(Oracle(seed=4), *Oracle(seed=4).start(), mode="policy")
    other = Oracle(seed=5)
    schedule(other, *other.start(), mode="world")
    again = schedule(Oracle(seed=4), *Oracle(seed=4).start(), mode="policy")
    assert torch.equal(first.actions, again.actions)


def test_guidance_scale_one_is_one_pass_and_guidance_extrapolates():
    cond, uncond = Oracle(seed=6), Oracle(seed=6)
    # The null prompt's oracle believes in other clean values (same noise).
    uncond.x0 = {k: v + 1.0 for k, v in cond.x0.items()}
    result = DenoisingSchedule(InferenceScheduleConfig())(
        cond, *cond.start(), mode="world", uncond_denoiser=uncond
    )
    assert result.num_denoiser_calls == 50 and not uncond.calls
    scale = 3.0
    guided = DenoisingSchedule(InferenceScheduleConfig(guidance_scale=scale))
    result = guided(cond, *cond.start(), mode="world", uncond_denoiser=uncond)
    assert result.num_denoiser_calls == 100
    assert all(not c["run_depth"] for c in uncond.calls)
    # v = v_u + s (v_c - v_u) = eps - (x0_u + s (x0_c - x0_u)): the solver lands on that point.
    target = cond.x0["actions"] + (1 - scale) * 1.0
    assert (result.actions - target).abs().max() < TOL
    with pytest.raises(ValueError, match="uncond_denoiser"):
        guided(cond, *cond.start())


def test_initial_latents_keep_the_condition():
    video_context, state_context = torch.randn(B, V, C, 1, H, W), torch.randn(B, DS)
    video, actions, states = initial_latents(
        video_context, state_context, F, K, DA, S, torch.Generator().manual_seed(0)
    )
    assert video.shape == (B, V, C, F, H, W) and actions.shape == (B, K, DA) and states.shape == (B, S, DS)
    assert torch.equal(video[:, :, :, :1], video_context) and torch.equal(states[:, 0], state_context)


def test_action_noise_scale_scales_only_the_action_and_state_noise():
    """inference.action_noise_scale multiplies the actions' and future states' starting noise; the video's
    noise and both conditions are the same draws whatever the scale (so the seed keeps its meaning)."""
    video_context, state_context = torch.randn(B, V, C, 1, H, W), torch.randn(B, DS)

    def start(scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        return initial_latents(video_context, state_context, F, K, DA, S, g, action_noise_scale=scale)

    video1, actions1, states1 = start(1.0)
    video_half, actions_half, states_half = start(0.5)
    video0, actions0, states0 = start(0.0)
    assert torch.equal(video_half, video1) and torch.equal(video0, video1)
    assert torch.allclose(actions_half, 0.5 * actions1) and actions1.abs().max() > 0.1
    assert torch.allclose(states_half[:, 1:], 0.5 * states1[:, 1:])
    assert not actions0.any() and not states0[:, 1:].any()
    assert torch.equal(states0[:, 0], state_context)


@dataclass
class FakeOutput:
    video: torch.Tensor
    actions: torch.Tensor
    states: torch.Tensor
    depth: torch.Tensor | None


class FakeModel:
    """The XWAMTransformer call contract, driven by an oracle; counts cache builds."""

    dtype = torch.float32

    def __init__(self, oracle: Oracle):
        self.oracle, self.cache_builds, self.caches_seen = oracle, 0, set()

    def build_step_cache(self, text, video_shape, num_actions, num_states):
        self.cache_builds += 1
        return {"text": text, "shape": (video_shape, num_actions, num_states)}

    def __call__(self, video, actions, states, t_video, t_action, text, run_depth=True, cache=None):
        assert cache is not None and cache["text"] is text
        self.caches_seen.add(id(cache))
        return FakeOutput(*self.oracle(video, actions, states, t_video, t_action, run_depth))


def test_model_adapter_builds_the_step_cache_once():
    oracle = Oracle(seed=7)
    model = FakeModel(oracle)
    denoiser = model_denoiser(model, text="pick the cube")
    schedule = DenoisingSchedule()
    for _ in range(2):
        result = schedule(denoiser, *oracle.start(), mode="world")
    assert model.cache_builds == 1 and len(model.caches_seen) == 1
    assert_recovers(result.actions, oracle, "actions")
    assert result.depth is not None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"schedule": "parallel"}, "schedule"),
        ({"num_steps_video": 0}, "num_steps_video"),
        ({"num_steps_action": 51}, "num_steps_action"),
        ({"num_steps_action": 0}, "num_steps_action"),
        ({"shift": 0.0}, "shift"),
        ({"solver_order": 4}, "solver_order"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"action_noise_scale": -0.5}, "action_noise_scale"),
        ({"action_noise_scale": float("nan")}, "action_noise_scale"),
        ({"action_noise_scale": float("inf")}, "action_noise_scale"),
        ({"unipc_impl": "euler"}, "unipc_impl"),
    ],
)
def test_inference_config_errors_name_the_field(overrides, field):
    config = InferenceScheduleConfig(**overrides)
    with pytest.raises(RecipeError, match=rf"^inference\.{field}: expected") as error:
        config.validate()
    assert "\n" not in str(error.value)
    with pytest.raises(RecipeError):
        DenoisingSchedule(config)
