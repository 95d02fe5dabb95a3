"""The release's maths (github sharinka0715/X-WAM) as XWAMTransformer's defaults, the older behaviour as options.

- action_state_readout: actions and states decoded from the last block's raw hidden state ("last_hidden"),
  or after the final norm like the video ("final_norm");
- depth_main_kv_grad: the depth loss reaches the main branch's last M blocks through the keys/values the depth
  queries attend to (True), or those are detached (False); the main outputs never depend on the depth branch;
- new_parameter_init: N(0, 0.02) weights and zero biases for the new parts ("release"), or a zero view
  embedding and nn.Linear's default ("pytorch");
- a config without these keys (written before them) loads with the older behaviour.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel

from xwam_core.errors import XWAMError
from xwam_core.models.transformer import XWAMTransformer

# 4 blocks, the last M = 2 copied into the depth branch: blocks 0-1 shared, 2-3 the main branch's last M.
CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=8,
    out_channels=8,
    text_dim=16,
    freq_dim=32,
    ffn_dim=64,
    num_layers=4,
    num_views=3,
    action_dim=5,
    state_dim=4,
    num_actions=8,
    num_states=3,
    num_depth_blocks=2,
)
N, M = CONFIG["num_layers"], CONFIG["num_depth_blocks"]
B, V, C, F, H, W, K, S, L = 2, 3, 8, 3, 4, 4, 8, 3, 6
N_VIDEO = F * V * (H // 2) * (W // 2)
NEW_KEYS = ("action_state_readout", "depth_main_kv_grad", "new_parameter_init")
LEGACY = {"action_state_readout": "final_norm", "depth_main_kv_grad": False, "new_parameter_init": "pytorch"}
RELEASE = {"action_state_readout": "last_hidden", "depth_main_kv_grad": True, "new_parameter_init": "release"}


def make_model(**overrides) -> XWAMTransformer:
    torch.manual_seed(0)
    return XWAMTransformer(**{**CONFIG, **overrides}).eval()


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


def settings(model: XWAMTransformer) -> dict:
    return {key: model.config[key] for key in NEW_KEYS}


# ---- readout -------------------------------------------------------------------------------------------


def _perturb_final_norm(model: XWAMTransformer) -> None:
    """New output shift/scale table and an affine output norm (Wan's has no parameters)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.wan.scale_shift_table.add_(torch.randn(model.wan.scale_shift_table.shape, generator=g))
    norm = nn.LayerNorm(model.inner_dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(model.inner_dim, generator=g))
        norm.bias.copy_(torch.randn(model.inner_dim, generator=g))
    model.wan.norm_out = norm


def test_release_readout_decodes_actions_and_states_from_the_last_hidden_state():
    model = make_model()
    assert settings(model) == RELEASE
    inputs = make_inputs()
    seen = {}
    hook = model.wan.blocks[-1].register_forward_hook(lambda m, args, out: seen.update(last=out))
    with torch.no_grad():
        out = model(**inputs, run_depth=False)
        hook.remove()
        last = seen["last"]  # (B, N, D): the last main block's output
        actions = model.action_decoder(last[:, N_VIDEO : N_VIDEO + K])
        states = model.state_decoder(last[:, N_VIDEO + K :])
    assert torch.equal(out.actions, actions)
    assert torch.equal(out.states, states)


@pytest.mark.parametrize("readout", ["last_hidden", "final_norm"])
def test_actions_and_states_depend_on_the_final_norm_only_with_final_norm_readout(readout):
    model = make_model(action_state_readout=readout)
    inputs = make_inputs()
    with torch.no_grad():
        before = model(**inputs)
        _perturb_final_norm(model)
        after = model(**inputs)
    assert not torch.allclose(before.video, after.video)  # the video always passes the final norm
    if readout == "last_hidden":
        assert torch.equal(before.actions, after.actions)
        assert torch.equal(before.states, after.states)
    else:
        assert not torch.allclose(before.actions, after.actions)
        assert not torch.allclose(before.states, after.states)


@pytest.mark.parametrize("readout", ["last_hidden", "final_norm"])
def test_the_timestep_reaches_actions_through_the_head_only_with_final_norm_readout(readout, monkeypatch):
    """The final norm's timestep shift/scale: swap the temb the head sees, keep the blocks' AdaLN as is."""
    model = make_model(action_state_readout=readout)
    inputs = make_inputs()
    with torch.no_grad():
        before = model(**inputs, run_depth=False)
        original = model._final_norm

        def other_temb(hidden, temb, table):
            return original(hidden, temb + 1.0, table)

        monkeypatch.setattr(model, "_final_norm", other_temb)
        after = model(**inputs, run_depth=False)
    assert not torch.allclose(before.video, after.video)
    assert torch.equal(before.actions, after.actions) == (readout == "last_hidden")
    assert torch.equal(before.states, after.states) == (readout == "last_hidden")


def test_velocity_head_gets_the_normed_video_tokens():
    model = make_model()
    inputs = make_inputs()
    seen = {}
    original = model.video_head.forward

    def spy(wan_output, tokens, *args):
        seen["wan_output"], seen["tokens"] = wan_output, tokens
        return original(wan_output, tokens, *args)

    model.video_head.forward = spy  # type: ignore[method-assign]
    hook = model.wan.blocks[-1].register_forward_hook(lambda m, args, out: seen.update(last=out))
    with torch.no_grad():
        out = model(**inputs, run_depth=False)
        hook.remove()
        temb, _ = model._embed_timesteps(
            torch.as_tensor(inputs["t_video"]),
            torch.as_tensor(inputs["t_action"]),
            model._timestep_class(model._layout(inputs["video"], inputs["actions"], inputs["states"]), "cpu"),
            torch.float32,
        )
        normed = model._final_norm(seen["last"][:, :N_VIDEO], temb[:, :N_VIDEO], model.wan.scale_shift_table)
    assert torch.equal(seen["tokens"], normed)
    assert torch.equal(out.video, seen["wan_output"])  # velocity head: Wan's output is the velocity


# ---- depth branch gradients ----------------------------------------------------------------------------


def _depth_grads(**overrides) -> XWAMTransformer:
    model = make_model(**overrides).train()
    with torch.no_grad():
        model.depth_proj_out.weight.normal_()
    model(**make_inputs()).depth.square().mean().backward()
    return model


def _nonzero(p: torch.Tensor) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def _zero(p: torch.Tensor) -> bool:
    return p.grad is None or not bool(p.grad.abs().sum() > 0)


def test_depth_loss_trains_the_main_last_blocks_through_their_keys_values_only():
    model = _depth_grads()
    blocks = model.wan.blocks
    # The depth stream starts from the video hidden state at block N-M: the shared blocks learn everything.
    # Blocks N-M .. N-2 feed the keys/values of the later main blocks, so all their weights learn too.
    for block in blocks[: N - 1]:
        for module in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0]):
            assert _nonzero(module.weight)
        assert _nonzero(block.attn2.to_q.weight) and _nonzero(block.ffn.net[2].weight)
    # The last main block reaches depth only through its keys/values: to_k, to_v, norm_k and the AdaLN
    # shift/scale of norm1 learn; queries, attention output, cross-attention, FFN and gates do not.
    last = blocks[N - 1]
    assert _nonzero(last.attn1.to_k.weight) and _nonzero(last.attn1.to_v.weight)
    assert _nonzero(last.attn1.norm_k.weight)
    assert _nonzero(last.attn1.to_v.bias)
    for name, p in last.named_parameters():
        if not name.startswith(("attn1.to_k.", "attn1.to_v.", "attn1.norm_k.", "scale_shift_table")):
            assert _zero(p), name
    table = last.scale_shift_table.grad  # (1, 6, D): shift, scale, gate of self-attention, then of the FFN
    assert table is not None and table[:, :2].abs().sum() > 0 and table[:, 2:].abs().sum() == 0
    # Nothing of the main outputs' heads learns from the depth loss.
    for module in (model.wan.proj_out, model.action_decoder, model.state_decoder):
        assert all(_zero(p) for p in module.parameters())
    assert _zero(model.wan.scale_shift_table)
    assert all(_nonzero(block.attn1.to_q.weight) for block in model.depth_blocks)


