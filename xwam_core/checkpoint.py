"""The checkpoint: one self-describing folder, the only thing inference needs (format version 1).

    CKPT/
      xwam_checkpoint.json   format version, step, what else the folder holds
      model/                 config.json + diffusion_pytorch_model.safetensors (a plain XWAMTransformer:
                             LoRA adapters are merged in; diffusers' from_pretrained alone loads it)
      text.json              the text conditioner: kind, task list (+ text.safetensors, its embeddings;
                             for UMT5 the frozen per-task table itself, so no cache file is read, and its
                             padding: "kept" or "zeroed"; absent in older folders, which hold "zeroed")
      codec.json             the codec's description (pixel codec factors, or the Wan VAE's source)
      normalizer.json        action/state names and their q01/q99 (xwam_core.normalizer)
      data_spec.json         views in order, image size, window layout, tasks, fps, the training store
      inference.json         the denoising schedule settings
      recipe.toml            the resolved training recipe, as a record only: loading never parses it
    and, in training checkpoints, what resuming needs:
      training/              trainable.safetensors (the optimised parameters), optimizer.{safetensors,json},
                             rng.safetensors, trainer.json (step, history, scheduler, numpy/python RNG),
                             ema.safetensors (with EMA)
                             or, for train.strategy=fsdp2: sharded/ (torch.distributed.checkpoint: one
                             file per process + .metadata; model and optimiser tensors by parameter name),
                             optimizer.json (parameter groups by name), rng.safetensors, trainer.json
                             (also the size of every shard file)

Written under a temporary name and renamed when complete (xwam_core.atomic), so a crash never leaves a
broken checkpoint; a run keeps `keep_last` of them in RUN/checkpoints/step-NNNNNNNN/, and prunes older ones
by renaming them to `.step-NNNNNNNN.pruned-<hex8>` before deleting them, so a checkpoint under its own
name is always complete. What a kill leaves (`.step-*.tmp-*`, `.step-*.old-*`, `.step-*.pruned-*`) is
removed by the next run that owns the folder (remove_checkpoint_leftovers). Nothing is unpickled freely:
tensors are safetensors, everything else JSON. The one pickle is the sharded training state of FSDP2
runs: DCP's own `.metadata`, read on resume with a restricted unpickler that admits only DCP's metadata
classes (xwam_core.dcp_metadata); DCP reads its tensor files with torch.load(weights_only=True). Share
the inference part (safetensors + JSON), not the training state. Reading a training state checks every file and names the
one that is missing, cut short or malformed. Folders written before format 1 (no xwam_checkpoint.json)
are refused with the `xwam convert xwam-v0` command that upgrades them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xwam_core.atomic import OLD_MARK, atomic_folder, fsync_tree, temporary_sibling, write_json_atomic
from xwam_core.data.windows import WindowLayout
from xwam_core.errors import XWAMError
from xwam_core.normalizer import Normalizer

FORMAT_VERSION = 1
MARKER = "xwam_checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TRAINING = "training"
SHARDED = "sharded"  # training/sharded/: the torch.distributed.checkpoint shards of an FSDP2 run
PRUNED_MARK = ".pruned-"
# what interrupted writes leave in RUN/checkpoints: a temporary being written (.tmp-), a step moved aside to
# be replaced (.old-, complete until its replacement is in place) or to be deleted (.pruned-)
LEFTOVER = re.compile(r"^\.(step-\d{8})(\.tmp-|\.old-|\.pruned-)[0-9a-f]{8}$")


# ------------------------------------------------------------------------------------ what it holds
@dataclass
class DataSpec:
    """What the model was trained on and how observations must look."""

    views: list[str]
    image_size: tuple[int, int]  # (H, W)
    window: WindowLayout
    tasks: list[str]
    fps: float | None = None
    store: str = ""  # the training store, a record (choosing held-out episodes when it is at hand)
    val_episodes: int = 0  # how many episodes of that store were held out (round-robin over tasks)

    def to_json(self) -> dict[str, Any]:
        return {
            "views": self.views,
            "image_size": list(self.image_size),
            "future_frames": self.window.future_frames,
            "frame_stride": self.window.frame_stride,
            "num_actions": self.window.num_actions,
            "tasks": self.tasks,
            "fps": self.fps,
            "store": self.store,
            "val_episodes": self.val_episodes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DataSpec:
        """Read data_spec.json; a field of the wrong kind raises ValueError naming it (`_parse` adds the file)."""
        for key in ("views", "tasks"):
            names = d[key]
            if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
                raise ValueError(f"'{key}' is {_short(names)}, expected a non-empty list of names")
        size = d["image_size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            raise ValueError(f"'image_size' is {_short(size)}, expected [height, width] in pixels, both > 0")
        for key in ("future_frames", "frame_stride"):
            if not (_is_int(d[key]) and d[key] > 0):
                raise ValueError(f"'{key}' is {_short(d[key])}, expected an integer > 0")
        if not _is_count(d.get("val_episodes", 0)):
            raise ValueError(f"'val_episodes' is {_short(d['val_episodes'])}, expected an integer >= 0")
        return cls(
            views=list(d["views"]),
            image_size=(size[0], size[1]),
            window=WindowLayout(d["future_frames"], d["frame_stride"]),
            tasks=list(d["tasks"]),
            fps=None if d.get("fps") is None else float(d["fps"]),
            store=str(d.get("store", "")),
            val_episodes=int(d.get("val_episodes", 0)),
        )


@dataclass
class PolicyParts:
    """Everything a checkpoint folder holds for inference, in memory."""

    model: Any  # XWAMTransformer
    text: Any  # TextConditioner
    codec: dict[str, Any]  # description (xwam_core.models.codecs.codec_from_description)
    normalizer: Normalizer
    data: DataSpec
    inference: Any  # InferenceScheduleConfig
    recipe_toml: str = ""
    step: int = 0
    path: Path | None = None


@dataclass
class RngState:
    """Every global RNG a run draws from: torch (CPU and each CUDA device), numpy and python."""

    tensors: dict[str, torch.Tensor]  # torch_cpu, torch_cuda_<i>
    meta: dict[str, Any]  # {"numpy": [...], "python": [...]}, JSON-able

    @classmethod
    def capture(cls) -> RngState:
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
        return cls(tensors, meta)

    def restore(self) -> None:
        torch.set_rng_state(self.tensors["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [self.tensors[k] for k in sorted(self.tensors) if k.startswith("torch_cuda_")]
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        n = self.meta["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
        p = self.meta["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


@dataclass
class TrainingState:
    """What resuming needs besides the weights inference uses."""

    trainable: dict[str, torch.Tensor]  # the optimised parameters by name (LoRA adapters included)
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rng: RngState | None = None  # when saving: None captures the RNGs as they are at the write
    # sharded state (FSDP2), when loading: {file: bytes} of training/sharded/; `trainable` is then empty
    # and `optimizer` holds only the parameter groups (read the tensors with read_shards)
    shards: dict[str, int] | None = None


# ------------------------------------------------------------------------------------ finding them
def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def resolve(path: str | Path) -> Path:
    """The checkpoint folder `path` names: itself, or a run folder's newest checkpoint. One clear line
    if it is not a checkpoint this version can load (an older one gets the command that converts it)."""
    path = Path(path)
    if not path.exists():
        raise XWAMError(f"{path}: checkpoint not found")
    if not (path / MARKER).is_file() and (path / "checkpoints").is_dir():
        dirs = checkpoint_dirs(path)
        if not dirs:
            raise XWAMError(f"{path}: run folder has no complete checkpoint yet")
        path = dirs[-1]
    marker = path / MARKER
    if not marker.is_file():
        if (path / "trainer.json").is_file() and (path / "layout.json").is_file():
            raise XWAMError(
                f"{path}: a checkpoint of an older xwam (no {MARKER}); convert it once with: "
                f"xwam convert xwam-v0 {path} --out NEW_CHECKPOINT"
            )
        raise XWAMError(f"{path}: not an xwam checkpoint (expected {MARKER} inside)")
    meta = _read_json(marker)
    version = meta.get("format")
    if version != FORMAT_VERSION:
        raise XWAMError(
            f"{marker}: checkpoint format {version!r}; this xwam reads format {FORMAT_VERSION} "
            "(upgrade xwam, or convert the checkpoint)"
        )
    return path


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint of the run (None if there is none); else a path."""
    if resume == "latest":
        dirs = checkpoint_dirs(run_dir)
        return resolve(dirs[-1]) if dirs else None
    path = resolve(resume)
    if _read_json(path / MARKER).get("training_state") is False:
        raise XWAMError(f"{path}: holds no training state (exported for inference only); cannot resume")
    return path


