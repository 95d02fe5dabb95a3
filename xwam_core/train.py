"""The one training loop behind `xwam pretrain` and `xwam finetune`, on Hugging Face accelerate.

The same code runs on a CPU, one GPU, many GPUs (DDP or FSDP) and many nodes: launch it with
`accelerate launch` (or torchrun) and accelerate picks the processes up. Per step:
    global batch -> this process's slice -> TrainingObjective (per-sample losses) -> masked means
    normalised over the global batch -> backward -> clip -> AdamW -> warm-up + cosine LR -> EMA.
Checkpoints (xwam_core.checkpoint) are atomic and pickle-free; `resume` continues bit-exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from xwam_core import checkpoint as ckpt_io
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout, collate_windows, split_episodes
from xwam_core.errors import XWAMError
from xwam_core.factory import build_codec, build_model, build_text, layout_for, text_meta
from xwam_core.objective import LOSS_TERMS, TrainingObjective
from xwam_core.recipe import TrainConfig


# ------------------------------------------------------------------------------------ data order
class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's share of each global batch, in a seeded per-epoch order.

    Global batch g of epoch e holds perm_e[g*G : (g+1)*G]; process r takes the r-th contiguous slice.
    The order depends only on (seed, epoch), so 1 and N processes see the same global batches, and a
    resumed run restarts at (epoch, batch) without reading the skipped data.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int = 0):
        if global_batch % world:
            raise XWAMError(f"data.batch_size={global_batch} must be divisible by the {world} processes")
        if n < global_batch:
            raise XWAMError(f"only {n} training windows for a global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.local = global_batch // world
        self.batches_per_epoch = n // global_batch
        self.start_step = start_step

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.batches_per_epoch)
            perm = self.order(epoch)
            for g in range(offset, self.batches_per_epoch):
                lo = g * self.global_batch + self.rank * self.local
                yield perm[lo : lo + self.local].tolist()
            step = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # infinite in practice; the loop stops at max_steps
        return 2**31


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ------------------------------------------------------------------------------------ the loop
@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    final_val_loss: float | None
    seconds: float
    samples_per_s: float
    checkpoint: Path
    history: list[dict[str, float]]
    init_report: str


def _reduce_losses(
    losses: dict[str, torch.Tensor], accelerator: Any, world: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked means over the GLOBAL batch: sum_local(m*l) * world / sum_global(m); DDP's gradient
    averaging over processes then gives exactly the single-process gradient."""
    total: Any = 0.0
    logs: dict[str, float] = {}
    for term in LOSS_TERMS:
        value, mask = losses[term], losses[f"{term}_mask"]
        mask_sum = mask.sum().detach()
        global_mask_sum = accelerator.reduce(mask_sum.clone(), reduction="sum") if world > 1 else mask_sum
        term_loss = (value * mask).sum() * world / global_mask_sum.clamp_min(1.0)
        total = total + term_loss
        logged = (value * mask).sum().detach()
        logged = accelerator.reduce(logged.clone(), reduction="sum") if world > 1 else logged
        logs[term] = float(logged / global_mask_sum.clamp_min(1.0))
    logs["loss"] = sum(logs[t] for t in LOSS_TERMS)
    return total, logs  # type: ignore[return-value]


