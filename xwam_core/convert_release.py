"""The X-WAM authors' released checkpoints -> an xwam checkpoint folder (xwam_core.checkpoint, format 1).

    xwam convert xwam-release EXP_DIR --wan WAN_DIR --prompts PROMPTS.txt --out CKPT

EXP_DIR is one of the release's experiment folders (Lightning + DeepSpeed):
    EXP_DIR/config.yaml                                            the training config (data config merged in)
    EXP_DIR/checkpoints/<name>.ckpt/checkpoint/mp_rank_00_model_states.pt   a pickle; weights under "module"
WAN_DIR is the Wan2.2 checkpoint the release was trained from: its config.json (Wan's own layout: dim,
num_heads, ...) or a diffusers folder (transformer/config.json) gives the attention heads, which the weights
cannot; every other size is read from the weights and checked against both configs.

The transformer's tensors ("model." keys; "text_encoder." and "vae." are the frozen encoders and are not
read) are renamed one-to-one onto XWAMTransformer (RELEASE_KEY_MAP), never reshaped; a key that maps to
nothing, or a model tensor left unfilled, stops the conversion naming it. Nothing is written on failure.

The source is a pickle: it is read with torch's restricted loader (weights_only), and a file that loader
refuses is read only when the caller passes allow_unsafe_pickle (unpickling can run code from the file).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xwam_core.errors import XWAMError, first_line

SOURCE = "xwam-release"
MODEL_STATES = "mp_rank_00_model_states.pt"
DTYPES = ("float32", "bfloat16", "float16")
GRIPPER_MODES = ("auto", "plain", "flipped")
DEFAULT_ACTIONS_PER_FRAME = 4  # frame_skip // action_skip of every released config
NUM_VIEWS = 3  # the release always trains on three views, sorted by name
# what the release's model does that xwam offers as settings; its depth images are its 8-bit depth
# values read as v / 127.5 - 1: the linear encoding over [0.001, 0.256] m of an `xwam prepare xwam-release`
# store (v kept as v + 1 mm), so world-mode depth comes back on that store's scale
RELEASE_MODEL_SETTINGS = {
    "action_state_readout": "last_hidden",
    "depth_main_kv_grad": True,
    "new_parameter_init": "release",
    "depth_encoding": "linear",
    "depth_near": 0.001,
    "depth_far": 0.256,
}

# ------------------------------------------------------------------------------------ the key map
# release name (after the "model." prefix) -> XWAMTransformer state-dict name; regexes matched whole.
_BLOCK_INNER = [
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("norm3", "norm2"),  # the cross-attention LayerNorm (affine)
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
]
_TOP_MODULES = [
    ("patch_embedding", "wan.patch_embedding"),
    ("text_embedding.0", "wan.condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "wan.condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "wan.condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "wan.condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "wan.condition_embedder.time_proj"),
    ("head.head", "wan.proj_out"),
    ("extra_heads.0.head", "depth_proj_out"),
    ("action_encoder.0", "action_encoder.0"),
    ("action_encoder.2", "action_encoder.2"),
    ("action_decoder.0", "action_decoder.0"),
    ("action_decoder.2", "action_decoder.2"),
    ("proprio_encoder.0", "state_encoder.0"),
    ("proprio_encoder.2", "state_encoder.2"),
    ("proprio_decoder.0", "state_decoder.0"),
    ("proprio_decoder.2", "state_decoder.2"),
]
_TOP_TENSORS = [
    ("view_embedding.weight", "view_embedding"),  # (V, D)
    ("head.modulation", "wan.scale_shift_table"),  # (1, 2, D)
    ("extra_heads.0.modulation", "depth_scale_shift_table"),  # (1, 2, D)
]


def _key_map() -> list[tuple[re.Pattern[str], str]]:
    rules: list[tuple[str, str]] = []
    for release, xwam in _TOP_MODULES:
        rules.append((re.escape(release) + r"\.(weight|bias)", xwam + r".\1"))
    for release, xwam in _TOP_TENSORS:
        rules.append((re.escape(release), xwam))
    for release_block, xwam_block in (
        (r"blocks\.(\d+)\.", r"wan.blocks.\1."),
        (r"extra_blocks\.0\.(\d+)\.", r"depth_blocks.\1."),
    ):
        rules.append((release_block + "modulation", xwam_block + "scale_shift_table"))  # (1, 6, D)
        for release, xwam in _BLOCK_INNER:
            rules.append(
                (release_block + re.escape(release) + r"\.(weight|bias)", xwam_block + xwam + r".\2")
            )
    return [(re.compile(pattern), template) for pattern, template in rules]


RELEASE_KEY_MAP = _key_map()


def xwam_name(release_key: str) -> str | None:
    """The XWAMTransformer name of a release transformer tensor (without "model."), or None."""
    for pattern, template in RELEASE_KEY_MAP:
        match = pattern.fullmatch(release_key)
        if match:
            return match.expand(template)
    return None


# ------------------------------------------------------------------------------------ the result
@dataclass
class ReleaseConversion:
    """What a conversion did, for the summary line."""

    path: Path
    source: Path
    tensors: int
    skipped: int  # text_encoder.* and vae.* tensors, not part of the transformer
    dtype: str
    gripper: str
    views: list[str]
    tasks: int
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ converting
def convert_xwam_release(
    exp_dir: str | Path,
    out: str | Path,
    *,
    wan: str | Path,
    prompts: str | Path | None = None,
    prompts_from: str | Path | None = None,
    name: str | None = None,
    views: list[str] | None = None,
    text_encoder: str | None = None,
    vae: str | None = None,
    codec: str = "wan-vae",
    dtype: str | None = None,
    gripper: str = "auto",
    guidance_scale: float = 1.0,
    allow_unsafe_pickle: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> ReleaseConversion:
    """Read a release experiment folder and write an xwam checkpoint folder at `out` (see module docstring).

    prompts: a text file, one task prompt per line; or prompts_from: an xwam store whose task list to use.
    views: the model's view names in its order (the release's views sorted by name); default view_0..2.
    text_encoder: UMT5 (a diffusers Wan folder with tokenizer/ and text_encoder/, or a hub id); default
    WAN_DIR when it has them, else the Wan2.2 hub id. vae / codec: the codec the checkpoint names
    ("wan-vae": the Wan2.2 VAE at `vae`, default WAN_DIR's vae/ or the hub id; "pixel:S:T": the exact
    pixel codec, for tiny test models). dtype: cast the weights (default: keep the source's).
    gripper: "plain" (delta gripper actions, quantile-normalised), "flipped" (raw controller gripper, sign
    flipped and not normalised, as the release's RoboCasa fine-tune) or "auto" (flipped for single-arm
    statistics, as the release's policy server decides).
    guidance_scale: classifier-free guidance; the release's cfg=c (0 = off) is guidance_scale c (1 = off).
    """
    import torch

    from xwam_core.checkpoint import MARKER, DataSpec, PolicyParts, export_checkpoint
    from xwam_core.data.windows import WindowLayout
    from xwam_core.schedule.inference import InferenceScheduleConfig

    exp = Path(exp_dir)
    if not exp.is_dir():
        raise XWAMError(f"{exp}: no such experiment folder")
    if dtype is not None and dtype not in DTYPES:
        raise XWAMError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if gripper not in GRIPPER_MODES:
        raise XWAMError(f"--gripper {gripper!r}: expected one of {', '.join(GRIPPER_MODES)}")
    if not (guidance_scale >= 1.0 and math.isfinite(guidance_scale)):
        raise XWAMError(f"--guidance-scale {guidance_scale}: expected a finite number >= 1 (1 = off)")
    out_path = Path(out)
    if out_path.exists() and not overwrite:
        raise XWAMError(f"{out_path}: exists; pass --overwrite to replace it")
    if (exp / MARKER).is_file():
        raise XWAMError(f"{exp}: already an xwam checkpoint; nothing to convert")

    config_path = exp / "config.yaml"
    config = _read_yaml(config_path, exp)
    release = _release_settings(config, config_path)
    state_file = _checkpoint_file(exp, name)
    tasks = _read_tasks(prompts, prompts_from)
    notes = list(release.notes)

    wan_dir = Path(wan).expanduser()
    geometry = _wan_geometry(wan_dir)
    codec_description, codec_channels = _codec(codec, vae, wan_dir)

    log(f"reading {state_file}")
    module, skipped, step = _load_release_module(state_file, allow_unsafe_pickle)
    weights = _weights_geometry(module, state_file)
    _check_geometry(geometry, weights, release, wan_dir, config_path)
    if codec_channels is not None and codec_channels != weights["in_channels"]:
        raise XWAMError(
            f"--codec {codec}: latent channels {codec_channels}, but the model takes {weights['in_channels']}"
        )
    num_views = weights["num_views"]
    view_names = _views(views, num_views)
    if views is None:
        notes.append(
            f"views named {', '.join(view_names)}: give the training data's view names (sorted by name, "
            "as the release orders them) with --views"
        )

    # the model: built without allocating its weights, then given the release's tensors by name
    from accelerate import init_empty_weights

    from xwam_core.models.transformer import XWAMTransformer

    kwargs: dict[str, Any] = {
        "patch_size": weights["patch_size"],
        "num_attention_heads": geometry["num_heads"],
        "attention_head_dim": weights["dim"] // geometry["num_heads"],
        "in_channels": weights["in_channels"],
        "out_channels": weights["out_channels"],
        "text_dim": weights["text_dim"],
        "freq_dim": weights["freq_dim"],
        "ffn_dim": weights["ffn_dim"],
        "num_layers": weights["num_layers"],
        "cross_attn_norm": True,  # the release's blocks always carry the affine cross-attention norm
        "qk_norm": "rms_norm_across_heads",
        "eps": geometry["eps"],
        "num_views": num_views,
        "action_dim": weights["action_dim"],
        "state_dim": weights["state_dim"],
        "num_actions": (release.frame_num - 1) * release.actions_per_frame,
        "num_states": release.frame_num,
        "num_depth_blocks": weights["num_extra_layers"],
    }
    kwargs.update(RELEASE_MODEL_SETTINGS)  # the release's maths and depth images, explicit
    target = _target_dtype(module, dtype, torch, notes)
    state = _mapped_state(module, state_file)
    if weights["num_extra_layers"] == 0:  # use_depth false: xwam's depth head exists but is never run
        state["depth_proj_out.weight"] = torch.zeros(
            weights["out_channels"] * math.prod(weights["patch_size"]), weights["dim"]
        )
        state["depth_proj_out.bias"] = torch.zeros(weights["out_channels"] * math.prod(weights["patch_size"]))
        state["depth_scale_shift_table"] = torch.zeros(1, 2, weights["dim"])
        notes.append("no depth branch (use_depth false): the unused depth head is zeros")
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    log(f"building the model: {weights['num_layers']} blocks + {weights['num_extra_layers']} depth blocks")
    try:
        with init_empty_weights(include_buffers=False):  # parameters on meta; RoPE tables real
            model = XWAMTransformer(**kwargs)
    except XWAMError as e:
        raise XWAMError(f"{state_file}: {e}") from None
    _check_complete(model, state, state_file)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()

    # text, normaliser, data, inference
    from xwam_core.models.text import UMT5_HUB_ID, PrecomputedText

    encoder_source = text_encoder or (
        str(wan_dir)
        if (wan_dir / "tokenizer").is_dir() and (wan_dir / "text_encoder").is_dir()
        else UMT5_HUB_ID
    )
    log(f"encoding {len(tasks)} prompt(s) with UMT5 from {encoder_source} (padding kept, as the release)")
    text_len = release.text_len or geometry["text_len"]  # the release's config says 512
    text = PrecomputedText.from_prompts(tasks, encoder_source, padding="kept", max_length=text_len)
    if text.text_dim != weights["text_dim"]:
        raise XWAMError(
            f"text encoder {encoder_source}: {text.text_dim}-wide embeddings, but the model takes "
            f"{weights['text_dim']} (use the UMT5 the release was trained with)"
        )
    gripper_mode = gripper if gripper != "auto" else release.auto_gripper
    normalizer = release_normalizer(release.statistics, gripper_mode, release.inverse_gripper, config_path)
    if normalizer.action_dim > weights["action_dim"] or normalizer.state_dim > weights["state_dim"]:
        raise XWAMError(
            f"{config_path}: statistics for {normalizer.action_dim} action / {normalizer.state_dim} state "
            f"dimensions, but the model has {weights['action_dim']} / {weights['state_dim']}"
        )
    inference = InferenceScheduleConfig(
        schedule="async",
        num_steps_video=release.sample_steps,
        num_steps_action=release.action_steps,
        shift=release.shift,
        guidance_scale=float(guidance_scale),
    )
    try:
        inference.validate()
    except XWAMError as e:  # the release's sample_steps, action_denoise_steps and time_shifting
        raise XWAMError(
            f"{config_path}: {e} (from sample_steps, action_denoise_steps, time_shifting)"
        ) from None
    parts = PolicyParts(
        model=model,
        text=text,
        codec=codec_description,
        normalizer=normalizer,
        data=DataSpec(
            views=view_names,
            image_size=release.image_size,
            window=WindowLayout(release.frame_num - 1, release.frame_skip),
            tasks=tasks,
            fps=None,  # not in config.yaml (each episode's json has its own)
            store="",
            val_episodes=0,
        ),
        inference=inference,
        recipe_toml=_record(exp, state_file, config_path, gripper_mode),
        step=step,
    )
    log(f"writing {out_path}")
    written = export_checkpoint(parts, out_path, overwrite=overwrite)
    return ReleaseConversion(
        path=written,
        source=state_file,
        tensors=len(module),
        skipped=skipped,
        dtype=str(target).replace("torch.", ""),
        gripper=gripper_mode,
        views=view_names,
        tasks=len(tasks),
        notes=notes,
    )


# ------------------------------------------------------------------------------------ config.yaml
@dataclass
class _Release:
    frame_num: int
    actions_per_frame: int
    frame_skip: int
    image_size: tuple[int, int]
    statistics: dict[str, Any]
    action_dim: int
    proprio_dim: int
    num_extra_layers: int
    sample_steps: int
    action_steps: int
    shift: float
    inverse_gripper: bool
    auto_gripper: str
    notes: list[str]
    text_len: int | None = None  # None: the Wan config's


def _read_yaml(path: Path, exp: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise XWAMError(f"{exp}: lacks config.yaml (the release writes it in the experiment folder)")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise XWAMError(f"{path}: unreadable YAML ({reason})") from None
    if not isinstance(data, dict):
        raise XWAMError(f"{path}: expected a mapping of settings")
    return data


def _release_settings(config: dict[str, Any], path: Path) -> _Release:
    """The settings the conversion needs, each checked; data settings from the merged `dataset` section."""
    notes: list[str] = []

    def number(section: dict[str, Any], key: str, where: str, default: Any = None, kind: type = int) -> Any:
        value = section.get(key, default)
        if value is None:
            raise XWAMError(f"{path}: lacks '{where}{key}'")
        try:
            if kind is int and (isinstance(value, bool) or float(value) != int(value)):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            raise XWAMError(f"{path}: '{where}{key}' is {value!r}, expected a number") from None

    def flag(section: dict[str, Any], key: str, where: str, default: bool) -> bool:
        value = section.get(key, default)
        if not isinstance(value, bool):
            raise XWAMError(f"{path}: '{where}{key}' is {value!r}, expected true or false")
        return value

    # read and checked: what the conversion uses. Recorded only (config.yaml goes verbatim into the
    # checkpoint's recipe.toml, nothing reads it back), so not checked: seed, lr and the other training
    # settings, and the dataset's paths.

    data = config.get("dataset")
    dataset_name = data if isinstance(data, str) else ""
    if not isinstance(data, dict):
        data = {}
    frame_num = number(config, "frame_num", "")
    if frame_num < 2:
        raise XWAMError(
            f"{path}: 'frame_num' is {frame_num}, expected at least 2 (the current frame + futures)"
        )
    if "frame_skip" in data:
        frame_skip = number(data, "frame_skip", "dataset.")
        action_skip = number(data, "action_skip", "dataset.", 1)
        if action_skip != 1:
            raise XWAMError(
                f"{path}: dataset.action_skip is {action_skip}; xwam windows take every store frame's action, "
                "so only action_skip 1 (every released config) converts"
            )
        actions_per_frame = frame_skip // action_skip
    else:
        frame_skip = actions_per_frame = DEFAULT_ACTIONS_PER_FRAME
        notes.append(
            f"config.yaml has no dataset.frame_skip: {DEFAULT_ACTIONS_PER_FRAME} actions per frame assumed"
        )
    size = data.get("video_size", config.get("video_size"))
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise XWAMError(f"{path}: 'dataset.video_size' is {size!r}, expected [height, width]")
    statistics = data.get("statistics")
    if not (
        isinstance(statistics, dict)
        and isinstance(statistics.get("q01"), dict)
        and isinstance(statistics.get("q99"), dict)
    ):
        raise XWAMError(f"{path}: lacks 'dataset.statistics' with q01 and q99 sections")
    decoupled = flag(config, "use_decoupled_inference", "", True)
    use_depth = flag(config, "use_depth", "", True)
    text_len = None
    if config.get("text_len") is not None:
        text_len = number(config, "text_len", "")
        if text_len < 1:
            raise XWAMError(f"{path}: 'text_len' is {text_len}, expected an integer >= 1 (UMT5 tokens)")
    sample_steps = number(config, "sample_steps", "", 50)
    two_arms = "proprio_right_ee_xyz" in statistics["q01"]
    return _Release(
        frame_num=frame_num,
        actions_per_frame=actions_per_frame,
        frame_skip=frame_skip,
        image_size=(int(size[0]), int(size[1])),
        statistics=statistics,
        action_dim=number(config, "action_dim", ""),
        proprio_dim=number(config, "proprio_dim", ""),
        num_extra_layers=number(config, "num_extra_layers", "") if use_depth else 0,
        sample_steps=sample_steps,
        action_steps=number(config, "action_denoise_steps", "", 10) if decoupled else sample_steps,
        shift=number(config, "time_shifting", "", 5.0, float),
        inverse_gripper=flag(data, "inverse_gripper", "dataset.", False),
        auto_gripper="flipped" if dataset_name == "robocasa" or not two_arms else "plain",
        notes=notes,
        text_len=text_len,
    )


# ------------------------------------------------------------------------------------ normalisation
QUATERNION = ("qw", "qx", "qy", "qz")
STATE_PARTS = ("ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz", "gripper")
ACTION_PARTS = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")


def release_normalizer(statistics: dict[str, Any], gripper: str, inverse_gripper: bool, path: Path) -> Any:
    """The release's normalisation as an xwam Normalizer (2 (x - q01) / (q99 - q01) - 1 per dimension).

    State per arm: xyz (proprio quantiles), quaternion w, x, y, z (identity: q01 -1, q99 1), gripper
    (gripper_pos). Action per arm: delta xyz, axis-angle, gripper: "plain" gripper_action quantiles;
    "flipped" the raw controller value negated and not normalised (bounds 1, -1). The config's
    inverse_gripper negates the normalised grippers (bounds swapped). One arm: the left slots only.
    """
    from xwam_core.normalizer import Normalizer

    q01, q99 = statistics["q01"], statistics["q99"]

    def bounds(key: str, size: int) -> tuple[list[float], list[float]]:
        for section, values in (("q01", q01), ("q99", q99)):
            if key not in values:
                raise XWAMError(f"{path}: dataset.statistics.{section} lacks '{key}'")
            if not (isinstance(values[key], list) and len(values[key]) == size):
                raise XWAMError(
                    f"{path}: dataset.statistics.{section}.{key} is {values[key]!r}, expected {size} numbers"
                )
        return [float(v) for v in q01[key]], [float(v) for v in q99[key]]

    def swapped(pair: tuple[list[float], list[float]]) -> tuple[list[float], list[float]]:
        return (pair[1], pair[0]) if inverse_gripper else pair

    arms = ["left", "right"] if "proprio_right_ee_xyz" in q01 else ["left"]
    state_lo: list[float] = []
    state_hi: list[float] = []
    action_lo: list[float] = []
    action_hi: list[float] = []
    for arm in arms:
        parts = [
            bounds(f"proprio_{arm}_ee_xyz", 3),
            ([-1.0] * 4, [1.0] * 4),
            swapped(bounds("gripper_pos", 1)),
        ]
        for lo, hi in parts:
            state_lo += lo
            state_hi += hi
        grip = ([1.0], [-1.0]) if gripper == "flipped" else swapped(bounds("gripper_action", 1))
        for lo, hi in (bounds(f"action_{arm}_ee_xyz", 3), bounds(f"action_{arm}_ee_axisangle", 3), grip):
            action_lo += lo
            action_hi += hi
    return Normalizer(
        action_names=[f"{arm}_{p}" for arm in arms for p in ACTION_PARTS],
        state_names=[f"{arm}_{p}" for arm in arms for p in STATE_PARTS],
        stats={"action": {"q01": action_lo, "q99": action_hi}, "state": {"q01": state_lo, "q99": state_hi}},
        normalization="release",  # the release's own statistics, made by its rules
    )


# ------------------------------------------------------------------------------------ the checkpoint file
def _checkpoint_file(exp: Path, name: str | None) -> Path:
    root = exp / "checkpoints"
    found = sorted(p.name for p in root.iterdir() if p.name.endswith(".ckpt")) if root.is_dir() else []
    if name:
        chosen = name if name.endswith(".ckpt") else f"{name}.ckpt"
    elif "last.ckpt" in found:
        chosen = "last.ckpt"
    elif found:
        chosen = max(found, key=lambda n: (_step_of(n), (root / n).stat().st_mtime))
    else:
        raise XWAMError(
            f"{root}: no <name>.ckpt checkpoint found (expected the release's Lightning checkpoints)"
        )
    file = root / chosen / "checkpoint" / MODEL_STATES
    if not file.is_file():
        raise XWAMError(f"{file}: not found; checkpoints in {root}: {', '.join(found) or 'none'}")
    return file


def _step_of(name: str) -> int:
    match = re.search(r"step=(\d+)", name)
    return int(match.group(1)) if match else -1


def _load_release_module(file: Path, allow_unsafe_pickle: bool) -> tuple[dict[str, Any], int, int]:
    """(transformer tensors without the "model." prefix, how many encoder tensors were skipped, step)."""
    import torch

    try:
        payload = _torch_load(file, weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_unsafe_pickle:
            raise XWAMError(
                f"{file}: torch's safe loader refuses it ({_refusal(e)}); if you trust this file, pass "
                "--allow-unsafe-pickle (unpickling it runs code from the file)"
            ) from None
        payload = _torch_load(file, weights_only=False)
    module = payload.get("module") if isinstance(payload, dict) else None
    if not isinstance(module, dict):
        raise XWAMError(f"{file}: no 'module' weights inside (expected a DeepSpeed model-states file)")
    tensors: dict[str, Any] = {}
    skipped = 0
    for key, value in module.items():
        if not isinstance(key, str):
            raise XWAMError(
                f"{file}: 'module' has the key {key!r} ({type(key).__name__}), expected tensor names "
                "(model.*, text_encoder.*, vae.*)"
            )
        if key.startswith(("text_encoder.", "vae.")):
            skipped += 1
        elif not key.startswith("model."):
            raise XWAMError(f"{file}: unexpected key '{key}' (expected model.*, text_encoder.* or vae.*)")
        elif not torch.is_tensor(value):
            raise XWAMError(f"{file}: '{key}' is a {type(value).__name__}, expected a tensor")
        else:
            tensors[key[len("model.") :]] = value
    if not tensors:
        raise XWAMError(f"{file}: holds no transformer weights (no 'model.' keys under 'module')")
    step = payload.get("global_steps", 0)
    return tensors, skipped, int(step) if isinstance(step, int) and not isinstance(step, bool) else 0


def _torch_load(file: Path, weights_only: bool) -> Any:
    import torch

    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=weights_only)  # an old, non-zip file
    except pickle.UnpicklingError as e:
        if weights_only:  # the restricted loader refuses a global or an opcode: the caller offers the opt-in
            raise
        raise XWAMError(f"{file}: not a readable torch checkpoint ({first_line(e)})") from None
    except MemoryError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise XWAMError(f"{file}: not a readable torch checkpoint ({first_line(e)})") from None
    # the unpicklers raise KeyError, IndexError, TypeError, ... on bytes that are not a pickle at all
    except Exception as e:
        raise XWAMError(
            f"{file}: not a readable torch checkpoint ({type(e).__name__}: {first_line(e)})"
        ) from None


def _refusal(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.rstrip(".").split(" We ")[0]
    return lines[0] if lines else type(error).__name__


# ------------------------------------------------------------------------------------ geometry
def _wan_geometry(wan: Path) -> dict[str, Any]:
    """Heads, eps, text length (and the sizes, for the cross-check) from WAN_DIR's config."""
    candidates = [wan / "config.json", wan / "transformer" / "config.json"]
    for path in candidates:
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise XWAMError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            continue
        try:
            if "num_heads" in cfg and "dim" in cfg:  # Wan's own layout (Wan2.2-TI2V-5B/config.json)
                return {
                    "source": path,
                    "num_heads": int(cfg["num_heads"]),
                    "eps": float(cfg.get("eps", 1e-6)),
                    "text_len": int(cfg.get("text_len", 512)),
                    "dim": int(cfg["dim"]),
                    "ffn_dim": int(cfg["ffn_dim"]),
                    "freq_dim": int(cfg["freq_dim"]),
                    "num_layers": int(cfg["num_layers"]),
                    "in_channels": int(cfg["in_dim"]),
                    "out_channels": int(cfg["out_dim"]),
                    "patch_size": tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2))),
                }
            if "num_attention_heads" in cfg:  # diffusers' WanTransformer3DModel
                heads = int(cfg["num_attention_heads"])
                return {
                    "source": path,
                    "num_heads": heads,
                    "eps": float(cfg.get("eps", 1e-6)),
                    "text_len": 512,  # the Wan pipelines' max_sequence_length
                    "dim": heads * int(cfg["attention_head_dim"]),
                    "ffn_dim": int(cfg["ffn_dim"]),
                    "freq_dim": int(cfg["freq_dim"]),
                    "num_layers": int(cfg["num_layers"]),
                    "in_channels": int(cfg["in_channels"]),
                    "out_channels": int(cfg["out_channels"]),
                    "patch_size": tuple(int(p) for p in cfg.get("patch_size", (1, 2, 2))),
                    "text_dim": int(cfg["text_dim"]) if "text_dim" in cfg else None,
                }
        except (KeyError, TypeError, ValueError) as e:
            raise XWAMError(f"{path}: malformed Wan config ({type(e).__name__}: {e})") from None
    if not wan.exists():
        raise XWAMError(f"--wan {wan}: no such folder")
    raise XWAMError(
        f"--wan {wan}: no Wan2.2 config (expected config.json with dim/num_heads, or a diffusers folder with "
        "transformer/config.json)"
    )


