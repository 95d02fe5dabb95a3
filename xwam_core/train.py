"""The one training loop behind `xwam pretrain` and `xwam finetune`, on Hugging Face accelerate.

The same code runs on a CPU, one GPU, many GPUs (DDP or FSDP) and many nodes: launch it with
`accelerate launch` (or torchrun) and accelerate picks the processes up. Per step:
    global batch -> this process's slice -> TrainingObjective (per-sample losses) -> masked means
    normalised over the global batch -> backward -> clip -> AdamW -> warm-up + cosine LR -> EMA.
`Trainer` has build / train_step / validate / save / resume / fit (torchtitan's shape). Checkpoints
(xwam_core.checkpoint) are atomic and pickle-free; `resume` continues bit-exactly.
"""

from __future__ import annotations

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
from xwam_core.atomic import atomic_file, write_json_atomic, write_text_atomic
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout, collate_windows, split_episodes
from xwam_core.errors import XWAMError
from xwam_core.factory import build_codec, build_model, build_text, layout_for
from xwam_core.finetune import add_lora, init_from_checkpoint, plain_model
from xwam_core.models.codecs import describe_codec
from xwam_core.normalizer import Normalizer
from xwam_core.objective import LOSS_TERMS, TrainingObjective
from xwam_core.progress import SILENT, Progress
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


# ------------------------------------------------------------------------------------ the trainer
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