def test_detached_option_stops_the_depth_loss_at_the_main_last_blocks():
    model = _depth_grads(depth_main_kv_grad=False)
    for block in model.wan.blocks[: N - M]:
        assert _nonzero(block.attn1.to_q.weight) and _nonzero(block.attn1.to_k.weight)
        assert _nonzero(block.ffn.net[2].weight)
    for block in model.wan.blocks[N - M :]:
        assert all(_zero(p) for p in block.parameters())
    assert all(_nonzero(block.attn1.to_q.weight) for block in model.depth_blocks)


def test_depth_gradients_are_the_same_with_gradient_checkpointing():
    plain = _depth_grads()
    torch.manual_seed(0)
    checkpointed = make_model().train()
    checkpointed.enable_gradient_checkpointing()
    with torch.no_grad():
        checkpointed.depth_proj_out.weight.normal_()
    checkpointed(**make_inputs()).depth.square().mean().backward()
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        other = grads[name].grad
        if p.grad is None:
            assert other is None or other.abs().sum() == 0, name
        else:
            torch.testing.assert_close(other, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kv_grad", [True, False])
def test_main_outputs_bit_identical_with_depth_on_or_off(kv_grad):
    model = make_model(depth_main_kv_grad=kv_grad)
    inputs = make_inputs()
    for grad in (False, True):  # inference, and a training step's forward
        with torch.set_grad_enabled(grad):
            on = model(**inputs, run_depth=True)
            off = model(**inputs, run_depth=False)
        assert on.depth is not None and off.depth is None
        for name in ("video", "actions", "states"):
            assert torch.equal(on[name], off[name]), (name, grad)


def test_main_losses_gradients_are_unchanged_by_the_depth_branch():
    """The main outputs' losses give the same gradients whether the depth branch ran or not."""
    grads = []
    for run_depth in (True, False):
        model = make_model().train()
        out = model(**make_inputs(), run_depth=run_depth)
        (out.video.square().mean() + out.actions.square().mean() + out.states.square().mean()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if n.startswith("wan.")})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