def _weights_geometry(module: dict[str, Any], file: Path) -> dict[str, Any]:
    """Every size the release's tensors fix (the heads they cannot)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in module:
            raise XWAMError(f"{file}: lacks 'model.{key}'")
        return tuple(module[key].shape)

    patch = shape("patch_embedding.weight")  # (D, C_in, pt, ph, pw)
    blocks = {int(m.group(1)) for k in module if (m := re.match(r"blocks\.(\d+)\.", k))}
    extra = {int(m.group(1)) for k in module if (m := re.match(r"extra_blocks\.0\.(\d+)\.", k))}
    dim = patch[0]
    patch_size = patch[2:]
    return {
        "dim": dim,
        "in_channels": patch[1],
        "patch_size": tuple(int(p) for p in patch_size),
        "out_channels": shape("head.head.weight")[0] // math.prod(patch_size),
        "text_dim": shape("text_embedding.0.weight")[1],
        "freq_dim": shape("time_embedding.0.weight")[1],
        "ffn_dim": shape("blocks.0.ffn.0.weight")[0],
        "num_layers": len(blocks),
        "num_extra_layers": len(extra),
        "num_views": shape("view_embedding.weight")[0],
        "action_dim": shape("action_encoder.0.weight")[1],
        "state_dim": shape("proprio_encoder.0.weight")[1],
    }


def _check_geometry(
    wan: dict[str, Any], weights: dict[str, Any], release: _Release, wan_dir: Path, config_path: Path
) -> None:
    for key in ("dim", "ffn_dim", "freq_dim", "num_layers", "in_channels", "out_channels", "patch_size"):
        if tuple(_listify(wan[key])) != tuple(_listify(weights[key])):
            raise XWAMError(
                f"{wan['source']}: {key} {wan[key]}, but the checkpoint's weights have {weights[key]} "
                f"(--wan must be the Wan2.2 model the release was trained from)"
            )
    if wan.get("text_dim") not in (None, weights["text_dim"]):
        raise XWAMError(
            f"{wan['source']}: text_dim {wan['text_dim']}, but the weights have {weights['text_dim']}"
        )
    if wan["num_heads"] < 1 or weights["dim"] % wan["num_heads"] or (weights["dim"] // wan["num_heads"]) % 2:
        raise XWAMError(
            f"{wan['source']}: {wan['num_heads']} heads do not divide width {weights['dim']} evenly"
        )
    for key, ours in (
        ("action_dim", release.action_dim),
        ("proprio_dim", release.proprio_dim),
        ("num_extra_layers", release.num_extra_layers),
    ):
        theirs = weights["state_dim" if key == "proprio_dim" else key]
        if ours != theirs:
            raise XWAMError(f"{config_path}: {key} {ours}, but the checkpoint's weights have {theirs}")


def _listify(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _mapped_state(module: dict[str, Any], file: Path) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, tensor in module.items():
        name = xwam_name(key)
        if name is None:
            raise XWAMError(f"{file}: 'model.{key}' has no place in xwam's model (no key-map rule for it)")
        if name in state:
            raise XWAMError(f"{file}: 'model.{key}' and another tensor both map onto '{name}'")
        state[name] = tensor
    return state


def _check_complete(model: Any, state: dict[str, Any], file: Path) -> None:
    """Every model tensor filled, by a tensor of its own shape; every mapped name one of the model's."""
    own = model.state_dict()
    for name, tensor in state.items():
        if name not in own:
            raise XWAMError(f"{file}: maps a tensor onto '{name}', which xwam's model lacks")
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise XWAMError(
                f"{file}: '{name}' has shape {tuple(tensor.shape)}, xwam's model expects {tuple(own[name].shape)}"
            )
    for name in own:
        if name not in state:
            raise XWAMError(
                f"{file}: nothing fills xwam's '{name}' (the checkpoint lacks its release tensor)"
            )