# ------------------------------------------------------------------------------------ writing
def write_policy_parts(folder: Path, parts: PolicyParts) -> None:
    """Write the inference part of a checkpoint into `folder` (a temporary folder of the caller)."""
    from xwam_core.models.text import PrecomputedText

    parts.model.save_pretrained(folder / "model", safe_serialization=True)
    text = parts.text
    text_meta: dict[str, Any] = {"tasks": parts.data.tasks, "seq_len": int(text.seq_len)}
    if isinstance(text, PrecomputedText):
        table = text.table().detach().cpu()
        text_meta["kind"] = "precomputed"
        text_meta["padding"] = text.padding  # how UMT5 outputs at padded positions were kept (text.py)
        save_file({"table": table.contiguous()}, folder / "text.safetensors")
    else:
        text_meta["kind"] = "task"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in text.state_dict().items()},
            folder / "text.safetensors",
        )
    write_json_atomic(folder / "text.json", text_meta)
    write_json_atomic(folder / "codec.json", parts.codec)
    write_json_atomic(folder / "normalizer.json", parts.normalizer.to_json())
    write_json_atomic(folder / "data_spec.json", parts.data.to_json())
    write_json_atomic(folder / "inference.json", _dataclass_json(parts.inference))
    (folder / "recipe.toml").write_text(parts.recipe_toml)
    write_json_atomic(
        folder / MARKER,
        {
            "format": FORMAT_VERSION,
            "step": parts.step,
            "training_state": (folder / TRAINING).is_dir(),
            "files": sorted(p.name for p in folder.iterdir()),
        },
    )


