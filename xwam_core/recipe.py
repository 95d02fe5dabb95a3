"""Recipes: TOML files mapped onto typed dataclasses, the single source of every setting.

- `load_recipe(path, overrides)` reads a TOML file, applies `section.key=value` overrides and checks
  every key and type against the dataclasses below: an unknown key, a wrong type or a missing
  required value is a `RecipeError` naming the file, the key and what was expected.
- Then every section's `validate()` checks the ranges (a batch size >= 1, a learning rate > 0, ...):
  a value outside is a `RecipeError` naming the file, the key, the value and the range. NaN and
  infinity are refused anywhere a number is expected. docs/recipes.md lists the ranges.
- `recipe_to_toml(recipe)` writes the resolved recipe back (saved with every output).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from xwam_core.data.augment import AugmentConfig
from xwam_core.data.prepare_config import (
    PrepareConfig,
)
from xwam_core.data.release_stats import NORMALIZATIONS
from xwam_core.errors import RecipeError, os_error_line, require
from xwam_core.schedule.inference import InferenceScheduleConfig
from xwam_core.schedule.sampler import NoiseSamplerConfig

T = TypeVar("T")

REQUIRED: Any = dataclasses.MISSING  # marker for documentation: fields without a default are required
TEXT_KINDS = ("task", "umt5")
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp2")  # train.strategy: how several processes share the work (xwam_core.train)


# ----------------------------------------------------------------------------------------- sections
@dataclass
class MixtureEntry:
    """One store of a mixture (`[[data.mixture]]`)."""

    store: str = ""
    # share of the training draws (relative to the other entries); 0 on every entry: each store's own
    # window count, i.e. every window of every store exactly once an epoch
    weight: float = 0.0
    val_episodes: int = -1  # episodes of this store held out; -1: data.val_episodes


@dataclass
class DataConfig:
    """Training windows over an episode store, or a mixture of stores."""

    store: str = ""
    mixture: list[MixtureEntry] = field(default_factory=list)  # several stores with weights (or `store`)
    # the decoded-frame cache: "auto" (on for stores whose decoded frames take <= 2 GiB), "on", "off"
    # (loader workers decode the frames of each window: large stores)
    frame_cache: str = "auto"
    future_frames: int = 8  # F: frames predicted after the current one
    frame_stride: int = 4  # store frames between two window frames; K = F * stride actions
    views: list[str] = field(default_factory=list)  # empty: the store's views in its order
    val_episodes: int = 1  # held out for validation, taken in turn from each task (its newest episode)
    num_workers: int = 2
    batch_size: int = 4  # the GLOBAL batch: split evenly over the processes
    # q01/q99 of actions and states: "quantile" (the store's per-dimension percentiles) or "release"
    # (the X-WAM release's rules: quaternions identity, symmetric action bounds, moving-gripper quantiles)
    normalization: str = "quantile"
    # true: a window starts at every frame; past an episode's end frames and states repeat the last, actions
    # the last action, and padded actions/states carry no loss (docs/data.md). false: full windows only
    pad_episode_ends: bool = True

    def entries(self) -> list[MixtureEntry]:
        """The stores trained on: data.mixture, else data.store as a mixture of one."""
        return list(self.mixture) if self.mixture else [MixtureEntry(store=self.store)]

    def validate(self) -> None:
        require(
            isinstance(self.pad_episode_ends, bool),
            "data.pad_episode_ends",
            "true or false",
            self.pad_episode_ends,
        )
        require(self.future_frames >= 1, "data.future_frames", "an integer >= 1", self.future_frames)
        require(self.frame_stride >= 1, "data.frame_stride", "an integer >= 1", self.frame_stride)
        require(len(set(self.views)) == len(self.views), "data.views", "each view once", self.views)
        require(self.val_episodes >= 0, "data.val_episodes", "an integer >= 0", self.val_episodes)
        require(
            self.num_workers >= 0,
            "data.num_workers",
            "an integer >= 0 (0: load in the main process)",
            self.num_workers,
        )
        require(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        require(
            self.frame_cache in ("auto", "on", "off"), "data.frame_cache", "auto, on or off", self.frame_cache
        )
        require(
            not (self.store and self.mixture),
            "data.mixture",
            "either data.store or data.mixture, not both (a --set of one replaces the recipe file's other)",
            f"{len(self.mixture)} stores and data.store={self.store!r}",
        )
        for i, entry in enumerate(self.mixture):
            key = f"data.mixture[{i}]"
            require(bool(entry.store), f"{key}.store", "the path of an episode store", entry.store)
            require(entry.weight >= 0, f"{key}.weight", "a number >= 0", entry.weight)
            require(
                entry.val_episodes >= -1,
                f"{key}.val_episodes",
                "an integer >= 0 (-1: data.val_episodes)",
                entry.val_episodes,
            )
        weighted = [e.weight > 0 for e in self.mixture]
        require(
            all(weighted) or not any(weighted),
            "data.mixture.weight",
            "a weight > 0 on every store, or on none (each store's own window count)",
            [e.weight for e in self.mixture],
        )
        require(
            len(self.mixture) < 2 or self.normalization == "quantile",
            "data.normalization",
            "quantile for a mixture of stores (release's rules are computed on one store)",
            self.normalization,
        )
        require(
            self.normalization in NORMALIZATIONS,
            "data.normalization",
            f"one of {', '.join(NORMALIZATIONS)}",
            self.normalization,
        )


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

    def validate(self) -> None:
        from xwam_core.models.presets import PRESETS

        require(self.preset in PRESETS, "model.preset", f"one of {', '.join(PRESETS)}", self.preset)
        require(self.text in TEXT_KINDS, "model.text", f"one of {', '.join(TEXT_KINDS)}", self.text)
        require(self.text_seq_len >= 1, "model.text_seq_len", "an integer >= 1", self.text_seq_len)
        require(self.action_dim >= 0, "model.action_dim", "an integer >= 0 (0: the store's)", self.action_dim)
        require(self.state_dim >= 0, "model.state_dim", "an integer >= 0 (0: the store's)", self.state_dim)
        require(self.depth_near > 0, "model.depth_near", "metres > 0", self.depth_near)
        require(
            self.depth_near < self.depth_far,
            "model.depth_far",
            f"metres > depth_near={self.depth_near}",
            self.depth_far,
        )
        for view, pair in self.depth_ranges.items():
            require(
                len(pair) == 2 and 0 < pair[0] < pair[1],
                f"model.depth_ranges.{view}",
                "[near, far] in metres with 0 < near < far",
                pair,
            )
        if self.overrides:
            self._validate_override_types()

    def _validate_override_types(self) -> None:
        """Each override has the type of XWAMTransformer's default for it (`num_layers = 'x'` is refused
        here, not deep in the model). Unknown names and ranges are the model's to check when it is built."""
        import inspect

        from xwam_core.models.transformer import XWAMTransformer

        params = inspect.signature(XWAMTransformer.__init__).parameters
        for name, value in self.overrides.items():
            if name in LAYOUT_DECIDES:
                raise RecipeError(
                    f"model.overrides.{name}: set by the data layout ({LAYOUT_DECIDES[name]}), not an override; "
                    f"got {value!r}"
                )
            default = params[name].default if name in params else None
            if isinstance(default, tuple):  # patch_size (t, h, w): overrides hold single values only
                raise RecipeError(
                    f"model.overrides.{name}: the preset fixes it ({list(default)}), not an override; got {value!r}"
                )
            for kind, expected in (
                (bool, "true/false"),
                (int, "an integer"),
                (float, "a number"),
                (str, "a string"),
            ):
                if isinstance(default, kind):
                    accepted = (int, float) if kind is float else kind
                    ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
                    require(ok, f"model.overrides.{name}", expected, value)
                    break


