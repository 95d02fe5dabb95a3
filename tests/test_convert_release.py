"""`xwam convert xwam-release`: a tiny experiment in the authors' on-disk form, built here, converted.

The release's form (their Lightning + DeepSpeed training): EXP/config.yaml (their model config with the
data config merged in under `dataset`) and EXP/checkpoints/<name>.ckpt/checkpoint/mp_rank_00_model_states.pt,
a torch pickle holding {"module": {"model.<their names>": tensors, "text_encoder.*", "vae.*"}}.
The converted checkpoint must act exactly like an XWAMTransformer given the same tensors by hand.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.umt5_fixtures import make_umt5_dir
from xwam_core.errors import XWAMError

# the tiny release model: width 32 (2 heads x 16), 3 blocks, the last 1 copied for depth, 3 views
DIM, HEADS, FFN, LAYERS, EXTRA, VIEWS = 32, 2, 64, 3, 1, 3
FREQ, TEXT_DIM, TEXT_LEN = 16, 16, 8
SPATIAL, TEMPORAL = 2, 2  # the pixel codec the test model pairs with: 3 * 2 * 2^2 = 24 latent channels
IN_CH = 3 * TEMPORAL * SPATIAL**2
PATCH = (1, 2, 2)
ACTION_DIM, PROPRIO_DIM = 14, 16
FRAME_NUM, FRAME_SKIP = 3, 2  # 2 future frames, 2 actions per frame -> 4 actions, 3 states
SIZE = [16, 16]
PROMPTS = ["pick up the cube", "open the drawer"]
STATISTICS = {
    "q01": {
        "proprio_left_ee_xyz": [-0.3, -0.05, 0.8],
        "proprio_right_ee_xyz": [-0.3, -0.35, 0.8],
        "action_left_ee_xyz": [-0.02, -0.015, -0.013],
        "action_left_ee_axisangle": [-0.04, -0.09, -0.06],
        "action_right_ee_xyz": [-0.018, -0.015, -0.012],
        "action_right_ee_axisangle": [-0.044, -0.086, -0.05],
        "gripper_pos": [0.0],
        "gripper_action": [-0.075],
    },
    "q99": {
        "proprio_left_ee_xyz": [0.09, 0.36, 1.09],
        "proprio_right_ee_xyz": [0.08, 0.05, 1.1],
        "action_left_ee_xyz": [0.02, 0.015, 0.013],
        "action_left_ee_axisangle": [0.04, 0.09, 0.06],
        "action_right_ee_xyz": [0.018, 0.015, 0.012],
        "action_right_ee_axisangle": [0.044, 0.086, 0.05],
        "gripper_pos": [1.0],
        "gripper_action": [0.075],
    },
}


class NotATensor:
    """A custom class in the pickle: torch's restricted loader refuses to build it."""

    def __init__(self) -> None:
        self.note = "lightning hyper-parameters"


