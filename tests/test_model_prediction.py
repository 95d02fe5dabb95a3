"""video_prediction='sample': the head predicts the clean latent and the velocity is derived from it."""

from __future__ import annotations

import torch

from xwam_core.models.presets import build_model
from xwam_core.models.transformer import MIN_SAMPLE_T


def test_sample_prediction_derives_velocity_from_the_same_head():
    torch.manual_seed(0)
    kwargs = dict(
        num_layers=2,
        num_depth_blocks=1,
        in_channels=48,
        out_channels=48,
        num_views=2,
        action_dim=4,
        state_dim=8,
        num_actions=8,
        num_states=3,
    )
    velocity = build_model("tiny", **kwargs, video_prediction="velocity").eval()
    sample = build_model("tiny", **kwargs, video_prediction="sample").eval()
    sample.load_state_dict(velocity.state_dict())
    video = torch.randn(2, 2, 48, 2, 4, 4)
    actions, states = torch.randn(2, 8, 4), torch.randn(2, 3, 8)
    t_video = torch.tensor([700.0, 20.0])  # the second is below the clamp (0.05 * 1000)
    t_action = torch.tensor([300.0, 10.0])
    text = torch.randn(2, 4, sample.config.text_dim)
    with torch.no_grad():
        raw = velocity(video, actions, states, t_video, t_action, text, run_depth=True)
        out = sample(video, actions, states, t_video, t_action, text, run_depth=True)
    t = (t_video / 1000).clamp_min(MIN_SAMPLE_T).view(-1, 1, 1, 1, 1, 1)
    torch.testing.assert_close(out.video, (video - raw.video) / t)
    torch.testing.assert_close(out.actions, raw.actions)  # only the video head changes meaning
    torch.testing.assert_close(out.depth, raw.depth)

    residual = build_model("tiny", **kwargs, video_prediction="residual").eval()
    with torch.no_grad():  # a new residual model predicts "nothing moves": the current frame
        fresh = residual(video, actions, states, t_video, t_action, text, run_depth=False)
    torch.testing.assert_close(fresh.video, (video - video[:, :, :, :1]) / t)
    residual.load_state_dict(velocity.state_dict())
    with torch.no_grad():
        res = residual(video, actions, states, t_video, t_action, text, run_depth=False)
    torch.testing.assert_close(res.video, (video - (raw.video + video[:, :, :, :1])) / t)


def test_tiny_preset_predicts_samples_base_predicts_velocity():
    from xwam_core.models.presets import PRESETS

    assert PRESETS["tiny"]["video_prediction"] == "residual"
    assert PRESETS["base"].get("video_prediction", "velocity") == "velocity"
