"""The X-WAM training objective (docs/method.md sections 3-5) as one module, so DDP/FSDP wrap it whole.

batch (from xwam_core.data.windows) -> augmentation -> codec latents (RGB and inverse depth) -> ANS
timesteps -> noised video/actions/states -> the transformer -> per-sample losses:
    video   flow matching on the future latent frames, in the loss form the model's video head declares
            ("velocity", the paper's; "sample": the same error on the clean latent, for x-prediction heads)
    action  flow matching, masked where t_action = 0 (ANS's action-conditioned half), where the dimension
            is padding for this embodiment, or where the step is past the episode's end (the batch's
            `action_is_pad`); each sample's mean counts its real steps only, and a sample without one
            leaves the term's batch mean (its mask is 0)
    state   the same on future states (`state_is_pad`)
    depth   MSE of the depth branch's clean depth latent, masked where the store has no depth
Noise, timesteps, prompt dropping and augmentation are drawn per sample from generators seeded by
(seed, step, global sample index), so a batch split over 2 processes sees exactly what 1 process sees,
and a resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from xwam_core.data.augment import AugmentConfig, augment_batch
from xwam_core.models.codecs import Codec, DepthRange, depth_to_image
from xwam_core.models.heads import MIN_SAMPLE_T
from xwam_core.models.text import TextConditioner
from xwam_core.models.transformer import XWAMTransformer
from xwam_core.schedule.flow import add_noise, model_timestep, velocity_target
from xwam_core.schedule.sampler import NoiseSamplerConfig, sample_noise_levels

LOSS_TERMS = ("video", "action", "state", "depth")


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """A generator for one sample of one step; independent of batch split and process count."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + index)


@dataclass
class Inputs:
    """A batch encoded for the transformer (clean latents and normalized vectors)."""

    video: torch.Tensor  # (B, V, C, F, h, w) clean RGB latents
    depth: torch.Tensor  # (B, V, C, F, h, w) clean inverse-depth latents
    actions: torch.Tensor  # (B, K, action_dim), padded to the model's dimension
    states: torch.Tensor  # (B, S, state_dim)
    has_depth: torch.Tensor  # (B,) bool
    task_index: torch.Tensor  # (B,)


def pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else torch.nn.functional.pad(x, (0, size - x.shape[-1]))


def real_steps(batch: dict[str, torch.Tensor], key: str, shape: tuple[int, ...], device: Any) -> torch.Tensor:
    """(B, N) float: 1 where the step is real, 0 where `batch[key]` (a window's `*_is_pad`) says padding;
    all ones for a batch without the key."""
    pad = batch.get(key)
    if pad is None:
        return torch.ones(shape, device=device)
    return (~pad.to(device).bool()).float()


def masked_step_mean(err: torch.Tensor, dim_w: torch.Tensor, step_w: torch.Tensor) -> torch.Tensor:
    """(B, N, D) squared errors -> (B,) means over the real steps (step_w (B, N)) and real dimensions
    (dim_w (D,)); 0, not NaN, for a sample without a real step."""
    w = dim_w.view(1, 1, -1)
    total = (err * w * step_w.unsqueeze(-1)).sum((1, 2))
    return total / (w.sum() * step_w.sum(1)).clamp_min(1e-12)


def executed_action_weights(num_actions: int, actions_per_query: int, weight: float) -> torch.Tensor | None:
    """(K,) action-loss weights: `weight` for the first `actions_per_query` steps (the ones a query executes,
    train.executed_action_weight), 1 for the rest; None when they are all 1 (the paper's uniform mean)."""
    if weight == 1.0 or not 0 < actions_per_query < num_actions:
        return None
    weights = torch.ones(num_actions)
    weights[:actions_per_query] = weight
    return weights


