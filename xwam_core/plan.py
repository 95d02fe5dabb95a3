"""What a recipe needs per GPU, said before any work (`xwam pretrain RECIPE --dry-run`).

The model, the text conditioner and the codec are built on the meta device (no weight is allocated,
nothing is downloaded: the Wan2.2 VAE's geometry is `codecs.WAN22_VAE_GEOMETRY` unless `model.vae` is a
local folder), and one forward of a single sample runs on meta tensors. That forward is the measurement
the activation figures come from:

- activations: the bytes autograd saves for backward, counted per storage with
  `torch.autograd.graph.saved_tensors_hooks` (so what the model code really keeps, in the compute dtype),
  split by block. Without gradient checkpointing a micro-batch of b samples keeps
      b x (sum over blocks of saved(block) + saved(outside the blocks))
  and with it
      b x (sum over blocks of input(block) + saved(outside) + max over blocks of saved(block))
  (each checkpointed block keeps only its inputs; backward recomputes one block at a time). The table
  prints saved(block) per token: ~`activation_kb_per_token_block`.
- codec: the frozen codec's weights (fp32, on every GPU: it is outside the sharded module) plus the peak
  of live tensors while one sample's clips are encoded (RGB and depth, all views), counted by a dispatch
  mode that follows every tensor's storage on meta; times the clips per codec call.
- FLOPs: torch's FlopCounterMode on the same meta forward (= 2 x params x tokens for every matmul plus
  4 x N_q x N_k x width for every attention); a training step is 3 x forward (backward = 2 x forward),
  plus one more forward of the blocks under gradient checkpointing; plus the codec's forward.

Memory per GPU under a strategy (P: the model's parameters, P_t: the trainable ones, R: ranks), in bytes:
- single / ddp: fp32 weights 4P, gradients 4P_t, AdamW m and v 8P_t (the fp32 weights are the master
  copy under mixed precision); under bf16/fp16 autocast also the half-precision copies of the weights
  autocast keeps for the forward (2P); ddp adds its reducer's gradient buckets (4P_t; the Trainer's DDP
  does not view gradients as buckets).
- fsdp2 (fully_shard per WanTransformerBlock of both branches, the rest as the root unit; bf16 params
  with fp32 reduction under mixed precision): (4P + 4P_t + 8P_t) / R, plus the unsharded half-precision
  parameters of the root and of two blocks (the one running and the prefetched one) and one block's
  unsharded gradients.
The peak is weights + gradients + buckets + optimizer + codec weights + max(encoding, activations): the
codec's encoding is over before the transformer's forward starts.

Calibrated against measured peak memory: `bench/plan_check.py` trains the tiny and a medium preset on
this CPU (fp32) in fresh processes and compares the peak RSS growth of a training step with this figure
(tests/test_plan.py checks tiny within 20%).
"""

from __future__ import annotations

import json
import math
import weakref
from unittest import mock
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from xwam_core.errors import XWAMError
from xwam_core.recipe import Recipe

GB = 1e9  # memory is printed in GB = 10^9 bytes and compared with the GPU's nominal size (conservative)

STRATEGIES = ("single", "ddp", "fsdp2")
DEFAULT_STRATEGY = "ddp"

# Recipe keys the planner reads, in one place: (section, key). The strategy and the accumulation keys
# belong to the Trainer; a recipe without them plans DDP with accumulation 1.
STRATEGY_KEY = ("train", "strategy")
GLOBAL_BATCH_KEY = ("data", "batch_size")  # the global batch: micro-batch x ranks x accumulation
ACCUMULATION_KEY = ("train", "grad_accum")
MICRO_BATCH_KEY = ("train", "micro_batch")
CODEC_BATCH_KEY = ("train", "codec_batch")  # clips per codec call; absent: a micro-batch's clips at once

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