def write_training_state(folder: Path, state: TrainingState) -> None:
    """Write what resuming needs into `folder`/training/ (before write_policy_parts, which records it).
    With shards already written there (write_shards), only the parameter groups, RNG and trainer state
    are added, and the shard files' sizes recorded."""
    root = folder / TRAINING
    sharded = (root / SHARDED).is_dir()
    root.mkdir(exist_ok=sharded)
    extra = dict(state.extra)
    if sharded:
        write_json_atomic(root / "optimizer.json", {"param_groups": state.optimizer["param_groups"]})
        extra["shards"] = {f.name: f.stat().st_size for f in sorted((root / SHARDED).iterdir())}
    else:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.trainable.items()},
            root / "trainable.safetensors",
        )
        opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
        save_file(opt_tensors, root / "optimizer.safetensors")
        write_json_atomic(root / "optimizer.json", opt_meta)
    rng = state.rng if state.rng is not None else RngState.capture()
    save_file(rng.tensors, root / "rng.safetensors")
    if state.ema is not None:
        save_file({k: v.contiguous().cpu() for k, v in state.ema.items()}, root / "ema.safetensors")
    trainer = {**extra, "history": state.history, "scheduler": state.scheduler, "rng": rng.meta}
    write_json_atomic(root / "trainer.json", trainer)


def save_checkpoint(
    run_dir: str | Path, parts: PolicyParts, state: TrainingState | None, keep_last: int = 3
) -> Path:
    """Write RUN/checkpoints/step-NNNNNNNN atomically (an existing one is swapped out, never deleted
    first) and prune all but the newest `keep_last`. Call on the main process only."""
    final = Path(run_dir) / "checkpoints" / f"step-{parts.step:08d}"
    with atomic_folder(final, overwrite=True) as tmp:
        if state is not None:
            write_training_state(tmp, state)
        write_policy_parts(tmp, parts)
        fsync_tree(tmp)
    prune_checkpoints(run_dir, keep_last)
    return final


