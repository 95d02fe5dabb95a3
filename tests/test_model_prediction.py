"""video_prediction='sample': the head predicts the clean latent and the velocity is derived from it."""

from __future__ import annotations

import torch

from xwam_core.models.heads import MIN_SAMPLE_T
from xwam_core.models.presets import build_model


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


def test_gated_prediction_keeps_the_current_frame_where_the_gate_is_closed():
    torch.manual_seed(0)
    kwargs = dict(
        num_layers=2, num_depth_blocks=1, in_channels=48, out_channels=48, num_views=2,
        action_dim=4, state_dim=8, num_actions=8, num_states=3,
    )  # fmt: skip
    sample = build_model("tiny", **kwargs, video_prediction="sample").eval()
    gated = build_model("tiny", **kwargs, video_prediction="gated").eval()
    missing, _ = gated.load_state_dict(sample.state_dict(), strict=False)
    assert sorted(missing) == ["video_head.gate.bias", "video_head.gate.weight"]
    video = torch.randn(2, 2, 48, 3, 4, 4)
    actions, states = torch.randn(2, 8, 4), torch.randn(2, 3, 8)
    t_video, t_action = torch.tensor([700.0, 300.0]), torch.tensor([300.0, 10.0])
    text = torch.randn(2, 4, sample.config.text_dim)
    t = (t_video / 1000).view(-1, 1, 1, 1, 1, 1)

    def clean(model):  # the clean latent the model predicts, from its velocity
        with torch.no_grad():
            return video - t * model(video, actions, states, t_video, t_action, text, run_depth=False).video

    head, current = clean(sample), video[:, :, :, :1]
    g = torch.sigmoid(torch.tensor(-4.0))  # a new model: closed gates, ~2% of the head
    torch.testing.assert_close(clean(gated), current + g * (head - current), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        gated.video_head.gate.bias.fill_(30.0)  # open: the head alone, as with video_prediction="sample"
    torch.testing.assert_close(clean(gated), head, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        gated.video_head.gate.bias.fill_(-30.0)  # shut: exactly the current frame
    torch.testing.assert_close(clean(gated), current.expand_as(video), rtol=1e-4, atol=1e-4)


def test_tiny_preset_predicts_samples_base_predicts_velocity():
    from xwam_core.models.presets import PRESETS

    assert PRESETS["tiny"]["video_prediction"] == "gated"
    assert PRESETS["tiny"]["condition_broadcast"] is True
    assert PRESETS["base"].get("video_prediction", "velocity") == "velocity"
    assert not PRESETS["base"].get("condition_broadcast", False)  # the paper's Wan2.2 token layout


def test_condition_broadcast_starts_as_a_no_op_and_feeds_the_current_frame_forward():
    torch.manual_seed(0)
    kwargs = dict(
        num_layers=2, num_depth_blocks=1, in_channels=48, out_channels=48, num_views=2,
        action_dim=4, state_dim=8, num_actions=8, num_states=3, video_prediction="velocity",
    )  # fmt: skip
    plain = build_model("tiny", **kwargs, condition_broadcast=False).eval()
    broadcast = build_model("tiny", **kwargs, condition_broadcast=True).eval()
    missing, unexpected = broadcast.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["frame_broadcast.proj.bias", "frame_broadcast.proj.weight"] and not unexpected
    assert broadcast.frame_broadcast is not None
    assert not broadcast.frame_broadcast.proj.weight.any() and not broadcast.frame_broadcast.proj.bias.any()
    video = torch.randn(2, 2, 48, 3, 4, 4)
    actions, states = torch.randn(2, 8, 4), torch.randn(2, 3, 8)
    t_video, t_action = torch.tensor([700.0, 200.0]), torch.tensor([300.0, 10.0])
    text = torch.randn(2, 4, plain.config.text_dim)

    def run(model, v):
        with torch.no_grad():
            return model(v, actions, states, t_video, t_action, text, run_depth=True)

    torch.testing.assert_close(run(broadcast, video).video, run(plain, video).video)  # zero-initialised
    with torch.no_grad():
        broadcast.frame_broadcast.proj.weight.copy_(torch.eye(broadcast.inner_dim))
    # a model without attention between frames (first block's attention zeroed) still sees the current
    # frame in its future tokens only through the broadcast
    for model in (plain, broadcast):
        for block in model.wan.blocks:
            torch.nn.init.zeros_(block.attn1.to_out[0].weight)
            torch.nn.init.zeros_(block.attn1.to_out[0].bias)
    changed = video.clone()
    changed[:, :, :, :1] += 1.0  # only the current frame differs
    future = slice(1, None)
    torch.testing.assert_close(
        run(plain, changed).video[:, :, :, future], run(plain, video).video[:, :, :, future]
    )
    delta = (run(broadcast, changed).video - run(broadcast, video).video)[:, :, :, future]
    assert delta.abs().mean() > 1e-3
