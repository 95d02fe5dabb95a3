"""Real-time chunking (RTC): guided inpainting of the action stream (Black, Galliker and Levine 2025,
"Real-Time Execution of Action Chunking Flow Policies").

While a chunk executes, the next one is sampled. Its first `d` actions (the inference delay, in control
steps) will have run by the time it arrives: they are the current chunk's. RTC freezes them and inpaints
the rest so that the new chunk continues the old one: at every denoising step the model's velocity for
the ACTION stream is corrected towards the previous chunk's remaining actions Y (aligned to start at this
query's time) by pseudo-inverse guidance, with soft prefix weights W over the chunk index i:

    W_i = 1                                   i < d            (will execute: frozen)
    W_i = c_i (exp(c_i) - 1) / (e - 1)        d <= i < L       c_i = (L - i) / (L - d + 1)
    W_i = 0                                   i >= L           (nothing to continue)

where L = len(Y) = H - s (chunk H, s actions executed between queries). In this project's convention
(x_sigma = (1 - sigma) x0 + sigma eps, velocity v = eps - x0, sigma from 1 to 0; the paper's tau is
1 - sigma) the clean estimate is x0_hat = x - sigma v, and the guided velocity is

    v_guided = v - w(sigma) J^T diag(W) (Y - x0_hat),   J = d x0_hat / d x (a vector-Jacobian product)
    w(sigma) = min(beta, ((1 - sigma)^2 + sigma^2) / (sigma (1 - sigma)))

(the paper's min(beta, (1 - tau) / (tau r_tau^2)) with r_tau^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)),
which moves the sample so that its clean estimate approaches Y where W is large. The solver (UniPC) then
takes the guided velocity as it takes the model's. Only the action stream is guided: video and states
use the same forward pass's velocities unchanged. After the last action step the first d actions are set
to Y's exactly (guidance makes them close; the hard freeze makes them equal).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

OVERLAPS = ("exp", "none")  # soft weights over the overlap (the paper's), or only the frozen prefix
DEFAULT_MAX_GUIDANCE = 5.0  # beta, the paper's clip of the guidance weight
Velocities = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"
]  # video, actions, states, depth


def prefix_weights(
    horizon: int, inference_delay: int, overlap_end: int, overlap: str = "exp"
) -> torch.Tensor:
    """W (horizon,): 1 on the first `inference_delay` actions, exponentially decaying weights up to
    `overlap_end` (= the previous chunk's remaining actions, H - s) with overlap="exp", 0 after."""
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap {overlap!r}: expected one of {', '.join(OVERLAPS)}")
    if not 0 <= inference_delay <= overlap_end <= horizon:
        raise ValueError(
            f"real-time chunking needs 0 <= inference delay ({inference_delay}) <= the previous chunk's "
            f"remaining actions ({overlap_end}) <= the chunk ({horizon})"
        )
    weights = torch.zeros(horizon, dtype=torch.float64)
    weights[:inference_delay] = 1.0
    if overlap == "exp" and overlap_end > inference_delay:
        i = torch.arange(inference_delay, overlap_end, dtype=torch.float64)
        c = (overlap_end - i) / (overlap_end - inference_delay + 1)
        weights[inference_delay:overlap_end] = c * torch.expm1(c) / math.expm1(1.0)
    return weights.float()


def guidance_weight(sigma: float, max_guidance: float) -> float:
    """min(beta, ((1 - sigma)^2 + sigma^2) / (sigma (1 - sigma))): beta at both ends of the schedule."""
    if sigma <= 0.0 or sigma >= 1.0:
        return max_guidance
    return min(max_guidance, ((1.0 - sigma) ** 2 + sigma**2) / (sigma * (1.0 - sigma)))


@dataclass
class RTCGuidance:
    """What one query of real-time chunking needs, in the sampler's (normalized) action units.

    prev_actions (B, L, D): the remaining actions of the chunk now executing, aligned so that row 0 runs
    at this query's time; L <= the chunk H, D <= the model's action width (only the first D dimensions
    are guided and frozen: the rest are padding). inference_delay d <= L: rows 0..d-1 are frozen.
    """

    prev_actions: torch.Tensor
    inference_delay: int
    overlap: str = "exp"
    max_guidance: float = DEFAULT_MAX_GUIDANCE

    def validate(self, actions: torch.Tensor) -> None:
        """Raise ValueError unless this guidance fits the action stream `actions` (B, H, Da)."""
        if self.prev_actions.ndim != 3:
            raise ValueError(f"prev_actions: expected (B, L, D), got shape {tuple(self.prev_actions.shape)}")
        b, h, da = actions.shape
        pb, length, d = self.prev_actions.shape
        if pb != b or length > h or d > da:
            raise ValueError(
                f"prev_actions {tuple(self.prev_actions.shape)} does not fit the action stream "
                f"{tuple(actions.shape)}: expected batch {b}, at most {h} actions of at most {da} dims"
            )
        if not math.isfinite(self.max_guidance) or self.max_guidance < 0:
            raise ValueError(f"max_guidance {self.max_guidance}: expected a finite number >= 0")
        prefix_weights(h, self.inference_delay, length, self.overlap)  # checks the delay and overlap

    def weights(self, horizon: int) -> torch.Tensor:
        """W (horizon,) for this guidance."""
        return prefix_weights(horizon, self.inference_delay, self.prev_actions.shape[1], self.overlap)

    def freeze(self, actions: torch.Tensor) -> None:
        """Set the first d actions (B, d, D) to the previous chunk's, in place (the hard freeze)."""
        d, dims = self.inference_delay, self.prev_actions.shape[2]
        actions[:, :d, :dims] = self.prev_actions[:, :d].to(actions.dtype)


def guided_action_velocity(
    velocities: Callable[[torch.Tensor], Velocities],
    actions: torch.Tensor,
    sigma: float,
    guidance: RTCGuidance,
    weights: torch.Tensor,
) -> Velocities:
    """Every stream's velocity at `actions` (B, H, Da), the action one guided towards the previous chunk.

    `velocities(actions)` runs the denoiser at that action input (the other streams fixed) and returns
    (v_video, v_actions, v_states, depth or None); it is differentiated with respect to `actions` only.
    Returns the same tuple, detached, with v_actions replaced by the guided velocity.
    """
    length, dims = guidance.prev_actions.shape[1:]
    x = actions.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        v_video, v_actions, v_states, depth = velocities(x)  # v_actions (B, H, Da)
        x0_hat = (x - sigma * v_actions)[:, :length, :dims]  # (B, L, D) the clean estimate, overlapped part
        w = weights[:length].to(x0_hat)[None, :, None]  # (1, L, 1)
        error = w * (guidance.prev_actions.to(x0_hat) - x0_hat.detach())  # diag(W) (Y - x0_hat)
        (vjp,) = torch.autograd.grad(x0_hat, x, grad_outputs=error)  # J^T diag(W) (Y - x0_hat), (B, H, Da)
    guided = v_actions.detach() - guidance_weight(sigma, guidance.max_guidance) * vjp
    return v_video.detach(), guided, v_states.detach(), depth.detach() if depth is not None else None


def sampling_context(guided: bool) -> contextlib.AbstractContextManager[object]:
    """No autograd while sampling: inference mode, or plain no_grad when RTC guidance needs a
    vector-Jacobian product (inference tensors cannot enter autograd)."""
    return torch.no_grad() if guided else torch.inference_mode()
