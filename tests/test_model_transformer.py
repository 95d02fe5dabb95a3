"""XWAMTransformer: token layout, per-token timesteps, unilateral depth attention, step cache."""

from __future__ import annotations

import pytest
import torch

from xwam_core.errors import XWAMError
from xwam_core.models.transformer import XWAMTransformer

# Small but complete: 3 views, 3 latent frames of 4x4 (2x2 tokens), 8 actions, 3 states, 3 blocks, M = 2.
CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=8,
    out_channels=8,
    text_dim=16,
    freq_dim=32,
    ffn_dim=96,
    num_layers=3,
    num_views=3,
    action_dim=5,
    state_dim=4,
    num_actions=8,
    num_states=3,
    num_depth_blocks=2,
)
B, V, C, F, H, W, K, S, L = 2, 3, 8, 3, 4, 4, 8, 3, 6


@pytest.fixture(scope="module")
def model() -> XWAMTransformer:
    torch.manual_seed(0)
    return XWAMTransformer(**CONFIG).eval()


def make_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        video=torch.randn(B, V, C, F, H, W, generator=g),
        actions=torch.randn(B, K, CONFIG["action_dim"], generator=g),
        states=torch.randn(B, S, CONFIG["state_dim"], generator=g),
        t_video=torch.tensor([700.0, 400.0]),
        t_action=torch.tensor([300.0, 100.0]),
        text=torch.randn(B, L, CONFIG["text_dim"], generator=g),
    )


def test_output_shapes(model):
    inputs = make_inputs()
    with torch.no_grad():
        out = model(**inputs)
    assert out.video.shape == inputs["video"].shape
    assert out.depth.shape == inputs["video"].shape
    assert out.actions.shape == inputs["actions"].shape
    assert out.states.shape == inputs["states"].shape
    assert all(torch.isfinite(x).all() for x in (out.video, out.depth, out.actions, out.states))


def test_class_declares_fsdp_units_and_checkpointing():
    assert XWAMTransformer._no_split_modules == ["WanTransformerBlock"]
    assert XWAMTransformer._supports_gradient_checkpointing


def test_depth_branch_off_leaves_main_outputs_bit_identical(model):
    inputs = make_inputs()
    with torch.no_grad():
        on = model(**inputs, run_depth=True)
        off = model(**inputs, run_depth=False)
    assert off.depth is None and on.depth is not None
    assert torch.equal(on.video, off.video)
    assert torch.equal(on.actions, off.actions)
    assert torch.equal(on.states, off.states)


def _depth_loss_grads(**overrides):
    torch.manual_seed(0)
    model = XWAMTransformer(**CONFIG, **overrides)
    model.depth_proj_out.weight.data.normal_()  # any head; gradients must flow regardless
    out = model(**make_inputs())
    out.depth.square().mean().backward()
    return model


