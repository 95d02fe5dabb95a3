"""Recipes: TOML files mapped onto typed dataclasses, the single source of every setting.

- `load_recipe(path, overrides)` reads a TOML file, applies `section.key=value` overrides and checks
  every key and type against the dataclasses below: an unknown key, a wrong type or a missing
  required value is a `RecipeError` naming the file, the key and what was expected.
- `recipe_to_toml(recipe)` writes the resolved recipe back (saved with every output).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from xwam_core.data.augment import AugmentConfig
from xwam_core.errors import RecipeError
from xwam_core.schedule.inference import InferenceScheduleConfig
from xwam_core.schedule.sampler import NoiseSamplerConfig

T = TypeVar("T")

REQUIRED: Any = dataclasses.MISSING  # marker for documentation: fields without a default are required


# ----------------------------------------------------------------------------------------- sections
@dataclass
class MetaWorldSourceConfig:
    """Options of the `metaworld` source (simulator + scripted experts)."""

    tasks: list[str] = field(default_factory=lambda: ["reach-v3", "push-v3"])
    episodes: int = 4  # per task
    views: list[str] = field(default_factory=lambda: ["corner2", "topview", "gripperPOV"])
    size: int = 64  # square image size in pixels (64..256)
    seed: int = 0
    max_steps: int = 150
    render_quality: str = "fast"  # "fast" (no shadows/reflections/multisampling) or "default"


@dataclass
class LeRobotSourceConfig:
    """Options of the `lerobot` source (import a LeRobot v2.1/v3.0 dataset folder)."""

    path: str = ""
    # camera key -> view name, e.g. {"observation.images.front" = "front"}; empty: every camera.
    views: dict[str, str] = field(default_factory=dict)
    episodes: list[int] = field(default_factory=list)  # empty: all
    state_key: str = "observation.state"
    action_key: str = "action"
    depth_scale: float = 0.0  # metres per unit for 8-bit depth video; 0: unknown


@dataclass
class PrepareConfig:
    """`xwam prepare`: which source, where the store goes."""

    source: str = "metaworld"  # "metaworld" or "lerobot"
    out: str = ""
    overwrite: bool = False
    metaworld: MetaWorldSourceConfig = field(default_factory=MetaWorldSourceConfig)
    lerobot: LeRobotSourceConfig = field(default_factory=LeRobotSourceConfig)


@dataclass
class DataConfig:
    """Training windows over an episode store."""

    store: str = ""
    future_frames: int = 8  # F: frames predicted after the current one
    frame_stride: int = 4  # store frames between two window frames; K = F * stride actions
    views: list[str] = field(default_factory=list)  # empty: the store's views in its order
    val_episodes: int = 1  # held out for validation, taken in turn from each task (its newest episode)
    num_workers: int = 2
    batch_size: int = 4  # the GLOBAL batch: split evenly over the processes


@dataclass
class ModelConfig:
    """The model: a preset, its starting weights, the text conditioning and the depth range."""

    preset: str = "tiny"  # "tiny" (CPU, pixel codec) or "base" (Wan2.2-TI2V-5B geometry)
    init: str = ""  # a Wan2.2 diffusers folder or hub id to start from (from_wan_pretrained); "": random
    vae: str = ""  # base: the Wan2.2 VAE folder or hub id ("" = the official hub id)
    text: str = "task"  # "task": a learned embedding per task; "umt5": precomputed UMT5 embeddings
    text_cache: str = ""  # umt5: safetensors file written by PrecomputedText.save
    text_seq_len: int = 8  # task embeddings: tokens per prompt
    action_dim: int = 0  # 0: the store's action dimension; larger: pad and mask (e.g. 14 for dual-arm)
    state_dim: int = 0  # 0: the store's state dimension
    depth_near: float = 0.05  # metres: the inverse-depth image range
    depth_far: float = 5.0
    # per view, by name: [near, far] in metres (views not named use depth_near/depth_far)
    depth_ranges: dict[str, list[float]] = field(default_factory=dict)
    # any other XWAMTransformer argument, e.g. {num_layers = 8, attention_head_dim = 64}
    overrides: dict[str, int | float | bool | str] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Training: optimiser, schedule, precision, checkpoints, validation."""

    out: str = "runs/xwam"  # run folder: checkpoints/, logs/, loss_curve.png, summary.json
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # "auto" (bf16 where the hardware has it), "no", "bf16", "fp16"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0  # 0: no EMA
    val_every: int = 100
    val_batches: int = 4
    checkpoint_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    lora_rank: int = 0  # finetune: >0 trains LoRA adapters on the trunk (peft) plus the new parts
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class Recipe:
    """Every setting of every command. Sections not used by a command keep their defaults."""

    name: str = "xwam"
    seed: int = 0
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseSamplerConfig = field(default_factory=NoiseSamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceScheduleConfig = field(default_factory=InferenceScheduleConfig)


# ------------------------------------------------------------------------------------ type checking
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    kind = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "table"}
    return f"{kind.get(type(value), type(value).__name__)} {value!r}"


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against type `tp`, converting int -> float where a number is expected."""

    def fail() -> RecipeError:
        return RecipeError(f"{where}: key '{key}' expects {_type_name(tp)}, got {_describe(value)}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except RecipeError:
                continue
        raise fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return _build(tp, value, key, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise RecipeError(f"{where}: key '{key}' has unsupported schema type {tp!r}")


def _build(cls: type[T], table: dict[str, Any], prefix: str, where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            raise RecipeError(f"{where}: unknown key '{full}' (expected one of: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        full = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in table:
            kwargs[f.name] = _convert(table[f.name], hints[f.name], full, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}: missing required key '{full}' ({_type_name(hints[f.name])})")
    return cls(**kwargs)


# ------------------------------------------------------------------------------------------ public
def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.key=value`; the value is read as TOML (numbers, booleans, lists), else a string."""
    if "=" not in text:
        raise RecipeError(f"--set '{text}': expected section.key=value")
    dotted, raw = text.split("=", 1)
    path = [p.strip() for p in dotted.strip().split(".")]
    if not all(path):
        raise RecipeError(f"--set '{text}': expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `table` with every `section.key=value` override applied."""
    import copy

    out = copy.deepcopy(table)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return out


def recipe_from_dict(table: dict[str, Any], where: str = "recipe", cls: type[T] = Recipe) -> T:  # type: ignore[assignment]
    return _build(cls, table, "", where)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (or the defaults when `path` is None) and apply `--set` overrides."""
    table: dict[str, Any] = {}
    where = "recipe"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"{where}: recipe file not found")
        try:
            table = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{where}: not valid TOML ({e})") from None
        except UnicodeDecodeError:
            raise RecipeError(f"{where}: not a text file (expected TOML)") from None
    overrides = overrides or []
    if overrides:
        table = apply_overrides(table, overrides)
        where = f"{where} (with --set overrides)"
    return recipe_from_dict(table, where)


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_to_toml(recipe: Any) -> str:
    """The resolved recipe as TOML text; `load_recipe` on it gives the same recipe back."""
    return tomli_w.dumps(_drop_none(recipe_to_dict(recipe)))


def _drop_none(table: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: unset optional values are left out (they fall back to their defaults)."""
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}
