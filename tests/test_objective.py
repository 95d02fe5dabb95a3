"""The training objective's video loss: flow matching on the velocity, or the same error on the clean latent,
as the model's video head declares."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import SyntheticSource, write_store
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout, collate_windows
from xwam_core.errors import XWAMError
from xwam_core.factory import build_codec, build_model, build_text, layout_for
from xwam_core.models.heads import MIN_SAMPLE_T, VelocityHead
from xwam_core.objective import TrainingObjective, sample_generator
from xwam_core.recipe import ModelConfig, load_recipe
from xwam_core.schedule.sampler import NoiseSamplerConfig, sample_noise_levels

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("objective") / "store"
    write_store(path, SyntheticSource(episodes=2, length=12, size=(32, 32), views=("a", "b")))
    store = EpisodeStore(path)
    window = WindowLayout(4, 2)
    cfg = ModelConfig(
        preset="tiny",
        depth_ranges={"b": [0.1, 4.0]},
        overrides={"num_layers": 2, "num_depth_blocks": 1},
    )
    layout = layout_for(store, window, cfg, None)
    torch.manual_seed(0)
    model, _ = build_model(cfg, layout)
    text = build_text(cfg, layout, int(model.config["text_dim"]))
    data = WindowDataset(store, window, episodes=[0, 1])
    batch = collate_windows([data[i] for i in range(4)])
    return model, text, build_codec(cfg), layout, batch


def objective(setup, model=None) -> TrainingObjective:
    default_model, text, codec, layout, _ = setup
    return TrainingObjective(
        model or default_model,
        text,
        codec,
        NoiseSamplerConfig(),
        layout.action_valid(),
        layout.state_valid(),
        None,
    )


class VelocityHeadWithSampleLoss(VelocityHead):
    """Wan's output unchanged, but declaring the "sample" loss form: isolates what the declaration does."""

    loss_form = "sample"


def test_the_video_loss_takes_the_heads_form(setup):
    velocity_model = copy.deepcopy(setup[0])
    velocity_model.video_head = VelocityHead()
    sample_model = copy.deepcopy(setup[0])
    sample_model.video_head = VelocityHeadWithSampleLoss()
    assert setup[0].video_head.loss_form == "sample"  # the tiny preset's gated head
    assert objective(setup).video_loss == "sample"
    batch = setup[-1]
    with torch.no_grad():  # same outputs; only the declared loss form differs
        velocity = objective(setup, velocity_model)(batch, seed=3, step=5, first_index=0, train=False)
        sample = objective(setup, sample_model)(batch, seed=3, step=5, first_index=0, train=False)
    # the timesteps the objective drew: each sample's generator, first draw (no augmentation here)
    t = torch.cat(
        [sample_noise_levels(NoiseSamplerConfig(), 1, sample_generator(3, 5, i)).t_video for i in range(4)]
    )
    assert (t > MIN_SAMPLE_T).all() and (t < 1).all()
    # "sample": the velocity error times t^2, i.e. measured on the clean latent
    torch.testing.assert_close(sample["video"], velocity["video"] * t**2)
    for term in ("action", "state", "depth"):  # only the video term changes
        torch.testing.assert_close(sample[term], velocity[term])
    assert setup[0].depth_range.per_view  # the store's views a (default range) and b (its own)


def test_a_recipe_cannot_choose_the_video_loss():
    with pytest.raises(XWAMError, match=r"unknown key 'train\.video_loss'"):
        load_recipe(TINY_RECIPE, ["train.video_loss=velocity"])  # the model's head decides it


def test_loss_masks_follow_the_drawn_timesteps_and_depth(setup):
    """What train.py averages over: action/state losses only where t_action > 0, depth where there is depth."""
    batch = setup[-1]
    with torch.no_grad():
        losses = objective(setup)(batch, seed=0, step=0, first_index=0, train=False)
    t_action = torch.cat(
        [sample_noise_levels(NoiseSamplerConfig(), 1, sample_generator(0, 0, i)).t_action for i in range(4)]
    )
    assert 0 < int((t_action > 0).sum()) < 4  # this draw has both clean and noisy actions
    assert torch.equal(losses["action_mask"], (t_action > 0).float())
    assert torch.equal(losses["state_mask"], losses["action_mask"])
    assert torch.equal(losses["depth_mask"], batch["has_depth"].float())
    assert torch.equal(losses["video_mask"], torch.ones(4))