def _target_dtype(module: dict[str, Any], dtype: str | None, torch: Any, notes: list[str]) -> Any:
    if dtype is not None:
        return getattr(torch, dtype)
    counts: dict[Any, int] = {}
    for tensor in module.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    common = max(counts, key=lambda d: counts[d]) if counts else torch.float32
    if len(counts) > 1:
        others = sum(n for d, n in counts.items() if d != common)
        notes.append(f"{others} tensor(s) of other dtypes cast to {str(common).replace('torch.', '')}")
    return common


# ------------------------------------------------------------------------------------ the rest
def _read_tasks(prompts: str | Path | None, prompts_from: str | Path | None) -> list[str]:
    if (prompts is None) == (prompts_from is None):
        raise XWAMError("give the task prompts: --prompts FILE (one per line) or --prompts-from STORE")
    if prompts is not None:
        path = Path(prompts)
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise XWAMError(f"--prompts {path}: unreadable ({type(e).__name__}: {e})") from None
        tasks = [line.strip() for line in lines if line.strip()]
        if not tasks:
            raise XWAMError(f"--prompts {path}: no prompts (expected one per line)")
    else:
        from xwam_core.data.reader import EpisodeStore

        tasks = list(EpisodeStore(Path(str(prompts_from))).tasks)
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise XWAMError(f"prompts: {duplicates[0]!r} is given more than once")
    return tasks


