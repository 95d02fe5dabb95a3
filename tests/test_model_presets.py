"""Presets: base = Wan2.2-TI2V-5B geometry (counted on the meta device), tiny runs end to end on the CPU."""

from __future__ import annotations

import pytest
import torch

from xwam_core.errors import XWAMError
from xwam_core.models.presets import PRESETS, build_model, preset_codec, preset_config
from xwam_core.models.text import TaskEmbeddingText


def test_base_preset_parameter_count_on_meta():
    with torch.device("meta"):
        model = build_model("base")
    assert all(p.is_meta for p in model.parameters())
    trunk = sum(p.numel() for p in model.wan.parameters())
    depth = sum(p.numel() for p in model.depth_blocks.parameters())
    total = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.wan.blocks[0].parameters())
    print(f"base: trunk {trunk / 1e9:.3f} B, depth copy {depth / 1e9:.3f} B, total {total / 1e9:.3f} B")
    assert 4.9e9 < trunk < 5.1e9  # Wan2.2-TI2V-5B
    assert depth == 10 * per_block
    assert 1.6e9 < depth < 1.7e9
    assert total - trunk - depth < 0.1e9  # view embedding, action/state MLPs, depth head
    cfg = model.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim, cfg.ffn_dim) == (
        30,
        24,
        128,
        14336,
    )
    assert (cfg.in_channels, tuple(cfg.patch_size), cfg.text_dim, cfg.num_depth_blocks) == (
        48,
        (1, 2, 2),
        4096,
        10,
    )
    assert (cfg.num_views, cfg.num_actions, cfg.num_states, cfg.action_dim, cfg.state_dim) == (
        3,
        32,
        9,
        14,
        16,
    )


def test_tiny_preset_runs_the_issue_workload():
    # 3 views, 9 frames of 64x64 RGB, 32 actions, 9 states: the tiny recipe's window.
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    codec = preset_codec("tiny")
    text = TaskEmbeddingText(num_tasks=2, text_dim=model.config.text_dim)
    frames = torch.rand(2, 3, 3, 9, 64, 64) * 2 - 1
    video = codec.encode_views(frames)
    assert video.shape == (2, 3, 768, 3, 8, 8)
    with torch.no_grad():
        out = model(
            video,
            torch.randn(2, 32, 14),
            torch.randn(2, 9, 16),
            torch.tensor([600.0, 300.0]),
            torch.tensor([200.0, 100.0]),
            text(torch.tensor([0, 1])),
        )
    assert out.video.shape == out.depth.shape == video.shape
    assert codec.decode_views(out.video).shape == frames.shape
    assert out.actions.shape == (2, 32, 14) and out.states.shape == (2, 9, 16)


def test_overrides_and_errors():
    assert preset_config("tiny", num_views=2)["num_views"] == 2
    assert PRESETS["tiny"]["num_views"] == 3  # the table is not mutated
    with pytest.raises(XWAMError, match="unknown model preset 'huge'"):
        preset_config("huge")
    with pytest.raises(XWAMError, match="unknown model setting"):
        preset_config("tiny", num_layer=3)


def test_depth_ranges_per_view_from_the_recipe():
    from xwam_core.errors import XWAMError
    from xwam_core.factory import depth_bounds
    from xwam_core.recipe import ModelConfig

    cfg = ModelConfig(depth_near=0.2, depth_far=3.0, depth_ranges={"wrist": [0.02, 0.4], "gone": [1.0, 2.0]})
    assert depth_bounds(cfg, ["front", "wrist"]) == ([0.2, 0.02], [3.0, 0.4])  # unnamed: the default
    assert depth_bounds(cfg, ["front"]) == (0.2, 3.0)  # no named view among the data's: one range
    bad = ModelConfig(depth_ranges={"wrist": [0.4, 0.02]})
    with pytest.raises(XWAMError, match=r"model.depth_ranges.wrist = \[0.4, 0.02\]: expected \[near, far\]"):
        depth_bounds(bad, ["wrist"])
    model = build_model("tiny", num_layers=1, num_depth_blocks=1, num_views=2, depth_near=[0.2, 0.02],
                        depth_far=[3.0, 0.4])  # fmt: skip
    assert model.depth_range.per_view and model.depth_range.view(1).far == 0.4
    with pytest.raises(XWAMError, match="one range per view"):
        build_model("tiny", num_layers=1, num_depth_blocks=1, num_views=3, depth_near=[0.2, 0.02],
                    depth_far=[3.0, 0.4])  # fmt: skip
