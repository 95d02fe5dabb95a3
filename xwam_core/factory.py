"""Build the model, text conditioner and codec a recipe asks for, fitted to a store's layout.

Used by training (pretrain / finetune) and by inference, so both agree on every dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowLayout
from xwam_core.errors import XWAMError
from xwam_core.models.codecs import Codec, DepthRange
from xwam_core.models.presets import preset_codec, preset_config
from xwam_core.models.text import PrecomputedText, TaskEmbeddingText, TextConditioner
from xwam_core.models.transformer import WAN_CONFIG_KEYS, XWAMTransformer
from xwam_core.recipe import ModelConfig


@dataclass
class Layout:
    """Everything the model's shape depends on, derived from the store and the window layout."""

    views: list[str]
    image_size: tuple[int, int]
    window: WindowLayout
    store_action_dim: int
    store_state_dim: int
    action_dim: int
    state_dim: int
    tasks: list[str]

    def action_valid(self) -> torch.Tensor:
        """(action_dim,) bool: the store's dimensions fill the first slots, the rest is masked."""
        return torch.arange(self.action_dim) < self.store_action_dim

    def state_valid(self) -> torch.Tensor:
        return torch.arange(self.state_dim) < self.store_state_dim


def layout_for(
    store: EpisodeStore, window: WindowLayout, model: ModelConfig, views: list[str] | None
) -> Layout:
    a_dim, s_dim = len(store.action_names), len(store.state_names)
    action_dim = model.action_dim or a_dim
    state_dim = model.state_dim or s_dim
    if action_dim < a_dim or state_dim < s_dim:
        raise XWAMError(
            f"model.action_dim={action_dim}/state_dim={state_dim} are smaller than the store's "
            f"{a_dim}/{s_dim} ({store.path})"
        )
    return Layout(
        views=list(views or store.views),
        image_size=store.image_size,
        window=window,
        store_action_dim=a_dim,
        store_state_dim=s_dim,
        action_dim=action_dim,
        state_dim=state_dim,
        tasks=list(store.tasks),
    )


def model_kwargs(cfg: ModelConfig, layout: Layout) -> dict[str, Any]:
    """XWAMTransformer arguments: the preset, the recipe's overrides, then the data layout."""
    near, far = depth_bounds(cfg, layout.views)
    return preset_config(
        cfg.preset,
        **{
            **cfg.overrides,
            "num_views": len(layout.views),
            "action_dim": layout.action_dim,
            "state_dim": layout.state_dim,
            "num_actions": layout.window.num_actions,
            "num_states": layout.window.num_frames,
            "depth_near": near,
            "depth_far": far,
        },
    )


def build_model(cfg: ModelConfig, layout: Layout) -> tuple[XWAMTransformer, str]:
    """A new model for the layout: random, or the Wan2.2 prior when `cfg.init` is set. Returns a report."""
    kwargs = model_kwargs(cfg, layout)
    if cfg.init:
        # the trunk's geometry comes from the checkpoint; every X-WAM setting (layout, readout, depth
        # gradients, init, plug-ins) from the preset and the recipe's overrides
        model, report = XWAMTransformer.from_wan_pretrained(
            cfg.init, **{k: v for k, v in kwargs.items() if k not in WAN_CONFIG_KEYS}
        )
        return model, report.summary()
    return XWAMTransformer(**kwargs), "random initialisation"


def build_text(
    cfg: ModelConfig, layout: Layout, text_dim: int, init_padding: str | None = None
) -> TextConditioner:
    """The recipe's text conditioner for the layout's tasks. `init_padding`: the padding of the UMT5 text
    the model being fine-tuned was trained with (None: no constraint); a cache that differs is refused."""
    if cfg.text == "task":
        return TaskEmbeddingText(len(layout.tasks), text_dim, cfg.text_seq_len)
    if cfg.text == "umt5":
        if not cfg.text_cache:
            raise XWAMError(
                "model.text = 'umt5' needs model.text_cache, a file written by "
                "xwam_core.models.text.PrecomputedText.from_prompts(tasks).save(path)"
            )
        cache = PrecomputedText.load(cfg.text_cache)
        if init_padding is not None and cache.padding != init_padding:
            raise XWAMError(
                f"{cfg.text_cache}: UMT5 text with padding '{cache.padding}', but the --init checkpoint's "
                f"model was trained on padding '{init_padding}'; re-encode the cache with "
                f"PrecomputedText.from_prompts(tasks, padding='{init_padding}')"
            )
        missing = [t for t in layout.tasks if t not in cache.tasks]
        if missing:
            raise XWAMError(f"{cfg.text_cache}: has no embedding for task(s) {missing[:3]}")
        # rows in the store's task order (the model is fed the store's task indices), by name
        table = cache.table()
        rows = [cache.tasks.index(t) for t in layout.tasks]
        return PrecomputedText(table[rows], table[-1], list(layout.tasks), padding=cache.padding)
    raise XWAMError(f"model.text = {cfg.text!r}: expected 'task' or 'umt5'")


def build_codec(cfg: ModelConfig) -> Codec:
    codec = preset_codec(cfg.preset, cfg.vae or None)
    codec.requires_grad_(False)
    return codec.eval()


def depth_bounds(cfg: ModelConfig, views: list[str]) -> tuple[float | list[float], float | list[float]]:
    """The model's depth_near/depth_far: the recipe's numbers, or one per view when model.depth_ranges names
    any of the views (views it does not name take depth_near/depth_far; names of views the data does not
    use are ignored, so one recipe serves stores with fewer views)."""
    for view, pair in cfg.depth_ranges.items():
        if len(pair) != 2 or not 0 < pair[0] < pair[1] < float("inf"):
            raise XWAMError(
                f"model.depth_ranges.{view} = {pair}: expected [near, far] in metres with 0 < near < far"
            )
    if not set(cfg.depth_ranges) & set(views):
        DepthRange(cfg.depth_near, cfg.depth_far)
        return cfg.depth_near, cfg.depth_far
    pairs = [cfg.depth_ranges.get(v, [cfg.depth_near, cfg.depth_far]) for v in views]
    DepthRange(tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))  # validates every range
    return [float(p[0]) for p in pairs], [float(p[1]) for p in pairs]