def write_shards(folder: Path, tensors: dict[str, Any]) -> None:
    """Every process writes its shard of `tensors` (nested dicts of tensors and DTensors) into the
    checkpoint folder `folder` (training/sharded/, torch.distributed.checkpoint). Collective: every process
    calls it with the same folder (on a filesystem all of them see); each fsyncs its files."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(
            tensors, storage_writer=dcp.FileSystemWriter(folder / TRAINING / SHARDED), no_dist=_one_process()
        )


def read_shards(path: Path, tensors: dict[str, Any]) -> None:
    """Fill `tensors` (shaped like write_shards' for this run's processes) in place from checkpoint
    `path`'s shards, resharded to any number of processes. Collective, like write_shards.

    DCP's `.metadata` is a pickle: it is read with a restricted unpickler (xwam_core.dcp_metadata) that
    refuses anything but DCP's own metadata classes, after load_training_state has checked every shard
    file's size against trainer.json; the tensors are read with torch.load(weights_only=True) by DCP."""
    import torch.distributed.checkpoint as dcp

    from xwam_core.dcp_metadata import RestrictedFileSystemReader

    RestrictedFileSystemReader(path / TRAINING / SHARDED).read_metadata()  # a refused file: its own line
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes one process
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                tensors,
                storage_reader=RestrictedFileSystemReader(path / TRAINING / SHARDED),
                no_dist=_one_process(),
            )
    except Exception as e:  # DCP raises its own CheckpointException with every rank's traceback
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise XWAMError(
            f"{path / TRAINING / SHARDED}: does not fit this recipe's model and optimiser ({first[:200]}); "
            "resume with the recipe the run used"
        ) from None


