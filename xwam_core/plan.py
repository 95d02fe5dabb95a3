"""What a recipe needs per GPU, said before any work (`xwam pretrain RECIPE --dry-run`).

The model, the text conditioner and the codec are built on the meta device: no weight is allocated and
nothing is downloaded (the Wan2.2 VAE's geometry is `codecs.WAN22_VAE_GEOMETRY` unless `model.vae` is a
local folder). Then the training objective itself (augmentation, codec, noising, transformer, losses)
runs on meta tensors for a micro-batch of 1 and of 2 samples, and three things are counted as it runs:
- live bytes: a dispatch mode follows every tensor an op creates (by storage) until its last reference
  dies, so the forward's peak is what the code really holds (latents, activations, losses and the
  transients between them) in the compute dtype; weights and their views are counted apart;
- saved bytes per block: what autograd keeps for backward (`saved_tensors_hooks`), so that gradient
  checkpointing can be derived: a checkpointed block keeps its inputs instead, and backward recomputes
  one block at a time;
- FLOPs: torch's FlopCounterMode (2 x params x tokens for every matmul, 4 x N_q x N_k x width for every
  attention, the codec's convolutions).
Attention runs as the fused kernels run it (flash / memory-efficient on GPUs, flash on CPUs): they keep
q, k, v, the output and the log-sum-exp, never the attention matrix (on meta, torch would pick the math
path, which keeps it). Each figure is fixed + b x per-sample, fitted exactly to the two traces.

Per GPU, for a micro-batch of b samples (P parameters, P_t of them trained, R ranks), in bytes:
    activations(b)   forward peak(b) without checkpointing; with it
                     forward peak(b) - saved(blocks) + inputs(blocks) + max saved(block)
    encoding(b)      the live peak while the batch is augmented and encoded (before the transformer)
    single, ddp      weights 4P (+ 2P under bf16/fp16 autocast: the half-precision copies it keeps for
                     the forward), gradients 4P_t, AdamW m and v 8P_t (the fp32 weights are the master
                     copy); ddp adds the reducer's gradient buckets 4P_t (the Trainer's DDP does not view
                     gradients as buckets)
    fsdp2            (4P + 4P_t + 8P_t) / R, plus the unsharded half-precision (bf16 params, fp32
                     reduction) parameters of the root and of two blocks (the running one and the
                     prefetched one) and one block's unsharded gradients; every WanTransformerBlock of
                     both branches a unit, the rest the root
    codec            its frozen fp32 weights on every GPU (outside the sharded module)
    peak             weights + buckets + optimizer + codec weights + text table
                     + max(encoding, activations, gradients)
                     (the encoding is over before the forward starts; backward frees activations as the
                     gradients appear; with accumulation the gradients persist and are added instead)
A training step's FLOPs are 3 x forward (backward = 2 x forward) plus one more forward of the blocks
under checkpointing, plus the codec's forward; the step time is quoted at `MFU` of the GPU's dense bf16
peak.

Checked against measurement (`bench/plan_check.py`, tests/test_plan.py): the tiny and a medium preset
trained on this CPU in fp32, peak RSS growth of two training steps in a fresh process vs this figure
for one process: see docs/training.md, "Memory and speed".
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from xwam_core.errors import XWAMError
from xwam_core.recipe import Recipe

if TYPE_CHECKING:
    from xwam_core.models.codecs import Codec
    from xwam_core.models.text import TextConditioner
    from xwam_core.models.transformer import XWAMTransformer

GB = 1e9  # memory is printed in GB = 10^9 bytes and compared with the GPU's nominal size (conservative)

STRATEGIES = ("single", "ddp", "fsdp2")
DEFAULT_STRATEGY = "ddp"

# Recipe keys the planner reads, in one place: (section, key). They belong to the Trainer; a recipe without
# them plans DDP with the whole per-GPU share in one micro-batch, encoded at once.
STRATEGY_KEY = ("train", "strategy")
GLOBAL_BATCH_KEY = ("data", "batch_size")  # the global batch: micro-batch x ranks x accumulation
MICRO_BATCH_KEY = ("train", "micro_batch")  # samples per GPU and forward (0: the per-GPU share)
CODEC_BATCH_KEY = ("train", "codec_micro_batch")  # samples the codec encodes at once (0: the micro-batch)

MFU = 0.40  # the utilisation step times are quoted at


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bf16_flops: float  # dense bf16 peak, FLOP/s (no sparsity)


# NVIDIA's data-sheet figures: H100 SXM 989 TFLOP/s bf16 dense, A100 312; H200 has H100's compute.
GPUS = {
    "H100": GPU("H100 80GB", 80.0, 989e12),
    "A100": GPU("A100 80GB", 80.0, 312e12),
    "H200": GPU("H200 141GB", 141.0, 989e12),
}
DEFAULT_GPU = "H100"

# When the recipe's store is not on this machine: the paper's layout (docs/method.md section 2).
PAPER_IMAGE_SIZE = (256, 320)


def gpu_named(name: str) -> GPU:
    """A GPU of the table by name, case-insensitive, the memory suffix optional ("h100", "H100 80GB")."""
    key = name.strip().upper().split()[0].split("-")[0] if name.strip() else ""
    if key not in GPUS:
        raise XWAMError(f"--gpu {name!r}: expected one of {', '.join(g.name for g in GPUS.values())}")
    return GPUS[key]


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class DataShape:
    """What the model's shape depends on, from the store when it is here, else from the recipe."""

    views: list[str]
    image_size: tuple[int, int]
    num_frames: int  # 1 + future frames
    num_actions: int
    action_dim: int
    state_dim: int
    tasks: int
    text_seq_len: int
    source: str  # where views and image size came from


