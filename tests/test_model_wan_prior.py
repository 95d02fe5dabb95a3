"""from_wan_pretrained on a tiny Wan2.2-layout transformer saved to disk; save/load round trip."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from xwam_core.errors import XWAMError
from xwam_core.models.transformer import XWAMTransformer

WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=8,
    out_channels=8,
    text_dim=16,
    freq_dim=32,
    ffn_dim=64,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)
XWAM_KWARGS = dict(num_views=3, action_dim=5, state_dim=4, num_actions=8, num_states=3, num_depth_blocks=2)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A diffusers pipeline-style folder with the tiny Wan in transformer/."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("wan")
    WanTransformer3DModel(**WAN_CONFIG).save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="module")
def loaded(wan_dir):
    return XWAMTransformer.from_wan_pretrained(wan_dir, **XWAM_KWARGS)


def test_reproduces_the_prior_on_video_only_input(wan_dir, loaded):
    model, _ = loaded
    wan = WanTransformer3DModel.from_pretrained(wan_dir / "transformer").eval()
    model.eval()
    g = torch.Generator().manual_seed(1)
    video = torch.randn(2, 8, 3, 4, 6, generator=g)  # (B, C, F, h, w)
    text = torch.randn(2, 7, 16, generator=g)
    t = torch.tensor([800.0, 250.0])
    # Wan2.2 TI2V: per-token timestep with the first latent frame clean.
    tokens_per_frame = (4 // 2) * (6 // 2)
    timestep = t[:, None].repeat(1, 3 * tokens_per_frame)
    timestep[:, :tokens_per_frame] = 0
    # The release's init draws the view embedding from N(0, 0.02); at zero the model is Wan exactly.
    view_embedding = model.view_embedding.detach().clone()
    with torch.no_grad():
        model.view_embedding.zero_()
        reference = wan(video, timestep, text).sample
        ours = model(video[:, None], None, None, t, None, text, run_depth=False).video[:, 0]
        model.view_embedding.copy_(view_embedding)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_report_lists_new_and_copied_weights(loaded):
    model, report = loaded
    wan_params = sum(p.numel() for p in model.wan.parameters())
    assert report.loaded_parameters == wan_params
    assert report.copied_blocks == {"depth_blocks.0": "wan.blocks.2", "depth_blocks.1": "wan.blocks.3"}
    assert report.copied_parameters == sum(p.numel() for p in model.depth_blocks.parameters())
    assert set(report.new_parameters) == {
        n for n, _ in model.named_parameters() if not n.startswith(("wan.", "depth_blocks."))
    }
    assert "view_embedding" in report.new_parameters and "depth_proj_out.weight" in report.new_parameters
    total = sum(p.numel() for p in model.parameters())
    assert report.loaded_parameters + report.copied_parameters + report.num_new_parameters == total
    assert "new:" in report.summary()


def test_depth_blocks_are_copies_of_the_last_blocks(loaded):
    model, _ = loaded
    for j, block in enumerate(model.depth_blocks):
        source = model.wan.blocks[2 + j].state_dict()
        copy = block.state_dict()
        assert all(torch.equal(copy[k], source[k]) for k in source)
        assert all(
            a.data_ptr() != b.data_ptr()
            for a, b in zip(block.parameters(), model.wan.blocks[2 + j].parameters(), strict=True)
        )
    assert 0.01 < model.view_embedding.std() < 0.03  # the release's N(0, 0.02)
    assert not any(p.is_meta for p in model.parameters())


def test_accepts_the_transformer_folder_itself(wan_dir):
    model, report = XWAMTransformer.from_wan_pretrained(wan_dir / "transformer", num_depth_blocks=1)
    assert model.config.num_layers == 4 and len(model.depth_blocks) == 1
    assert report.copied_blocks == {"depth_blocks.0": "wan.blocks.3"}


def test_loaded_model_trains_end_to_end(loaded):
    model, _ = loaded
    model.train()
    g = torch.Generator().manual_seed(2)
    out = model(
        torch.randn(1, 3, 8, 3, 4, 4, generator=g),
        torch.randn(1, 8, 5, generator=g),
        torch.randn(1, 3, 4, generator=g),
        torch.tensor([500.0]),
        torch.tensor([200.0]),
        torch.randn(1, 5, 16, generator=g),
    )
    loss = sum(x.square().mean() for x in (out.video, out.actions, out.states, out.depth))
    loss.backward()
    assert model.view_embedding.grad is not None and model.action_encoder[0].weight.grad is not None
    model.zero_grad()


def test_save_and_load_round_trip_bit_exact(loaded, tmp_path):
    model, _ = loaded
    model.eval()
    view_embedding = model.view_embedding.detach().clone()
    with torch.no_grad():
        model.view_embedding.normal_()  # make sure trained-looking weights survive too
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert "config.json" in files and any(f.endswith(".safetensors") for f in files)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["_class_name"] == "XWAMTransformer" and config["num_depth_blocks"] == 2

    again = XWAMTransformer.from_pretrained(tmp_path / "ckpt").eval()
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    g = torch.Generator().manual_seed(3)
    args = (
        torch.randn(1, 3, 8, 3, 4, 4, generator=g),
        torch.randn(1, 8, 5, generator=g),
        torch.randn(1, 3, 4, generator=g),
        torch.tensor([500.0]),
        torch.tensor([200.0]),
        torch.randn(1, 5, 16, generator=g),
    )
    with torch.no_grad():
        a, b = model(*args), again(*args)
    for name in ("video", "actions", "states", "depth"):
        assert torch.equal(a[name], b[name]), name
    with torch.no_grad():
        model.view_embedding.copy_(view_embedding)


def test_bad_sources_raise_one_line_errors(tmp_path, wan_dir):
    with pytest.raises(XWAMError, match="no such checkpoint folder"):
        XWAMTransformer.from_wan_pretrained(tmp_path / "missing")
    with pytest.raises(XWAMError, match=r"no config\.json"):
        XWAMTransformer.from_wan_pretrained(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(XWAMError, match="expected WanTransformer3DModel"):
        XWAMTransformer.from_wan_pretrained(tmp_path / "vae")
    with pytest.raises(XWAMError, match="come from the checkpoint"):
        XWAMTransformer.from_wan_pretrained(wan_dir, num_layers=2)
    with pytest.raises(XWAMError, match="unknown XWAMTransformer setting"):
        XWAMTransformer.from_wan_pretrained(wan_dir, num_view=2)


def test_a_recipe_with_init_keeps_its_xwam_settings(wan_dir):
    """model.init takes the trunk from the checkpoint and every X-WAM setting (readout, plug-ins, layout)
    from the recipe: none is dropped on the way to from_wan_pretrained."""
    from xwam_core.data.windows import WindowLayout
    from xwam_core.factory import Layout, build_model
    from xwam_core.recipe import ModelConfig

    layout = Layout(
        views=["a", "b"],
        image_size=(32, 32),
        window=WindowLayout(4, 2),
        store_action_dim=5,
        store_state_dim=4,
        action_dim=5,
        state_dim=4,
        tasks=["t"],
    )
    cfg = ModelConfig(
        preset="tiny",
        init=str(wan_dir),
        overrides={"action_state_readout": "final_norm", "video_prediction": "gated", "num_depth_blocks": 1},
    )
    model, report = build_model(cfg, layout)
    assert model.config.action_state_readout == "final_norm"
    assert model.config.video_prediction == "gated" and model.config.num_depth_blocks == 1
    assert model.config.num_layers == WAN_CONFIG["num_layers"] and "loaded" in report