def encode_batch(
    batch: dict[str, torch.Tensor],
    codec: Codec,
    depth_range: DepthRange,
    action_dim: int,
    state_dim: int,
    device: torch.device | str = "cpu",
    augment: AugmentConfig | None = None,
    generators: list[torch.Generator] | None = None,
    codec_micro_batch: int = 0,
) -> Inputs:
    """Loader batch -> model inputs. Augments per sample (own generator) when `augment` is given; the
    codec encodes `codec_micro_batch` samples at a time (0: all at once), so a large batch never holds
    every clip's codec activations together."""
    rgb = batch["rgb"].to(device).permute(0, 1, 2, 5, 3, 4).float() / 255.0  # (B, V, T, 3, H, W)
    depth = batch["depth"].to(device).float()  # (B, V, T, H, W)
    if augment is not None and augment.enabled:
        k = batch["intrinsics"].to(device)
        parts = [
            augment_batch(
                rgb[i : i + 1], depth[i : i + 1], k[i : i + 1], augment, generators[i] if generators else None
            )
            for i in range(rgb.shape[0])
        ]
        rgb = torch.cat([p[0] for p in parts])
        depth = torch.cat([p[1] for p in parts])
    frames = (rgb * 2.0 - 1.0).permute(0, 1, 3, 2, 4, 5)  # (B, V, 3, T, H, W) in [-1, 1]
    chunk = codec_micro_batch if codec_micro_batch > 0 else frames.shape[0]
    with torch.no_grad():
        video = torch.cat([codec.encode_views(part) for part in frames.split(chunk)])
        depth_latents = torch.cat(
            [codec.encode_views(depth_to_image(part, depth_range)) for part in depth.split(chunk)]
        )
    return Inputs(
        video=video,
        depth=depth_latents,
        actions=pad_last(batch["actions"].to(device).float(), action_dim),
        states=pad_last(batch["states"].to(device).float(), state_dim),
        has_depth=batch["has_depth"].to(device).bool(),
        task_index=batch["task_index"].to(device),
    )


@dataclass
class Noised:
    """One (local) batch encoded and noised, ready for the trainable parts (TrainingObjective.noise)."""

    x: Inputs
    t_video: torch.Tensor  # (B,) in [0, 1]
    t_action: torch.Tensor  # (B,)
    drop_text: torch.Tensor | None  # (B,) bool; None: keep every prompt (validation)
    eps_video: torch.Tensor  # noise like x.video
    eps_action: torch.Tensor  # like x.actions
    eps_state: torch.Tensor  # like x.states
    action_real: torch.Tensor  # (B, K) 1 where the action step is real
    state_real: torch.Tensor  # (B, F) the same for the future states
    masks: dict[str, torch.Tensor]  # {term_mask: (B,)}, which samples each loss term counts
    run_depth: bool  # whether the depth branch runs (a trainer may switch it on for all processes)


