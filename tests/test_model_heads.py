"""The plug-in contract (xwam_core.models.heads): what each video head returns and declares, which presets use
which plug-ins, and the renaming of checkpoints written before the plug-ins were modules."""

from __future__ import annotations

import pytest
import torch

from xwam_core.errors import XWAMError
from xwam_core.models.heads import (
    VIDEO_HEADS,
    CurrentFrameBroadcast,
    GatedSampleHead,
    ObservedDepthConditioner,
    ResidualSampleHead,
    SampleHead,
    VelocityHead,
    build_video_head,
    sample_to_velocity,
)
from xwam_core.models.presets import build_model
from xwam_core.models.transformer import XWAMTransformer, upgrade_legacy_state_dict

B, V, C, F, H, W, D = 2, 2, 8, 3, 4, 4, 16
PATCH = (1, 2, 2)
SMALL = dict(num_layers=2, num_depth_blocks=1, in_channels=48, out_channels=48, num_views=2, action_dim=4,
             state_dim=8, num_actions=8, num_states=3)  # fmt: skip


def unpatchify(tokens: torch.Tensor) -> torch.Tensor:
    """(B, F*V*h'*w', C*4) -> (B, V, C, F, h, w) for patch (1, 2, 2), as the transformer does."""
    x = tokens.reshape(B, F, V, H // 2, W // 2, 1, 2, 2, C)
    return x.permute(0, 2, 8, 1, 5, 3, 6, 4, 7).reshape(B, V, C, F, H, W)


def head_inputs():
    g = torch.Generator().manual_seed(0)
    wan_output = torch.randn(B, V, C, F, H, W, generator=g)
    tokens = torch.randn(B, F * V * (H // 2) * (W // 2), D, generator=g)
    video = torch.randn(B, V, C, F, H, W, generator=g)
    return wan_output, tokens, video, torch.tensor([700.0, 20.0])


def test_each_head_declares_its_loss_form():
    assert VelocityHead.loss_form == "velocity"  # the paper's: flow matching on Wan's velocity
    for head in (SampleHead, ResidualSampleHead, GatedSampleHead):  # x-prediction: the clean-latent error
        assert head.loss_form == "sample"
    assert set(VIDEO_HEADS) == {"velocity", "sample", "residual", "gated"}
    with pytest.raises(XWAMError, match=r"video_prediction='x0': expected one of"):
        build_video_head("x0", D, C * 4, -4.0)
    with pytest.raises(XWAMError, match=r"video_prediction='x0'"):
        XWAMTransformer(video_prediction="x0", num_layers=1, num_depth_blocks=0, num_attention_heads=1,
                        attention_head_dim=16, in_channels=4, out_channels=4, text_dim=8, freq_dim=8,
                        ffn_dim=16)  # fmt: skip


def test_heads_turn_wan_output_into_the_velocity():
    wan_output, tokens, video, t_video = head_inputs()
    current = video[:, :, :, :1]
    assert torch.equal(VelocityHead()(wan_output, tokens, video, t_video, unpatchify), wan_output)
    assert torch.equal(
        SampleHead()(wan_output, tokens, video, t_video, unpatchify),
        sample_to_velocity(video, wan_output, t_video),
    )
    assert torch.equal(
        ResidualSampleHead()(wan_output, tokens, video, t_video, unpatchify),
        sample_to_velocity(video, wan_output + current, t_video),
    )
    t = (t_video / 1000).clamp_min(0.05).view(-1, 1, 1, 1, 1, 1)  # the second sample is below the clamp
    torch.testing.assert_close(sample_to_velocity(video, wan_output, t_video), (video - wan_output) / t)


def test_gated_head_with_a_closed_gate_returns_the_current_frame():
    wan_output, tokens, video, t_video = head_inputs()
    current = video[:, :, :, :1]
    head = GatedSampleHead(D, C * 4, gate_init_logit=-4.0)
    head.reset_parameters()
    assert not head.gate.weight.any() and (head.gate.bias == -4.0).all()
    with torch.no_grad():
        head.gate.bias.fill_(-float("inf"))  # shut: exactly the current frame, whatever Wan says
        shut = head(wan_output, tokens, video, t_video, unpatchify)
        head.gate.bias.fill_(float("inf"))  # open: Wan's output alone, as SampleHead
        open_ = head(wan_output, tokens, video, t_video, unpatchify)
    assert torch.equal(shut, sample_to_velocity(video, current.expand_as(video), t_video))
    torch.testing.assert_close(open_, SampleHead()(wan_output, tokens, video, t_video, unpatchify))


def test_conditioners_start_as_no_ops():
    _, tokens, video, _ = head_inputs()
    broadcast = CurrentFrameBroadcast(D)
    broadcast.reset_parameters()
    grid = tokens.view(B, F, V, H // 2, W // 2, D)
    assert torch.equal(broadcast(grid), grid)
    with torch.no_grad():
        broadcast.proj.weight.copy_(torch.eye(D))
    fed = broadcast(grid)
    assert torch.equal(fed[:, 0], grid[:, 0])  # the current frame itself is untouched
    torch.testing.assert_close(fed[:, 1:], grid[:, 1:] + grid[:, :1])

    depth = ObservedDepthConditioner(C, D, PATCH, gate_init_logit=-float("inf"))
    depth.reset_parameters()
    observed = torch.randn(B, V, C, 1, H, W)
    assert torch.equal(depth.embed(tokens, observed), tokens)  # zero embedding
    gated = depth.gate_head(video, tokens, observed, unpatchify)  # shut gate: the observed depth
    assert torch.equal(gated, observed.expand_as(video))
    with pytest.raises(XWAMError, match="pass depth_context"):
        depth.checked(None, tuple(video.shape))


def test_presets_pick_their_plug_ins():
    with torch.device("meta"):
        base = build_model("base", num_layers=1, num_depth_blocks=1)
    assert type(base.video_head) is VelocityHead and base.video_head.loss_form == "velocity"
    assert base.frame_broadcast is None and base.depth_conditioner is None
    assert sum(p.numel() for p in base.video_head.parameters()) == 0  # the paper's model: Wan's head only
    tiny = build_model("tiny", **SMALL)
    assert type(tiny.video_head) is GatedSampleHead and tiny.video_head.loss_form == "sample"
    assert tiny.frame_broadcast is not None and tiny.depth_conditioner is None
    rgbd = build_model("tiny", **SMALL, depth_condition=True)  # as recipes/tiny_cpu.toml sets it
    assert isinstance(rgbd.depth_conditioner, ObservedDepthConditioner)


def test_legacy_parameter_names_are_upgraded():
    torch.manual_seed(0)
    model = build_model("tiny", **SMALL, depth_condition=True, gate_init_logit=-8.0)
    new_to_old = {  # the names a checkpoint written before the plug-ins were modules holds
        "video_head.gate": "gate_proj",
        "frame_broadcast.proj": "condition_proj",
        "depth_conditioner.embedding": "depth_condition_embedding",
        "depth_conditioner.gate": "depth_gate_proj",
    }
    state = model.state_dict()
    legacy = {}
    for name, tensor in state.items():
        module, _, param = name.rpartition(".")
        legacy[f"{new_to_old[module]}.{param}" if module in new_to_old else name] = tensor
    assert "gate_proj.weight" in legacy and "depth_gate_proj.bias" in legacy and "wan.proj_out.bias" in legacy
    upgraded = upgrade_legacy_state_dict(legacy)
    assert list(upgraded) == list(state)  # the same names in the same order
    assert all(upgraded[n] is state[n] for n in state)
    assert upgrade_legacy_state_dict(state) == state  # new names pass through
    fresh = build_model("tiny", **SMALL, depth_condition=True, gate_init_logit=-8.0)
    fresh.load_state_dict(upgraded, strict=True)


def test_state_broadcast_starts_as_a_no_op_and_feeds_the_current_state_to_actions():
    from xwam_core.models.heads import CurrentStateBroadcast

    broadcast = CurrentStateBroadcast(D)
    broadcast.reset_parameters()
    g = torch.Generator().manual_seed(1)
    actions, states = torch.randn(B, 8, D, generator=g), torch.randn(B, 3, D, generator=g)
    a, s = broadcast(actions, states)
    assert torch.equal(a, actions) and torch.equal(s, states)
    with torch.no_grad():
        broadcast.proj.weight.copy_(torch.eye(D))
    a, s = broadcast(actions, states)
    torch.testing.assert_close(a, actions + states[:, :1])
    assert torch.equal(s[:, 0], states[:, 0])  # the current state itself is untouched
    torch.testing.assert_close(s[:, 1:], states[:, 1:] + states[:, :1])

    # in the model: off at init changes nothing; trained, every action token reads the current state
    model, plugin, (video, acts, sts, t, text) = _model_with_a_no_op_plugin("state_broadcaster")
    with torch.no_grad():
        plugin.proj.weight.normal_()
    moved = sts.clone()
    moved[:, 0] += 1.0
    changed = model(video, acts, moved, t, t, text, run_depth=False)
    assert not torch.allclose(changed.actions, model(video, acts, sts, t, t, text, run_depth=False).actions)


def _model_with_a_no_op_plugin(attribute: str):
    """A small model with the state plug-in at `attribute` switched on, checked to change nothing at init
    (the same outputs with the plug-in removed); returns the model, the plug-in and the inputs used."""
    torch.manual_seed(0)
    flag = {
        "state_broadcaster": "state_broadcast",
        "state_modulator": "state_modulation",
        "video_state_modulator": "video_state_modulation",
    }[attribute]
    model = build_model("tiny", **SMALL, **{flag: True}).eval()
    assert model.config[flag] and getattr(model, attribute) is not None
    video = torch.randn(1, V, 48, F, H, W)
    acts, sts = torch.randn(1, 8, 4), torch.randn(1, 3, 8)
    t = torch.tensor([500.0])
    text = torch.randn(1, 4, model.config.text_dim)
    before = model(video, acts, sts, t, t, text, run_depth=False)
    plugin = getattr(model, attribute)
    setattr(model, attribute, None)
    without = model(video, acts, sts, t, t, text, run_depth=False)
    setattr(model, attribute, plugin)
    assert torch.equal(before.actions, without.actions) and torch.equal(before.video, without.video)
    return model, plugin, (video, acts, sts, t, text)


def test_state_modulation_starts_as_a_no_op_and_conditions_the_action_stream_on_the_current_state():
    model, plugin, (video, acts, sts, t, text) = _model_with_a_no_op_plugin("state_modulator")
    with torch.no_grad():
        plugin.embed[-1].weight.normal_()
    # only the current state is read: a future state's change does not reach the modulation ...
    emb = plugin(sts[:, 0])
    moved_future = sts.clone()
    moved_future[:, 2] += 1.0
    assert torch.equal(plugin(moved_future[:, 0]), emb)
    # ... the current state's does, through the action stream's AdaLN (the video tokens' timestep embedding
    # is untouched: their modulation is that of the model without the plug-in)
    moved = sts.clone()
    moved[:, 0] += 1.0
    changed = model(video, acts, moved, t, t, text, run_depth=False)
    assert not torch.allclose(changed.actions, model(video, acts, sts, t, t, text, run_depth=False).actions)
    timestep_class = model._timestep_class(model._layout(video, acts, sts), video.device)
    temb, _ = model._embed_timesteps(t, t, timestep_class, torch.float32, plugin(sts[:, 0]))
    plain, _ = model._embed_timesteps(t, t, timestep_class, torch.float32)
    action_rows = timestep_class == 2
    torch.testing.assert_close(temb[:, action_rows], plain[:, action_rows] + emb[:, None])
    assert torch.equal(temb[:, ~action_rows], plain[:, ~action_rows])


def test_video_state_modulation_starts_as_a_no_op_and_conditions_the_future_video_on_the_current_state():
    model, plugin, (video, acts, sts, t, text) = _model_with_a_no_op_plugin("video_state_modulator")
    assert model.state_modulator is None  # its own switch and embedding, apart from the action stream's
    with torch.no_grad():
        plugin.embed[-1].weight.normal_()
    emb = plugin(sts[:, 0])
    moved = sts.clone()
    moved[:, 0] += 1.0
    changed = model(video, acts, moved, t, t, text)
    base = model(video, acts, sts, t, t, text)
    assert not torch.allclose(changed.video[:, :, :, 1:], base.video[:, :, :, 1:])
    assert not torch.allclose(changed.depth, base.depth)  # the depth branch reads the video tokens' AdaLN
    # only the future video tokens' timestep embedding moves (class 1); the clean current frame's and the
    # action stream's stay those of the model without the plug-in
    timestep_class = model._timestep_class(model._layout(video, acts, sts), video.device)
    temb, _ = model._embed_timesteps(t, t, timestep_class, torch.float32, None, emb)
    plain, _ = model._embed_timesteps(t, t, timestep_class, torch.float32)
    future_video = timestep_class == 1
    assert future_video.any()
    torch.testing.assert_close(temb[:, future_video], plain[:, future_video] + emb[:, None])
    assert torch.equal(temb[:, ~future_video], plain[:, ~future_video])