def data_shape(recipe: Recipe, image_size: tuple[int, int] | None = None) -> DataShape:
    """The layout training would see: the store's views/size/dimensions when the store exists; a recipe
    that prepares its own store (prepare.out = data.store) gives them before it is made; else the
    paper's 3 views at 256x320. `image_size` overrides the size."""
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
        mw = recipe.prepare.metaworld
        views, size, tasks = list(mw.views), (mw.size, mw.size), len(mw.tasks)
        a_dim, s_dim = 4, 18 if mw.state == "task" else 8  # the Meta-World source's dimensions
        source = f"prepare.metaworld (store {store_path} not made yet)"
    else:
        layout = PRESETS[model.preset]
        views = [f"view{i}" for i in range(int(layout["num_views"]))]
        size, tasks = PAPER_IMAGE_SIZE, 1
        source = f"the paper's layout (store {store_path or '(none)'} not found here)"
    if data.views:
        views = list(data.views)
    text_len = model.text_seq_len
    if model.text == "umt5":
        text_len, tasks = _umt5_cache_shape(model.text_cache, tasks)
    return DataShape(
        views=views,
        image_size=(int(image_size[0]), int(image_size[1])) if image_size else (int(size[0]), int(size[1])),
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
class _LiveBytes(TorchDispatchMode):
    """Follows every tensor an op creates (by storage) until its last Python reference dies: the peak of
    live bytes of a computation on meta tensors, without allocating anything."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage id -> [bytes, live tensor objects]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        key = t.untyped_storage()._cdata
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


@dataclass
class ForwardTrace:
    """One sample's forward on meta: what autograd keeps, what checkpointed blocks keep, FLOPs."""

    saved_outside: int  # bytes saved outside the blocks (embeddings, heads, RoPE, text projection)
    saved_blocks: list[int]  # bytes saved inside each block (main blocks, then depth blocks)
    block_inputs: list[int]  # bytes a checkpointed block keeps: its inputs
    forward_flops: int
    block_forward_flops: int  # the part of forward_flops inside the blocks (recomputed under checkpointing)

    def activations(self, checkpointing: bool) -> int:
        if checkpointing:
            return self.saved_outside + sum(self.block_inputs) + max(self.saved_blocks, default=0)
        return self.saved_outside + sum(self.saved_blocks)


class _FusedAttention(torch.autograd.Function):
    """Fused attention as the GPU (flash / memory-efficient) and CPU (flash) kernels keep it for backward:
    q, k, v, the output and the log-sum-exp, never the attention matrix. Stands in for SDPA in the trace
    (on meta tensors torch picks the math path, which keeps the matrix); its forward still runs the
    math path (no grad) so the FLOP count includes attention."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kwargs: Any) -> Any:
        out = _SDPA(query, key, value, **kwargs)  # (B, H, N_q, d)
        lse = torch.empty(out.shape[:-1], device=out.device, dtype=torch.float32)  # (B, H, N_q)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # never run: the trace only counts
        raise NotImplementedError


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _fused_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value, kwargs)


def trace_forward(
    model: nn.Module, shape: DataShape, factors: tuple[int, int], dtype: torch.dtype
) -> ForwardTrace:
    """Run the model on one sample of meta tensors in `dtype`; count saved bytes per block and FLOPs.
    `factors`: the codec's (spatial, temporal) compression."""
    from torch.utils.flop_counter import FlopCounterMode

    from xwam_core.models.transformer import SelfAttnInputs

    cfg: Any = model.config
    blocks = [*model.wan.blocks, *model.depth_blocks]
    owner = [-1]  # the block running now (-1: outside the blocks)
    saved: dict[int, tuple[int, int]] = {}  # storage -> (owner, bytes); a storage counts once
    inputs = [0] * len(blocks)
    shared: set[int] = set()
    counter = FlopCounterMode(display=False)
    flops_in_blocks = [0]

    weights = {_storage_bytes(p)[0] for p in model.parameters()}  # saved weights are not activations

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_bytes(t)
        if key not in saved and key not in weights:
            saved[key] = (owner[0], nbytes)
        return t

    def enter(index: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            owner[0] = index
            flops_in_blocks[0] -= counter.get_total_flops()
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
        flops_in_blocks[0] += counter.get_total_flops()

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave))
    video = torch.empty(
        1, len(shape.views), cfg.in_channels, *latent_grid(shape, factors), device="meta", dtype=dtype
    )
    actions = torch.empty(1, shape.num_actions, cfg.action_dim, device="meta", dtype=dtype)
    states = torch.empty(1, shape.num_frames, cfg.state_dim, device="meta", dtype=dtype)
    t = torch.empty(1, device="meta")
    text = torch.empty(1, shape.text_seq_len, cfg.text_dim, device="meta", dtype=dtype)
    depth_context = video[:, :, :, :1] if cfg.get("depth_condition", False) else None
    fused = mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter, fused:
            model(video, actions, states, t, t, text, run_depth=True, depth_context=depth_context)
    finally:
        for h in handles:
            h.remove()
    per_block = [0] * len(blocks)
    outside = 0
    for who, nbytes in saved.values():
        if who < 0:
            outside += nbytes
        else:
            per_block[who] += nbytes
    return ForwardTrace(outside, per_block, inputs, counter.get_total_flops(), flops_in_blocks[0])


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


