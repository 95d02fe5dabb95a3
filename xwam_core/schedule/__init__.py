"""ANS: flow matching, the training timestep sampler and asynchronous inference (docs/schedule.md)."""

from xwam_core.schedule.flow import (
    add_noise,
    model_timestep,
    shift_timesteps,
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
    "add_noise",
    "initial_latents",
    "make_flow_unipc",
    "model_denoiser",
    "model_timestep",
    "sample_noise_levels",
    "shift_timesteps",
    "velocity_target",
]