# ------------------------------------------------------------------------------------ the release's form
def release_block(prefix: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One of the release's WanAttentionBlock's tensors, in their names and shapes."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    out = {f"{prefix}.modulation": randn(1, 6, DIM)}
    for attn in ("self_attn", "cross_attn"):
        for proj in "qkvo":
            out[f"{prefix}.{attn}.{proj}.weight"] = randn(DIM, DIM)
            out[f"{prefix}.{attn}.{proj}.bias"] = randn(DIM)
        out[f"{prefix}.{attn}.norm_q.weight"] = 1 + randn(DIM)
        out[f"{prefix}.{attn}.norm_k.weight"] = 1 + randn(DIM)
    out[f"{prefix}.norm3.weight"] = 1 + randn(DIM)
    out[f"{prefix}.norm3.bias"] = randn(DIM)
    out[f"{prefix}.ffn.0.weight"], out[f"{prefix}.ffn.0.bias"] = randn(FFN, DIM), randn(FFN)
    out[f"{prefix}.ffn.2.weight"], out[f"{prefix}.ffn.2.bias"] = randn(DIM, FFN), randn(DIM)
    return out


def release_tensors(seed: int = 0, layers: int = LAYERS, extra: int = EXTRA) -> dict[str, torch.Tensor]:
    """Every tensor of the release's XWAMModel at the tiny size (names without their "model." prefix)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    out_per_token = IN_CH * math.prod(PATCH)
    t = {
        "patch_embedding.weight": randn(DIM, IN_CH, *PATCH),
        "patch_embedding.bias": randn(DIM),
        "text_embedding.0.weight": randn(DIM, TEXT_DIM),
        "text_embedding.0.bias": randn(DIM),
        "text_embedding.2.weight": randn(DIM, DIM),
        "text_embedding.2.bias": randn(DIM),
        "view_embedding.weight": randn(VIEWS, DIM),
        "time_embedding.0.weight": randn(DIM, FREQ),
        "time_embedding.0.bias": randn(DIM),
        "time_embedding.2.weight": randn(DIM, DIM),
        "time_embedding.2.bias": randn(DIM),
        "time_projection.1.weight": randn(6 * DIM, DIM),
        "time_projection.1.bias": randn(6 * DIM),
        "head.head.weight": randn(out_per_token, DIM),
        "head.head.bias": randn(out_per_token),
        "head.modulation": randn(1, 2, DIM),
    }
    for name, (i, o) in {
        "action_encoder": (ACTION_DIM, DIM),
        "action_decoder": (DIM, ACTION_DIM),
        "proprio_encoder": (PROPRIO_DIM, DIM),
        "proprio_decoder": (DIM, PROPRIO_DIM),
    }.items():
        t[f"{name}.0.weight"], t[f"{name}.0.bias"] = randn(DIM if "decoder" in name else o, i), randn(DIM)
        t[f"{name}.2.weight"], t[f"{name}.2.bias"] = randn(o, DIM), randn(o)
    for i in range(layers):
        t.update(release_block(f"blocks.{i}", g))
    for j in range(extra):
        t.update(release_block(f"extra_blocks.0.{j}", g))
    if extra:
        t["extra_heads.0.head.weight"] = randn(out_per_token, DIM)
        t["extra_heads.0.head.bias"] = randn(out_per_token)
        t["extra_heads.0.modulation"] = randn(1, 2, DIM)
    return t


def release_config(**changes) -> dict:
    config = {
        "text_len": TEXT_LEN,
        "num_extra_layers": EXTRA,
        "action_dim": ACTION_DIM,
        "proprio_dim": PROPRIO_DIM,
        "frame_num": FRAME_NUM,
        "sample_steps": 50,
        "action_denoise_steps": 10,
        "use_decoupled_inference": True,
        "time_shifting": 5.0,
        "use_depth": True,
        "seed": 42,
        "lr": 1e-5,
        "dataset": {
            "dataset_path": "./sft_datasets/RoboTwin/",
            "sequence_length": FRAME_NUM,
            "frame_skip": FRAME_SKIP,
            "action_skip": 1,
            "video_size": SIZE,
            "inverse_gripper": False,
            "statistics": STATISTICS,
        },
    }
    config.update(changes)
    return config


def make_experiment(
    root: Path,
    tensors: dict[str, torch.Tensor] | None = None,
    config: dict | None = None,
    name: str = "last",
    extra: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """EXP/config.yaml and EXP/checkpoints/<name>.ckpt/checkpoint/mp_rank_00_model_states.pt."""
    exp = root / "exp"
    tensors = release_tensors() if tensors is None else tensors
    module = {f"model.{k}": v.to(dtype) for k, v in tensors.items()}
    module["text_encoder.model.token_embedding.weight"] = torch.zeros(4, 4)  # frozen encoders: not converted
    module["vae.model.encoder.conv1.weight"] = torch.zeros(2, 2)
    folder = exp / "checkpoints" / f"{name}.ckpt" / "checkpoint"
    folder.mkdir(parents=True)
    payload = {"module": module, "global_steps": 20000, "dp_world_size": 8, **(extra or {})}
    torch.save(payload, folder / "mp_rank_00_model_states.pt")
    (exp / "config.yaml").write_text(yaml.safe_dump(release_config() if config is None else config))
    return exp


def wan_original(root: Path) -> Path:
    """A Wan2.2 folder in Wan's own layout (config.json with dim, num_heads, ...)."""
    wan = root / "wan"
    wan.mkdir(exist_ok=True)
    config = {
        "_class_name": "WanModel",
        "dim": DIM,
        "ffn_dim": FFN,
        "freq_dim": FREQ,
        "num_heads": HEADS,
        "num_layers": LAYERS,
        "in_dim": IN_CH,
        "out_dim": IN_CH,
        "eps": 1e-6,
        "text_len": TEXT_LEN,
        "model_type": "ti2v",
    }
    (wan / "config.json").write_text(json.dumps(config))
    return wan


def wan_diffusers(root: Path) -> Path:
    """A diffusers Wan pipeline folder: transformer/config.json (WanTransformer3DModel's keys)."""
    wan = root / "wan_diffusers"
    (wan / "transformer").mkdir(parents=True)
    config = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": list(PATCH),
        "num_attention_heads": HEADS,
        "attention_head_dim": DIM // HEADS,
        "in_channels": IN_CH,
        "out_channels": IN_CH,
        "text_dim": TEXT_DIM,
        "freq_dim": FREQ,
        "ffn_dim": FFN,
        "num_layers": LAYERS,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
    }
    (wan / "transformer" / "config.json").write_text(json.dumps(config))
    return wan


