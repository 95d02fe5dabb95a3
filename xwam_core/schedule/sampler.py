"""Training timestep sampler: Asynchronous Noise Sampling (ANS) and the two ablation modes.

docs/method.md section 4. Per sample, in `ans` mode:
  with probability p_clean_action: t_action = 0, t_video ~ U(0, 1)   (action-conditioned video;
                                   action and state losses masked)
  otherwise: t_action ~ U(0, 1), b ~ Beta(a, b), t_video = t_action + (1 - t_action) b
then both pass the shift t' = s t / (1 + (s - 1) t). The shift is monotone, so t_video >= t_action always.
`sync` draws one shared t; `decoupled` draws t_video and t_action independently. Neither uses
p_clean_action (they are the paper's ablation baselines). States share t_action in every mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from xwam_core.errors import RecipeError, require
from xwam_core.schedule.flow import shift_timesteps

SAMPLER_MODES = ("ans", "sync", "decoupled")


@dataclass
class NoiseSamplerConfig:
    """Recipe section for the training timestep sampler. Defaults are the paper's."""

    mode: str = "ans"  # "ans" | "sync" | "decoupled"
    p_clean_action: float = 0.5  # ans: fraction of samples with clean actions (t_action = 0)
    lag_beta_a: float = 1.5  # ans: b ~ Beta(lag_beta_a, lag_beta_b), t_video = t_a + (1 - t_a) b
    lag_beta_b: float = 1.0
    shift: float = 5.0  # t' = s t / (1 + (s - 1) t), applied to both streams
    p_drop_text: float = 0.1  # classifier-free guidance: fraction of prompts replaced by the null one

    def validate(self) -> None:
        """Raise RecipeError naming the first field outside its range (the recipe loader calls it)."""
        require(self.mode in SAMPLER_MODES, "noise.mode", f"one of {', '.join(SAMPLER_MODES)}", self.mode)
        for name in ("p_clean_action", "p_drop_text"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"noise.{name}", "a probability in [0, 1]", value)
        for name in ("lag_beta_a", "lag_beta_b", "shift"):
            value = getattr(self, name)
            require(value > 0.0 and math.isfinite(value), f"noise.{name}", "a finite number > 0", value)


@dataclass
class NoiseSample:
    """Per-sample timesteps in [0, 1] (already shifted; feed the model t * 1000) and loss switches."""

    t_video: torch.Tensor  # (B,)
    t_action: torch.Tensor  # (B,) shared by actions and states
    action_loss_on: torch.Tensor  # (B,) bool: False where t_action == 0 (actions are the condition)
    drop_text: torch.Tensor  # (B,) bool: True where the prompt is replaced by the null prompt


def sample_noise_levels(
    config: NoiseSamplerConfig,
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> NoiseSample:
    """Draw t_video, t_action and the loss/guidance switches for one batch.

    Deterministic given the generator's state (the global RNG when None), so a saved RNG state
    reproduces the same batch after a resume.
    """
    uniform = torch.rand(4, batch_size, generator=generator, device=device)  # (4, B)
    if config.mode == "ans":
        clean_action = uniform[0] < config.p_clean_action
        lag = _sample_beta(config.lag_beta_a, config.lag_beta_b, batch_size, generator, uniform.device)
        t_action = torch.where(clean_action, torch.zeros_like(uniform[1]), uniform[1])
        t_video = torch.where(clean_action, uniform[2], t_action + (1.0 - t_action) * lag)
    elif config.mode == "sync":
        t_action = t_video = uniform[1]
    elif config.mode == "decoupled":
        t_action, t_video = uniform[1], uniform[2]
    else:
        raise RecipeError(f"noise.mode: expected one of {', '.join(SAMPLER_MODES)}, got {config.mode!r}")
    t_video = shift_timesteps(t_video, config.shift)
    t_action = shift_timesteps(t_action, config.shift)
    return NoiseSample(
        t_video=t_video,
        t_action=t_action,
        action_loss_on=t_action > 0,
        drop_text=uniform[3] < config.p_drop_text,
    )


def _sample_beta(
    a: float, b: float, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Beta(a, b) draws from `generator` (torch.distributions ignores generators): X / (X + Y), X, Y gamma."""
    x = _sample_gamma(a, n, generator, device)
    y = _sample_gamma(b, n, generator, device)
    return x / (x + y)


def _sample_gamma(
    alpha: float, n: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Gamma(alpha, 1) by Marsaglia-Tsang (2000), vectorised rejection; alpha < 1 by the boost U^(1/alpha)."""
    boost = alpha < 1.0
    d = (alpha + 1.0 if boost else alpha) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, device=device)
    pending = torch.arange(n, device=device)
    while pending.numel() > 0:  # acceptance is > 95%: a couple of rounds
        m = pending.numel()
        z = torch.randn(m, generator=generator, device=device)
        u = torch.rand(m, generator=generator, device=device)
        v = (1.0 + c * z) ** 3
        accept = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        out[pending[accept]] = d * v[accept]
        pending = pending[~accept]
    if boost:
        out = out * torch.rand(n, generator=generator, device=device) ** (1.0 / alpha)
    return out