# model settings the data layout decides (xwam_core.factory.model_kwargs sets them after the overrides)
LAYOUT_DECIDES = {
    "num_views": "the number of data.views (or the store's views)",
    "action_dim": "the store's action width (model.action_dim pads it)",
    "state_dim": "the store's state width (model.state_dim pads it)",
    "num_actions": "data.future_frames x data.frame_stride",
    "num_states": "data.future_frames + 1",
    "depth_near": "model.depth_ranges",
    "depth_far": "model.depth_ranges",
}

LOSS_WEIGHT_TERMS = ("video", "action", "state", "depth")  # xwam_core.objective.LOSS_TERMS (tested equal)


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
    log_every: int = 10  # TensorBoard scalars every N steps (and at validations and the end); 0: every step
    lora_rank: int = 0  # finetune: >0 trains LoRA adapters on the trunk (peft) plus the new parts
    # "ddp": every process holds the whole model (accelerate's DDP; one process: plain training);
    # "fsdp2": parameters, gradients and optimiser state sharded over the processes (torch's fully_shard),
    # training state saved as torch.distributed.checkpoint shards (docs/checkpoint.md)
    strategy: str = "ddp"
    # samples each process puts through the model at once; data.batch_size / processes / micro_batch
    # micro-batches are accumulated per optimiser step (0: the whole per-process share at once)
    micro_batch: int = 0
    codec_micro_batch: int = 0  # samples the codec (VAE) encodes at once (0: the whole micro-batch)
    # Weight of each loss term in the total (video, action, state, depth); a missing term weighs 1.
    # The paper and the authors' release: all 1.
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"video": 1.0, "action": 1.0, "state": 1.0, "depth": 1.0}
    )
    # learning-rate multiplier of the action/state modules (their encoders and decoders and the state
    # plug-ins, xwam_core.models.transformer.ACTION_MODULES), an optimiser group of their own when it is not 1
    action_lr_scale: float = 1.0
    # weight, in each sample's action loss, of the first inference.actions_per_query actions (the ones a query
    # executes) against the rest of the chunk; 1: every action alike (the paper's). No effect when a query
    # executes the whole chunk (actions_per_query 0 or K)
    executed_action_weight: float = 1.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self) -> None:
        require(bool(self.out), "train.out", "a run folder", self.out)
        require(
            self.action_lr_scale > 0 and math.isfinite(self.action_lr_scale),
            "train.action_lr_scale",
            "a finite number > 0",
            self.action_lr_scale,
        )
        require(
            0 < self.executed_action_weight < math.inf,
            "train.executed_action_weight",
            "a finite number > 0 (1: every action of the chunk alike)",
            self.executed_action_weight,
        )
        require(self.max_steps >= 1, "train.max_steps", "an integer >= 1", self.max_steps)
        require(self.lr > 0, "train.lr", "a learning rate > 0", self.lr)
        require(self.weight_decay >= 0, "train.weight_decay", "a number >= 0", self.weight_decay)
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "two numbers in [0, 1) (Adam's beta1, beta2)",
            self.betas,
        )
        require(self.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0", self.warmup_steps)
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "a fraction in [0, 1]", self.min_lr_ratio)
        require(self.grad_clip >= 0, "train.grad_clip", "a norm >= 0 (0: no clipping)", self.grad_clip)
        require(
            self.mixed_precision in MIXED_PRECISIONS,
            "train.mixed_precision",
            f"one of {', '.join(MIXED_PRECISIONS)}",
            self.mixed_precision,
        )
        require(0 <= self.ema_decay < 1, "train.ema_decay", "a decay in [0, 1) (0: no EMA)", self.ema_decay)
        require(self.val_every >= 0, "train.val_every", "an integer >= 0 (0: no validation)", self.val_every)
        require(self.val_batches >= 1, "train.val_batches", "an integer >= 1", self.val_batches)
        require(
            self.checkpoint_every >= 0,
            "train.checkpoint_every",
            "an integer >= 0 (0: only at the end)",
            self.checkpoint_every,
        )
        require(
            self.keep_last >= 0,
            "train.keep_last",
            "an integer >= 0 (0: keep every checkpoint)",
            self.keep_last,
        )
        require(self.log_every >= 0, "train.log_every", "an integer >= 0", self.log_every)
        require(self.lora_rank >= 0, "train.lora_rank", "an integer >= 0 (0: no LoRA)", self.lora_rank)
        require(
            self.strategy in STRATEGIES, "train.strategy", f"one of {', '.join(STRATEGIES)}", self.strategy
        )
        require(
            self.micro_batch >= 0,
            "train.micro_batch",
            "an integer >= 0 (0: no gradient accumulation)",
            self.micro_batch,
        )
        require(
            self.codec_micro_batch >= 0,
            "train.codec_micro_batch",
            "an integer >= 0 (0: the whole micro-batch at once)",
            self.codec_micro_batch,
        )
        if self.strategy == "fsdp2":
            require(
                self.ema_decay == 0,
                "train.ema_decay",
                "0 with train.strategy=fsdp2 (EMA is not sharded yet)",
                self.ema_decay,
            )
            require(
                self.lora_rank == 0,
                "train.lora_rank",
                "0 with train.strategy=fsdp2 (LoRA is not sharded yet)",
                self.lora_rank,
            )
            require(
                self.mixed_precision != "fp16",
                "train.mixed_precision",
                "auto, no or bf16 with train.strategy=fsdp2 (fp16 needs a loss scaler FSDP2 lacks here)",
                self.mixed_precision,
            )
        for term, weight in self.loss_weights.items():
            require(
                term in LOSS_WEIGHT_TERMS,
                f"train.loss_weights.{term}",
                f"one of {', '.join(LOSS_WEIGHT_TERMS)}",
                term,
            )
            require(
                isinstance(weight, (int, float))
                and not isinstance(weight, bool)
                and math.isfinite(weight)
                and weight >= 0,
                f"train.loss_weights.{term}",
                "a number >= 0",
                weight,
            )
        self.augment.validate()

    def accumulation(self, global_batch: int, processes: int) -> int:
        """Micro-batches per optimiser step: global batch = micro_batch x processes x accumulation."""
        local = global_batch // max(1, processes)
        if self.micro_batch == 0 or self.micro_batch == local:
            return 1
        if self.micro_batch > local or local % self.micro_batch:
            raise RecipeError(
                f"train.micro_batch={self.micro_batch}: must divide the per-process batch {local} "
                f"(data.batch_size={global_batch} over {processes} processes)"
            )
        return local // self.micro_batch


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

    def validate(self) -> None:
        """Every section's ranges; raises the RecipeError of the first setting outside its range."""
        # numpy's legacy seeding (data-loader workers) takes 32-bit seeds
        require(0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32 - 1]", self.seed)
        self.prepare.validate()
        self.data.validate()
        self.model.validate()
        self.noise.validate()
        self.train.validate()
        self.inference.validate()
        chunk = self.data.future_frames * self.data.frame_stride
        require(
            self.inference.actions_per_query <= chunk,
            "inference.actions_per_query",
            f"0 (the whole chunk) to the chunk's {chunk} actions (data.future_frames x data.frame_stride)",
            self.inference.actions_per_query,
        )


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

    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{where}: key '{key}' expects a finite number, got {value}")
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