@pytest.fixture(scope="module")
def umt5(tmp_path_factory):
    return make_umt5_dir(tmp_path_factory.mktemp("umt5"), d_model=TEXT_DIM)


def convert(exp: Path, out: Path, wan: Path, umt5: Path, **kwargs):
    from xwam_core.convert_release import convert_xwam_release

    prompts = exp.parent / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    options = {"prompts": prompts, "text_encoder": str(umt5), "codec": f"pixel:{SPATIAL}:{TEMPORAL}"}
    return convert_xwam_release(exp, out, wan=wan, **{**options, **kwargs})


# ------------------------------------------------------------------------------------ the reference
def placed_by_hand(model, t: dict[str, torch.Tensor]) -> None:
    """Give an XWAMTransformer the release's tensors module by module (independent of the converter's map);
    asserts that every parameter was given one."""
    given: set[int] = set()

    def put(param: torch.nn.Parameter, key: str) -> None:
        assert param.shape == t[key].shape, key
        param.data.copy_(t[key])
        given.add(id(param))

    def linear(module, key: str) -> None:
        put(module.weight, f"{key}.weight")
        put(module.bias, f"{key}.bias")

    def block(b, key: str) -> None:
        put(b.scale_shift_table, f"{key}.modulation")
        for attn, theirs in ((b.attn1, "self_attn"), (b.attn2, "cross_attn")):
            linear(attn.to_q, f"{key}.{theirs}.q")
            linear(attn.to_k, f"{key}.{theirs}.k")
            linear(attn.to_v, f"{key}.{theirs}.v")
            linear(attn.to_out[0], f"{key}.{theirs}.o")
            put(attn.norm_q.weight, f"{key}.{theirs}.norm_q.weight")
            put(attn.norm_k.weight, f"{key}.{theirs}.norm_k.weight")
        linear(b.norm2, f"{key}.norm3")
        linear(b.ffn.net[0].proj, f"{key}.ffn.0")
        linear(b.ffn.net[2], f"{key}.ffn.2")

    wan = model.wan
    linear(wan.patch_embedding, "patch_embedding")
    linear(wan.condition_embedder.text_embedder.linear_1, "text_embedding.0")
    linear(wan.condition_embedder.text_embedder.linear_2, "text_embedding.2")
    linear(wan.condition_embedder.time_embedder.linear_1, "time_embedding.0")
    linear(wan.condition_embedder.time_embedder.linear_2, "time_embedding.2")
    linear(wan.condition_embedder.time_proj, "time_projection.1")
    for i, b in enumerate(wan.blocks):
        block(b, f"blocks.{i}")
    for j, b in enumerate(model.depth_blocks):
        block(b, f"extra_blocks.0.{j}")
    linear(wan.proj_out, "head.head")
    put(wan.scale_shift_table, "head.modulation")
    linear(model.depth_proj_out, "extra_heads.0.head")
    put(model.depth_scale_shift_table, "extra_heads.0.modulation")
    put(model.view_embedding, "view_embedding.weight")
    for ours, theirs in (
        (model.action_encoder, "action_encoder"),
        (model.action_decoder, "action_decoder"),
        (model.state_encoder, "proprio_encoder"),
        (model.state_decoder, "proprio_decoder"),
    ):
        linear(ours[0], f"{theirs}.0")
        linear(ours[2], f"{theirs}.2")
    missing = [n for n, p in model.named_parameters() if id(p) not in given]
    assert not missing, missing