def _views(views: list[str] | None, num_views: int) -> list[str]:
    if views is None:
        return [f"view_{i}" for i in range(num_views)]
    names = [v.strip() for v in views if v.strip()]
    if len(names) != num_views or len(set(names)) != len(names):
        raise XWAMError(f"--views {','.join(views)}: expected {num_views} distinct names (the model's views)")
    return names


def _codec(codec: str, vae: str | None, wan_dir: Path) -> tuple[dict[str, Any], int | None]:
    """(codec description, its latent channels when known without loading it)."""
    from xwam_core.models.codecs import describe_codec

    if codec == "wan-vae":
        source = vae or (str(wan_dir / "vae") if (wan_dir / "vae" / "config.json").is_file() else "")
        channels = None
        config = Path(source) / "config.json" if source else None
        if config is not None and config.is_file():
            try:
                channels = int(json.loads(config.read_text())["z_dim"])
            except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
                channels = None
        return describe_codec("base", source), channels
    match = re.fullmatch(r"pixel:(\d+):(\d+)", codec)
    if match:
        spatial, temporal = int(match.group(1)), int(match.group(2))
        if spatial < 1 or temporal < 1:
            raise XWAMError(f"--codec {codec}: factors must be >= 1")
        description = {"kind": "pixel", "spatial_factor": spatial, "temporal_factor": temporal}
        return description, 3 * temporal * spatial**2
    raise XWAMError(f"--codec {codec!r}: expected 'wan-vae' or 'pixel:SPATIAL:TEMPORAL'")


def _record(exp: Path, state_file: Path, config_path: Path, gripper: str) -> str:
    """recipe.toml for a converted checkpoint: where it came from, and the release's config verbatim."""
    import tomli_w

    record = {
        "converted": {
            "from": SOURCE,
            "experiment": str(exp.resolve()),
            "checkpoint": str(state_file.resolve()),
            "gripper": gripper,
            "config_yaml": config_path.read_text(),
        }
    }
    return (
        "# a record only: converted by `xwam convert xwam-release`; nothing reads it back\n"
        + tomli_w.dumps(record, multiline_strings=True)
    )