# ---- initialisation ------------------------------------------------------------------------------------

WIDE = dict(CONFIG, num_attention_heads=4, attention_head_dim=64, num_layers=2, num_depth_blocks=1)


def _mlp_linears(model: XWAMTransformer) -> list[nn.Linear]:
    mlps = (model.action_encoder, model.action_decoder, model.state_encoder, model.state_decoder)
    return [layer for mlp in mlps for layer in mlp if isinstance(layer, nn.Linear)]


def _check_release_init(model: XWAMTransformer) -> None:
    assert model.inner_dim == 256
    assert abs(model.view_embedding.std().item() - 0.02) < 0.003
    assert abs(model.view_embedding.mean().item()) < 0.003
    for layer in [*_mlp_linears(model), model.depth_proj_out]:
        assert abs(layer.weight.std().item() - 0.02) < 0.002, layer
        assert abs(layer.weight.mean().item()) < 0.002, layer
        assert torch.count_nonzero(layer.bias) == 0, layer
    table = model.depth_scale_shift_table  # Wan's own: randn / sqrt(D)
    assert abs(table.std().item() - 256**-0.5) < 0.15 * 256**-0.5


def _check_pytorch_init(model: XWAMTransformer) -> None:
    assert torch.count_nonzero(model.view_embedding) == 0
    for layer in [*_mlp_linears(model), model.depth_proj_out]:
        bound = layer.in_features**-0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        assert abs(layer.weight.std().item() - bound / 3**0.5) < 0.1 * bound
        assert torch.count_nonzero(layer.bias) == layer.bias.numel()


def test_release_initialisation_statistics():
    torch.manual_seed(0)
    _check_release_init(XWAMTransformer(**WIDE))


def test_pytorch_initialisation_is_the_old_one():
    torch.manual_seed(0)
    model = XWAMTransformer(**WIDE, new_parameter_init="pytorch")
    _check_pytorch_init(model)
    # The same draws as before the option existed: nn.Linear's reset_parameters, in module order.
    torch.manual_seed(0)
    again = XWAMTransformer(**WIDE, new_parameter_init="pytorch")
    for name, p in model.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name