def observation(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "images": {f"view_{i}": rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for i in range(VIEWS)},
        "state": np.concatenate([[0.0, 0.1, 0.9, 1, 0, 0, 0, 0.5], [0.0, -0.1, 0.95, 1, 0, 0, 0, 0.2]]),
        "task": PROMPTS[1],
    }


# ------------------------------------------------------------------------------------ the tests
def test_a_release_checkpoint_converts_and_acts_exactly_like_the_same_tensors_placed_by_hand(tmp_path, umt5):
    from xwam_core.checkpoint import PolicyParts, load_policy_parts
    from xwam_core.models.transformer import XWAMTransformer
    from xwam_core.policy import Policy

    tensors = release_tensors()
    exp = make_experiment(tmp_path, tensors)
    result = convert(exp, tmp_path / "ckpt", wan_original(tmp_path), umt5)
    assert result.tensors == len(tensors) == (LAYERS + EXTRA) * 27 + 35  # 27 per block, 35 outside: 143
    assert result.skipped == 2 and result.dtype == "float32" and result.gripper == "plain"
    assert result.views == ["view_0", "view_1", "view_2"]

    parts = load_policy_parts(tmp_path / "ckpt")
    cfg = parts.model.config
    assert (cfg.num_layers, cfg.num_depth_blocks, cfg.num_views) == (LAYERS, EXTRA, VIEWS)
    assert (cfg.num_actions, cfg.num_states, cfg.action_dim, cfg.state_dim) == (4, 3, ACTION_DIM, PROPRIO_DIM)
    assert parts.step == 20000
    assert parts.text.padding == "kept" and parts.text.seq_len == TEXT_LEN and parts.data.tasks == PROMPTS
    assert parts.data.window.future_frames == 2 and parts.data.window.frame_stride == FRAME_SKIP
    assert parts.data.image_size == (16, 16) and parts.data.fps is None
    assert parts.codec == {"kind": "pixel", "spatial_factor": SPATIAL, "temporal_factor": TEMPORAL}
    inference = parts.inference
    assert (inference.schedule, inference.num_steps_video, inference.num_steps_action) == ("async", 50, 10)
    assert (inference.shift, inference.guidance_scale) == (5.0, 1.0)
    assert "xwam-release" in parts.recipe_toml and "frame_skip" in parts.recipe_toml

    # the reference: the same model settings, the tensors placed by hand
    reference = XWAMTransformer.from_config(parts.model.config)
    with torch.no_grad():
        placed_by_hand(reference, tensors)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(parts.model.state_dict()[name], tensor), name

    # one forward step, every output
    g = torch.Generator().manual_seed(1)
    video = torch.randn(1, VIEWS, IN_CH, 2, 8, 8, generator=g)
    actions, states = torch.randn(1, 4, ACTION_DIM, generator=g), torch.randn(1, 3, PROPRIO_DIM, generator=g)
    text = parts.text(torch.tensor([1]))
    args = (video, actions, states, torch.tensor([700.0]), torch.tensor([400.0]), text)
    with torch.no_grad():
        ours, theirs = parts.model.eval()(*args), reference.eval()(*args)
    for field in ("video", "actions", "states", "depth"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=0, atol=1e-5)

    # the Policy in policy and world mode, from the folder, against one built on the reference
    fast = {"num_steps_video": 3, "num_steps_action": 2}
    policy = Policy.from_checkpoint(tmp_path / "ckpt", **fast)
    hand = PolicyParts(
        model=reference,
        text=parts.text,
        codec=parts.codec,
        normalizer=parts.normalizer,
        data=parts.data,
        inference=replace(parts.inference, **fast),
    )
    by_hand = Policy(hand)
    obs = observation()
    for mode in ("policy", "world"):
        a = policy.predict(obs, mode=mode, generator=torch.Generator().manual_seed(3))
        b = by_hand.predict(obs, mode=mode, generator=torch.Generator().manual_seed(3))
        assert a.actions.shape == (1, 4, ACTION_DIM) and a.states.shape == (1, 3, PROPRIO_DIM)
        np.testing.assert_allclose(a.actions, b.actions, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.states, b.states, rtol=0, atol=1e-5)
        if mode == "world":
            assert a.rgb is not None and a.depth is not None and b.rgb is not None and b.depth is not None
            assert a.rgb.shape == (1, VIEWS, FRAME_NUM, *SIZE, 3)
            assert np.abs(a.rgb.astype(int) - b.rgb.astype(int)).max() <= 1  # uint8 rounding
            np.testing.assert_allclose(a.depth, b.depth, rtol=1e-5, atol=1e-5)