def _one_process() -> bool:
    """No process group: DCP reads and writes the whole state in this process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    keep_last: int,
    main: bool,
    share: Callable[[str | None], str],
    barrier: Callable[[], None],
) -> Iterator[Path]:
    """The folder every process writes checkpoint step-N into (FSDP2's shards), atomic like
    save_checkpoint: the main process makes the temporary folder and `share`s its name (every process
    calls `share`, the others with None, and gets it back); on leaving, after `barrier` (every shard
    written), the main process fsyncs it, renames it into place and prunes all but `keep_last`."""
    final = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    if not main:
        tmp = Path(share(None))
        yield tmp
        barrier()
        return
    with atomic_folder(final, overwrite=True) as tmp:
        share(str(tmp))
        yield tmp
        barrier()
        fsync_tree(tmp)
    prune_checkpoints(run_dir, keep_last)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all). Each is first renamed to a hidden
    `.step-N.pruned-*` name, so a kill mid-deletion never leaves a partial folder under a checkpoint's name."""
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        doomed = temporary_sibling(old, PRUNED_MARK)
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_checkpoint_leftovers(run_dir: str | Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """Remove what interrupted writes left in RUN/checkpoints: returns ([(removed, bytes)], [restored]).

    A step moved aside for its replacement (`.step-N.old-*`) whose replacement never arrived is complete
    (it is only deleted after the swap): it is renamed back when it verifies, not deleted. Call only while
    owning the run (xwam_core.runlock), when no write of it can be under way."""
    from xwam_core.runlock import tree_bytes

    root = Path(run_dir) / "checkpoints"
    removed: list[tuple[Path, int]] = []
    restored: list[Path] = []
    if not root.is_dir():
        return removed, restored
    for entry in sorted(root.iterdir()):
        match = LEFTOVER.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        final = root / match.group(1)
        if match.group(2) == OLD_MARK and not final.exists():
            try:
                verify_checkpoint(entry)
            except XWAMError:
                pass
            else:
                os.replace(entry, final)
                restored.append(final)
                continue
        removed.append((entry, tree_bytes(entry)))
        shutil.rmtree(entry, ignore_errors=True)
    return removed, restored


def export_checkpoint(parts: PolicyParts, out: str | Path, overwrite: bool = False) -> Path:
    """A checkpoint folder for inference only (no training state) at `out`."""
    with atomic_folder(Path(out), overwrite=overwrite, replaces=MARKER) as tmp:
        write_policy_parts(tmp, parts)
        fsync_tree(tmp)
    return Path(out)


# ------------------------------------------------------------------------------------ reading
def load_policy_parts(path: str | Path, device: str | torch.device = "cpu") -> PolicyParts:
    """Everything inference needs, read from the checkpoint folder alone (a run folder: its newest)."""
    path = resolve(path)
    model = load_model(path / "model")
    data = _parse(path / "data_spec.json", DataSpec.from_json)
    _check_data_spec(path / "data_spec.json", data, model.config)
    text = load_text(path, int(model.config["text_dim"]), tasks=data.tasks)
    inference = _inference_config(path / "inference.json")
    meta = _read_json(path / MARKER)
    step = meta.get("step", 0)
    if not _is_count(step):
        raise XWAMError(f"{path / MARKER}: 'step' is {_short(step)}, expected an integer >= 0")
    recipe = path / "recipe.toml"
    return PolicyParts(
        model=model.to(device),
        text=text.to(device),
        codec=_read_json(path / "codec.json"),
        normalizer=_parse(path / "normalizer.json", Normalizer.from_json),
        data=data,
        inference=inference,
        # a record of how it was trained, never parsed: undecodable bytes are kept as replacement characters
        recipe_toml=recipe.read_text(errors="replace") if recipe.is_file() else "",
        step=step,
        path=path,
    )


# diffusers' names for a model folder's safetensors weights: one file, or shards listed by an index
SAFETENSORS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)


def load_model(folder: Path) -> Any:
    """The transformer saved in a checkpoint's model/ folder: safetensors only, from this disk only (never a
    pickled .bin beside them, never the Hub), every weight present. One line if not."""
    from diffusers.utils import logging as diffusers_logging

    from xwam_core.models.transformer import XWAMTransformer

    if not folder.is_dir():
        raise XWAMError(f"{folder.parent}: checkpoint lacks model/")
    # one line for a missing or malformed config, before diffusers reads it
    _read_json(folder / "config.json")
    if not any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
        raise XWAMError(
            f"{folder}: no {SAFETENSORS_WEIGHTS[0]}; expected the model's weights in safetensors "
            "(pickled .bin weights are never loaded)"
        )
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its missing/unexpected-weight warnings: reported below instead
    try:
        model = XWAMTransformer.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception as e:  # diffusers and safetensors raise many kinds for a damaged folder
        raise XWAMError(f"{folder}: cannot load the model ({type(e).__name__}: {e})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    missing = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    missing += [name for name, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise XWAMError(f"{folder}: the weights lack {missing[0]}{more}; expected every tensor of the model")
    return model


def _check_data_spec(file: Path, data: DataSpec, config: Any) -> None:
    """data_spec.json must describe the observations the model was built for: its views and its chunk."""
    views, actions = config.get("num_views"), config.get("num_actions")
    if _is_int(views) and len(data.views) > views:
        raise XWAMError(
            f"{file}: {len(data.views)} views {_short(data.views)}, but model/config.json has "
            f"num_views={views}; expected at most that many"
        )
    if _is_int(actions) and data.window.num_actions != actions:
        raise XWAMError(
            f"{file}: future_frames x frame_stride = {data.window.num_actions} actions, but model/config.json "
            f"has num_actions={actions}; expected the chunk the model predicts"
        )


def _inference_config(file: Path) -> Any:
    """inference.json, type-checked and range-checked like the recipe's [inference] section."""
    from xwam_core.errors import RecipeError
    from xwam_core.recipe import recipe_from_dict
    from xwam_core.schedule.inference import InferenceScheduleConfig

    table = _read_json(file)
    try:
        inference = recipe_from_dict(table, where=str(file), cls=InferenceScheduleConfig)
        inference.validate()
    except RecipeError as e:
        message = str(e)
        raise XWAMError(message if message.startswith(str(file)) else f"{file}: {message}") from None
    return inference


def load_text(path: Path, text_dim: int, tasks: list[str] | None = None) -> Any:
    """The text conditioner saved in checkpoint `path`; given `tasks` (data_spec.json's), text.json must name
    the same in the same order: a task's index picks its embedding. One line for a damaged file."""
    from xwam_core.models.text import LEGACY_PADDING, PADDINGS, PrecomputedText, TaskEmbeddingText

    file, weights = path / "text.json", path / "text.safetensors"
    meta = _read_json(file)
    try:
        tensors = load_file(weights)
    except Exception as e:
        raise XWAMError(f"{weights}: unreadable ({type(e).__name__}: {e})") from None
    saved, kind = meta.get("tasks"), meta.get("kind")
    if not (isinstance(saved, list) and saved and all(isinstance(t, str) for t in saved)):
        raise XWAMError(f"{file}: 'tasks' is {_short(saved)}, expected a non-empty list of task names")
    if tasks is not None and saved != tasks:
        raise XWAMError(
            f"{file}: tasks {_short(saved)} differ from data_spec.json's {_short(tasks)}; expected "
            "the same tasks in the same order (a task's index picks its embedding)"
        )
    if kind not in ("task", "precomputed"):
        raise XWAMError(f"{file}: 'kind' is {_short(kind)}, expected 'task' or 'precomputed'")
    if kind == "precomputed":
        table = tensors.get("table")
        if table is None or table.ndim != 3 or table.shape[0] != len(saved) + 1 or table.shape[2] != text_dim:
            raise XWAMError(
                f"{weights}: 'table' is {_describe_tensor(table)}, expected ({len(saved) + 1}, seq_len, "
                f"{text_dim}): a row per task of text.json and the empty prompt's, the model's text_dim wide"
            )
        padding = meta.get("padding", LEGACY_PADDING)  # written before padding was recorded: zeroed
        if padding not in PADDINGS:
            raise XWAMError(f"{file}: padding {padding!r}, expected one of {', '.join(PADDINGS)}")
        return PrecomputedText(table[:-1], table[-1], saved, padding=padding)
    seq_len: Any = meta.get("seq_len")
    if not (_is_int(seq_len) and seq_len > 0):
        raise XWAMError(f"{file}: 'seq_len' is {_short(seq_len)}, expected an integer > 0")
    text = TaskEmbeddingText(len(saved), text_dim, seq_len)
    expected = {k: list(v.shape) for k, v in text.state_dict().items()}
    found = {k: list(v.shape) for k, v in tensors.items()}
    if found != expected:
        raise XWAMError(
            f"{weights}: tensors {_short(found)}, expected {_short(expected)} for {len(saved)} tasks, "
            f"seq_len {seq_len} and the model's text_dim {text_dim}"
        )
    text.load_state_dict(tensors)
    return text


def verify_checkpoint(path: Path) -> None:
    """Check without loading that checkpoint `path` is whole: its marker, every file the marker lists, and
    every safetensors file complete (the header covers the file: a truncated one fails). One line if not."""
    meta = _read_json(path / MARKER)
    listed = meta.get("files")
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        raise XWAMError(
            f"{path / MARKER}: 'files' is {_short(listed)}, expected the list of the folder's files"
        )
    for name in listed:
        if not (path / name).exists():
            raise XWAMError(f"{path}: checkpoint lacks {name} (listed in {MARKER}); the folder is incomplete")
    for file in sorted(path.rglob("*.safetensors")):
        _check_safetensors(file)


def load_training_state(path: Path) -> TrainingState:
    """The training part of checkpoint `path`, every file checked: one line naming the file and what is
    wrong if one is missing, cut short or malformed (the model's weights are checked, not loaded)."""
    root = path / TRAINING
    verify_checkpoint(path)  # first: a training/ folder the marker lists but the disk lacks is damage
    if not root.is_dir():
        raise XWAMError(f"{path}: holds no training state ({TRAINING}/ missing); cannot resume from it")
    trainer_file = root / "trainer.json"
    trainer = _read_json(trainer_file)
    step = _expect(trainer_file, trainer, "step", _is_count, "a non-negative integer")
    if "processes" in trainer:
        _expect(trainer_file, trainer, "processes", lambda v: _is_count(v) and v > 0, "a positive integer")
    history = _expect(
        trainer_file,
        trainer,
        "history",
        lambda v: (
            isinstance(v, list)
            and all(isinstance(h, dict) and all(_is_number(x) for x in h.values()) for h in v)
        ),
        "a list of {name: number} entries",
    )
    scheduler = _expect(trainer_file, trainer, "scheduler", lambda v: isinstance(v, dict), "an object")
    _expect(trainer_file, scheduler, "last_epoch", _is_int, "an integer", "scheduler.")
    _expect(trainer_file, scheduler, "base_lrs", _is_numbers, "a list of numbers", "scheduler.")
    rng_meta = _expect(trainer_file, trainer, "rng", lambda v: isinstance(v, dict), "an object")
    _expect(trainer_file, rng_meta, "numpy", _is_numpy_state, "numpy's MT19937 state", "rng.")
    _expect(trainer_file, rng_meta, "python", _is_python_state, "python's random state", "rng.")

    shards = trainer.get("shards")
    if shards is not None:
        _check_shards(root, shards)
    rng_tensors = _load_tensors(root / "rng.safetensors")
    cpu = rng_tensors.get("torch_cpu")
    expected_rng = torch.get_rng_state()
    if cpu is None or cpu.dtype != torch.uint8 or cpu.shape != expected_rng.shape:
        raise XWAMError(
            f"{root / 'rng.safetensors'}: 'torch_cpu' is {_describe_tensor(cpu)}, expected a uint8 tensor "
            f"of shape {tuple(expected_rng.shape)}"
        )
    opt_file = root / "optimizer.json"
    opt_meta = _read_json(opt_file)
    extra = {k: v for k, v in trainer.items() if k not in ("history", "scheduler", "rng", "shards")}
    extra["step"] = step
    if shards is not None:  # FSDP2: the tensors are in training/sharded/, the groups name parameters
        groups = _expect(
            opt_file,
            opt_meta,
            "param_groups",
            lambda v: (
                isinstance(v, list)
                and all(
                    isinstance(g, dict)
                    and isinstance(g.get("params"), list)
                    and all(isinstance(n, str) for n in g["params"])
                    for g in v
                )
            ),
            "a list of parameter groups, each with its parameters' names",
        )
        return TrainingState(
            {}, {"param_groups": groups, "state": {}}, scheduler, list(history), None, extra,
            RngState(rng_tensors, rng_meta), shards,
        )  # fmt: skip
    groups = _expect(
        opt_file,
        opt_meta,
        "param_groups",
        lambda v: (
            isinstance(v, list)
            and all(
                isinstance(g, dict)
                and isinstance(g.get("params"), list)
                and all(_is_int(i) for i in g["params"])
                for g in v
            )
        ),
        "a list of parameter groups, each with its 'params' indices",
    )
    opt_state = _expect(
        opt_file,
        opt_meta,
        "state",
        lambda v: isinstance(v, dict) and all(k.isdigit() and isinstance(e, dict) for k, e in v.items()),
        "an object of per-parameter states keyed by index",
    )
    opt_tensors = _load_tensors(root / "optimizer.safetensors")
    for pid, entry in opt_state.items():
        for key, value in entry.items():
            if isinstance(value, dict) and value.get("tensor") not in opt_tensors:
                raise XWAMError(
                    f"{opt_file}: state {pid}.{key} refers to tensor {value.get('tensor')!r}, which "
                    f"{root / 'optimizer.safetensors'} lacks"
                )
    optimizer = _unflatten_optimizer(opt_tensors, {"param_groups": groups, "state": opt_state})
    trainable = _load_tensors(root / "trainable.safetensors")
    ema = _load_tensors(root / "ema.safetensors") if (root / "ema.safetensors").exists() else None
    return TrainingState(
        trainable, optimizer, scheduler, list(history), ema, extra, RngState(rng_tensors, rng_meta)
    )


# ------------------------------------------------------------------------------------ helpers
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise XWAMError(f"{path.parent}: checkpoint lacks {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XWAMError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise XWAMError(f"{path}: expected a JSON object")
    return data


def _parse(path: Path, parse: Any) -> Any:
    try:
        return parse(_read_json(path))
    except XWAMError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise XWAMError(f"{path}: malformed ({type(e).__name__}: {e})") from None


def _dataclass_json(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


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


def _check_shards(root: Path, shards: Any) -> None:
    """Every shard file trainer.json lists is there, at its recorded size (a cut or lost shard is named)."""
    trainer_file = root / "trainer.json"
    if not (isinstance(shards, dict) and shards and all(_is_count(v) for v in shards.values())):
        raise XWAMError(
            f"{trainer_file}: 'shards' is {_short(shards)}, expected {{file: bytes}} of {SHARDED}/"
        )
    for name, size in shards.items():
        file = root / SHARDED / name
        if not file.is_file():
            raise XWAMError(
                f"{root.parent}: checkpoint lacks {TRAINING}/{SHARDED}/{name} (listed in trainer.json)"
            )
        if file.stat().st_size != size:
            raise XWAMError(
                f"{file}: {file.stat().st_size} bytes, trainer.json recorded {size}; it was probably cut short"
            )


def _check_safetensors(file: Path) -> None:
    try:
        with safe_open(str(file), "pt"):
            pass
    except Exception as e:  # safetensors raises its own error kinds for a damaged header
        raise XWAMError(
            f"{file}: not a complete safetensors file ({_reason(e)}); it was probably cut short"
        ) from None


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise XWAMError(f"{file.parent.parent}: checkpoint lacks {file.parent.name}/{file.name}")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error kinds for a damaged file
        raise XWAMError(
            f"{file}: not a complete safetensors file ({_reason(e)}); it was probably cut short"
        ) from None


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.replace("Error while deserializing header: ", "")


def _expect(file: Path, data: dict[str, Any], key: str, ok: Any, expected: str, prefix: str = "") -> Any:
    """data[key] if ok(data[key]); else one line naming the file, the key, the value and what was expected."""
    if key not in data:
        raise XWAMError(f"{file}: key '{prefix}{key}' is missing (expected {expected})")
    value = data[key]
    if not ok(value):
        raise XWAMError(f"{file}: '{prefix}{key}' is {_short(value)}, expected {expected}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe_tensor(tensor: torch.Tensor | None) -> str:
    return "missing" if tensor is None else f"{tensor.dtype} of shape {tuple(tensor.shape)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(v) for v in value)


def _is_numpy_state(value: Any) -> bool:
    """['MT19937', 624 key words, position, has_gauss, cached_gaussian]"""
    return (
        isinstance(value, list)
        and len(value) == 5
        and value[0] == "MT19937"
        and isinstance(value[1], list)
        and len(value[1]) == 624
        and all(_is_int(k) and 0 <= k < 2**32 for k in value[1])
        and _is_int(value[2])
        and 0 <= value[2] <= 624
        and _is_int(value[3])
        and _is_number(value[4])
    )


def _is_python_state(value: Any) -> bool:
    """[version, 625 words (624 + position), cached gaussian or null]"""
    return (
        isinstance(value, list)
        and len(value) == 3
        and _is_int(value[0])
        and isinstance(value[1], list)
        and len(value[1]) == 625
        and all(_is_int(k) and 0 <= k < 2**32 for k in value[1][:624])
        and _is_int(value[1][624])
        and 0 <= value[1][624] <= 624
        and (value[2] is None or _is_number(value[2]))
    )