@pytest.mark.parametrize("init", ["release", "pytorch"])
def test_from_wan_pretrained_applies_the_same_initialisation(tmp_path, init):
    from xwam_core.models.transformer import WAN_CONFIG_KEYS

    wan_keys = [k for k in WAN_CONFIG_KEYS if k in WIDE]
    torch.manual_seed(0)
    WanTransformer3DModel(**{k: WIDE[k] for k in wan_keys}).save_pretrained(tmp_path / "transformer")
    xwam = {k: v for k, v in WIDE.items() if k not in wan_keys}
    torch.manual_seed(0)
    model, report = XWAMTransformer.from_wan_pretrained(tmp_path, **xwam, new_parameter_init=init)
    assert model.config.new_parameter_init == init
    (_check_release_init if init == "release" else _check_pytorch_init)(model)
    assert "view_embedding" in report.new_parameters


# ---- configs: options, validation, older checkpoints ---------------------------------------------------


def _legacy_config() -> dict:
    """An XWAMTransformer config as a checkpoint written before the three keys existed holds it."""
    config = {k: v for k, v in dict(make_model().config).items() if k not in NEW_KEYS}
    config.pop("_use_default_values", None)
    return {**config, "_class_name": "XWAMTransformer"}


def test_new_models_record_all_three_keys(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: written[k] for k in NEW_KEYS} == RELEASE
    again = XWAMTransformer.from_pretrained(tmp_path / "m")
    assert settings(again) == RELEASE

    options = make_model(**LEGACY)
    options.save_pretrained(tmp_path / "o")
    assert settings(XWAMTransformer.from_pretrained(tmp_path / "o")) == LEGACY


def test_from_config_of_a_live_model_keeps_its_settings():
    """A model built with the defaults holds them in its config (diffusers also lists them as defaulted)."""
    model = make_model()
    assert set(NEW_KEYS) <= set(model.config) and set(NEW_KEYS) <= set(model.config["_use_default_values"])
    assert settings(XWAMTransformer.from_config(model.config)) == RELEASE
    assert settings(XWAMTransformer.from_config(make_model(**LEGACY).config)) == LEGACY


def test_a_config_without_the_keys_loads_with_the_old_behaviour():
    legacy = _legacy_config()
    model = XWAMTransformer.from_config(legacy)
    assert settings(model) == LEGACY
    assert settings(XWAMTransformer.from_config(legacy, action_state_readout="last_hidden")) == {
        **LEGACY,
        "action_state_readout": "last_hidden",
    }
    model, unused = XWAMTransformer.from_config(legacy, return_unused_kwargs=True)
    assert settings(model) == LEGACY and isinstance(unused, dict)


def test_an_old_checkpoint_loads_and_computes_as_before(tmp_path):
    old = make_model(**LEGACY)  # what xwam built before the options existed
    old.save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    written = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({k: v for k, v in written.items() if k not in NEW_KEYS}))

    loaded = XWAMTransformer.from_pretrained(tmp_path / "ckpt").eval()
    assert settings(loaded) == LEGACY
    inputs = make_inputs()
    with torch.no_grad():
        a, b = old(**inputs), loaded(**inputs)
    for name in ("video", "actions", "states", "depth"):
        assert torch.equal(a[name], b[name]), name
    loaded.save_pretrained(tmp_path / "again")  # re-saved: the keys are now written out
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: again[k] for k in NEW_KEYS} == LEGACY


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("action_state_readout", "raw", "'last_hidden' .*or 'final_norm'"),
        ("depth_main_kv_grad", "yes", "true .*or false"),
        ("new_parameter_init", "xavier", "'release' .*or 'pytorch'"),
    ],
)
def test_bad_values_raise_one_line_errors(key, value, expected):
    with pytest.raises(XWAMError, match=f"{key}={value!r}: expected {expected}") as err:
        XWAMTransformer(**CONFIG, **{key: value})
    assert "\n" not in str(err.value)
    with pytest.raises(XWAMError, match=f"{key}={value!r}"):
        XWAMTransformer.from_config({**_legacy_config(), key: value})