@dataclass
class CodecTrace:
    parameters: int
    weight_bytes: int
    encode_peak_per_sample: int  # live bytes while one sample's RGB and depth clips are encoded
    clips_per_sample: int
    forward_flops_per_sample: int


def trace_codec(codec: nn.Module, shape: DataShape) -> CodecTrace:
    """The codec on one clip of meta tensors: peak live bytes and FLOPs; x views x 2 (RGB and depth)."""
    from torch.utils.flop_counter import FlopCounterMode

    height, width = shape.image_size
    views = len(shape.views)
    params = sum(p.numel() for p in codec.parameters())
    weight_bytes = sum(_nbytes(p) for p in codec.parameters())
    with torch.no_grad():
        tracker = _LiveBytes()
        counter = FlopCounterMode(display=False)
        with tracker, counter:
            # one sample: its views' RGB clips, then the same for depth images (encode_batch's two calls)
            for _ in range(2):
                clips = torch.empty(views, 3, shape.num_frames, height, width, device="meta")
                tracker.track(clips)
                latents = codec.encode(clips)
                del clips
        del latents
    return CodecTrace(params, weight_bytes, tracker.peak, 2 * views, counter.get_total_flops())


# ----------------------------------------------------------------------------------------- building
@dataclass
class Built:
    model: nn.Module
    codec: nn.Module
    text: nn.Module
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
    from xwam_core.models.text import TaskEmbeddingText
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
        text: nn.Module = (
            TaskEmbeddingText(max(shape.tasks, 1), model.config.text_dim, cfg.text_seq_len)
            if cfg.text == "task"
            else nn.Module()  # precomputed UMT5 embeddings: a buffer table, no encoder at training
        )
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

    @property
    def total(self) -> int:
        static = self.weights + self.gradients + self.ddp_buckets + self.optimizer + self.codec_weights
        return static + self.text_table + max(self.encoding, self.activations)


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
    codec_flops_per_step: float
    step_seconds: float
    fits: bool
    advice: str = ""
    notes: list[str] = field(default_factory=list)

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
    """global = micro x ranks x accumulation, from the recipe's keys (accumulation 1 without them)."""
    global_batch = int(recipe_value(recipe, GLOBAL_BATCH_KEY, 1))
    per_rank, rest = divmod(global_batch, ranks)
    if rest:
        raise XWAMError(f"data.batch_size={global_batch} does not divide over {ranks} GPUs")
    if micro_batch is None:
        micro_batch = int(recipe_value(recipe, MICRO_BATCH_KEY, 0))
    if not micro_batch:
        accumulation = int(recipe_value(recipe, ACCUMULATION_KEY, 1)) or 1
        micro_batch, rest = divmod(per_rank, accumulation)
        if rest or micro_batch < 1:
            raise XWAMError(
                f"{global_batch} samples over {ranks} GPUs x accumulation {accumulation}: not a whole micro-batch"
            )
    accumulation, rest = divmod(per_rank, micro_batch)
    if rest or accumulation < 1:
        raise XWAMError(f"micro-batch {micro_batch} does not divide the {per_rank} samples per GPU")
    return Batch(global_batch, ranks, micro_batch, accumulation)