def _one_data_source(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """data.store and data.mixture are two forms of one setting: an override of one replaces the other
    where `table` (the recipe file) has it, so `--set 'data.mixture=[...]'` trains a recipe that names
    data.store on the mixture (and `--set data.store=...` a mixture recipe on one store)."""
    keys = {tuple(parse_override(text)[0]) for text in overrides}
    data = table.get("data")
    if not isinstance(data, dict):
        return table
    for given, other in (("mixture", "store"), ("store", "mixture")):
        if ("data", given) in keys and ("data", other) not in keys and other in data:
            table = {**table, "data": {k: v for k, v in data.items() if k != other}}
    return table


def recipe_from_dict(table: dict[str, Any], where: str = "recipe", cls: type[T] = Recipe) -> T:  # type: ignore[assignment]
    return _build(cls, table, "", where)


def load_recipe(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    overrides_from: str = "--set overrides",
) -> Recipe:
    """Load a recipe file (or the defaults when `path` is None), apply `section.key=value` overrides and
    check every range. Errors name the file, followed by `(with <overrides_from>)` when there are overrides."""
    table: dict[str, Any] = {}
    where = "recipe"
    if path is not None:
        where = str(path)
        p = Path(path)
        if p.is_dir():
            raise RecipeError(f"{where}: is a folder; expected a recipe TOML file (see recipes/)")
        if not p.exists():
            raise RecipeError(f"{where}: recipe file not found")
        if not p.is_file():
            raise RecipeError(f"{where}: not a regular file; expected a recipe TOML file (see recipes/)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"{where}: not UTF-8 text; expected a TOML file") from None
        except OSError as e:
            raise RecipeError(f"{where}: cannot be read ({os_error_line(e)})") from None
        text = text.removeprefix("\ufeff")  # a byte-order mark, as some editors write: not TOML, harmless
        if not text.strip():
            raise RecipeError(f"{where}: empty; expected TOML settings (see recipes/tiny_cpu.toml)")
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{where}: not valid TOML ({e})") from None
        except RecursionError:
            raise RecipeError(f"{where}: nested too deeply to read; expected a recipe's sections") from None
    overrides = overrides or []
    if overrides:
        table = apply_overrides(_one_data_source(table, overrides), overrides)
        where = f"{where} (with {overrides_from})"
    recipe: Recipe = recipe_from_dict(table, where)
    try:
        recipe.validate()
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    return recipe


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def recipe_to_toml(recipe: Any) -> str:
    """The resolved recipe as TOML text; `load_recipe` on it gives the same recipe back."""
    return tomli_w.dumps(_drop_none(recipe_to_dict(recipe)))


def _drop_none(table: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: unset optional values are left out (they fall back to their defaults)."""
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}