class Trainer:
    """pretrain and finetune: `build` everything, then `fit` calls train_step / validate / save.

    trainer = Trainer(recipe, init="runs/base", resume="latest")   # builds, restores on resume
    print(trainer.describe())
    result = trainer.fit(progress)
    """

    def __init__(self, recipe: Any, init: str | Path | None = None, resume: str | None = None) -> None:
        self.recipe = recipe
        self.cfg: TrainConfig = recipe.train
        self.run_dir = Path(self.cfg.out)
        self.init = None if init is None else Path(init)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self.build()
        self.resume_path = ckpt_io.resolve_resume(self.run_dir, resume) if resume else None
        if self.resume_path is not None:
            self.resume(self.resume_path)
        self._prepare()

    # ---- build -------------------------------------------------------------------------------------
    def build(self) -> None:
        """Data first (a missing store fails before anything is built), then model, objective, optimiser."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        recipe, cfg = self.recipe, self.cfg
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        if mixed not in ("no", "bf16", "fp16"):
            raise XWAMError(f"train.mixed_precision={cfg.mixed_precision!r}: expected auto, no, bf16 or fp16")
        self.mixed_precision = mixed
        self.store = EpisodeStore(recipe.data.store)
        # DDP must be told when some parameters get no gradient: the depth branch on a store without depth
        ddp = DistributedDataParallelKwargs(
            find_unused_parameters=not self.store.has_depth or cfg.lora_rank > 0
        )
        # cpu=True lets accelerate form a gloo process group when launched on machines without a GPU
        self.accelerator = Accelerator(
            mixed_precision=mixed, kwargs_handlers=[ddp], cpu=not torch.cuda.is_available()
        )
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        set_seed(recipe.seed)

        window = WindowLayout(recipe.data.future_frames, recipe.data.frame_stride)
        views = recipe.data.views or None
        train_eps, val_eps = split_episodes(self.store, recipe.data.val_episodes)
        self.train_set = WindowDataset(self.store, window, views=views, episodes=train_eps)
        self.val_set = WindowDataset(self.store, window, views=views, episodes=val_eps) if val_eps else None

        self.layout = layout_for(self.store, window, recipe.model, views)
        if self.init is not None:
            model, text, self.init_report = init_from_checkpoint(self.init, recipe.model, self.layout)
        else:
            model, self.init_report = build_model(recipe.model, self.layout)
            text = build_text(recipe.model, self.layout, int(model.config["text_dim"]))
        if cfg.lora_rank > 0:
            model = add_lora(model, cfg.lora_rank)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        recipe.noise.validate()
        self.objective = TrainingObjective(
            model,
            text,
            build_codec(recipe.model).to(self.accelerator.device),
            recipe.noise,
            self.layout.action_valid(),
            self.layout.state_valid(),
            cfg.augment,
        ).to(self.accelerator.device)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=cfg.lr,
            betas=(cfg.betas[0], cfg.betas[1]),
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        )
        self.ema = None
        if cfg.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.objective.model.parameters(), decay=cfg.ema_decay)

    def _prepare(self) -> None:
        """Wrap for the processes (DDP) and start the data where the run stands."""
        self.objective, self.optimizer = self.accelerator.prepare(self.objective, self.optimizer)
        recipe = self.recipe
        sampler = GlobalBatchSampler(
            len(self.train_set), recipe.data.batch_size, self.rank, self.world, recipe.seed, self.step
        )
        self.local_batch = sampler.local
        workers = recipe.data.num_workers
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate_windows,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def describe(self) -> dict[str, Any]:
        """What is about to run (printed by the CLI before the first step)."""
        return {
            "start_step": self.step,
            "max_steps": self.cfg.max_steps,
            "processes": self.world,
            "train_windows": len(self.train_set),
            "val_windows": len(self.val_set) if self.val_set else 0,
            "parameters": sum(p.numel() for p in self.params),
            "init": self.init_report,
            "device": str(self.accelerator.device),
            "mixed_precision": self.mixed_precision,
        }

    # ---- one step, validation -----------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Forward, backward, clip, AdamW, LR schedule, EMA on one global batch; returns its losses."""
        acc = self.accelerator
        self.objective.train()
        with acc.autocast():
            losses = self.objective(
                batch, self.recipe.seed, self.step, self.rank * self.local_batch, train=True
            )
        loss, logs = _reduce_losses(losses, acc, self.world)
        acc.backward(loss)
        if self.cfg.grad_clip > 0:
            acc.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(acc.unwrap_model(self.objective).model.parameters())
        logs["lr"] = float(self.scheduler.get_last_lr()[0])
        self.step += 1
        return logs

    def validate(self) -> float:
        assert self.val_set is not None
        return validate(self.objective, self.val_set, self.recipe, self.accelerator, self.cfg.val_batches)

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint the current step (every process calls it; the main process writes)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        path = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        if acc.is_main_process:
            objective = acc.unwrap_model(self.objective)
            optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            state = ckpt_io.TrainingState(
                trainable={n: p for n, p in objective.named_parameters() if p.requires_grad},
                optimizer=optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                history=self.history,
                ema=self._ema_tensors(),
                extra={"step": self.step, "processes": self.world},
            )
            path = ckpt_io.save_checkpoint(self.run_dir, self.policy_parts(), state, self.cfg.keep_last)
        acc.wait_for_everyone()
        self.last_checkpoint = path
        return path

    def policy_parts(self) -> ckpt_io.PolicyParts:
        """The inference part of a checkpoint of the model as it is now (LoRA adapters merged in)."""
        from xwam_core.recipe import recipe_to_toml

        objective = self.accelerator.unwrap_model(self.objective)
        store, layout = self.store, self.layout
        return ckpt_io.PolicyParts(
            model=plain_model(objective.model),
            text=objective.text,
            codec=describe_codec(self.recipe.model.preset, self.recipe.model.vae),
            normalizer=Normalizer.from_store_stats(store.stats, store.action_names, store.state_names),
            data=ckpt_io.DataSpec(
                views=layout.views,
                image_size=layout.image_size,
                window=layout.window,
                tasks=layout.tasks,
                fps=store.fps,
                store=str(store.path.resolve()),
                val_episodes=self.recipe.data.val_episodes,
            ),
            inference=self.recipe.inference,
            recipe_toml=recipe_to_toml(self.recipe),
            step=self.step,
        )

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`: trainable weights, optimiser, scheduler, EMA, RNG, step."""
        state = ckpt_io.load_training_state(path)
        named = {n: p for n, p in self.objective.named_parameters() if p.requires_grad}
        missing = sorted(set(named) - set(state.trainable))
        extra = sorted(set(state.trainable) - set(named))
        if missing or extra:
            raise XWAMError(
                f"{path}: was trained with other parameters than this recipe builds "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the recipe the run used"
            )
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(state.trainable[name])
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.ema is not None and state.ema is not None:
            for i, p in enumerate(self.ema.shadow_params):
                p.data.copy_(state.ema[f"shadow.{i}"])
            self.ema.optimization_step = int(state.ema["optimization_step"])
        ckpt_io.restore_rng(path)
        self.step, self.history = int(state.extra["step"]), state.history
        self.last_checkpoint = path

    def _ema_tensors(self) -> dict[str, torch.Tensor] | None:
        if self.ema is None:
            return None
        tensors = {f"shadow.{i}": p.detach() for i, p in enumerate(self.ema.shadow_params)}
        return {**tensors, "optimization_step": torch.tensor(int(self.ema.optimization_step))}

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self, progress: Progress = SILENT) -> TrainResult:
        """Train to train.max_steps, validating and checkpointing as the recipe says."""
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "recipe.toml", _recipe_toml(self.recipe))
        tracker = _Tracker(self.run_dir / "logs") if acc.is_main_process else None
        bar = progress.task("steps", total=cfg.max_steps, completed=self.step)
        start_step, t0 = self.step, time.perf_counter()
        val_loss: float | None = None
        data = iter(self.loader)
        while self.step < cfg.max_steps:
            logs = self.train_step(next(data))
            done = self.step
            if (
                self.val_set is not None
                and cfg.val_every > 0
                and (done % cfg.val_every == 0 or done == cfg.max_steps)
            ):
                val_loss = logs["val_loss"] = self.validate()
            self.history.append({"step": done, **logs})
            if tracker is not None:
                tracker.log(done, logs)
            rate = (done - start_step) / max(time.perf_counter() - t0, 1e-9)
            val = f" val {logs['val_loss']:.4f}" if "val_loss" in logs else ""
            bar.advance(info=f"loss {logs['loss']:.4f}{val} lr {logs['lr']:.2e} {rate:.2f} it/s")
            if (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == cfg.max_steps:
                self.save()
        seconds = time.perf_counter() - t0
        samples_per_s = (self.step - start_step) * self.recipe.data.batch_size / max(seconds, 1e-9)
        if tracker is not None:
            tracker.close()
        if self.last_checkpoint is None:  # max_steps already reached by the resumed checkpoint
            self.last_checkpoint = self.save()
        if acc.is_main_process:
            _plot_losses(self.history, self.run_dir / "loss_curve.png")
            summary = {
                "steps": cfg.max_steps,
                "final": self.history[-1] if self.history else {},
                "seconds": seconds,
                "samples_per_s": samples_per_s,
                "checkpoint": str(self.last_checkpoint),
                "init": self.init_report,
            }
            write_json_atomic(self.run_dir / "summary.json", summary)
        acc.wait_for_everyone()
        return TrainResult(
            run_dir=self.run_dir,
            steps=cfg.max_steps,
            final_loss=float(self.history[-1]["loss"]) if self.history else float("nan"),
            final_val_loss=val_loss,
            seconds=seconds,
            samples_per_s=samples_per_s,
            checkpoint=self.last_checkpoint,
            history=self.history,
            init_report=self.init_report,
        )


def _recipe_toml(recipe: Any) -> str:
    from xwam_core.recipe import recipe_to_toml

    return recipe_to_toml(recipe)


def train(
    recipe: Any, init: str | Path | None = None, resume: str | None = None, progress: Progress = SILENT
) -> TrainResult:
    """Build a Trainer and fit it: `init` fine-tunes from a checkpoint, `resume` is 'latest' or a path."""
    return Trainer(recipe, init=init, resume=resume).fit(progress)


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
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