def _precision(recipe: Recipe, on_gpu: bool) -> str:
    mixed = recipe.train.mixed_precision
    if mixed == "auto":
        return "bf16" if on_gpu else "no"
    return mixed


@dataclass
class _Measured:
    built: Built
    trace: ForwardTrace
    codec: CodecTrace
    shape: DataShape
    dtype: torch.dtype


def measure(recipe: Recipe, shape: DataShape, precision: str) -> _Measured:
    built = build_on_meta(recipe, shape)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    for p in built.model.parameters():
        p.data = p.data.to(dtype)  # the compute dtype: autocast's casts, or FSDP2's bf16 parameters
    trace = trace_forward(built.model, shape, built.factors, dtype)
    return _Measured(built, trace, trace_codec(built.codec, shape), shape, dtype)


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
    sample = m.trace.activations(checkpointing)
    text_table = sum(_nbytes(b) for b in m.built.text.buffers())
    if m.built.text.__class__ is nn.Module:  # UMT5: (tasks + 1) x L x text_dim fp32 table on the GPU
        text_table = (m.shape.tasks + 1) * m.shape.text_seq_len * int(model.config.text_dim) * 4
    clips = codec_batch or batch.micro_batch * m.codec.clips_per_sample // 2
    encoding = m.codec.encode_peak_per_sample * clips // max(m.codec.clips_per_sample // 2, 1)
    return Memory(
        weights=weights,
        gradients=gradients,
        ddp_buckets=buckets,
        optimizer=optimizer,
        activations=sample * batch.micro_batch,
        codec_weights=m.codec.weight_bytes,
        encoding=encoding,
        text_table=text_table,
    )


def plan(
    recipe: Recipe,
    gpus: int = 8,
    gpu: str = DEFAULT_GPU,
    gpu_memory_gb: float | None = None,
    strategy: str | None = None,
    image_size: tuple[int, int] | None = None,
    on_gpu: bool = True,
    shape: DataShape | None = None,
) -> Plan:
    """What `recipe` needs per GPU on `gpus` GPUs; `fits` and a one-line `advice` when it does not."""
    if gpus < 1:
        raise XWAMError(f"--gpus {gpus}: expected an integer >= 1")
    card = gpu_named(gpu)
    capacity = gpu_memory_gb if gpu_memory_gb is not None else card.memory_gb
    if capacity <= 0:
        raise XWAMError(f"--gpu-memory {capacity}: expected GB > 0")
    strategy = strategy or str(recipe_value(recipe, STRATEGY_KEY, DEFAULT_STRATEGY))
    if strategy not in STRATEGIES:
        raise XWAMError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if strategy == "single" and gpus != 1:
        raise XWAMError(f"strategy 'single' runs on one GPU, not {gpus}: use ddp or fsdp2")
    shape = shape or data_shape(recipe, image_size)
    precision = _precision(recipe, on_gpu)
    batch = resolve_batch(recipe, gpus)
    m = measure(recipe, shape, precision)
    ckpt = recipe.train.gradient_checkpointing
    codec_batch = int(recipe_value(recipe, CODEC_BATCH_KEY, 0))
    memory = memory_for(m, strategy, batch, precision, ckpt, codec_batch)
    other = memory_for(m, strategy, batch, precision, not ckpt, codec_batch)
    views = len(shape.views)
    latent_f, latent_h, latent_w = latent_grid(shape, m.built.factors)
    patch = tuple(m.built.model.config.patch_size)
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
    fwd = m.trace.forward_flops + (m.trace.block_forward_flops if ckpt else 0)
    flops = 3 * m.trace.forward_flops * batch.global_batch + (fwd - m.trace.forward_flops) * batch.global_batch
    codec_flops = m.codec.forward_flops_per_sample * batch.global_batch
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
        codec_flops_per_step=codec_flops,
        step_seconds=step_seconds,
        fits=memory.total <= capacity * GB,
    )
    if not result.fits:
        result.advice = _advice(m, recipe, result, capacity, precision, codec_batch)
    return result


