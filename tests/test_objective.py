"""The training objective's video loss: flow matching on the velocity, or the same error on the clean latent."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SyntheticSource, write_store
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout, collate_windows
from xwam_core.errors import XWAMError
from xwam_core.factory import build_codec, build_model, build_text, layout_for
from xwam_core.models.transformer import MIN_SAMPLE_T
from xwam_core.objective import TrainingObjective, sample_generator
from xwam_core.recipe import ModelConfig
from xwam_core.schedule.sampler import NoiseSamplerConfig, sample_noise_levels


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


def objective(setup, video_loss: str) -> TrainingObjective:
    model, text, codec, layout, _ = setup
    return TrainingObjective(
        model,
        text,
        codec,
        NoiseSamplerConfig(),
        layout.action_valid(),
        layout.state_valid(),
        None,
        video_loss,
    )


def test_sample_loss_is_the_velocity_loss_times_t_squared(setup):
    batch = setup[-1]
    with torch.no_grad():
        velocity = objective(setup, "velocity")(batch, seed=3, step=5, first_index=0, train=False)
        sample = objective(setup, "sample")(batch, seed=3, step=5, first_index=0, train=False)
    # the timesteps the objective drew: each sample's generator, first draw (no augmentation here)
    t = torch.cat(
        [sample_noise_levels(NoiseSamplerConfig(), 1, sample_generator(3, 5, i)).t_video for i in range(4)]
    )
    assert (t > MIN_SAMPLE_T).all() and (t < 1).all()
    torch.testing.assert_close(sample["video"], velocity["video"] * t**2)
    for term in ("action", "state", "depth"):  # only the video term changes
        torch.testing.assert_close(sample[term], velocity[term])
    assert setup[0].depth_range.per_view  # the store's views a (default range) and b (its own)


def test_unknown_video_loss_is_refused(setup):
    with pytest.raises(XWAMError, match=r"train\.video_loss = 'x0': expected one of velocity, sample"):
        objective(setup, "x0")


def test_loss_masks_follow_the_drawn_timesteps_and_depth(setup):
    """What train.py averages over: action/state losses only where t_action > 0, depth where there is depth."""
    batch = setup[-1]
    with torch.no_grad():
        losses = objective(setup, "velocity")(batch, seed=0, step=0, first_index=0, train=False)
    t_action = torch.cat(
        [sample_noise_levels(NoiseSamplerConfig(), 1, sample_generator(0, 0, i)).t_action for i in range(4)]
    )
    assert 0 < int((t_action > 0).sum()) < 4  # this draw has both clean and noisy actions
    assert torch.equal(losses["action_mask"], (t_action > 0).float())
    assert torch.equal(losses["state_mask"], losses["action_mask"])
    assert torch.equal(losses["depth_mask"], batch["has_depth"].float())
    assert torch.equal(losses["video_mask"], torch.ones(4))
