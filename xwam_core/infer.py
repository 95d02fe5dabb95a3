"""Inference from a checkpoint: policy mode (actions fast) and world mode (actions + future RGB-D).

    predictor = Predictor.from_checkpoint("runs/tiny/checkpoints/step-00002000")
    out = predictor.predict(batch, mode="world")      # batch from xwam_core.data.windows
    out.actions      (B, K, D_action)  in the dataset's units
    out.rgb          (B, V, T, H, W, 3) uint8, frame 0 is the observed frame
    out.depth        (B, V, T, H, W) metres

Only the current frame, the current state and the task of each window are read from the batch (and,
for a depth_condition checkpoint in world mode, the current frame's depth): the future is the model's.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xwam_core.data.stats import QuantileNormalizer
from xwam_core.data.windows import WindowLayout
from xwam_core.errors import XWAMError
from xwam_core.factory import load_text_from_checkpoint
from xwam_core.finetune import check_checkpoint
from xwam_core.models.codecs import Codec, DepthRange, depth_to_image, image_to_depth
from xwam_core.models.presets import preset_codec
from xwam_core.models.text import TextConditioner
from xwam_core.models.transformer import XWAMTransformer
from xwam_core.objective import pad_last
from xwam_core.schedule.inference import (
    DenoisingSchedule,
    InferenceScheduleConfig,
    initial_latents,
    model_denoiser,
)


@dataclass
class Prediction:
    actions: torch.Tensor  # (B, K, D_action) dataset units
    states: torch.Tensor  # (B, S, D_state) dataset units
    rgb: torch.Tensor | None  # (B, V, T, H, W, 3) uint8 (world mode)
    depth: torch.Tensor | None  # (B, V, T, H, W) metres (world mode)
    latency_s: float  # wall time of the denoising (+ decoding in world mode) for the batch
    num_denoiser_calls: int


@dataclass
class CheckpointLayout:
    """What a checkpoint was trained on (layout.json): views, tasks, window, the store's dimensions."""

    views: list[str]
    tasks: list[str]
    window: WindowLayout
    action_dim: int  # the store's (unpadded) dimensions
    state_dim: int
    image_size: tuple[int, int]
    store: str

    def to_json(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "tasks": self.tasks,
            "future_frames": self.window.future_frames,
            "frame_stride": self.window.frame_stride,
            "action_dim": self.action_dim,
            "state_dim": self.state_dim,
            "image_size": list(self.image_size),
            "store": self.store,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CheckpointLayout:
        return cls(
            views=list(d["views"]),
            tasks=list(d["tasks"]),
            window=WindowLayout(d["future_frames"], d["frame_stride"]),
            action_dim=int(d["action_dim"]),
            state_dim=int(d["state_dim"]),
            image_size=(int(d["image_size"][0]), int(d["image_size"][1])),
            store=str(d["store"]),
        )


class Predictor:
    """A trained model ready to act and imagine, with its codec, text and normalization."""

    def __init__(
        self,
        model: XWAMTransformer,
        text: TextConditioner,
        codec: Codec,
        layout: CheckpointLayout,
        stats: dict[str, Any],
        schedule: InferenceScheduleConfig | None = None,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.text = text.to(self.device).eval()
        self.codec = codec.to(self.device).eval()
        self.layout = layout
        self.stats = stats
        self.action_norm = QuantileNormalizer.from_stats(stats, "action")
        self.state_norm = QuantileNormalizer.from_stats(stats, "observation.state")
        self.depth_range = model.depth_range
        self.schedule_config = schedule or InferenceScheduleConfig()
        self.schedule = DenoisingSchedule(self.schedule_config)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        schedule: InferenceScheduleConfig | None = None,
        device: str | torch.device = "cpu",
        vae: str | None = None,
    ) -> Predictor:
        path = check_checkpoint(Path(path))  # a run folder means its newest checkpoint
        for name in ("layout.json", "stats.json", "recipe.toml"):
            if not (path / name).is_file():
                raise XWAMError(f"{path}: checkpoint lacks {name} (was it written by `xwam pretrain`?)")
        model = XWAMTransformer.from_pretrained(path / "model")
        text, _ = load_text_from_checkpoint(path, int(model.config["text_dim"]))
        layout = CheckpointLayout.from_json(json.loads((path / "layout.json").read_text()))
        stats = json.loads((path / "stats.json").read_text())
        from xwam_core.recipe import load_recipe

        recipe = load_recipe(path / "recipe.toml")
        codec = preset_codec(recipe.model.preset, vae or recipe.model.vae or None)
        codec.requires_grad_(False)
        return cls(model, text, codec, layout, stats, schedule or recipe.inference, device)

    # ---------------------------------------------------------------------------------------- use
    def task_indices(self, store_tasks: list[str], task_index: torch.Tensor) -> torch.Tensor:
        """Map a store's task indices to this checkpoint's (by task text)."""
        mapping = []
        for t in store_tasks:
            if t not in self.layout.tasks:
                raise XWAMError(
                    f"task {t!r} was not seen in training (the checkpoint knows {self.layout.tasks})"
                )
            mapping.append(self.layout.tasks.index(t))
        return torch.as_tensor(mapping, dtype=torch.long)[task_index.long().cpu()]

    @torch.inference_mode()
    def predict(
        self,
        batch: dict[str, torch.Tensor],
        mode: str = "policy",
        task_index: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Actions (and in world mode the future RGB-D) for a batch of windows.

        `task_index`: the checkpoint's task indices (default: the batch's, assumed to be the checkpoint's).
        """
        if mode not in ("policy", "world"):
            raise XWAMError(f"mode {mode!r}: expected 'policy' or 'world'")
        dev = self.device
        cfg = self.model.config
        rgb0 = (
            batch["rgb"][:, :, :1].to(dev).permute(0, 1, 5, 2, 3, 4).float() / 127.5 - 1.0
        )  # (B, V, 3, 1, H, W)
        state0 = torch.as_tensor(batch["states"][:, 0]).to(dev).float()  # (B, Ds) normalized
        tasks = (task_index if task_index is not None else batch["task_index"]).to(dev)
        window = self.layout.window
        num_latent = self.codec.latent_shape(window.num_frames, *rgb0.shape[-2:])[1]

        start = time.perf_counter()
        context = self.codec.encode_views(rgb0)  # (B, V, C, 1, h, w)
        video, actions, states = initial_latents(
            context,
            pad_last(state0, cfg.state_dim),
            num_latent,
            window.num_actions,
            cfg.action_dim,
            window.num_frames,
            generator=generator,
        )
        text = self.text(tasks)
        depth_context = None
        if mode == "world" and cfg.get("depth_condition", False):  # RGB-D input: the observed depth
            if batch.get("depth") is None:
                raise XWAMError(
                    "this checkpoint's depth branch reads the observed current depth (depth_condition): "
                    "world mode needs batch['depth'], and the data has none"
                )
            depth0 = torch.as_tensor(batch["depth"][:, :, :1]).to(dev).float()  # (B, V, 1, H, W) metres
            depth_context = self.codec.encode_views(depth_to_image(depth0, self.depth_range))
        denoiser = model_denoiser(self.model, text, depth_context=depth_context)
        uncond = None
        if self.schedule_config.guidance_scale != 1.0:
            uncond = model_denoiser(
                self.model, self.text.empty(tasks.shape[0]).to(dev), depth_context=depth_context
            )
        result = self.schedule(denoiser, video, actions, states, mode=mode, uncond_denoiser=uncond)
        rgb = depth = None
        if mode == "world":
            assert result.video is not None and result.depth is not None
            frames = self.codec.decode_views(result.video)  # (B, V, 3, T, H, W)
            rgb = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 5, 2)
            depth_image = self.codec.decode_views(result.depth)  # (B, V, 3, T, H, W)
            depth = image_to_depth(depth_image, self.depth_range)  # (B, V, T, H, W)
        latency = time.perf_counter() - start
        a = result.actions[..., : self.layout.action_dim].float().cpu()
        s = result.states[..., : self.layout.state_dim].float().cpu()
        return Prediction(
            actions=self.action_norm.denormalize(a),
            states=self.state_norm.denormalize(s),
            rgb=rgb.cpu() if rgb is not None else None,
            depth=depth.float().cpu() if depth is not None else None,
            latency_s=latency,
            num_denoiser_calls=result.num_denoiser_calls,
        )


def depth_roundtrip(depth: torch.Tensor, codec: Codec, depth_range: DepthRange) -> torch.Tensor:
    """What the codec can represent of a depth video (B, V, T, H, W): the ceiling of depth prediction."""
    latents = codec.encode_views(depth_to_image(depth, depth_range))
    return image_to_depth(codec.decode_views(latents), depth_range)


def mean_action(stats: dict[str, Any]) -> np.ndarray:
    return np.asarray(stats["action"]["mean"], dtype=np.float32)
