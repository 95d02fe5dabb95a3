"""A fine-tuning recipe keeps the model of the recipe its checkpoint comes from.

Fine-tuning rebuilds the model from the fine-tuning recipe and loads the checkpoint's tensors into it
(xwam_core/finetune.py). Tensors the new model lacks are dropped, and a different depth range changes
what the depth latents mean, both without an error: so the model settings of a pair must agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xwam_core.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# fine-tuning recipe -> the recipe that trains the checkpoints it starts from
PAIRS = {"finetune_tiny.toml": "tiny_cpu.toml", "finetune_base.toml": "base.toml"}
MODEL_KEYS = ("preset", "text", "text_seq_len", "action_dim", "state_dim", "depth_near", "depth_far")


@pytest.mark.parametrize(("finetune", "pretrain"), PAIRS.items())
def test_finetune_recipe_keeps_the_checkpoint_model(finetune, pretrain):
    ft, pre = load_recipe(RECIPES / finetune).model, load_recipe(RECIPES / pretrain).model
    for key in (*MODEL_KEYS, "depth_ranges", "overrides"):
        assert getattr(ft, key) == getattr(pre, key), f"{finetune} model.{key} differs from {pretrain}'s"
