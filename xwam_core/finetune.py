"""Fine-tuning: start from a checkpoint, adapt to a new embodiment / views / tasks, optional LoRA.

Weights whose shapes still fit are loaded; heads and embeddings that no longer fit (action/state
encoders and decoders for another action dimension, view embeddings for another number of views,
task embeddings for new tasks) are re-initialised, and the report lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from xwam_core.checkpoint import load_policy_parts
from xwam_core.errors import XWAMError
from xwam_core.factory import Layout, build_text, model_kwargs
from xwam_core.models.text import TaskEmbeddingText, TextConditioner
from xwam_core.models.transformer import XWAMTransformer
from xwam_core.recipe import ModelConfig

# which trunk weights LoRA adapts: Wan's attention projections
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


KEPT_MATHS_KEYS = ("action_state_readout", "depth_main_kv_grad")


def init_from_checkpoint(
    path: Path, cfg: ModelConfig, layout: Layout
) -> tuple[XWAMTransformer, TextConditioner, str]:
    """A model for `layout` initialised from the checkpoint at `path` (a run folder: its newest);
    returns (model, text, report)."""
    parts = load_policy_parts(path)
    source = parts.model
    src_cfg = dict(source.config)
    kwargs = model_kwargs(cfg, layout)
    trunk_keys = (
        "num_attention_heads",
        "attention_head_dim",
        "num_layers",
        "in_channels",
        "text_dim",
        "ffn_dim",
        "patch_size",
        "freq_dim",
    )
    mismatched = [k for k in trunk_keys if tuple(_tuple(src_cfg[k])) != tuple(_tuple(kwargs[k]))]
    if mismatched:
        k = mismatched[0]
        raise XWAMError(
            f"{path}: incompatible checkpoint: its {k}={src_cfg[k]} but the recipe's model needs {kwargs[k]} "
            f"(fine-tuning keeps the trunk; use the same model preset)"
        )
    # Fine-tuning keeps the checkpoint's maths (an older checkpoint's readout and depth gradients) unless
    # the recipe's model.overrides names them.
    for key in KEPT_MATHS_KEYS:
        if key not in cfg.overrides:
            kwargs[key] = src_cfg[key]
    model = XWAMTransformer(**kwargs)
    own = model.state_dict()
    loaded, reinit = {}, []
    for name, tensor in source.state_dict().items():
        if name in own and own[name].shape == tensor.shape:
            loaded[name] = tensor
        elif name in own:
            reinit.append(name)
    reinit += [n for n in own if n not in loaded and n not in reinit]
    model.load_state_dict(loaded, strict=False)

    text_dim = int(model.config.text_dim)
    old_text, old_tasks = parts.text, parts.data.tasks
    text = build_text(cfg, layout, text_dim, init_padding=getattr(old_text, "padding", None))
    new_tasks = []
    if isinstance(text, TaskEmbeddingText) and isinstance(old_text, TaskEmbeddingText):
        with torch.no_grad():
            for i, task in enumerate(layout.tasks):
                if task in old_tasks and old_text.seq_len == text.seq_len:
                    text.embedding[i] = old_text.embedding[old_tasks.index(task)]
                else:
                    new_tasks.append(task)
            if old_text.seq_len == text.seq_len:
                text.embedding[-1] = old_text.embedding[-1]  # the empty prompt
    report = f"initialised from {path}: {len(loaded)} tensors loaded"
    if reinit:
        report += f"; re-initialised (shape changed): {', '.join(_group(reinit))}"
    if new_tasks:
        report += f"; new task embeddings: {', '.join(new_tasks)}"
    return model, text, report


def add_lora(model: XWAMTransformer, rank: int) -> Any:
    """Freeze the trunk and train LoRA adapters on its attention projections (peft); new parts train fully."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise XWAMError(f"train.lora_rank > 0 needs peft: pip install 'xwam[train]' ({e})") from None
    for p in model.wan.parameters():
        p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
    model.wan = inject_adapter_in_model(config, model.wan)
    return model


def plain_model(model: XWAMTransformer) -> XWAMTransformer:
    """The model without LoRA wrappers: each adapted weight W becomes W + scale * B A (peft's own delta).

    Checkpoints hold this plain model, so inference, fine-tuning and diffusers load them without peft;
    a model without adapters is returned as it is (no copy).
    """
    from peft.tuners.lora import LoraLayer

    adapted = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not adapted:
        return model
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for name, module in adapted.items():
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)  # type: ignore[attr-defined]  # on every LoRA layer type
                state[f"{name}.weight"] = state[f"{name}.weight"] + delta
    with torch.device("meta"):
        plain = XWAMTransformer.from_config(model.config)
    plain.load_state_dict(state, assign=True)
    return plain


def _tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _group(names: list[str]) -> list[str]:
    """Parameter names grouped by module for a readable report."""
    seen: list[str] = []
    for n in names:
        module = n.rsplit(".", 2)[0] if n.count(".") >= 2 else n
        if module not in seen:
            seen.append(module)
    return seen