class TrainingObjective(nn.Module):
    """Holds the trainable parts (transformer + text conditioner) and computes per-sample losses.

    The video loss takes its form from the model's video head, so a head cannot be trained with the wrong one.
    """

    action_valid: torch.Tensor  # (action_dim,) float buffer: 1 where the dimension is the store's
    state_valid: torch.Tensor

    def __init__(
        self,
        model: XWAMTransformer,
        text: TextConditioner,
        codec: Codec,
        sampler: NoiseSamplerConfig,
        action_valid: torch.Tensor,
        state_valid: torch.Tensor,
        augment: AugmentConfig | None = None,
        action_step_weights: torch.Tensor | None = None,
    ):
        super().__init__()
        self.video_loss = model.video_head.loss_form  # "velocity" or "sample", the head's
        self.model = model
        self.text = text
        self.codec = codec
        self.sampler = sampler
        self.augment = augment
        self.register_buffer("action_valid", action_valid.float(), persistent=False)
        self.register_buffer("state_valid", state_valid.float(), persistent=False)
        # (K,) weight of each action step in a sample's action loss (None: all 1; executed_action_weights)
        self.action_step_weights: torch.Tensor | None
        weights = None if action_step_weights is None else action_step_weights.float()
        self.register_buffer("action_step_weights", weights, persistent=False)
        self.depth_range = model.depth_range
        self.codec_micro_batch = 0  # samples the codec encodes at once (0: all); train.codec_micro_batch

    def noise(
        self, batch: dict[str, torch.Tensor], seed: int, step: int, first_index: int, train: bool = True
    ) -> Noised:
        """Augment, encode (the frozen codec, `codec_micro_batch` samples at a time) and noise one (local)
        batch: everything before the trainable parts, so a trainer knows every loss mask of a step before
        its first backward (gradient accumulation normalises over the whole global batch).

        `first_index` is the global index of the batch's first sample in the global batch.
        """
        b = batch["actions"].shape[0]
        gens = [sample_generator(seed, step, first_index + i) for i in range(b)]
        cfg: Any = self.model.config
        x = encode_batch(
            batch,
            self.codec,
            self.depth_range,
            cfg.action_dim,
            cfg.state_dim,
            self.action_valid.device,
            self.augment if train else None,
            gens,
            self.codec_micro_batch,
        )
        device = x.video.device
        levels = [sample_noise_levels(self.sampler, 1, generator=g) for g in gens]
        t_video = torch.cat([lv.t_video for lv in levels]).to(device)  # (B,)
        t_action = torch.cat([lv.t_action for lv in levels]).to(device)
        action_on = torch.cat([lv.action_loss_on for lv in levels]).to(device)
        drop_text = torch.cat([lv.drop_text for lv in levels]).to(device) if train else None
        eps_video = torch.stack([torch.randn(x.video.shape[1:], generator=g) for g in gens]).to(device)
        eps_action = torch.stack([torch.randn(x.actions.shape[1:], generator=g) for g in gens]).to(device)
        eps_state = torch.stack([torch.randn(x.states.shape[1:], generator=g) for g in gens]).to(device)
        action_real = real_steps(batch, "action_is_pad", x.actions.shape[:2], device)  # (B, K)
        state_real = real_steps(batch, "state_is_pad", x.states.shape[:2], device)[:, 1:]  # (B, F)
        masks = {
            "video_mask": torch.ones(b, device=device),
            "action_mask": action_on.float() * (action_real.sum(1) > 0).float(),
            "state_mask": action_on.float() * (state_real.sum(1) > 0).float(),
            "depth_mask": x.has_depth.float(),
        }
        return Noised(
            x, t_video, t_action, drop_text, eps_video, eps_action, eps_state, action_real, state_real, masks,
            run_depth=bool(x.has_depth.any()),
        )  # fmt: skip

    def forward(
        self,
        batch: dict[str, torch.Tensor] | Noised,
        seed: int = 0,
        step: int = 0,
        first_index: int = 0,
        train: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses {term: (B,)} and their masks {term_mask: (B,)} for one (local) batch: a loader
        batch (noised here with `seed`, `step`, `first_index`, `train`; see `noise`) or a `Noised` one."""
        n = batch if isinstance(batch, Noised) else self.noise(batch, seed, step, first_index, train)
        x, t_video, t_action = n.x, n.t_video, n.t_action
        cfg: Any = self.model.config
        b = x.video.shape[0]
        device = x.video.device

        # the current frame and the current state are the clean condition (t = 0)
        noisy_video = add_noise(x.video, n.eps_video, t_video)
        noisy_video[:, :, :, :1] = x.video[:, :, :, :1]
        noisy_actions = add_noise(x.actions, n.eps_action, t_action)
        noisy_states = add_noise(x.states, n.eps_state, t_action)
        noisy_states[:, :1] = x.states[:, :1]

        text = self.text(x.task_index, n.drop_text)
        out = self.model(
            noisy_video,
            noisy_actions,
            noisy_states,
            model_timestep(t_video),
            model_timestep(t_action),
            text,
            run_depth=n.run_depth,
            depth_context=x.depth[:, :, :, :1] if cfg.get("depth_condition", False) else None,
        )

        future = slice(1, None)
        v_err = (
            out.video[:, :, :, future].float() - velocity_target(x.video, n.eps_video)[:, :, :, future]
        ) ** 2
        if self.video_loss == "sample":
            # (v_pred - v) t = x0 - x0_pred, with t clamped as the x-prediction heads clamp it
            v_err = v_err * t_video.float().clamp_min(MIN_SAMPLE_T).view(-1, 1, 1, 1, 1, 1) ** 2
        losses = {"video": v_err.flatten(1).mean(1)}
        a_err = (out.actions.float() - velocity_target(x.actions, n.eps_action)) ** 2  # (B, K, Da)
        action_w = (
            n.action_real if self.action_step_weights is None else n.action_real * self.action_step_weights
        )
        losses["action"] = masked_step_mean(a_err, self.action_valid, action_w)
        s_err = (out.states[:, future].float() - velocity_target(x.states, n.eps_state)[:, future]) ** 2
        losses["state"] = masked_step_mean(s_err, self.state_valid, n.state_real)
        if n.run_depth and out.depth is not None:
            losses["depth"] = ((out.depth.float() - x.depth) ** 2).flatten(1).mean(1)
        else:
            losses["depth"] = torch.zeros(b, device=device)
        return {**losses, **n.masks}