def data_shape(recipe: Recipe) -> DataShape:
    """The layout training would see: the store's views/size/dimensions when the store exists; a recipe
    that prepares its own store (prepare.out = data.store) gives them before it is made; else the
    paper's 3 views at 256x320."""
    from xwam_core.data.windows import WindowLayout
    from xwam_core.models.presets import PRESETS

    data, model = recipe.data, recipe.model
    window = WindowLayout(data.future_frames, data.frame_stride)
    store_path = data.entries()[0].store
    views: list[str]
    a_dim = s_dim = 0
    if store_path and (Path(store_path) / "meta").is_dir():
        from xwam_core.data.reader import EpisodeStore

        store = EpisodeStore(store_path)
        views, size, tasks = list(store.views), tuple(store.image_size), len(store.tasks)
        a_dim, s_dim = len(store.action_names), len(store.state_names)
        source = f"store {store_path}"
    elif recipe.prepare.out and recipe.prepare.out == store_path and recipe.prepare.source == "metaworld":
        from xwam_core.data.sources.metaworld import ACTION_NAMES, STATE_LAYOUTS

        mw = recipe.prepare.metaworld
        views, size, tasks = list(mw.views), (mw.size, mw.size), len(mw.tasks)
        a_dim, s_dim = len(ACTION_NAMES), len(STATE_LAYOUTS[mw.state])
        source = f"prepare.metaworld; store {store_path} not made yet"
    else:
        layout = PRESETS[model.preset]
        views = [f"view{i}" for i in range(int(layout["num_views"]))]
        size, tasks = PAPER_IMAGE_SIZE, 1
        source = f"the paper's layout; store {store_path or '(none)'} not found here"
    if data.views:
        views = list(data.views)
    text_len = model.text_seq_len
    if model.text == "umt5":
        text_len, tasks = _umt5_cache_shape(model.text_cache, tasks)
    return DataShape(
        views=views,
        image_size=(int(size[0]), int(size[1])),
        num_frames=window.num_frames,
        num_actions=window.num_actions,
        action_dim=model.action_dim or a_dim or int(PRESETS[model.preset]["action_dim"]),
        state_dim=model.state_dim or s_dim or int(PRESETS[model.preset]["state_dim"]),
        tasks=tasks,
        text_seq_len=text_len,
        source=source,
    )


def _umt5_cache_shape(path: str, tasks: int) -> tuple[int, int]:
    """(tokens per prompt, tasks) of a UMT5 cache file, from its header; UMT5's length when absent."""
    from xwam_core.models.text import UMT5_MAX_LENGTH

    if path and Path(path).is_file():
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            shape = f.get_slice("embeddings").get_shape()
        return int(shape[1]), int(shape[0])
    return UMT5_MAX_LENGTH, tasks


# ------------------------------------------------------------------------------ meta measurements
# Ops that read a tensor's value (bool(t), t.item()): on meta tensors the trace answers true for the
# result of an `any` (so the depth branch runs) and false otherwise (so range checks pass).
_DATA_DEPENDENT = (torch.ops.aten.is_nonzero.default, torch.ops.aten._local_scalar_dense.default)