def _advice(
    m: _Measured, recipe: Recipe, p: Plan, capacity: float, precision: str, codec_batch: int
) -> str:
    """One line: what this needs, and the first setting that fits (fsdp2 and checkpointing before a
    smaller micro-batch, the largest micro-batch that fits), or that none does on these GPUs."""
    need = (
        f"needs {p.memory.total / GB:.0f} GB/GPU on {p.batch.ranks} x {capacity:g} GB "
        f"({p.strategy}, micro-batch {p.batch.micro_batch}"
        f"{', grad checkpointing' if p.checkpointing else ''})"
    )
    per_rank = p.batch.global_batch // p.batch.ranks
    strategies = [s for s in STRATEGIES if s != "single"] if p.batch.ranks > 1 else ["single"]
    options = []
    for strategy in strategies:
        for ckpt in sorted({p.checkpointing, True}):
            options.append((strategy, ckpt))
    for micro in sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), reverse=True):
        for strategy, ckpt in options:
            batch = Batch(p.batch.global_batch, p.batch.ranks, micro, per_rank // micro)
            mem = memory_for(m, strategy, batch, precision, ckpt, codec_batch)
            if mem.total <= capacity * GB:
                how = strategy + (" + grad checkpointing" if ckpt else "")
                return (
                    f"{need}; fits with {how} at micro-batch {micro} (x accumulation {per_rank // micro}): "
                    f"{mem.total / GB:.0f} GB/GPU"
                )
    smallest = memory_for(m, "fsdp2", Batch(p.batch.global_batch, p.batch.ranks, 1, per_rank), precision, True, 1)
    return f"{need}; does not fit even with fsdp2 + grad checkpointing at micro-batch 1 ({smallest.total / GB:.0f} GB/GPU): use more GPUs or GPUs with more memory"


# ------------------------------------------------------------------------------------------- output
def plan_json(p: Plan) -> str:
    return json.dumps(p.to_json(), indent=2)


def plan_rows(p: Plan) -> Iterator[tuple[str, str]]:
    """(label, value) rows of the dry-run table."""
    yield "recipe", f"{p.recipe}: {p.strategy} on {p.batch.ranks} x {p.gpu.name} ({p.gpu_memory_gb:g} GB), {p.precision if p.precision != 'no' else 'fp32'}"
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
    yield "memory/GPU: gradients", _gb(mem.gradients) + (
        f" (+ DDP buckets {_gb(mem.ddp_buckets)})" if mem.ddp_buckets else ""
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
        yield "memory/GPU: text table", _gb(mem.text_table)
    yield (
        "memory/GPU: peak",
        f"{_gb(mem.total)} of {p.gpu_memory_gb:g} GB ({'fits' if p.fits else 'does NOT fit'}; "
        f"grad checkpointing {'on' if p.checkpointing else 'off'}, {_gb(other.total)} with it "
        f"{'off' if p.checkpointing else 'on'})",
    )
    yield (
        "FLOPs per step",
        f"{p.flops_per_step:.3g} transformer + {p.codec_flops_per_step:.3g} codec "
        f"({(p.flops_per_step + p.codec_flops_per_step) / b.ranks:.3g} per GPU)",
    )
    yield "step time", f"{p.step_seconds:.2f} s at {MFU:.0%} MFU of {p.gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16"


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.1f} GB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"
