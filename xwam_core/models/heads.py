"""Plug-ins the paper's model does without: x-prediction video heads and two conditioners for small models.

The paper's X-WAM (the `base` preset) returns Wan's output as the flow velocity (`VelocityHead`) and has no
conditioner. The `tiny` preset, trained from scratch on a pixel codec whose tokens hold far more values
than the model is wide, plugs in:
- a video head that predicts the clean latent and derives the velocity (`SampleHead`, `ResidualSampleHead`,
  `GatedSampleHead`); each head declares the loss form the training objective must use with it;
- `CurrentFrameBroadcast`: every future video token also receives the current frame's token;
- `ObservedDepthConditioner` (RGB-D input): the observed current depth enters the depth branch, and the
  depth head is gated against it.
The conditioners start as no-ops and the residual and gated heads as "nothing moves", so switching one on
does not upset a model's first steps.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn as nn

from xwam_core.errors import XWAMError

LossForm = Literal["velocity", "sample"]
# Maps a (B, N_video, C * pt * ph * pw) token output to latents (B, V, C, F, h, w).
Unpatchify = Callable[[torch.Tensor], torch.Tensor]

MIN_SAMPLE_T = 0.05  # x-prediction: velocity = (x_t - x0) / max(t, 0.05), as in JiT (Li & He, 2025)


def sample_to_velocity(noisy: torch.Tensor, clean: torch.Tensor, t_video: torch.Tensor) -> torch.Tensor:
    """The flow velocity implied by a predicted clean latent: x_t = (1 - t) x0 + t eps gives eps - x0 = (x_t - x0) / t.

    noisy, clean (B, V, C, F, h, w); t_video (B,) model timesteps in [0, 1000], clamped at MIN_SAMPLE_T.
    """
    t = (t_video.float() / 1000.0).clamp_min(MIN_SAMPLE_T).view(-1, 1, 1, 1, 1, 1)
    return ((noisy.float() - clean.float()) / t).to(clean.dtype)


def gated_blend(anchor: torch.Tensor, head: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """anchor + sigmoid(gate_logits) * (head - anchor) in float32, returned in head's dtype.

    A closed gate keeps the anchor (the current frame, the observed depth) exactly; an open one takes the head.
    """
    gate = torch.sigmoid(gate_logits.float())
    anchor = anchor.float()
    return (anchor + gate * (head.float() - anchor)).to(head.dtype)


# --------------------------------------------------------------------------------------------------
# Video heads: Wan's video output -> the returned flow velocity
# --------------------------------------------------------------------------------------------------


class VideoHead(nn.Module, ABC):
    """Turns Wan's video output into the returned flow velocity, and says how training measures its error.

    `loss_form` "velocity": flow matching on the velocity; "sample": the same error times t^2, i.e. measured
    on the clean latent (the velocity loss's 1/t^2 weight would let nearly clean samples dominate).
    """

    loss_form: ClassVar[LossForm]

    def reset_parameters(self) -> None:
        """Initialise the head's own parameters (called again after loading Wan); most heads have none."""

    def prepare_output_layer(self, proj_out: nn.Linear) -> None:
        """Initialise a new model's Wan output layer for this head; Wan's own init unless a head needs another."""

    @abstractmethod
    def forward(
        self,
        wan_output: torch.Tensor,
        tokens: torch.Tensor,
        video: torch.Tensor,
        t_video: torch.Tensor,
        unpatchify: Unpatchify,
    ) -> torch.Tensor:
        """wan_output (B, V, C, F, h, w): Wan's proj_out, unpatchified; tokens (B, N_video, D): the video tokens
        after the output AdaLN; video (B, V, C, F, h, w): the noisy input, latent frame 0 clean; t_video (B,).
        Returns the flow velocity (B, V, C, F, h, w)."""


class VelocityHead(VideoHead):
    """Wan's output is the velocity (the paper's, and Wan2.2's own)."""

    loss_form: ClassVar[LossForm] = "velocity"

    def forward(
        self,
        wan_output: torch.Tensor,
        tokens: torch.Tensor,
        video: torch.Tensor,
        t_video: torch.Tensor,
        unpatchify: Unpatchify,
    ) -> torch.Tensor:
        return wan_output


class SampleHead(VideoHead):
    """Wan's output is the clean latent; the velocity is derived from it (JiT, 2025).

    For tokens that hold more latent values than the model is wide: the model cannot carry the noise
    through its width, but it can predict the clean image.
    """

    loss_form: ClassVar[LossForm] = "sample"

    def clean_latent(
        self, wan_output: torch.Tensor, tokens: torch.Tensor, video: torch.Tensor, unpatchify: Unpatchify
    ) -> torch.Tensor:
        """The predicted clean latent (B, V, C, F, h, w)."""
        return wan_output

    def forward(
        self,
        wan_output: torch.Tensor,
        tokens: torch.Tensor,
        video: torch.Tensor,
        t_video: torch.Tensor,
        unpatchify: Unpatchify,
    ) -> torch.Tensor:
        return sample_to_velocity(video, self.clean_latent(wan_output, tokens, video, unpatchify), t_video)


class ResidualSampleHead(SampleHead):
    """Clean future = current frame's latent + Wan's output; a new model (zero output layer) predicts a still scene.

    Meaningful for the pixel codec, whose latent frames all hold frames the same way.
    """

    def prepare_output_layer(self, proj_out: nn.Linear) -> None:
        with torch.no_grad():  # "nothing moves" at the start, as DiT zero-inits its output
            proj_out.weight.zero_()
            proj_out.bias.zero_()

    def clean_latent(
        self, wan_output: torch.Tensor, tokens: torch.Tensor, video: torch.Tensor, unpatchify: Unpatchify
    ) -> torch.Tensor:
        return wan_output + video[:, :, :, :1].to(wan_output.dtype)  # (B, V, C, F, h, w)


class GatedSampleHead(SampleHead):
    """Clean future = current + g * (Wan's output - current), g = sigmoid of a second linear head per latent value.

    Still regions keep the current frame exactly while moving ones are drawn anew; a residual head would have
    to cancel the moving object's old appearance, which a narrow model cannot carry. The gate starts shut
    (zero weights, bias `gate_init_logit`).
    """

    def __init__(self, inner_dim: int, values_per_token: int, gate_init_logit: float) -> None:
        super().__init__()
        self.gate_init_logit = gate_init_logit
        self.gate = nn.Linear(inner_dim, values_per_token)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Closed gates: a new model predicts (almost) the current frame."""
        self.gate.weight.zero_()
        self.gate.bias.fill_(float(self.gate_init_logit))

    def clean_latent(
        self, wan_output: torch.Tensor, tokens: torch.Tensor, video: torch.Tensor, unpatchify: Unpatchify
    ) -> torch.Tensor:
        gate_logits = unpatchify(self.gate(tokens))  # (B, V, C, F, h, w)
        return gated_blend(video[:, :, :, :1], wan_output, gate_logits)


VIDEO_HEADS: dict[str, type[VideoHead]] = {
    "velocity": VelocityHead,
    "sample": SampleHead,
    "residual": ResidualSampleHead,
    "gated": GatedSampleHead,
}


def build_video_head(
    video_prediction: str, inner_dim: int, values_per_token: int, gate_init_logit: float
) -> VideoHead:
    """The head a model's `video_prediction` setting names (see VIDEO_HEADS)."""
    if video_prediction not in VIDEO_HEADS:
        raise XWAMError(f"video_prediction={video_prediction!r}: expected one of {tuple(VIDEO_HEADS)}")
    if video_prediction == "gated":
        return GatedSampleHead(inner_dim, values_per_token, gate_init_logit)
    return VIDEO_HEADS[video_prediction]()


# --------------------------------------------------------------------------------------------------
# Conditioners
# --------------------------------------------------------------------------------------------------


class _ZeroInitBroadcast(nn.Module):
    """A broadcast plug-in's linear map (`proj`, width -> width), zero-initialised: a no-op until trained."""

    def __init__(self, inner_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(inner_dim, inner_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.proj.weight.zero_()
        self.proj.bias.zero_()


class CurrentFrameBroadcast(_ZeroInitBroadcast):
    """Adds to every future video token the current frame's token of its view and position, through a linear map.

    A pretrained Wan finds the condition frame by attention; a small model trained from scratch learns that
    far too slowly. Zero-initialised, so switching it on changes nothing until trained.
    """

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, F', V, h', w', D), latent frame 0 the current frame -> the same shape."""
        if tokens.shape[1] == 1:
            return tokens
        return torch.cat([tokens[:, :1], tokens[:, 1:] + self.proj(tokens[:, :1])], dim=1)


class CurrentStateBroadcast(_ZeroInitBroadcast):
    """Adds to every action token and future state token the current state's token, through a linear map.

    The state token is one of a few hundred tokens; a small model trained from scratch is slow to learn that
    the actions depend on it (e.g. a goal position held in the state), as with the current frame for video.
    Zero-initialised, so switching it on changes nothing until trained. Demo-only, like CurrentFrameBroadcast.
    """

    def forward(
        self, action_tokens: torch.Tensor | None, state_tokens: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """action tokens (B, K, D) or None, state tokens (B, S, D), state 0 the current one -> the same."""
        current = self.proj(state_tokens[:, :1])  # (B, 1, D)
        if action_tokens is not None:
            action_tokens = action_tokens + current
        state_tokens = torch.cat([state_tokens[:, :1], state_tokens[:, 1:] + current], dim=1)
        return action_tokens, state_tokens


class CurrentStateModulation(nn.Module):
    """Adds an embedding of the current state to a stream's timestep embedding, so every block's AdaLN
    shift/scale/gate of its tokens depends on it (DiT's class conditioning): the action and future-state
    tokens' (`state_modulation`) or the future video tokens' (`video_state_modulation`, which the final
    norm and the depth branch read too).

    A token is one of a few hundred, and a small model trained from scratch reads a condition through the
    AdaLN modulation far sooner than through attention or a summed token (DiT, Peebles & Xie 2023: adaLN-Zero
    against in-context conditioning). The last layer is zero-initialised: a no-op until trained. Demo-only.
    """

    def __init__(self, state_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(state_dim, inner_dim), nn.SiLU(), nn.Linear(inner_dim, inner_dim)
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        last = self.embed[-1]
        assert isinstance(last, nn.Linear)
        last.weight.zero_()
        last.bias.zero_()  # type: ignore[union-attr]

    def forward(self, current_state: torch.Tensor) -> torch.Tensor:
        """current_state (B, state_dim), normalized -> (B, D), added to its stream's timestep embedding."""
        return self.embed(current_state)


class ObservedDepthConditioner(nn.Module):
    """RGB-D input: the observed current depth latent enters every depth-branch token, and the depth head
    is gated against it (observed + g * (head - observed)).

    Only the depth branch sees it, so actions, video and policy mode are those of the model without it.
    Starts as "the depth stays as observed": zero embedding, gate shut at `gate_init_logit`.
    """

    def __init__(
        self,
        in_channels: int,
        inner_dim: int,
        patch_size: tuple[int, int, int],
        gate_init_logit: float,
    ) -> None:
        super().__init__()
        self.gate_init_logit = gate_init_logit
        self.embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.gate = nn.Linear(inner_dim, in_channels * math.prod(patch_size))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.embedding.weight)
        nn.init.zeros_(self.embedding.bias)  # type: ignore[arg-type]  # Conv3d has a bias
        self.gate.weight.zero_()
        self.gate.bias.fill_(float(self.gate_init_logit))

    @staticmethod
    def checked(depth_context: torch.Tensor | None, video_shape: tuple[int, ...]) -> torch.Tensor:
        """depth_context validated against the video (B, V, C, F, h, w): (B, V, C, 1, h, w), or XWAMError."""
        expected = (*video_shape[:3], 1, *video_shape[4:])
        if depth_context is None:
            raise XWAMError(
                "this model's depth branch is conditioned on the observed depth (depth_condition=True): "
                "pass depth_context, the current frame's depth latent"
            )
        if tuple(depth_context.shape) != expected:
            raise XWAMError(
                f"depth_context must be (B, V, C, 1, h, w) = {expected}, got {tuple(depth_context.shape)}"
            )
        return depth_context

    def embed(self, depth_hidden: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """depth_hidden (B, N_video, D) plus the observed depth (B, V, C, 1, h, w), patch-embedded into every
        latent frame's token of its view and position."""
        batch, views = observed.shape[:2]
        d = self.embedding(observed.flatten(0, 1).to(depth_hidden.dtype))  # (B*V, D, 1, h', w')
        d = d.unflatten(0, (batch, views)).permute(0, 3, 1, 4, 5, 2)  # (B, 1, V, h', w', D)
        frames = depth_hidden.shape[1] // (views * d.shape[3] * d.shape[4])
        d = d.expand(-1, frames, -1, -1, -1, -1)  # (B, F', V, h', w', D): every latent frame
        return depth_hidden + d.flatten(1, 4)

    def gate_head(
        self,
        depth_out: torch.Tensor,
        depth_hidden: torch.Tensor,
        observed: torch.Tensor,
        unpatchify: Unpatchify,
    ) -> torch.Tensor:
        """depth_out (B, V, C, F, h, w) gated against the observed depth by the last depth hidden state (B, N, D)."""
        return gated_blend(observed, depth_out, unpatchify(self.gate(depth_hidden)))
