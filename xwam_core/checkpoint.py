"""Crash-safe, pickle-free training checkpoints.

A checkpoint is a folder `RUN/checkpoints/step-NNNNNNNN/`:
    model/                 config.json + diffusion_pytorch_model.safetensors (from_pretrained alone loads it)
    text.safetensors       the text conditioner's weights (+ text.json: its kind and task list)
    ema.safetensors        EMA weights of the model, when EMA is on
    optimizer.safetensors  every tensor of the optimizer state; optimizer.json: the rest (param groups)
    trainer.json           step, loss history, LR scheduler state, numpy/python RNG state (the data
                           position follows from the step: see GlobalBatchSampler)
    rng.safetensors        torch CPU (and CUDA) RNG states
    recipe.toml            the resolved recipe
    layout.json            views, tasks, window and the store's dimensions the model was trained on
    stats.json             the training store's statistics (the normalization inference undoes)
It is written under a temporary name and renamed when complete, so `latest` is always readable; only
`keep_last` checkpoints are kept. Nothing is ever unpickled: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from xwam_core.errors import XWAMError

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if not (path / "trainer.json").is_file() and (path / "checkpoints").is_dir():
        dirs = checkpoint_dirs(path)
        if not dirs:
            raise XWAMError(f"{path}: run folder has no complete checkpoint yet")
        return dirs[-1]
    return path


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of the run (None if there is none); else a path."""
    if resume == "latest":
        dirs = checkpoint_dirs(run_dir)
        return dirs[-1] if dirs else None
    path = Path(resume)
    if not (path / "trainer.json").is_file():
        raise XWAMError(f"{path}: not a checkpoint folder (no trainer.json)")
    return path


# ------------------------------------------------------------------------------ optimizer state
def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for pid, pstate in state["state"].items():
        entry: dict[str, Any] = {}
        for key, value in pstate.items():
            if torch.is_tensor(value):
                name = f"{pid}.{key}"
                tensors[name] = value.detach().contiguous().cpu()
                entry[key] = {"tensor": name}
            else:
                entry[key] = value
        meta["state"][str(pid)] = entry
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for pid, entry in meta["state"].items():
        state[int(pid)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------ RNG state
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state: Any = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ------------------------------------------------------------------------------ save / load
def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    text: torch.nn.Module,
    text_meta: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    recipe_toml: str,
    ema: torch.nn.Module | None = None,
    keep_last: int = 3,
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step-NNNNNNNN` atomically and prune old ones. Call on the main process."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)  # type: ignore[operator]
        save_file({k: v.contiguous() for k, v in text.state_dict().items()}, tmp / "text.safetensors")
        (tmp / "text.json").write_text(json.dumps(text_meta, indent=2))
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta}
        (tmp / "trainer.json").write_text(json.dumps(state, indent=2))
        (tmp / "recipe.toml").write_text(recipe_toml)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / "trainer.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise XWAMError(f"{path}: checkpoint unreadable ({e})") from None


def load_optimizer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return _unflatten_optimizer(
        load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
    )


def restore_rng(path: str | Path, trainer_state: dict[str, Any]) -> None:
    set_rng_state(load_file(Path(path) / "rng.safetensors"), trainer_state["rng"])