class _LiveBytes(TorchDispatchMode):
    """Follows every tensor an op creates (by storage) until its last reference dies: the peak of live
    bytes of a computation, on meta tensors without allocating anything. A meta value read back to the
    CPU (small: colour-jitter factors) reads as zeros."""

    def __init__(self, ignore: set[int] | None = None) -> None:
        super().__init__()
        self.ignore = ignore or set()  # storages that exist already (weights): views of them cost nothing
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, live tensor objects]
        self._truthy: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _DATA_DEPENDENT and args[0].device.type == "meta":
            return _storage_bytes(args[0])[0] in self._truthy
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "meta":
            device = (kwargs or {}).get("device")
            if device is not None and torch.device(device).type != "meta":  # small values read back
                return torch.zeros(args[0].shape, dtype=(kwargs or {}).get("dtype") or args[0].dtype)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        if func.overloadpacket is torch.ops.aten.any and isinstance(out, torch.Tensor) and out.is_meta:
            self._truthy.add(_storage_bytes(out)[0])
        return out

    def track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key in self.ignore:
            return
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [t.untyped_storage().nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self._storages[key]
                self._truthy.discard(key)


@dataclass
class StepTrace:
    """A micro-batch's training forward (augmentation, codec, noising, transformer, losses) on meta."""

    encoding: int  # live bytes while the sample is augmented and encoded (before the transformer runs)
    forward_peak: int  # live bytes at the forward's peak, from the batch on (latents, activations, losses)
    saved_blocks: list[int]  # bytes autograd keeps inside each block (main blocks, then depth blocks)
    block_inputs: list[int]  # bytes a checkpointed block keeps instead: its inputs
    transformer_flops: int  # the transformer's forward
    block_flops: int  # the part of it inside the blocks (run again in backward under checkpointing)
    codec_flops: int  # the encoding's forward (augmentation included)

    def activations(self, checkpointing: bool) -> int:
        """Per sample: the forward's peak; under checkpointing the blocks keep their inputs, and backward
        recomputes one block at a time."""
        if not checkpointing or not self.saved_blocks:
            return self.forward_peak
        kept = sum(self.block_inputs) + max(self.saved_blocks)
        return self.forward_peak - sum(self.saved_blocks) + kept


@dataclass
class Footprint:
    """Bytes (or FLOPs) of a micro-batch of b samples: fixed + b x per_sample, fitted exactly to traces of
    1 and 2 samples (what does not grow with the batch: RoPE tables, the timestep embedding, ...)."""

    fixed: int
    per_sample: int

    @classmethod
    def fit(cls, one: int, two: int) -> Footprint:
        per_sample = max(two - one, 0)
        return cls(max(one - per_sample, 0), per_sample)

    def at(self, samples: int) -> int:
        return self.fixed + samples * self.per_sample


class _FusedAttention(torch.autograd.Function):
    """Fused attention as the GPU (flash / memory-efficient) and CPU (flash) kernels keep it for backward:
    q, k, v, the output and the log-sum-exp, never the attention matrix. Stands in for SDPA in the trace
    (on meta tensors torch picks the math path, which keeps the matrix). Its forward still runs the math
    path, without grad, so that the FLOP count includes attention; that path's matrix is then a transient
    of one layer in the live bytes (a small overestimate: 28 MB a sample for the base model)."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: Any) -> Any:
        out = _SDPA(query, key, value, **kwargs)  # (B, H, N_q, d)
        lse = torch.empty(out.shape[:-1], device=out.device, dtype=torch.float32)  # (B, H, N_q)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        # the planner traces the forward pass and counts what autograd keeps; it never differentiates
        raise RuntimeError(
            "plan: the fused-attention stand-in only counts memory and FLOPs; it has no backward"
        )


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fused_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value, kwargs)


def trace_step(
    built: Built, recipe: Recipe, shape: DataShape, dtype: torch.dtype, samples: int = 1
) -> StepTrace:
    """Run the training objective on one sample of meta tensors, the transformer in `dtype` (the compute
    dtype: autocast's casts, or FSDP2's bf16 parameters); count live bytes, saved bytes per block, FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from xwam_core.models.transformer import SelfAttnInputs
    from xwam_core.objective import TrainingObjective

    model: Any = built.model
    blocks = [*model.wan.blocks, *model.depth_blocks]
    owner = [-1]  # the block running now (-1: outside the blocks)
    saved: dict[int, tuple[int, int]] = {}  # storage -> (owner, bytes); a storage counts once
    inputs = [0] * len(blocks)
    shared: set[int] = set()
    counter = FlopCounterMode(display=False)
    marks: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_bytes(t)
        if key not in saved and key not in weights:
            saved[key] = (owner[0], nbytes)
        return t

    def enter(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            owner[0] = index
            marks["block_flops"] -= counter.get_total_flops()
            # what a checkpointed block keeps: its hidden input (and, in the depth branch, the main
            # branch's keys/values it attends to); the text and the AdaLN projection all blocks share, once
            held = [args[0]]
            if isinstance(args[3], SelfAttnInputs) and args[3].kv_extra is not None:
                held += list(args[3].kv_extra)
            inputs[index] += sum(_storage_bytes(t)[1] for t in held)
            for t in (args[1], args[2]):
                if isinstance(t, torch.Tensor) and _storage_bytes(t)[0] not in shared:
                    shared.add(_storage_bytes(t)[0])
                    inputs[index] += _storage_bytes(t)[1]

        return hook

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        owner[0] = -1
        marks["block_flops"] += counter.get_total_flops()

    def model_starts(_module: nn.Module, _args: Any) -> None:
        marks["encoding"] = live.peak
        marks["flops_before_model"] = counter.get_total_flops()

    def model_ends(_module: nn.Module, _args: Any, _out: Any) -> None:
        marks["model_flops"] = counter.get_total_flops() - marks["flops_before_model"]

    handles = [model.register_forward_pre_hook(model_starts), model.register_forward_hook(model_ends)]
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave))
    marks["block_flops"] = 0
    for p in model.parameters():
        p.data = p.data.to(dtype)
    modules = (model, built.text, built.codec)
    # weights and buffers are counted apart: a view of one (a transposed weight autograd keeps) costs nothing
    weights = {_storage_bytes(t)[0] for m in modules for t in [*m.parameters(), *m.buffers()]}
    live = _LiveBytes(ignore=weights)
    views, (height, width), frames = len(shape.views), shape.image_size, shape.num_frames
    meta = torch.device("meta")
    objective = TrainingObjective(
        model,
        built.text,
        built.codec,
        recipe.noise,
        torch.ones(shape.action_dim, dtype=torch.bool, device=meta),
        torch.ones(shape.state_dim, dtype=torch.bool, device=meta),
        recipe.train.augment,
    )
    batch = {  # as the loader gives it
        "rgb": torch.empty(samples, views, frames, height, width, 3, dtype=torch.uint8, device=meta),
        "depth": torch.empty(samples, views, frames, height, width, device=meta),
        "intrinsics": torch.eye(3).expand(samples, views, frames, 3, 3).to(meta),
        "actions": torch.empty(samples, shape.num_actions, shape.action_dim, device=meta),
        "states": torch.empty(samples, frames, shape.state_dim, device=meta),
        "has_depth": torch.ones(samples, dtype=torch.bool, device=meta),
        "task_index": torch.zeros(samples, dtype=torch.long, device=meta),
    }
    fused = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter, live, fused:
            losses = objective(batch, 0, 0, 0)
            marks["forward_peak"] = live.peak
            del losses
    finally:
        for h in handles:
            h.remove()
    per_block = [0] * len(blocks)
    for who, nbytes in saved.values():
        if who >= 0:
            per_block[who] += nbytes
    total_flops = counter.get_total_flops()
    return StepTrace(
        encoding=marks["encoding"],
        forward_peak=marks["forward_peak"],
        saved_blocks=per_block,
        block_inputs=inputs,
        transformer_flops=marks["model_flops"],
        block_flops=marks["block_flops"],
        codec_flops=total_flops - marks["model_flops"],
    )


