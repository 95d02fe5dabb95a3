"""ANS: flow matching, the training timestep sampler and asynchronous inference (docs/schedule.md)."""

from xwam_core.schedule.flow import (
    add_noise,
    masked_mse,
    model_timestep,
    shift_timesteps,
    unshift_timesteps,
    velocity_target,
)
from xwam_core.schedule.inference import (
    Denoiser,
    DenoiseResult,
    DenoisingSchedule,
    InferenceScheduleConfig,
    initial_latents,
    make_flow_unipc,
    model_denoiser,
)
from xwam_core.schedule.sampler import (
    NoiseSample,
    NoiseSamplerConfig,
    action_state_loss_weight,
    depth_loss_weight,
    sample_noise_levels,
)
from xwam_core.schedule.unipc import FlowUniPC

__all__ = [
    "DenoiseResult",
    "Denoiser",
    "DenoisingSchedule",
    "FlowUniPC",
    "InferenceScheduleConfig",
    "NoiseSample",
    "NoiseSamplerConfig",
    "action_state_loss_weight",
    "add_noise",
    "depth_loss_weight",
    "initial_latents",
    "make_flow_unipc",
    "masked_mse",
    "model_denoiser",
    "model_timestep",
    "sample_noise_levels",
    "shift_timesteps",
    "unshift_timesteps",
    "velocity_target",
]