def train(
    recipe: Any,
    init_checkpoint: str | None = None,
    resume: str | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train as the recipe says. `init_checkpoint`: fine-tune from it; `resume`: 'latest' or a path."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from xwam_core.recipe import recipe_to_toml

    cfg: TrainConfig = recipe.train
    run_dir = Path(cfg.out)
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mixed not in ("no", "bf16", "fp16"):
        raise XWAMError(f"train.mixed_precision={cfg.mixed_precision!r}: expected auto, no, bf16 or fp16")
    # ---- data (first: a missing store fails before anything is built or written)
    store = EpisodeStore(recipe.data.store)
    # DDP must be told when some parameters get no gradient: the depth branch on a store without depth
    from accelerate.utils import DistributedDataParallelKwargs

    ddp = DistributedDataParallelKwargs(find_unused_parameters=not store.has_depth or cfg.lora_rank > 0)
    # cpu=True lets accelerate form a gloo process group when launched on machines without a GPU
    accelerator = Accelerator(mixed_precision=mixed, kwargs_handlers=[ddp], cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    set_seed(recipe.seed)

    window = WindowLayout(recipe.data.future_frames, recipe.data.frame_stride)
    train_eps, val_eps = split_episodes(store, recipe.data.val_episodes)
    train_set = WindowDataset(store, window, views=recipe.data.views or None, episodes=train_eps)
    val_set = (
        WindowDataset(store, window, views=recipe.data.views or None, episodes=val_eps) if val_eps else None
    )

    # ---- model
    layout = layout_for(store, window, recipe.model, recipe.data.views or None)
    resume_path = ckpt_io.resolve_resume(run_dir, resume) if resume else None
    if init_checkpoint is not None:
        from xwam_core.finetune import init_from_checkpoint

        model, text, init_report = init_from_checkpoint(Path(init_checkpoint), recipe.model, layout)
    else:
        model, init_report = build_model(recipe.model, layout)
        text = build_text(recipe.model, layout, int(model.config["text_dim"]))
    if resume_path is not None:
        model, text = _load_weights(resume_path, model, text)
    if cfg.lora_rank > 0:
        from xwam_core.finetune import add_lora

        model = add_lora(model, cfg.lora_rank)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    codec = build_codec(recipe.model).to(accelerator.device)
    recipe.noise.validate()
    objective = TrainingObjective(
        model,
        text,
        codec,
        recipe.noise,
        layout.action_valid(),
        layout.state_valid(),
        cfg.augment,
    ).to(accelerator.device)

    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)  # type: ignore[arg-type]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    ema = None
    if cfg.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(objective.model.parameters(), decay=cfg.ema_decay)

    start_step, history = 0, []
    if resume_path is not None:
        state = ckpt_io.load_trainer_state(resume_path)
        optimizer.load_state_dict(ckpt_io.load_optimizer_state(resume_path))
        scheduler.load_state_dict(state["scheduler"])
        ckpt_io.restore_rng(resume_path, state)
        start_step, history = int(state["step"]), list(state.get("history", []))
        if ema is not None and (resume_path / "ema.safetensors").exists():
            _load_ema(ema, resume_path / "ema.safetensors")

    objective, optimizer = accelerator.prepare(objective, optimizer)
    sampler = GlobalBatchSampler(len(train_set), recipe.data.batch_size, rank, world, recipe.seed, start_step)
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=recipe.data.num_workers,
        collate_fn=collate_windows,
        persistent_workers=recipe.data.num_workers > 0,
        prefetch_factor=4 if recipe.data.num_workers > 0 else None,
    )
    local = sampler.local
    recipe_toml = recipe_to_toml(recipe)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.toml").write_text(recipe_toml)
    tracker = _Tracker(run_dir / "logs") if accelerator.is_main_process else None
    if on_start and accelerator.is_main_process:
        on_start(
            {
                "start_step": start_step,
                "max_steps": cfg.max_steps,
                "processes": world,
                "train_windows": len(train_set),
                "val_windows": len(val_set) if val_set else 0,
                "parameters": sum(p.numel() for p in params),
                "init": init_report,
                "device": str(accelerator.device),
                "mixed_precision": mixed,
            }
        )

    t0 = time.perf_counter()
    logs: dict[str, float] = {}
    val_loss: float | None = None
    data_iter = iter(loader)
    step = start_step
    last_ckpt: Path | None = resume_path
    for step in range(start_step, cfg.max_steps):
        objective.train()
        batch = next(data_iter)
        with accelerator.autocast():
            losses = objective(batch, recipe.seed, step, rank * local, train=True)
        loss, logs = _reduce_losses(losses, accelerator, world)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(objective).model.parameters())
        logs["lr"] = float(scheduler.get_last_lr()[0])
        done = step + 1
        if val_set is not None and cfg.val_every > 0 and (done % cfg.val_every == 0 or done == cfg.max_steps):
            val_loss = validate(objective, val_set, recipe, accelerator, cfg.val_batches)
            logs["val_loss"] = val_loss
        history.append({"step": done, **logs})
        if tracker is not None:
            tracker.log(done, logs)
        if on_step and accelerator.is_main_process:
            on_step(done, logs)
        if (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == cfg.max_steps:
            last_ckpt = _save(
                run_dir,
                done,
                objective,
                optimizer,
                scheduler,
                ema,
                accelerator,
                recipe_toml,
                cfg.keep_last,
                history,
                recipe,
                layout,
                store,
            )
    seconds = time.perf_counter() - t0
    steps_run = max(0, cfg.max_steps - start_step)
    if tracker is not None:
        tracker.close()
    if accelerator.is_main_process:
        _plot_losses(history, run_dir / "loss_curve.png")
        summary = {
            "steps": cfg.max_steps,
            "final": history[-1] if history else {},
            "seconds": seconds,
            "samples_per_s": steps_run * recipe.data.batch_size / max(seconds, 1e-9),
            "checkpoint": str(last_ckpt),
            "init": init_report,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    if last_ckpt is None:
        last_ckpt = ckpt_io.checkpoint_dirs(run_dir)[-1]
    return TrainResult(
        run_dir=run_dir,
        steps=cfg.max_steps,
        final_loss=float(history[-1]["loss"]) if history else float("nan"),
        final_val_loss=val_loss,
        seconds=seconds,
        samples_per_s=steps_run * recipe.data.batch_size / max(seconds, 1e-9),
        checkpoint=last_ckpt,
        history=history,
        init_report=init_report,
    )


@torch.no_grad()
def validate(objective: Any, val_set: WindowDataset, recipe: Any, accelerator: Any, batches: int) -> float:
    """Held-out loss with fixed noise (seeded by batch index), the same at every evaluation."""
    objective.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    g = recipe.data.batch_size
    n = min(len(val_set), batches * g)
    totals = {t: 0.0 for t in LOSS_TERMS}
    masks = {t: 0.0 for t in LOSS_TERMS}
    for first in range(0, n, g):
        ids = list(range(first, min(first + g, n)))
        share = math.ceil(len(ids) / world)
        mine = ids[rank * share : (rank + 1) * share]  # contiguous: noise is seeded by the sample's index
        if not mine:
            continue
        batch = collate_windows([val_set[i] for i in mine])
        with accelerator.autocast():
            losses = objective(batch, recipe.seed + 1, 0, mine[0], train=False)
        for t in LOSS_TERMS:
            totals[t] += float((losses[t] * losses[f"{t}_mask"]).sum())
            masks[t] += float(losses[f"{t}_mask"].sum())
    values = torch.tensor(
        [totals[t] for t in LOSS_TERMS] + [masks[t] for t in LOSS_TERMS], device=accelerator.device
    )
    if world > 1:
        values = accelerator.reduce(values, reduction="sum")
    k = len(LOSS_TERMS)
    return float(sum(values[i] / values[k + i].clamp_min(1.0) for i in range(k)))


def _save(
    run_dir,
    step,
    objective,
    optimizer,
    scheduler,
    ema,
    accelerator,
    recipe_toml,
    keep_last,
    history,
    recipe,
    layout,
    store,
) -> Path:
    from xwam_core.infer import CheckpointLayout

    accelerator.wait_for_everyone()
    path = run_dir / "checkpoints" / f"step-{step:08d}"
    unwrapped = accelerator.unwrap_model(objective)
    if accelerator.is_main_process:
        ema_module = None
        if ema is not None:
            ema_module = _EMAHolder(ema)
        trainer_state = {"history": history, "processes": accelerator.num_processes}
        ckpt_layout = CheckpointLayout(
            views=layout.views,
            tasks=layout.tasks,
            window=layout.window,
            action_dim=layout.store_action_dim,
            state_dim=layout.store_state_dim,
            image_size=layout.image_size,
            store=str(store.path),
        )
        path = ckpt_io.save_checkpoint(
            run_dir,
            step,
            unwrapped.model,
            unwrapped.text,
            text_meta(recipe.model, layout),
            optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
            scheduler,
            trainer_state,
            recipe_toml,
            ema=ema_module,
            keep_last=keep_last,
            extra_json={"layout.json": ckpt_layout.to_json(), "stats.json": store.stats},
        )
    accelerator.wait_for_everyone()
    return path


class _EMAHolder(torch.nn.Module):
    """Exposes an EMAModel's shadow parameters as a state dict for safetensors."""

    def __init__(self, ema: Any):
        super().__init__()
        self._tensors = {f"shadow.{i}": p.detach() for i, p in enumerate(ema.shadow_params)}
        self.optimization_step = ema.optimization_step

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {**self._tensors, "optimization_step": torch.tensor(int(self.optimization_step))}


def _load_ema(ema: Any, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(path)
    for i, p in enumerate(ema.shadow_params):
        p.data.copy_(tensors[f"shadow.{i}"])
    ema.optimization_step = int(tensors["optimization_step"])


def _load_weights(path: Path, model: Any, text: Any) -> tuple[Any, Any]:
    from safetensors.torch import load_file

    from xwam_core.models.transformer import XWAMTransformer

    loaded = XWAMTransformer.from_pretrained(path / "model")
    model.load_state_dict(loaded.state_dict())
    text.load_state_dict(load_file(path / "text.safetensors"))
    return model, text


class _Tracker:
    """TensorBoard scalars per loss term and learning rate (when tensorboard is installed)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(str(log_dir))
        except ImportError:
            self.writer = None

    def log(self, step: int, logs: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in logs.items():
            tag = key if key in ("lr",) else f"loss/{key}"
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plot_losses(history: list[dict[str, float]], path: Path) -> None:
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = np.array([h["step"] for h in history])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for term in (*LOSS_TERMS, "loss"):
        values = np.array([h[term] for h in history])
        ax.plot(steps, values, label=term, lw=2 if term == "loss" else 1)
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", color="black")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