def _has_grad(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_depth_loss_reaches_shared_blocks_and_main_last_blocks_keys_values():
    model = _depth_loss_grads()  # the release: the main keys/values are not detached
    n = CONFIG["num_layers"]
    # Every main block feeds the depth branch through keys/values: blocks before the last feed later ones'
    # keys/values as well, so all their weights learn; the last main block only through its keys/values
    # (precise statements in tests/test_model_release_maths.py).
    assert all(_has_grad(block) for block in model.wan.blocks[: n - 1])
    last = model.wan.blocks[n - 1]
    assert _has_grad(last.attn1.to_k) and _has_grad(last.attn1.to_v)
    assert not _has_grad(last.attn1.to_q) and not _has_grad(last.ffn) and not _has_grad(last.attn2)
    assert all(_has_grad(block) for block in model.depth_blocks)
    assert _has_grad(model.wan.patch_embedding) and _has_grad(model.depth_proj_out)
    assert not _has_grad(model.wan.proj_out) and not _has_grad(model.action_decoder)


def test_detached_option_keeps_depth_loss_out_of_main_last_blocks():
    model = _depth_loss_grads(depth_main_kv_grad=False)
    n, m = CONFIG["num_layers"], CONFIG["num_depth_blocks"]
    assert all(_has_grad(block) for block in model.wan.blocks[: n - m])  # shared blocks
    assert not any(_has_grad(block) for block in model.wan.blocks[n - m :])  # main branch's last M
    assert all(_has_grad(block) for block in model.depth_blocks)
    assert _has_grad(model.wan.patch_embedding) and _has_grad(model.depth_proj_out)
    assert not _has_grad(model.wan.proj_out) and not _has_grad(model.action_decoder)


def test_per_token_timesteps_are_wired(model, monkeypatch):
    seen = {}
    original = model._embed_timesteps

    def spy(t_video, t_action, timestep_class, dtype, state_embedding=None, video_state_embedding=None):
        # no state_modulation, no video_state_modulation: the paper's model
        assert state_embedding is None and video_state_embedding is None
        temb, proj = original(t_video, t_action, timestep_class, dtype)
        seen["temb"] = temb
        return temb, proj

    monkeypatch.setattr(model, "_embed_timesteps", spy)
    inputs = make_inputs()
    with torch.no_grad():
        base = model(**inputs)
        temb_base = seen["temb"]
        changed = model(**{**inputs, "t_action": torch.tensor([900.0, 50.0])})
        temb_changed = seen["temb"]

    # Changing t_action changes the action and state predictions.
    assert not torch.allclose(base.actions, changed.actions)
    assert not torch.allclose(base.states[:, 1:], changed.states[:, 1:])

    # Token embeddings: frame 0 and state 0 are clean (t = 0), video frames 1.. take t_video,
    # actions and states 1.. take t_action.
    per_frame = V * (H // 2) * (W // 2)
    n_video = F * per_frame
    with torch.no_grad():
        zeros = torch.zeros(B)
        ref = {
            name: original(t, t, torch.ones(1, dtype=torch.long), torch.float32)[0][:, 0]
            for name, t in (("clean", zeros), ("video", inputs["t_video"]), ("action", inputs["t_action"]))
        }
    expected = torch.cat(
        [
            ref["clean"][:, None].expand(B, per_frame, -1),
            ref["video"][:, None].expand(B, n_video - per_frame, -1),
            ref["action"][:, None].expand(B, K, -1),
            ref["clean"][:, None],
            ref["action"][:, None].expand(B, S - 1, -1),
        ],
        dim=1,
    )
    torch.testing.assert_close(temb_base, expected, rtol=0, atol=1e-6)
    clean = torch.zeros(n_video + K + S, dtype=torch.bool)
    clean[:per_frame] = True
    clean[n_video + K] = True
    assert torch.equal(temb_base[:, clean], temb_changed[:, clean])  # the condition does not move
    assert torch.equal(temb_base[:, :n_video], temb_changed[:, :n_video])
    assert not torch.allclose(
        temb_base[:, n_video:][:, ~clean[n_video:]], temb_changed[:, n_video:][:, ~clean[n_video:]]
    )


def test_t_action_does_not_touch_video_only_inputs(model):
    inputs = make_inputs()
    with torch.no_grad():
        a = model(inputs["video"], None, None, inputs["t_video"], inputs["t_action"], inputs["text"])
        b = model(inputs["video"], None, None, inputs["t_video"], torch.tensor([1.0, 999.0]), inputs["text"])
    assert torch.equal(a.video, b.video) and a.actions is None and a.states is None


def test_permuting_views_with_their_embeddings_permutes_outputs():
    torch.manual_seed(0)
    model = XWAMTransformer(**CONFIG).eval()
    model.view_embedding.data.normal_()
    inputs = make_inputs()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(**inputs)
        model.view_embedding.data = model.view_embedding.data[perm]
        permuted = model(**{**inputs, "video": inputs["video"][:, perm]})
    torch.testing.assert_close(permuted.video, out.video[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted.depth, out.depth[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(permuted.actions, out.actions, rtol=1e-5, atol=1e-5)


def test_view_embedding_starts_small_and_matters(model):
    # the release's N(0, 0.02)
    assert torch.count_nonzero(model.view_embedding) == model.view_embedding.numel()
    assert model.view_embedding.abs().max() < 0.2
    assert torch.count_nonzero(XWAMTransformer(**CONFIG, new_parameter_init="pytorch").view_embedding) == 0
    torch.manual_seed(1)
    other = XWAMTransformer(**CONFIG).eval()
    other.load_state_dict(model.state_dict())
    other.view_embedding.data[1] = 1.0
    inputs = make_inputs()
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).video, other(**inputs).video)


def test_step_cache_gives_the_same_result(model):
    inputs = make_inputs()
    cache = model.build_step_cache(inputs["text"], inputs["video"].shape, K, S)
    with torch.no_grad():
        plain = model(**inputs)
        cached = model(**{**inputs, "text": None}, cache=cache)
        for t in (900.0, 10.0):  # the cache is step-invariant
            step = {**inputs, "t_video": torch.full((B,), t), "t_action": torch.full((B,), t / 2)}
            assert torch.equal(model(**step).video, model(**{**step, "text": None}, cache=cache).video)
    for name in ("video", "actions", "states", "depth"):
        assert torch.equal(plain[name], cached[name]), name
    with pytest.raises(XWAMError, match="step cache built for layout"):
        model(**{**inputs, "actions": inputs["actions"][:, :4]}, cache=cache)


def test_step_cache_skips_the_text_work(model):
    inputs = make_inputs()
    cache = model.build_step_cache(inputs["text"], inputs["video"].shape, K, S)
    calls = []
    watched = [model.wan.condition_embedder.text_embedder]
    watched += [block.attn2.to_k for block in [*model.wan.blocks, *model.depth_blocks]]
    watched += [block.attn2.to_v for block in [*model.wan.blocks, *model.depth_blocks]]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in watched]
    try:
        with torch.no_grad():
            model(**{**inputs, "text": None}, cache=cache)
            assert calls == []
            model(**inputs)
            assert len(calls) == len(watched)
    finally:
        for handle in handles:
            handle.remove()


def test_one_prompt_broadcasts_over_the_batch(model):
    inputs = make_inputs()
    text = inputs["text"][:1]
    with torch.no_grad():
        one = model(**{**inputs, "text": text})
        full = model(**{**inputs, "text": text.expand(B, -1, -1)})
        cached = model(
            **{**inputs, "text": None}, cache=model.build_step_cache(text, inputs["video"].shape, K, S)
        )
    torch.testing.assert_close(one.video, full.video)
    assert torch.equal(one.video, cached.video)


def test_action_and_state_rope_positions_follow_the_layout(model):
    # 32 actions and 9 states over 3 latent frames: action i at i/16, state j at j/4 (docs/method.md, 2).
    from xwam_core.models.transformer import _Layout

    rope = model.wan.rope
    positions = torch.arange(5, dtype=torch.float64)
    cos, sin = model.time_rope(positions)
    assert torch.equal(cos[:, : rope.t_dim], rope.freqs_cos[:5, : rope.t_dim])  # Wan's own frequencies
    assert torch.equal(sin[:, : rope.t_dim], rope.freqs_sin[:5, : rope.t_dim])
    assert torch.equal(cos[:, rope.t_dim :], torch.ones_like(cos[:, rope.t_dim :]))  # spatial position 0

    layout = _Layout(1, 3, C, 3, 4, 4, 32, 9, (1, 2, 2))
    cos, _ = model._rope_tables(layout, torch.device("cpu"))
    n_video = layout.num_video_tokens
    want, _ = model.time_rope(torch.cat([torch.arange(32) / 16, torch.arange(9) / 4]).double())
    assert torch.equal(cos[0, n_video:, 0], want)
    assert torch.equal(cos[0, n_video + 16, 0], cos[0, n_video + 32 + 4, 0])  # action 16 and state 4: frame 1
    # Every view gets the same 3-D positions.
    per_view = 2 * 2
    frame1 = cos[0, 3 * per_view : 6 * per_view, 0].view(3, per_view, -1)
    assert torch.equal(frame1[0], frame1[1]) and torch.equal(frame1[0], frame1[2])


def test_video_only_and_empty_chunks(model):
    inputs = make_inputs()
    empty_actions = inputs["actions"][:, :0]
    with torch.no_grad():
        out = model(
            inputs["video"], empty_actions, None, inputs["t_video"], inputs["t_action"], inputs["text"]
        )
    assert out.actions.shape == (B, 0, CONFIG["action_dim"]) and out.states is None
    with torch.no_grad():
        one_view = model(inputs["video"][:, :1], None, None, 500.0, None, inputs["text"], run_depth=False)
    assert one_view.video.shape == (B, 1, C, F, H, W)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = XWAMTransformer(**CONFIG)
    inputs = make_inputs()

    def grads():
        model.zero_grad()
        out = model(**inputs)
        (out.video.square().mean() + out.actions.square().mean() + out.depth.square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    model.disable_gradient_checkpointing()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"video": torch.randn(B, V, C + 1, F, H, W)}, "latent channels"),
        ({"video": torch.randn(B, 4, C, F, H, W)}, "view slots"),
        ({"video": torch.randn(B, V, C, F, H, 5)}, "not divisible by patch"),
        ({"actions": torch.randn(B, K, 7)}, "actions must be"),
        ({"text": torch.randn(B, L, 3)}, "text must be"),
        ({"t_video": torch.zeros(3)}, "t_video must be"),
        ({"t_action": None}, "t_action is required"),
    ],
)
def test_bad_inputs_raise_one_line_errors(model, change, message):
    with pytest.raises(XWAMError, match=message) as err:
        model(**{**make_inputs(), **change})
    assert "\n" not in str(err.value)


def test_bad_config_raises():
    with pytest.raises(XWAMError, match="num_depth_blocks"):
        XWAMTransformer(**{**CONFIG, "num_depth_blocks": 4})
    with pytest.raises(XWAMError, match="depth range"):
        XWAMTransformer(**{**CONFIG, "depth_near": 2.0, "depth_far": 1.0})


@pytest.mark.parametrize("name", ["num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers"])
def test_sizes_below_one_are_one_line(name):
    with pytest.raises(XWAMError, match=rf"{name}=0: expected an integer >= 1"):
        XWAMTransformer(**{**CONFIG, name: 0})