def _storage_bytes(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def latent_grid(shape: DataShape, factors: tuple[int, int]) -> tuple[int, int, int]:
    """(latent frames, h, w) of one view's clip for a codec of (spatial, temporal) compression."""
    spatial, temporal = factors
    height, width = shape.image_size
    if (shape.num_frames - 1) % temporal or height % spatial or width % spatial:
        raise XWAMError(
            f"{shape.num_frames} frames of {height}x{width}: the codec needs 1 + {temporal}k frames and sizes "
            f"divisible by {spatial}"
        )
    return 1 + (shape.num_frames - 1) // temporal, height // spatial, width // spatial


# ----------------------------------------------------------------------------------------- building
@dataclass
class Built:
    model: XWAMTransformer
    codec: Codec
    text: TextConditioner
    parameters: dict[str, dict[str, int]]  # group -> {"trainable", "frozen"}

    @property
    def factors(self) -> tuple[int, int]:
        """The codec's (spatial, temporal) compression."""
        return int(self.codec.spatial_factor), int(self.codec.temporal_factor)


def build_on_meta(recipe: Recipe, shape: DataShape) -> Built:
    """The recipe's model, text conditioner and codec with no weights allocated."""
    from accelerate import init_empty_weights

    from xwam_core.data.windows import WindowLayout
    from xwam_core.factory import Layout, model_kwargs
    from xwam_core.models.codecs import empty_codec
    from xwam_core.models.text import PrecomputedText, TaskEmbeddingText
    from xwam_core.models.transformer import XWAMTransformer

    cfg = recipe.model
    window = WindowLayout(recipe.data.future_frames, recipe.data.frame_stride)
    layout = Layout(
        views=list(shape.views),
        image_size=shape.image_size,
        window=window,
        store_action_dim=shape.action_dim,
        store_state_dim=shape.state_dim,
        action_dim=shape.action_dim,
        state_dim=shape.state_dim,
        tasks=[str(i) for i in range(max(shape.tasks, 1))],
    )
    # RoPE tables and other buffers stay real (they are small and the forward reads them); parameters meta
    with init_empty_weights(include_buffers=False):
        model = XWAMTransformer(**model_kwargs(cfg, layout))
        codec = empty_codec(cfg.preset, cfg.vae)
        text: TextConditioner
        if cfg.text == "task":
            text = TaskEmbeddingText(max(shape.tasks, 1), model.config.text_dim, cfg.text_seq_len)
        else:  # precomputed UMT5 embeddings: a table on the GPU, no encoder at training
            table = torch.empty(max(shape.tasks, 1), shape.text_seq_len, model.config.text_dim, device="meta")
            text = PrecomputedText(table, table[0], padding="kept")
    codec.requires_grad_(False)
    if recipe.train.lora_rank > 0:
        from xwam_core.finetune import add_lora

        with init_empty_weights(include_buffers=False):
            model = add_lora(model, recipe.train.lora_rank)
    groups: dict[str, dict[str, int]] = {}

    def add(group: str, module: nn.Module, prefix_filter: Any = None) -> None:
        entry = groups.setdefault(group, {"trainable": 0, "frozen": 0})
        for name, p in module.named_parameters():
            if prefix_filter is not None and not prefix_filter(name):
                continue
            entry["trainable" if p.requires_grad else "frozen"] += p.numel()

    add("main branch", model, lambda n: not n.startswith(("depth_blocks.", "depth_")))
    add("depth branch", model, lambda n: n.startswith(("depth_blocks.", "depth_")))
    add("text", text)
    add("codec", codec)
    return Built(model, codec, text, groups)


# ------------------------------------------------------------------------------------------ planning
@dataclass
class Memory:
    """Bytes per GPU."""

    weights: int
    gradients: int
    ddp_buckets: int
    optimizer: int
    activations: int  # the transformer's, for the micro-batch
    codec_weights: int
    encoding: int  # the codec's encoding of a micro-batch (or codec micro-batch)
    text_table: int
    # with accumulation the gradients outlive a micro-batch's backward and meet the next one's forward;
    # without, they grow in backward as the activations are freed (and are dropped after the step)
    gradients_persist: bool

    @property
    def total(self) -> int:
        """The peak: what stays, plus the largest of what comes and goes in turn (the codec's encoding,
        then the forward's activations, then, as backward frees those, the gradients)."""
        static = self.weights + self.ddp_buckets + self.optimizer + self.codec_weights + self.text_table
        grads = self.gradients if self.gradients_persist else 0
        return static + grads + max(self.encoding, self.activations, self.gradients - grads)


@dataclass
class Batch:
    global_batch: int
    ranks: int
    micro_batch: int
    accumulation: int


@dataclass
class Plan:
    recipe: str
    strategy: str
    gpu: GPU
    gpu_memory_gb: float
    batch: Batch
    shape: DataShape
    precision: str
    checkpointing: bool
    parameters: dict[str, dict[str, int]]
    tokens: dict[str, int]
    memory: Memory
    memory_other_checkpointing: Memory  # the same with gradient checkpointing switched the other way
    activation_bytes_per_token_block: float
    flops_per_step: float  # whole global batch
    flops_six_params_tokens: float  # the rule of thumb: 6 x parameters x the tokens they see
    codec_flops_per_step: float
    step_seconds: float
    fits: bool
    advice: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["memory"]["total"] = self.memory.total
        out["memory_other_checkpointing"]["total"] = self.memory_other_checkpointing.total
        out["mfu"] = MFU
        return out


def recipe_value(recipe: Recipe, key: tuple[str, str], default: Any) -> Any:
    section = getattr(recipe, key[0], None)
    value = getattr(section, key[1], None) if section is not None else None
    return default if value is None else value


def resolve_batch(recipe: Recipe, ranks: int, micro_batch: int | None = None) -> Batch:
    """global = micro-batch x ranks x accumulation; the micro-batch is `micro_batch`, else the recipe's,
    else the whole per-GPU share (accumulation 1)."""
    global_batch = int(recipe_value(recipe, GLOBAL_BATCH_KEY, 1))
    per_rank, rest = divmod(global_batch, ranks)
    if rest:
        raise XWAMError(f"data.batch_size={global_batch} does not divide over {ranks} GPUs")
    if micro_batch is None:
        micro_batch = int(recipe_value(recipe, MICRO_BATCH_KEY, 0))
    micro_batch = micro_batch or per_rank
    accumulation, rest = divmod(per_rank, micro_batch)
    if rest or accumulation < 1:
        raise XWAMError(
            f"micro-batch {micro_batch} does not divide the {per_rank} samples per GPU "
            f"(data.batch_size={global_batch} over {ranks} GPUs)"
        )
    return Batch(global_batch, ranks, micro_batch, accumulation)


def _precision(recipe: Recipe, on_gpu: bool) -> str:
    mixed = recipe.train.mixed_precision
    if mixed == "auto":
        return "bf16" if on_gpu else "no"
    return mixed


@dataclass
class _Measured:
    built: Built
    trace: StepTrace  # of one sample
    encoding: Footprint
    activations: dict[bool, Footprint]  # by gradient checkpointing
    transformer_flops: Footprint
    block_flops: Footprint
    codec_flops: Footprint
    shape: DataShape


def measure(recipe: Recipe, shape: DataShape, precision: str) -> _Measured:
    """Build on meta and trace the training forward of 1 and of 2 samples in the compute dtype."""
    built = build_on_meta(recipe, shape)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    one, two = (trace_step(built, recipe, shape, dtype, samples) for samples in (1, 2))
    return _Measured(
        built=built,
        trace=one,
        encoding=Footprint.fit(one.encoding, two.encoding),
        activations={c: Footprint.fit(one.activations(c), two.activations(c)) for c in (False, True)},
        transformer_flops=Footprint.fit(one.transformer_flops, two.transformer_flops),
        block_flops=Footprint.fit(one.block_flops, two.block_flops),
        codec_flops=Footprint.fit(one.codec_flops, two.codec_flops),
        shape=shape,
    )


def memory_for(
    m: _Measured, strategy: str, batch: Batch, precision: str, checkpointing: bool, codec_batch: int
) -> Memory:
    model = m.built.model
    params = [p for p in [*model.parameters(), *m.built.text.parameters()]]
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    half = 2 if precision in ("bf16", "fp16") else 0
    ranks = batch.ranks
    if strategy == "fsdp2":
        unit_bytes = half or 4
        blocks = [*model.wan.blocks, *model.depth_blocks]
        block_sizes = sorted((sum(p.numel() for p in b.parameters()) for b in blocks), reverse=True)
        root = total - sum(block_sizes)
        weights = math.ceil(4 * total / ranks) + unit_bytes * (root + sum(block_sizes[:2]))
        gradients = math.ceil(4 * trainable / ranks) + unit_bytes * block_sizes[0]
        optimizer = math.ceil(8 * trainable / ranks)
        buckets = 0
    else:
        weights = 4 * total + half * sum(p.numel() for p in model.parameters())
        gradients = 4 * trainable
        optimizer = 8 * trainable
        buckets = 4 * trainable if strategy == "ddp" and ranks > 1 else 0
    codec_weights = sum(_nbytes(p) for p in m.built.codec.parameters())  # fp32, frozen, on every GPU
    return Memory(
        weights=weights,
        gradients=gradients,
        ddp_buckets=buckets,
        optimizer=optimizer,
        activations=m.activations[checkpointing].at(batch.micro_batch),
        codec_weights=codec_weights,
        # the objective encodes a micro-batch at once, or CODEC_BATCH_KEY samples at a time
        encoding=m.encoding.at(min(codec_batch or batch.micro_batch, batch.micro_batch)),
        text_table=sum(_nbytes(b) for b in m.built.text.buffers()),
        gradients_persist=batch.accumulation > 1,
    )


def plan(
    recipe: Recipe,
    gpus: int = 8,
    gpu: str | None = None,
    gpu_memory_gb: float | None = None,
    strategy: str | None = None,
    on_gpu: bool = True,
    shape: DataShape | None = None,
    micro_batch: int | None = None,
) -> Plan:
    """What `recipe` needs per GPU on `gpus` GPUs; `fits` and a one-line `advice` when it does not.

    `on_gpu=False` plans this CPU's run (mixed_precision "auto" is fp32 there); `shape` replaces the data
    layout found from the recipe, `micro_batch` the recipe's."""
    if gpus < 1:
        raise XWAMError(f"--gpus {gpus}: expected an integer >= 1")
    card = gpu_named(gpu or DEFAULT_GPU)
    capacity = gpu_memory_gb if gpu_memory_gb is not None else card.memory_gb
    if not (0 < capacity < math.inf):
        raise XWAMError(f"--gpu-memory {capacity}: expected a finite number of GB > 0")
    strategy = strategy or str(recipe_value(recipe, STRATEGY_KEY, DEFAULT_STRATEGY))
    if strategy not in STRATEGIES:
        raise XWAMError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if strategy == "single" and gpus != 1:
        raise XWAMError(f"strategy 'single' runs on one GPU, not {gpus}: use ddp or fsdp2")
    shape = shape or data_shape(recipe)
    precision = _precision(recipe, on_gpu)
    batch = resolve_batch(recipe, gpus, micro_batch)
    m = measure(recipe, shape, precision)
    ckpt = recipe.train.gradient_checkpointing
    codec_batch = int(recipe_value(recipe, CODEC_BATCH_KEY, 0))
    memory = memory_for(m, strategy, batch, precision, ckpt, codec_batch)
    other = memory_for(m, strategy, batch, precision, not ckpt, codec_batch)
    views = len(shape.views)
    latent_f, latent_h, latent_w = latent_grid(shape, m.built.factors)
    patch = tuple(m.built.model.cfg.patch_size)
    per_view_frame = (latent_h // patch[1]) * (latent_w // patch[2])
    video_tokens = views * (latent_f // patch[0]) * per_view_frame
    tokens = {
        "video": video_tokens,
        "actions": shape.num_actions,
        "states": shape.num_frames,
        "sequence": video_tokens + shape.num_actions + shape.num_frames,
        "depth_branch": video_tokens if len(m.built.model.depth_blocks) else 0,
        "text": shape.text_seq_len,
        "per_view_frame": per_view_frame,
        "latent_frames": latent_f,
    }
    blocks = len(m.trace.saved_blocks)
    block_tokens = tokens["sequence"] * len(m.built.model.wan.blocks) + tokens["depth_branch"] * len(
        m.built.model.depth_blocks
    )
    per_token_block = sum(m.trace.saved_blocks) / max(block_tokens, 1) if blocks else 0.0
    # backward = 2 x forward; checkpointed blocks run their forward once more
    micro_batches = batch.ranks * batch.accumulation
    transformer = m.transformer_flops.at(batch.micro_batch) * micro_batches
    recompute = m.block_flops.at(batch.micro_batch) * micro_batches if ckpt else 0
    flops = 3 * transformer + recompute
    codec_flops = m.codec_flops.at(batch.micro_batch) * micro_batches
    depth_params = sum(
        g["trainable"] + g["frozen"] for k, g in m.built.parameters.items() if k == "depth branch"
    )
    main_params = sum(
        g["trainable"] + g["frozen"] for k, g in m.built.parameters.items() if k == "main branch"
    )
    six_pt = (
        6 * (main_params * tokens["sequence"] + depth_params * tokens["depth_branch"]) * batch.global_batch
    )
    step_seconds = (flops + codec_flops) / gpus / (MFU * card.bf16_flops)
    result = Plan(
        recipe=recipe.name,
        strategy=strategy,
        gpu=card,
        gpu_memory_gb=capacity,
        batch=batch,
        shape=shape,
        precision=precision,
        checkpointing=ckpt,
        parameters=m.built.parameters,
        tokens=tokens,
        memory=memory,
        memory_other_checkpointing=other,
        activation_bytes_per_token_block=per_token_block,
        flops_per_step=flops,
        flops_six_params_tokens=six_pt,
        codec_flops_per_step=codec_flops,
        step_seconds=step_seconds,
        fits=memory.total <= capacity * GB,
    )
    if not result.fits:
        result.advice = _advice(m, result, capacity, precision, codec_batch)
    return result


def _advice(m: _Measured, p: Plan, capacity: float, precision: str, codec_batch: int) -> str:
    """One line: what this needs, and what fits: the largest micro-batch (x accumulation, the same global
    batch) that fits with the simplest strategy (ddp before fsdp2, checkpointing only when needed), or
    from how many GPUs fsdp2 fits at micro-batch 1."""
    need = (
        f"needs {_gb_value(p.memory.total)} GB/GPU on {p.batch.ranks} x {capacity:g} GB "
        f"({p.strategy}, micro-batch {p.batch.micro_batch}"
        f"{', grad checkpointing' if p.checkpointing else ''})"
    )
    per_rank = p.batch.global_batch // p.batch.ranks
    strategies = ["single"] if p.batch.ranks == 1 and p.strategy == "single" else ["ddp", "fsdp2"]
    options = [(s, c) for s in strategies for c in sorted({p.checkpointing, True})]
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        batch = Batch(p.batch.global_batch, p.batch.ranks, micro, per_rank // micro)
        for strategy, ckpt in options:
            mem = memory_for(m, strategy, batch, precision, ckpt, codec_batch)
            if mem.total <= capacity * GB:
                how = strategy + (" + grad checkpointing" if ckpt else "")
                return (
                    f"{need}; fits with {how} at micro-batch {micro} (x accumulation {batch.accumulation}): "
                    f"{_gb_value(mem.total)} GB/GPU"
                )
    floor = memory_for(
        m, "fsdp2", Batch(p.batch.global_batch, p.batch.ranks, 1, per_rank), precision, True, 1
    )
    line = (
        f"{need}; does not fit even with fsdp2 + grad checkpointing at micro-batch 1 "
        f"({_gb_value(floor.total)} GB/GPU)"
    )
    ranks = p.batch.ranks
    while ranks < 1 << 20:  # what sharding over more GPUs gives (the rest does not shrink with them)
        ranks *= 2
        mem = memory_for(m, "fsdp2", Batch(ranks, ranks, 1, 1), precision, True, 1)
        if mem.total <= capacity * GB:
            return f"{line}; fsdp2 fits from {ranks} GPUs of {capacity:g} GB"
    return f"{line}; more GPUs do not help: the unsharded part alone is too large for {capacity:g} GB"


# ------------------------------------------------------------------------------------------- output
def plan_json(p: Plan) -> str:
    return json.dumps(p.to_json(), indent=2)


def plan_rows(p: Plan) -> Iterator[tuple[str, str]]:
    """(label, value) rows of the dry-run table."""
    yield (
        "recipe",
        f"{p.recipe}: {p.strategy} on {p.batch.ranks} x {p.gpu.name} ({p.gpu_memory_gb:g} GB), {p.precision if p.precision != 'no' else 'fp32'}",
    )
    b = p.batch
    yield (
        "batch",
        f"global {b.global_batch} = micro-batch {b.micro_batch} x {b.ranks} GPUs x accumulation {b.accumulation}",
    )
    s = p.shape
    yield (
        "data",
        f"{len(s.views)} views at {s.image_size[0]}x{s.image_size[1]}, {s.num_frames} frames, "
        f"{s.num_actions} actions ({s.source})",
    )
    for group, counts in p.parameters.items():
        if counts["trainable"] or counts["frozen"]:
            yield (
                f"parameters: {group}",
                f"{_count(counts['trainable'])} trainable, {_count(counts['frozen'])} frozen",
            )
    t = p.tokens
    yield (
        "tokens per sample",
        f"{t['sequence']} = {t['per_view_frame']} per view-frame x {len(s.views)} views x {t['latent_frames']} "
        f"latent frames + {t['actions']} actions + {t['states']} states; depth branch {t['depth_branch']}; "
        f"text {t['text']}",
    )
    mem, other = p.memory, p.memory_other_checkpointing
    yield "memory/GPU: weights", _gb(mem.weights)
    yield (
        "memory/GPU: gradients",
        _gb(mem.gradients) + (f" (+ DDP buckets {_gb(mem.ddp_buckets)})" if mem.ddp_buckets else ""),
    )
    yield "memory/GPU: optimizer (AdamW m+v)", _gb(mem.optimizer)
    on, off = (mem, other) if p.checkpointing else (other, mem)
    yield (
        "memory/GPU: activations",
        f"{_gb(on.activations)} with grad checkpointing, {_gb(off.activations)} without "
        f"({p.activation_bytes_per_token_block / 1024:.0f} KB per token per block)",
    )
    yield "memory/GPU: codec", f"{_gb(mem.codec_weights)} weights + {_gb(mem.encoding)} encoding"
    if mem.text_table:
        yield (
            "memory/GPU: text table",
            f"{_gb(mem.text_table)} ({s.tasks} task(s) + the empty prompt x {s.text_seq_len} tokens, fp32)",
        )
    yield (
        "memory/GPU: peak",
        f"{_gb(mem.total)} of {p.gpu_memory_gb:g} GB ({'fits' if p.fits else 'does NOT fit'}; "
        f"grad checkpointing {'on' if p.checkpointing else 'off'}, {_gb(other.total)} with it "
        f"{'off' if p.checkpointing else 'on'})",
    )
    yield (
        "FLOPs per step",
        f"{p.flops_per_step:.3g} transformer (6 x params x tokens: {p.flops_six_params_tokens:.3g}; the rest "
        f"attention's quadratic term{' and the recompute' if p.checkpointing else ''}) + "
        f"{p.codec_flops_per_step:.3g} codec = {(p.flops_per_step + p.codec_flops_per_step) / b.ranks:.3g} per GPU",
    )
    yield (
        "step time",
        f"{p.step_seconds:.2f} s at {MFU:.0%} MFU of {p.gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16",
    )


def _gb(nbytes: float) -> str:
    return f"{_gb_value(nbytes)} GB"


def _gb_value(nbytes: float) -> str:
    """GB to three significant digits (615, 76.1, 0.412), never in exponent form."""
    value = nbytes / GB
    digits = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:.{digits}f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"
