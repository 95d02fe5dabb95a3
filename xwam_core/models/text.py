"""Text conditioning: task indices -> text embeddings (B, L, text_dim) for the transformer's cross-attention.

Two implementations behind one interface:
- `PrecomputedText`: UMT5 embeddings computed once per task (`PrecomputedText.from_prompts(tasks).save(path)`,
  in Python: no command writes them) and cached in a safetensors file (`model.text_cache`); real recipes
  (text_dim 4096, L = 512, as Wan2.2 was trained).
- `TaskEmbeddingText`: a learned embedding per task; tiny recipes, no text encoder needed.
Both keep an "empty prompt" row for classifier-free guidance dropout (`drop=`).

Padding: a prompt is tokenised to L tokens, most of them padding. The authors' release keeps UMT5's
outputs at the padded positions ("kept": their T5 returns the whole sequence); the diffusers Wan pipelines
zero them ("zeroed"). A model must see the text the way it was trained, so `PrecomputedText` records which
(in its cache file and in a checkpoint's text.json). New encodes default to "kept", as the release
trains; caches and checkpoints written before this setting existed hold "zeroed" text.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn

from xwam_core.errors import XWAMError

UMT5_HUB_ID = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
PADDINGS = ("kept", "zeroed")  # UMT5 outputs at padded token positions: kept (the release) or zeros
DEFAULT_PADDING = "kept"
LEGACY_PADDING = "zeroed"  # what text written without a recorded padding holds
UMT5_MAX_LENGTH = 512  # tokens per prompt, as Wan2.2 was trained


def check_padding(padding: str) -> str:
    if padding not in PADDINGS:
        raise XWAMError(f"text padding {padding!r}: expected one of {', '.join(PADDINGS)}")
    return padding


class TextConditioner(nn.Module, ABC):
    """Maps task indices (B,) to text embeddings (B, L, text_dim); `drop` (B,) bool selects the empty prompt."""

    num_tasks: int
    seq_len: int
    text_dim: int

    @abstractmethod
    def table(self) -> torch.Tensor:
        """(num_tasks + 1, L, text_dim): one row per task, the last row the empty prompt."""

    def forward(self, task_index: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        task_index = torch.as_tensor(task_index, dtype=torch.long).reshape(-1)
        if task_index.numel() and (task_index.min() < 0 or task_index.max() >= self.num_tasks):
            bad = task_index[(task_index < 0) | (task_index >= self.num_tasks)][0].item()
            raise XWAMError(
                f"task index {bad} out of range: this text conditioner knows {self.num_tasks} tasks"
            )
        table = self.table()
        task_index = task_index.to(table.device)
        if drop is not None:
            task_index = torch.where(drop.to(table.device).bool(), self.num_tasks, task_index)
        return table[task_index]  # (B, L, text_dim)

    def empty(self, batch: int = 1) -> torch.Tensor:
        """The empty-prompt embedding, (batch, L, text_dim)."""
        return self.table()[self.num_tasks].expand(batch, -1, -1)


class TaskEmbeddingText(TextConditioner):
    """A learned (L, text_dim) embedding per task, plus a learned empty prompt; for tiny recipes."""

    def __init__(self, num_tasks: int, text_dim: int, seq_len: int = 8) -> None:
        super().__init__()
        if num_tasks < 1 or text_dim < 1 or seq_len < 1:
            raise XWAMError(
                f"TaskEmbeddingText needs num_tasks, text_dim, seq_len >= 1, got {num_tasks}, {text_dim}, {seq_len}"
            )
        self.num_tasks, self.seq_len, self.text_dim = num_tasks, seq_len, text_dim
        self.embedding = nn.Parameter(
            torch.randn(num_tasks + 1, seq_len, text_dim)
        )  # unit scale like UMT5 output

    def table(self) -> torch.Tensor:
        return self.embedding


class PrecomputedText(TextConditioner):
    """Frozen per-task UMT5 embeddings (a buffer, not saved with a model) loaded from a cache file.

    `padding` records how the embeddings treat padded token positions ("kept" or "zeroed", see above).
    """

    _table: torch.Tensor

    def __init__(
        self,
        embeddings: torch.Tensor,
        empty: torch.Tensor,
        tasks: list[str] | None = None,
        padding: str = LEGACY_PADDING,
    ) -> None:
        super().__init__()
        self.padding = check_padding(padding)
        if embeddings.ndim != 3 or empty.shape != embeddings.shape[1:]:
            raise XWAMError(
                f"PrecomputedText needs embeddings (tasks, L, D) and empty (L, D), got "
                f"{tuple(embeddings.shape)} and {tuple(empty.shape)}"
            )
        self.num_tasks, self.seq_len, self.text_dim = embeddings.shape
        self.tasks = list(tasks) if tasks is not None else [str(i) for i in range(self.num_tasks)]
        if len(self.tasks) != self.num_tasks:
            raise XWAMError(f"PrecomputedText: {len(self.tasks)} task names for {self.num_tasks} embeddings")
        self.register_buffer("_table", torch.cat([embeddings, empty[None]]), persistent=False)

    def table(self) -> torch.Tensor:
        return self._table

    @classmethod
    def from_prompts(
        cls,
        tasks: list[str],
        path_or_hub_id: str | Path = UMT5_HUB_ID,
        *,
        padding: str = DEFAULT_PADDING,
        **kwargs: Any,
    ) -> PrecomputedText:
        """Encode every task (and the empty prompt) with UMT5; kwargs go to `encode_prompts_umt5`."""
        embeddings = encode_prompts_umt5([*tasks, ""], path_or_hub_id, padding=padding, **kwargs)
        return cls(embeddings[:-1], embeddings[-1], tasks, padding=padding)

    def save(self, path: str | Path) -> None:
        """Write the cache as safetensors (tensors `embeddings`, `empty`; task names and padding in the
        metadata)."""
        from safetensors.torch import save_file

        table = self._table.detach().cpu().contiguous()
        save_file(
            {"embeddings": table[:-1].contiguous(), "empty": table[-1].contiguous()},
            str(path),
            metadata={"tasks": json.dumps(self.tasks), "padding": self.padding},
        )

    @classmethod
    def load(cls, path: str | Path) -> PrecomputedText:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise XWAMError(f"{path}: no such text-embedding cache (write one with PrecomputedText.save)")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                embeddings, empty = f.get_tensor("embeddings"), f.get_tensor("empty")
        except Exception as err:  # safetensors raises its own error types
            raise XWAMError(f"{path}: not a text-embedding cache ({err})") from err
        tasks = json.loads(metadata["tasks"]) if "tasks" in metadata else None
        padding = metadata.get("padding", LEGACY_PADDING)  # caches written before it was recorded: zeroed
        if padding not in PADDINGS:
            raise XWAMError(
                f"{path}: padding {padding!r} in its metadata; expected one of {', '.join(PADDINGS)}"
            )
        return cls(embeddings, empty, tasks, padding=padding)


def _clean_prompt(text: str) -> str:
    """Whitespace clean-up as in the Wan pipelines (without their optional ftfy step)."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts_umt5(
    texts: list[str],
    path_or_hub_id: str | Path = UMT5_HUB_ID,
    *,
    max_length: int = UMT5_MAX_LENGTH,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    padding: str = DEFAULT_PADDING,
) -> torch.Tensor:
    """UMT5 embeddings (N, max_length, D): each prompt padded to max_length tokens and encoded with its
    attention mask. `padding="kept"` keeps the encoder's outputs at the padded positions (the authors'
    release); `"zeroed"` sets them to zero (the diffusers Wan pipelines).

    `path_or_hub_id`: a pipeline folder with `tokenizer/` and `text_encoder/`, a folder holding both, or a hub id.
    """
    check_padding(padding)
    try:
        from transformers import AutoTokenizer, UMT5EncoderModel
    except ImportError as e:
        raise XWAMError(
            f"UMT5 prompt embeddings need transformers: pip install 'xwam[train]' ({e})"
        ) from None

    source = str(path_or_hub_id)
    path = Path(source).expanduser()
    if path.is_dir():
        split = (path / "text_encoder").is_dir()
        if not split and not (path / "config.json").is_file():
            raise XWAMError(f"{path}: no text_encoder/ or config.json; expected a UMT5 encoder folder")
    else:
        split = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer" if split else "")
        encoder = UMT5EncoderModel.from_pretrained(
            source, subfolder="text_encoder" if split else "", torch_dtype=dtype
        )
    except (OSError, ValueError) as err:
        raise XWAMError(f"cannot load UMT5 from '{source}': {str(err).strip().splitlines()[0]}") from err
    encoder = cast(Any, encoder).to(device).eval()

    out = []
    for start in range(0, len(texts), batch_size):
        batch = [_clean_prompt(t) for t in texts[start : start + batch_size]]
        tokens = tokenizer(
            batch,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        hidden = encoder(tokens.input_ids.to(device), mask).last_hidden_state  # (n, max_length, D)
        if padding == "zeroed":
            hidden = hidden * mask[..., None].to(hidden.dtype)  # zeros past each prompt
        out.append(hidden.to("cpu", dtype))
    if not out:
        return torch.zeros(0, max_length, encoder.config.d_model, dtype=dtype)
    return torch.cat(out)
