"""Flow matching as X-WAM uses it for every stream (video, actions, states).

x_t = (1 - t) x_0 + t eps, velocity target v = eps - x_0, model timestep t * 1000 (docs/method.md section 4).
t = 1 is pure noise and t = 0 is clean data, so denoising integrates dx/dt = v from t = 1 down to 0.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000  # the model sees t * 1000, like Wan2.2


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x_0 + t eps, with t of shape (B,) broadcast over the other dimensions."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim)).to(x0.dtype)
    return x0 + t * (eps - x0)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target eps - x_0 (constant along the straight path)."""
    return eps - x0


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): monotone, keeps 0 and 1, spends more time at high noise when s > 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def model_timestep(t: torch.Tensor) -> torch.Tensor:
    """The timestep the transformer is fed: t * 1000, float (not rounded)."""
    return t * NUM_TRAIN_TIMESTEPS