def test_a_diffusers_wan_folder_gives_the_same_model_and_the_release_settings_are_set(tmp_path, umt5):
    from xwam_core.checkpoint import load_policy_parts
    from xwam_core.convert_release import RELEASE_MODEL_SETTINGS
    from xwam_core.models.codecs import DepthRange

    exp = make_experiment(tmp_path)
    convert(exp, tmp_path / "a", wan_original(tmp_path), umt5)
    convert(exp, tmp_path / "b", wan_diffusers(tmp_path), umt5)
    a, b = load_policy_parts(tmp_path / "a"), load_policy_parts(tmp_path / "b")
    settings = [{k: v for k, v in dict(p.model.config).items() if not k.startswith("_")} for p in (a, b)]
    assert settings[0] == settings[1]
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[name], tensor), name
    for key, value in RELEASE_MODEL_SETTINGS.items():  # set explicitly, whatever xwam's defaults are
        assert a.model.config[key] == value
    assert a.model.depth_range == DepthRange(0.001, 0.256, "linear")  # the release's depth images


def test_bf16_is_kept_and_dtype_casts(tmp_path, umt5):
    from safetensors import safe_open

    exp = make_experiment(tmp_path, dtype=torch.bfloat16)
    wan = wan_original(tmp_path)
    assert convert(exp, tmp_path / "bf16", wan, umt5).dtype == "bfloat16"
    assert convert(exp, tmp_path / "fp32", wan, umt5, dtype="float32").dtype == "float32"
    for folder, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with safe_open(str(tmp_path / folder / "model" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}  # noqa: SIM118


def test_the_release_normalisation(tmp_path, umt5):
    """State: xyz quantiles, quaternion identity, gripper_pos; action: xyz, axis-angle, gripper_action. A
    one-arm experiment (RoboCasa) fills the left slots and flips the raw gripper, as the release serves it."""
    from xwam_core.checkpoint import load_policy_parts

    exp = make_experiment(tmp_path)
    convert(exp, tmp_path / "two", wan_original(tmp_path), umt5)
    n = load_policy_parts(tmp_path / "two").normalizer
    assert n.state_names[:8] == [
        "left_ee_x", "left_ee_y", "left_ee_z", "left_ee_qw", "left_ee_qx", "left_ee_qy", "left_ee_qz", "left_gripper"
    ]  # fmt: skip
    assert n.action_names[7:] == [
        "right_dx",
        "right_dy",
        "right_dz",
        "right_drx",
        "right_dry",
        "right_drz",
        "right_gripper",
    ]
    state = np.array([0.05, 0.2, 0.9, 0.6, -0.8, 0.0, 0.0, 0.25, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    q01, q99 = STATISTICS["q01"], STATISTICS["q99"]
    expect = (
        2
        * (state[:3] - np.array(q01["proprio_left_ee_xyz"]))
        / (np.array(q99["proprio_left_ee_xyz"]) - np.array(q01["proprio_left_ee_xyz"]))
        - 1
    )
    out = n.state.normalize(state)
    np.testing.assert_allclose(out[:3], expect, rtol=1e-5)
    np.testing.assert_allclose(out[3:7], state[3:7], rtol=1e-6)  # the quaternion passes unchanged
    np.testing.assert_allclose(out[7], -0.5, rtol=1e-6)  # gripper_pos in [0, 1]
    action = np.zeros(14, np.float32)
    action[6] = 0.075
    assert n.action.normalize(action)[6] == pytest.approx(1.0)

    one_arm = {k: {n: v for n, v in s.items() if "right" not in n} for k, s in STATISTICS.items()}
    config = release_config()
    config["dataset"] = {
        **config["dataset"],
        "statistics": one_arm,
        "dataset_path": "./sft_datasets/RoboCasa/",
    }
    exp1 = make_experiment(tmp_path / "robocasa", config=config)
    assert convert(exp1, tmp_path / "one", wan_original(tmp_path / "robocasa"), umt5).gripper == "flipped"
    n1 = load_policy_parts(tmp_path / "one").normalizer
    assert n1.action_dim == 7 and n1.state_dim == 8 and n1.action_names[-1] == "left_gripper"
    # training fed the model -raw gripper (not normalised): the prediction y means the raw action -y
    y = np.array([0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.8], np.float32)
    assert n1.action.denormalize(y)[6] == pytest.approx(-0.8)
    assert n1.action.normalize(n1.action.denormalize(y))[6] == pytest.approx(0.8)
    assert (
        convert(exp1, tmp_path / "plain", wan_original(tmp_path / "robocasa"), umt5, gripper="plain").gripper
        == "plain"
    )
    n2 = load_policy_parts(tmp_path / "plain").normalizer
    assert n2.action.denormalize(y)[6] == pytest.approx((0.8 + 1) / 2 * 0.15 - 0.075)


def test_reversed_quantile_bounds_flip_the_sign():
    from xwam_core.normalizer import QuantileNormalizer

    forward = QuantileNormalizer(np.array([-2.0, 0.0, 3.0]), np.array([2.0, 1.0, 3.0]))
    flipped = QuantileNormalizer(np.array([2.0, 1.0, 3.0]), np.array([-2.0, 0.0, 3.0]))
    x = np.array([[0.5, 0.25, 3.0], [-1.0, 0.9, 3.0]], np.float32)
    np.testing.assert_allclose(flipped.normalize(x), -forward.normalize(x), atol=1e-6)
    np.testing.assert_allclose(flipped.denormalize(flipped.normalize(x)), x, atol=1e-6)
    y = torch.tensor([[0.3, -0.7, 0.2]])
    torch.testing.assert_close(flipped.denormalize(y), torch.from_numpy(flipped.denormalize(y.numpy())))
    assert flipped.constant.tolist() == [False, False, True]  # only a tiny |q99 - q01| is constant
    assert flipped.normalize(x)[:, 2].tolist() == [0.0, 0.0]
    raw = QuantileNormalizer(np.array([1.0]), np.array([-1.0]))  # the raw gripper: y = -x
    np.testing.assert_allclose(raw.normalize(np.array([0.4], np.float32)), [-0.4], atol=1e-7)


# ------------------------------------------------------------------------------------ bad inputs
def nothing_written(tmp_path: Path, out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, umt5):
    exp = make_experiment(tmp_path)
    wan = wan_original(tmp_path)
    out = tmp_path / "out"

    def fails(match: str, experiment: Path = exp, wan_dir: Path = wan, **kwargs) -> None:
        with pytest.raises(XWAMError, match=match) as info:
            convert(experiment, out, wan_dir, umt5, **kwargs)
        assert "\n" not in str(info.value)
        assert nothing_written(tmp_path, out)

    fails(r"--dtype 'float64': expected one of float32, bfloat16, float16", dtype="float64")
    fails(
        r"checkpoints/nope\.ckpt/checkpoint/mp_rank_00_model_states\.pt: not found; checkpoints in .*: last\.ckpt",
        name="nope",
    )
    fails(r"--gripper 'open'", gripper="open")
    fails(r"--views a,b: expected 3 distinct names", views=["a", "b"])
    fails(r"--codec pixel:4:2: latent channels 96, but the model takes 24", codec="pixel:4:2")
    fails(r"--wan .*: no Wan2.2 config", wan_dir=tmp_path)

    (exp / "config.yaml").rename(exp / "config.yml")
    fails(r"exp: lacks config\.yaml")
    (exp / "config.yml").rename(exp / "config.yaml")

    # an unmatched key: a tensor the key map has no place for
    odd = release_tensors()
    odd["blocks.0.self_attn.extra.weight"] = torch.zeros(DIM, DIM)
    fails(
        r"'model\.blocks\.0\.self_attn\.extra\.weight' has no place in xwam's model",
        make_experiment(tmp_path / "odd", odd),
    )
    # a model tensor nothing fills
    short = release_tensors()
    del short["blocks.1.cross_attn.norm_k.weight"]
    fails(
        r"nothing fills xwam's 'wan\.blocks\.1\.attn2\.norm_k\.weight'",
        make_experiment(tmp_path / "short", short),
    )
    # a config that disagrees with the weights
    fails(r"config\.yaml: action_dim 7, but the checkpoint's weights have 14",
          make_experiment(tmp_path / "dims", config=release_config(action_dim=7)))  # fmt: skip
    # no checkpoint at all
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text(yaml.safe_dump(release_config()))
    fails(r"checkpoints: no <name>\.ckpt checkpoint found", empty)


def test_a_pickle_the_safe_loader_refuses_needs_the_flag_that_names_the_risk(tmp_path, umt5):
    exp = make_experiment(tmp_path, extra={"hyper_parameters": NotATensor()})
    wan = wan_original(tmp_path)
    with pytest.raises(XWAMError) as info:
        convert(exp, tmp_path / "out", wan, umt5)
    message = str(info.value)
    assert "\n" not in message and "mp_rank_00_model_states.pt" in message
    assert "--allow-unsafe-pickle (unpickling it runs code from the file)" in message
    assert "NotATensor" in message
    assert nothing_written(tmp_path, tmp_path / "out")
    assert convert(exp, tmp_path / "out", wan, umt5, allow_unsafe_pickle=True).tensors == len(
        release_tensors()
    )


def test_the_newest_checkpoint_is_chosen_without_last_and_a_name_picks_one(tmp_path, umt5):
    from xwam_core.convert_release import _checkpoint_file

    exp = make_experiment(tmp_path, name="epoch=0-step=5000")
    for step in (10000, 500):
        folder = exp / "checkpoints" / f"epoch=0-step={step}.ckpt" / "checkpoint"
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert _checkpoint_file(exp, None).parts[-3] == "epoch=0-step=10000.ckpt"
    assert _checkpoint_file(exp, "epoch=0-step=5000").parts[-3] == "epoch=0-step=5000.ckpt"
    with pytest.raises(XWAMError, match=r"not a readable torch checkpoint"):
        convert(exp, tmp_path / "out", wan_original(tmp_path), umt5)


def test_the_cli_converts_and_its_help_lists_xwam_release(tmp_path, umt5):
    from typer.testing import CliRunner

    from xwam_cli.main import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["convert", "--help"]).output
    assert "xwam-release" in help_text and "--allow-unsafe-pickle" in help_text

    exp = make_experiment(tmp_path)
    wan = wan_original(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS))
    args = ["convert", "xwam-release", str(exp), "--wan", str(wan), "--prompts", str(tmp_path / "prompts.txt"),
            "--text-encoder", str(umt5), "--codec", "pixel:2:2", "--views", "a,b,c", "--out", str(tmp_path / "ckpt")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "converted 143 tensors (2 text-encoder/VAE tensors skipped), float32" in result.output
    assert json.loads((tmp_path / "ckpt" / "data_spec.json").read_text())["views"] == ["a", "b", "c"]
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "exists; pass --overwrite" in again.output
    bad = runner.invoke(app, ["convert", "xwam-release", str(exp), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "needs --wan" in bad.output
    v0 = runner.invoke(app, ["convert", "xwam-v0", str(exp), "--wan", str(wan), "--out", str(tmp_path / "x")])
    assert v0.exit_code != 0 and "--wan is for xwam-release only" in v0.output
