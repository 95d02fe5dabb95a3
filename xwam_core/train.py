"""The one training loop behind `xwam pretrain` and `xwam finetune`, on Hugging Face accelerate.

The same code runs on a CPU, one GPU, many GPUs and many nodes: launch it with `accelerate launch` (or
torchrun) and accelerate picks the processes up. train.strategy chooses how they share the work: "ddp"
(accelerate's DDP: every process holds the whole model) or "fsdp2" (torch's fully_shard: parameters,
gradients and AdamW state sharded; accelerate's FSDP plugin refuses CPU processes, fully_shard does not,
so both strategies are tested here on CPU ranks with gloo). Per step:
    global batch -> this process's slice -> micro-batches of train.micro_batch, each encoded and noised
    (TrainingObjective.noise) -> the step's loss-mask counts over the global batch -> per micro-batch:
    TrainingObjective (per-sample losses) -> masked sums normalised over the global batch -> backward
    (gradients synchronised on the last micro-batch only) -> clip to the global norm -> AdamW -> warm-up +
    cosine LR -> EMA.
`Trainer` has build / train_step / validate / save / resume / fit (torchtitan's shape). Checkpoints
(xwam_core.checkpoint) are atomic and pickle-free (FSDP2's sharded state: see there); `resume` continues
bit-exactly, RNG states included. One process owns the run folder at a time (xwam_core.runlock); Ctrl-C
or SIGTERM ends `fit` after the current step with a checkpoint of it (TrainingInterrupted says what is
on disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from xwam_core import checkpoint as ckpt_io
from xwam_core import runlock
from xwam_core.atomic import write_json_atomic, write_text_atomic
from xwam_core.data.mixture import MixtureDataset, check_compatible
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.sampler import GlobalBatchSampler, quotas
from xwam_core.data.windows import WindowDataset, WindowLayout, collate_windows, split_episodes
from xwam_core.errors import XWAMError
from xwam_core.factory import build_codec, build_model, build_text, layout_for
from xwam_core.finetune import add_lora, init_from_checkpoint, plain_model
from xwam_core.fsdp import shard_fsdp2
from xwam_core.models.codecs import describe_codec
from xwam_core.models.transformer import ACTION_MODULES
from xwam_core.objective import LOSS_TERMS, TrainingObjective, executed_action_weights
from xwam_core.progress import SILENT, Progress
from xwam_core.recipe import TrainConfig
from xwam_core.train_log import Tracker, plot_losses


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
    start_step: int = 0  # where this fit began (== steps: nothing was left to train)


def _mask_sums(masks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(micro-batches, terms) how many samples each loss term counts in each micro-batch (this process)."""
    return torch.stack([torch.stack([m[f"{t}_mask"].sum() for t in LOSS_TERMS]) for m in masks]).detach()


def _reduce_losses(
    losses: dict[str, torch.Tensor],
    step_masks: torch.Tensor,
    world: int,
    weights: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's share of the step's loss: each term's masked sum * world / its mask count over the
    GLOBAL batch (`step_masks` (terms,): every micro-batch of every process). Gradient averaging over
    processes (DDP, FSDP2) then gives exactly the single-process gradient, and k accumulated micro-batches
    exactly that of one batch k times larger. The total is the `weights`-weighted sum of the terms
    (train.loss_weights; a missing term weighs 1). Also returns the micro-batch's (terms,) masked sums
    (detached) for the logs (`_step_logs`)."""
    weights = weights or {}
    total: Any = 0.0
    sums = []
    for i, term in enumerate(LOSS_TERMS):
        masked = (losses[term] * losses[f"{term}_mask"]).sum()
        total = total + float(weights.get(term, 1.0)) * masked * world / step_masks[i].clamp_min(1.0)
        sums.append(masked.detach())
    return total, torch.stack(sums)


def _step_logs(
    sums: torch.Tensor, step_masks: torch.Tensor, weights: dict[str, float] | None = None
) -> dict[str, float]:
    """Each term's masked mean over the global batch (unweighted) and `loss`, their weighted total, from
    the (terms,) masked sums and mask counts of the whole step."""
    weights = weights or {}
    logs = {t: float(sums[i] / step_masks[i].clamp_min(1.0)) for i, t in enumerate(LOSS_TERMS)}
    logs["loss"] = sum(float(weights.get(t, 1.0)) * logs[t] for t in LOSS_TERMS)
    return logs


def _rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Samples [start, stop) of a loader batch."""
    return {key: value[start:stop] for key, value in batch.items()}


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended training early; the message says exactly what is on disk.

    A KeyboardInterrupt, so code that stops on Ctrl-C stops on it; the CLI prints the message and exits
    with 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.message, self.signum, self.step, self.checkpoint = message, signum, step, checkpoint

    def __str__(self) -> str:
        return self.message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopRequest:
    """SIGINT/SIGTERM handlers while `fit` runs (main thread only: Python delivers signals there).

    The first signal asks the loop to stop after the current step (which is then checkpointed); a second
    one raises KeyboardInterrupt where the run stands (the checkpoint write is atomic: a partial one is
    never left under a checkpoint's name). Launchers (torchrun, accelerate launch) forward the terminal's
    Ctrl-C to workers that already received it from the terminal: a repeat within DEBOUNCE_S of the first
    signal is the same request, not a second one."""

    DEBOUNCE_S = 1.0

    def __init__(self) -> None:
        self.signum: int | None = None  # the first signal (or the one another process received)
        self.second: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at = signum, now
        elif now - self._first_at > self.DEBOUNCE_S:
            self.second = signum
            raise KeyboardInterrupt


def _signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def _workers_leave_interrupts_to_the_trainer(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM: a Ctrl-C reaches the whole process group, and a worker
    that died of it would break the step the trainer is finishing (the workers end with the loader)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _stop_workers(loader: Any) -> None:
    """End a DataLoader's persistent workers now. They ignore SIGTERM (above), so left to the interpreter's
    exit, which terminates child processes with SIGTERM and then joins them, they would hang it forever;
    a later iter(loader) starts fresh ones."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    if iterator is not None:
        loader._iterator = None


def optimizer_groups(objective: torch.nn.Module, lr: float, action_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: one group of every trainable parameter, or, when `action_lr_scale` is not 1,
    the rest at `lr` and the action/state modules (ACTION_MODULES) at `lr * action_lr_scale`. The LR schedule
    multiplies each group's own rate, so the ratio holds through warm-up and decay."""
    trainable = [(name, p) for name, p in objective.named_parameters() if p.requires_grad]
    if action_lr_scale == 1.0:
        return [{"params": [p for _, p in trainable]}]

    def is_action(name: str) -> bool:
        return any(part in ACTION_MODULES for part in name.split("."))

    action = [p for name, p in trainable if is_action(name)]
    if not action:
        raise XWAMError("train.action_lr_scale: the model has no action/state modules to scale")
    rest = [p for name, p in trainable if not is_action(name)]
    return [{"params": rest}, {"params": action, "lr": lr * action_lr_scale}]


class Trainer:
    """pretrain and finetune: `build` everything, then `fit` calls train_step / validate / save.

    trainer = Trainer(recipe, init="runs/base", resume="latest")   # builds, restores on resume
    print(trainer.describe())
    result = trainer.fit(progress)

    From construction until `fit` ends (or `close`), this process owns train.out (xwam_core.runlock):
    another process is refused, and what interrupted runs left there is removed. A folder that already
    holds a run is refused unless `resume` continues it or `overwrite` replaces it (after the first step,
    so an early failure leaves the old run whole). Ctrl-C or SIGTERM in `fit` stops after the current
    step with a checkpoint of it and raises TrainingInterrupted.
    """

    def __init__(
        self,
        recipe: Any,
        init: str | Path | None = None,
        resume: str | None = None,
        overwrite: bool = False,
    ) -> None:
        self.recipe = recipe
        self.cfg: TrainConfig = recipe.train
        recipe.validate()  # ranges (train.max_steps >= 1, ...), for recipes built in Python too
        if resume is not None and overwrite:
            raise XWAMError(
                f"--resume {resume} and --overwrite contradict each other: resume continues the run in "
                f"{self.cfg.out}, overwrite replaces it"
            )
        self.run_dir = Path(self.cfg.out)
        self.init = None if init is None else Path(init)
        if overwrite and self.init is not None and self.init.resolve().is_relative_to(self.run_dir.resolve()):
            raise XWAMError(
                f"--init {init} lies in train.out {self.cfg.out}, which --overwrite replaces: the checkpoint "
                "it starts from would be deleted; give train.out another folder"
            )
        self.overwrite = overwrite
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Path | None = None
        self.notes: list[str] = []  # lines for the user: a stale lock taken over, leftovers removed
        self._owning = False
        self._release: Callable[[], Any] | None = None
        self._saved_step: int | None = None  # the step whose checkpoint exists (written or resumed from)
        self._saving: int | None = None  # the step being written, while it is
        self._start_processes()
        self.build()  # everything that can refuse the recipe, before the run folder is touched
        if resume is not None and resume != "latest":
            ckpt_io.resolve_resume(self.run_dir, resume)  # a wrong path, before the run folder is touched
        self._take_run_folder(resume, overwrite)
        try:
            self.resume_path = self._resume_from(resume) if resume else None
            self._prepare()
        except BaseException:
            self.close()
            raise

    # ---- build -------------------------------------------------------------------------------------
    def _start_processes(self) -> None:
        """The store (a missing one fails before anything else) and accelerate's processes."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        cfg = self.cfg
        mixed = cfg.mixed_precision
        if mixed == "auto":
            mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        if mixed not in ("no", "bf16", "fp16"):
            raise XWAMError(f"train.mixed_precision={cfg.mixed_precision!r}: expected auto, no, bf16 or fp16")
        self.mixed_precision = mixed
        self.stores = [EpisodeStore(entry.store) for entry in self.recipe.data.entries()]
        self.store = self.stores[0]  # the first store of the mixture: recorded in checkpoints
        # DDP must be told when some parameters get no gradient: the depth branch on a store without depth,
        # the depth head of a model without depth blocks (num_depth_blocks = 0, the no-depth ablation)
        no_depth_blocks = self.recipe.model.overrides.get("num_depth_blocks") == 0
        ddp = DistributedDataParallelKwargs(
            find_unused_parameters=not all(s.has_depth for s in self.stores)
            or cfg.lora_rank > 0
            or no_depth_blocks
        )
        # cpu=True lets accelerate form a gloo process group when launched on machines without a GPU
        self.accelerator = Accelerator(
            mixed_precision=mixed, kwargs_handlers=[ddp], cpu=not torch.cuda.is_available()
        )
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        # fsdp2: DCP checkpoints on any number of processes; the model is sharded when there are several
        self.fsdp2 = cfg.strategy == "fsdp2"
        self.sharded = self.fsdp2 and self.world > 1
        self.fsdp_roots: list[Any] = []

    def build(self) -> None:
        """Data sets, model, objective, optimiser (the store and processes are already up)."""
        from accelerate.utils import set_seed

        recipe, cfg = self.recipe, self.cfg
        set_seed(recipe.seed)

        window = WindowLayout(recipe.data.future_frames, recipe.data.frame_stride)
        data = recipe.data
        views = data.views or list(self.store.views)
        check_compatible(self.stores, views)
        entries = data.entries()
        options = {
            "views": views,
            "normalization": data.normalization,
            "pad_episode_ends": data.pad_episode_ends,
            "frame_cache": data.frame_cache,
        }
        train_parts, val_parts = [], []
        for entry, store in zip(entries, self.stores, strict=True):
            held = entry.val_episodes if entry.val_episodes >= 0 else data.val_episodes
            train_eps, val_eps = split_episodes(store, held)  # each store holds out its own
            train_parts.append(WindowDataset(store, window, episodes=train_eps, **options))  # type: ignore[arg-type]
            if val_eps:
                val_parts.append(WindowDataset(store, window, episodes=val_eps, **options))  # type: ignore[arg-type]
        weights = [e.weight for e in entries]
        sizes = [len(p) for p in train_parts]
        shares = [q / sum(sizes) for q in quotas(sizes, weights)]
        self.train_set = MixtureDataset(train_parts, shares=shares)
        self.val_set = (
            MixtureDataset(val_parts, normalizer=self.train_set.normalizer, tasks=self.train_set.tasks)
            if val_parts
            else None
        )

        self.layout = dataclasses.replace(
            layout_for(self.store, window, recipe.model, data.views or None), tasks=list(self.train_set.tasks)
        )
        if self.init is not None:
            model, text, self.init_report = init_from_checkpoint(self.init, recipe.model, self.layout)
        else:
            model, self.init_report = build_model(recipe.model, self.layout)
            text = build_text(recipe.model, self.layout, int(model.config["text_dim"]))
        if cfg.lora_rank > 0:
            model = add_lora(model, cfg.lora_rank)
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.objective = TrainingObjective(
            model,
            text,
            build_codec(recipe.model).to(self.accelerator.device),
            recipe.noise,
            self.layout.action_valid(),
            self.layout.state_valid(),
            cfg.augment,
            executed_action_weights(
                self.layout.window.num_actions, recipe.inference.actions_per_query, cfg.executed_action_weight
            ),
        ).to(self.accelerator.device)
        self.objective.codec_micro_batch = cfg.codec_micro_batch
        if self.sharded:  # before the optimiser: fully_shard replaces the parameters with sharded ones
            self.fsdp_roots = shard_fsdp2(self.objective, self.accelerator.device, self.mixed_precision)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            optimizer_groups(self.objective, cfg.lr, cfg.action_lr_scale),
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
        # the data order (it refuses a global batch the data or the processes cannot fill); _prepare
        # starts it where the run stands
        self.sampler = GlobalBatchSampler(
            self.train_set.sizes, recipe.data.batch_size, self.rank, self.world, recipe.seed, weights=weights
        )
        self.accumulation = cfg.accumulation(recipe.data.batch_size, self.world)  # micro-batches per step

    def _prepare(self) -> None:
        """Wrap for the processes (DDP; FSDP2 sharded in `build`) and start the data where the run stands."""
        if not self.fsdp2:
            self.objective, self.optimizer = self.accelerator.prepare(self.objective, self.optimizer)
        recipe = self.recipe
        self.sampler.start_step = self.step
        self.local_batch = self.sampler.local
        workers = recipe.data.num_workers
        self.loader = DataLoader(
            self.train_set,
            batch_sampler=self.sampler,
            num_workers=workers,
            collate_fn=collate_windows,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # its own generator: making an iterator draws a seed for the workers, which from the global
            # RNG would leave a resumed run one draw ahead of an uninterrupted one
            generator=torch.Generator().manual_seed(recipe.seed),
            worker_init_fn=_workers_leave_interrupts_to_the_trainer if workers > 0 else None,
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
            "resumed_from": str(self.resume_path) if self.resume_path is not None else None,
            "device": str(self.accelerator.device),
            "mixed_precision": self.mixed_precision,
            "strategy": self.cfg.strategy,
            "micro_batch": self.local_batch // self.accumulation,
            "accumulation": self.accumulation,
        }

    # ---- one step, validation -----------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on this process's share of a global batch: every micro-batch encoded and
        noised first (so the loss masks of the whole step are known), then forward and backward micro-batch
        by micro-batch with the gradients synchronised on the last only; clip, AdamW, LR schedule, EMA."""
        acc, cfg = self.accelerator, self.cfg
        self.objective.train()
        plain = self._plain_objective()
        k = self.accumulation
        micro = self.local_batch // k
        first = self.rank * self.local_batch  # the global index of this process's first sample
        with acc.autocast():
            parts = [
                plain.noise(
                    _rows(batch, i * micro, (i + 1) * micro), self.recipe.seed, self.step, first + i * micro
                )
                for i in range(k)
            ]
        counts = _mask_sums([part.masks for part in parts])  # (k, terms)
        if self.world > 1:
            counts = acc.reduce(counts.to(acc.device), reduction="sum")
        step_masks = counts.sum(0)
        sums = torch.zeros(len(LOSS_TERMS), device=acc.device)
        for i, part in enumerate(parts):
            # every process runs the depth branch when any has depth (sharded blocks gather collectively)
            part.run_depth = bool(counts[i, LOSS_TERMS.index("depth")] > 0)
            with self._gradient_sync(i == k - 1):
                with acc.autocast():
                    losses = self.objective(part)
                loss, part_sums = _reduce_losses(losses, step_masks, self.world, cfg.loss_weights)
                acc.backward(loss)
            sums += part_sums.to(sums.device)
        if self.world > 1:
            sums = acc.reduce(sums, reduction="sum")
        logs = _step_logs(sums, step_masks, cfg.loss_weights)
        if cfg.grad_clip > 0:
            logs["grad_norm"] = self._clip_grad_norm(cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(plain.model.parameters())
        logs["lr"] = float(self.scheduler.get_last_lr()[0])
        self.step += 1
        return logs

    def _plain_objective(self) -> TrainingObjective:
        """The objective without accelerate's DDP wrapper (FSDP2 shards it in place)."""
        return self.objective if self.fsdp2 else self.accelerator.unwrap_model(self.objective)

    def _gradient_sync(self, sync: bool) -> Any:
        """DDP: gradients reduced over the processes only when `sync` (the step's last micro-batch). FSDP2:
        every micro-batch's gradients are reduce-scattered into the sharded gradient (as torchtitan does):
        skipping the sync would hold unsharded gradients of every trainable weight on every process between
        micro-batches (~27 GB per GPU at 5B parameters in float32), the memory sharding exists to save;
        one reduce-scatter per micro-batch is the price (xwam_core.plan counts sharded gradients)."""
        if sync or self.world == 1 or self.sharded:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.objective)

    def _clip_grad_norm(self, max_norm: float) -> float:
        """Clip to the GLOBAL gradient norm and return it. Sharded gradients are DTensors: torch's
        clip_grad_norm_ reduces their per-shard norms over the processes (the returned norm is a DTensor
        whose full value is the norm of the whole gradient); replicated ones go through accelerate."""
        if not self.sharded:
            return float(self.accelerator.clip_grad_norm_(self.params, max_norm))
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def validate(self) -> float:
        assert self.val_set is not None
        return validate(
            self.objective,
            self.val_set,
            self.recipe,
            self.accelerator,
            self.cfg.val_batches,
            self._plain_objective(),
        )

    # ---- the run folder ----------------------------------------------------------------------------
    def _take_run_folder(self, resume: str | None, overwrite: bool) -> None:
        """Own train.out (the main process holds the lock; every process agrees on the outcome), remove
        what interrupted runs left there, and refuse a folder that holds a run unless resumed or replaced."""
        error = None
        if self.accelerator.is_main_process:
            try:
                lock = runlock.acquire_run(self.run_dir)
                self._release = weakref.finalize(self, runlock.release_run, lock)
                if resume is None and not overwrite and runlock.is_run(self.run_dir):
                    raise XWAMError(
                        f"{self.run_dir}: already holds a run (recipe.toml or checkpoints); continue it with "
                        "--resume latest, replace it with --overwrite, or give train.out another folder"
                    )
                if lock.users == 1:  # the first owner in this process: nothing here is being written
                    if lock.taken_over is not None:
                        self.notes.append(
                            f"{self.run_dir}: took over the stale lock of {lock.taken_over.describe()}, "
                            "which is no longer running"
                        )
                    removed = runlock.remove_leftovers(self.run_dir)
                    if removed:
                        self.notes.append(removed)
            except XWAMError as e:
                self.close()
                error = str(e)
        error = self._agree(error)
        if error is not None:
            raise XWAMError(error)
        self._owning = True

    def _own(self) -> None:
        """Own train.out again after `close` (a second `fit`, a `save` after it)."""
        if self._owning:
            return
        error = None
        if self.accelerator.is_main_process:
            try:
                lock = runlock.acquire_run(self.run_dir)
                self._release = weakref.finalize(self, runlock.release_run, lock)
            except XWAMError as e:
                error = str(e)
        error = self._agree(error)
        if error is not None:
            raise XWAMError(error)
        self._owning = True

    def close(self) -> None:
        """Give train.out up (fit does when it ends); the Trainer owns it again if it is used further."""
        if self._release is not None:
            self._release()
            self._release = None
        self._owning = False

    def _agree(self, error: str | None) -> str | None:
        """The main process's outcome, on every process."""
        if self.world == 1:
            return error
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([error], from_process=0)[0]

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint the current step (every process calls it; the main process writes)."""
        acc = self.accelerator
        self._own()
        acc.wait_for_everyone()
        path = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        self._saving = self.step
        if self.fsdp2:
            self._save_sharded()
        elif acc.is_main_process:
            objective = acc.unwrap_model(self.objective)
            optimizer = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
            state = ckpt_io.TrainingState(
                trainable={n: p for n, p in objective.named_parameters() if p.requires_grad},
                optimizer=optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                history=self.history,
                ema=self._ema_tensors(),
                extra=self._trainer_extra(),
            )
            path = ckpt_io.save_checkpoint(self.run_dir, self.policy_parts(), state, self.cfg.keep_last)
        acc.wait_for_everyone()
        self._saving = None
        self.last_checkpoint, self._saved_step = path, self.step
        return path

    def _save_sharded(self) -> None:
        """FSDP2's checkpoint (train.strategy=fsdp2, any number of processes): every process writes its
        shard of the trainable weights and the optimiser state (torch.distributed.checkpoint, by parameter
        name, so a resume may use another number of processes); the main process adds the parameter
        groups, scheduler, RNG, data order and step, and the inference part from the gathered weights.
        One folder, renamed into place when complete, like every checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        acc = self.accelerator
        model_state, optim_state = get_state_dict(self.objective, self.optimizer)
        trainable = {n for n, p in self.objective.named_parameters() if p.requires_grad}
        shards = {
            "model": {k: v for k, v in model_state.items() if k in trainable},
            "optimizer": optim_state["state"],
        }
        parts = self.policy_parts()  # gathers the sharded weights onto the main process
        with ckpt_io.sharded_checkpoint(
            self.run_dir,
            self.step,
            self.cfg.keep_last,
            acc.is_main_process,
            self._share,
            acc.wait_for_everyone,
        ) as tmp:
            ckpt_io.write_shards(tmp, shards)
            if acc.is_main_process:
                state = ckpt_io.TrainingState(
                    trainable={},
                    optimizer={"param_groups": optim_state["param_groups"]},
                    scheduler=self.scheduler.state_dict(),
                    history=self.history,
                    extra=self._trainer_extra(),
                )
                ckpt_io.write_training_state(tmp, state)
                ckpt_io.write_policy_parts(tmp, parts)

    def _trainer_extra(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "processes": self.world,
            "strategy": self.cfg.strategy,
            "sampler": self.sampler.state(self.step),
        }

    def _share(self, value: str | None) -> str:
        """The main process's `value`, on every process."""
        if self.world == 1:
            assert value is not None
            return value
        from accelerate.utils import broadcast_object_list

        return str(broadcast_object_list([value], from_process=0)[0])

    def export(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the model as it is now to `out`, a checkpoint folder for inference only (what
        `load_policy_parts` and the Policy read): under FSDP2 the shards are gathered onto the main
        process, which writes it. Every process calls it."""
        parts = self.policy_parts()
        error = None
        if self.accelerator.is_main_process:
            try:
                ckpt_io.export_checkpoint(parts, out, overwrite=overwrite)
            except XWAMError as e:
                error = str(e)
        error = self._agree(error)
        if error is not None:
            raise XWAMError(error)
        return Path(out)

    def _full_modules(self) -> tuple[Any, Any]:
        """(transformer, text conditioner) with their whole weights, as plain modules: the live ones, or
        under FSDP2 fresh copies of the gathered weights on the main process (None on the others).
        Collective when sharded."""
        objective = self._plain_objective()
        if not self.sharded:
            return plain_model(objective.model), objective.text
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from xwam_core.models.transformer import XWAMTransformer

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(objective.model, options=options)
        text_sharded = len(self.fsdp_roots) > 1
        text_state = get_model_state_dict(objective.text, options=options) if text_sharded else None
        if not self.accelerator.is_main_process:
            return None, None
        with torch.device("meta"):
            model = XWAMTransformer.from_config(objective.model.config)
            text = (
                build_text(self.recipe.model, self.layout, int(model.config["text_dim"]))
                if text_sharded
                else None
            )
        model = _filled(model, model_state, objective.model)
        text = (
            _filled(text, text_state, objective.text) if text is not None and text_state else objective.text
        )
        return model, text

    def policy_parts(self) -> ckpt_io.PolicyParts:
        """The inference part of a checkpoint of the model as it is now (LoRA adapters merged in; under
        FSDP2 the whole weights, gathered: every process calls it, the main process gets the model)."""
        from xwam_core.recipe import recipe_to_toml

        model, text = self._full_modules()
        store, layout = self.store, self.layout
        return ckpt_io.PolicyParts(
            model=model,
            text=text,
            codec=describe_codec(self.recipe.model.preset, self.recipe.model.vae),
            normalizer=self.train_set.normalizer,  # what training normalized with (data.normalization)
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

    def _resume_from(self, resume: str) -> Path | None:
        """Resolve `resume` ('latest' or a path) and restore it; a damaged newest checkpoint is named, with
        the older one to give by path instead."""
        try:
            path = ckpt_io.resolve_resume(self.run_dir, resume)
            state = ckpt_io.load_training_state(path) if path is not None else None
        except XWAMError as e:
            if resume != "latest":
                raise
            dirs = ckpt_io.checkpoint_dirs(self.run_dir)
            older = (
                f"resume from an older one by path: --resume {dirs[-2]}"
                if len(dirs) > 1
                else "there is no older one to resume from"
            )
            raise XWAMError(
                f"{e} (--resume latest: the newest checkpoint {dirs[-1].name} is damaged; {older})"
            ) from None
        if path is None or state is None:  # latest, before the first checkpoint: a new run, said so
            self.notes.append(
                f"--resume latest: {self.run_dir} holds no checkpoint yet; starting from step 0"
            )
            return None
        self._restore(path, state)
        return path

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path`: trainable weights, optimiser, scheduler, EMA, RNG, step."""
        self._restore(path, ckpt_io.load_training_state(path))

    def _restore(self, path: Path, state: ckpt_io.TrainingState) -> None:
        """Put a loaded training state in place, checking first that it fits what this recipe built."""
        written = "fsdp2" if state.shards is not None else "ddp"
        if written != self.cfg.strategy:
            raise XWAMError(
                f"{path}: was written with train.strategy={written}, this recipe trains with "
                f"train.strategy={self.cfg.strategy}; resume with train.strategy={written}"
            )
        if state.shards is not None:
            self._restore_shards(path, state)
        else:
            self._restore_tensors(path, state)
        self.scheduler.load_state_dict(state.scheduler)
        if state.rng is not None:
            state.rng.restore()  # last: building drew from the RNGs; nothing may draw between here and step 1
        if isinstance(state.extra.get("sampler"), dict):  # the data order continues where it stood
            self.sampler.check(state.extra["sampler"], int(state.extra["step"]), str(path))
        self.step, self.history = int(state.extra["step"]), list(state.history)
        self.last_checkpoint, self._saved_step = path, self.step

    def _restore_shards(self, path: Path, state: ckpt_io.TrainingState) -> None:
        """FSDP2: the trainable weights and optimiser state from the shards, resharded onto this run's
        processes (their number may differ from the writer's)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.objective, self.optimizer)  # makes AdamW's state
        optim: dict[str, Any] = dict(optim_state)
        trainable = {n for n, p in self.objective.named_parameters() if p.requires_grad}
        groups = state.optimizer["param_groups"]
        saved = [list(g["params"]) for g in groups]
        mine = [list(g["params"]) for g in optim["param_groups"]]
        if saved != mine:
            raise XWAMError(
                f"{path / ckpt_io.TRAINING / 'optimizer.json'}: optimises {sum(map(len, saved))} parameters "
                f"in {len(saved)} group(s), this recipe {sum(map(len, mine))} in {len(mine)}; resume with the "
                "recipe the run used"
            )
        shards: dict[str, Any] = {
            "model": {k: v for k, v in model_state.items() if k in trainable},
            "optimizer": optim["state"],
        }
        ckpt_io.read_shards(path, shards)
        set_state_dict(
            self.objective,
            self.optimizer,
            model_state_dict=shards["model"],
            optim_state_dict={"state": shards["optimizer"], "param_groups": groups},
            options=StateDictOptions(strict=False),
        )

    def _restore_tensors(self, path: Path, state: ckpt_io.TrainingState) -> None:
        """DDP (or one process): every tensor from its safetensors file, checked against this recipe."""
        root = path / ckpt_io.TRAINING
        named = {n: p for n, p in self.objective.named_parameters() if p.requires_grad}
        missing = sorted(set(named) - set(state.trainable))
        extra = sorted(set(state.trainable) - set(named))
        if missing or extra:
            raise XWAMError(
                f"{path}: was trained with other parameters than this recipe builds "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the recipe the run used"
            )
        for name, param in named.items():
            _same_shape(root / "trainable.safetensors", name, state.trainable[name], param)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        groups = state.optimizer["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.optimizer.param_groups]:
            raise XWAMError(
                f"{root / 'optimizer.json'}: parameter groups of {[len(g['params']) for g in groups]} "
                f"parameters, this recipe optimises {[len(g['params']) for g in self.optimizer.param_groups]}; "
                "resume with the recipe the run used"
            )
        for pid, entry in state.optimizer["state"].items():
            if not 0 <= pid < len(params):
                raise XWAMError(f"{root / 'optimizer.json'}: state for parameter {pid} of {len(params)}")
            for key, value in entry.items():
                if torch.is_tensor(value) and key != "step":
                    _same_shape(root / "optimizer.safetensors", f"{pid}.{key}", value, params[pid])
        if len(state.scheduler["base_lrs"]) != len(groups):
            raise XWAMError(
                f"{root / 'trainer.json'}: 'scheduler.base_lrs' has {len(state.scheduler['base_lrs'])} "
                f"entries, expected one per parameter group ({len(groups)})"
            )
        if self.ema is not None and state.ema is not None:
            shadows = self.ema.shadow_params
            for i, p in enumerate(shadows):
                if f"shadow.{i}" not in state.ema:
                    raise XWAMError(
                        f"{root / 'ema.safetensors'}: lacks 'shadow.{i}' ({len(shadows)} expected)"
                    )
                _same_shape(root / "ema.safetensors", f"shadow.{i}", state.ema[f"shadow.{i}"], p)
        try:
            self.optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise XWAMError(
                f"{root / 'optimizer.json'}: does not fit this recipe's optimiser ({e})"
            ) from None
        with torch.no_grad():
            for name, param in named.items():
                param.copy_(state.trainable[name])
        if self.ema is not None and state.ema is not None:
            for i, p in enumerate(self.ema.shadow_params):
                p.data.copy_(state.ema[f"shadow.{i}"])
            self.ema.optimization_step = int(state.ema.get("optimization_step", torch.tensor(0)))

    def _ema_tensors(self) -> dict[str, torch.Tensor] | None:
        if self.ema is None:
            return None
        tensors = {f"shadow.{i}": p.detach() for i, p in enumerate(self.ema.shadow_params)}
        return {**tensors, "optimization_step": torch.tensor(int(self.ema.optimization_step))}

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self, progress: Progress = SILENT) -> TrainResult:
        """Train to train.max_steps, validating and checkpointing as the recipe says.

        Ctrl-C or SIGTERM: the current step ends, is checkpointed, and TrainingInterrupted says so."""
        for note in self.notes:
            progress.log(note)
        self.notes = []
        if self.step >= self.cfg.max_steps:  # a resumed run that has already reached max_steps
            self.close()
            return self._result(self.step, 0.0, None)
        self._own()
        stop = _StopRequest()
        try:
            with stop:
                try:
                    return self._loop(progress, stop)
                except KeyboardInterrupt as e:
                    if isinstance(e, TrainingInterrupted):
                        raise
                    raise self._interrupted_again(stop) from None
        finally:
            self.close()

    def _loop(self, progress: Progress, stop: _StopRequest) -> TrainResult:
        cfg = self.cfg
        bar = progress.task("steps", total=cfg.max_steps, completed=self.step)
        start_step, t0 = self.step, time.perf_counter()
        val_loss: float | None = None
        tracker: Tracker | None = None
        data = iter(self.loader)
        try:
            while self.step < cfg.max_steps and not self._stop_agreed(stop):
                logs = self.train_step(next(data))
                done = self.step
                self._check_finite(logs, done)  # before an --overwrite replaces the old run, or a save
                if done == start_step + 1:  # the run does something: its outputs begin
                    tracker = self._begin_outputs()
                if (
                    self.val_set is not None
                    and cfg.val_every > 0
                    and (done % cfg.val_every == 0 or done == cfg.max_steps)
                ):
                    val_loss = logs["val_loss"] = self.validate()
                    self._check_finite(logs, done)
                self.history.append({"step": done, **logs})
                every = cfg.log_every or 1
                if tracker is not None and (done % every == 0 or "val_loss" in logs or done == cfg.max_steps):
                    tracker.log(done, logs)  # TensorBoard every train.log_every steps
                rate = (done - start_step) / max(time.perf_counter() - t0, 1e-9)
                val = f" val {logs['val_loss']:.4f}" if "val_loss" in logs else ""
                bar.advance(info=f"loss {logs['loss']:.4f}{val} lr {logs['lr']:.2e} {rate:.2f} it/s")
                if (cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0) or done == cfg.max_steps:
                    self.save()
        finally:
            if tracker is not None:
                tracker.close()
            del data
            _stop_workers(self.loader)
        if self.step < cfg.max_steps:
            assert stop.signum is not None
            raise self._interrupted(stop.signum, start_step)
        seconds = time.perf_counter() - t0
        samples_per_s = (self.step - start_step) * self.recipe.data.batch_size / max(seconds, 1e-9)
        if self.accelerator.is_main_process:
            plot_losses(self.history, self.run_dir / "loss_curve.png")
            summary = {
                "steps": cfg.max_steps,
                "final": self.history[-1] if self.history else {},
                "seconds": seconds,
                "samples_per_s": samples_per_s,
                "checkpoint": str(self.last_checkpoint),
                "init": self.init_report,
            }
            write_json_atomic(self.run_dir / "summary.json", summary)
        self.accelerator.wait_for_everyone()
        return self._result(start_step, seconds, val_loss)

    def _check_finite(self, logs: dict[str, float], step: int) -> None:
        """Stop a diverged run in one line (the same on every process: the logged sums are reduced): a NaN or
        infinite loss or gradient norm has already reached the weights, so this step is never saved."""
        bad = [key for key, value in logs.items() if not math.isfinite(value)]
        if not bad:
            return
        key = "loss" if "loss" in bad else bad[0]
        kept = (
            f"the newest checkpoint, {self.last_checkpoint}, is from before it"
            if self.last_checkpoint is not None
            else "no checkpoint was written"
        )
        raise XWAMError(
            f"training diverged: {key} is {logs[key]} at step {step} (expected finite values; try a lower "
            f"train.lr than {self.cfg.lr:g} or more train.warmup_steps); stopped, {kept}"
        )

    def _result(self, start_step: int, seconds: float, val_loss: float | None) -> TrainResult:
        assert self.last_checkpoint is not None
        return TrainResult(
            run_dir=self.run_dir,
            steps=self.step,
            final_loss=float(self.history[-1]["loss"]) if self.history else float("nan"),
            final_val_loss=val_loss,
            seconds=seconds,
            samples_per_s=(self.step - start_step) * self.recipe.data.batch_size / max(seconds, 1e-9),
            checkpoint=self.last_checkpoint,
            history=self.history,
            init_report=self.init_report,
            start_step=start_step,
        )

    def _begin_outputs(self) -> Tracker | None:
        """After the first step: replace the old run (--overwrite), write recipe.toml, open the logs."""
        if not self.accelerator.is_main_process:
            return None
        if self.overwrite:
            runlock.clear_run(self.run_dir)
            self.overwrite = False
        write_text_atomic(self.run_dir / "recipe.toml", _recipe_toml(self.recipe))
        return Tracker(self.run_dir / "logs")

    def _stop_agreed(self, stop: _StopRequest) -> bool:
        """Whether any process was asked to stop (all processes then stop after the same step)."""
        if self.world > 1:
            flags = self.accelerator.gather(torch.tensor([stop.signum or 0], device=self.accelerator.device))
            agreed = int(flags.max())
            if agreed and stop.signum is None:
                stop.signum = agreed
        return stop.signum is not None

    def _interrupted(self, signum: int, start_step: int) -> TrainingInterrupted:
        """The first signal stopped the loop after a step: checkpoint that step and say so."""
        how = f"interrupted ({_signal_name(signum)})"
        if self.step == start_step and self._saved_step is None:
            return TrainingInterrupted(
                f"{how} before the first step: nothing was written", signum, self.step, None
            )
        if self.step == start_step:
            return TrainingInterrupted(
                f"{how} at step {self.step} before training further: {self.last_checkpoint} is still the "
                "newest checkpoint; continue with --resume latest",
                signum,
                self.step,
                self.last_checkpoint,
            )
        path = self.last_checkpoint if self._saved_step == self.step else self.save()
        assert path is not None
        return TrainingInterrupted(
            f"{how} at step {self.step}: checkpoint {path} written; continue with --resume latest",
            signum,
            self.step,
            path,
        )

    def _interrupted_again(self, stop: _StopRequest) -> TrainingInterrupted:
        """A second signal (or a KeyboardInterrupt from elsewhere) broke off a step or a checkpoint write:
        say what is on disk, as found there."""
        signum = stop.second or stop.signum or signal.SIGINT
        if self._saving is not None:
            what = (
                f"while checkpoint step-{self._saving:08d} was being written: that checkpoint was not written "
                "(it is written under a temporary name and renamed only when complete)"
            )
        else:
            what = f"at step {self.step}, during step {self.step + 1}: that step was not checkpointed"
        self._saving = None
        dirs = ckpt_io.checkpoint_dirs(self.run_dir)
        left = sorted(p.name for p in (self.run_dir / "checkpoints").glob(".step-*.tmp-*"))
        if dirs:
            on_disk = f"the newest complete checkpoint is {dirs[-1]}; continue with --resume latest"
        elif (self.run_dir / "recipe.toml").exists():
            on_disk = f"no checkpoint was written ({self.run_dir} holds recipe.toml and logs/); start again with --overwrite"
        else:
            on_disk = "nothing was written"
        if left:
            on_disk += (
                f" ({', '.join(left)} was left half-written: the next run in {self.run_dir} removes it)"
            )
        return TrainingInterrupted(
            f"interrupted again ({_signal_name(signum)}) {what}; {on_disk}",
            signum,
            self.step,
            dirs[-1] if dirs else None,
        )


def _filled(fresh: torch.nn.Module, state: dict[str, Any], live: torch.nn.Module) -> Any:
    """`fresh` (built on the meta device) holding `state`; its non-persistent buffers (RoPE tables), which
    no state dict carries and FSDP2 never shards, are copied from `live`."""
    fresh.load_state_dict(state, assign=True)
    buffers = dict(live.named_buffers())
    for name, buffer in list(fresh.named_buffers()):
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[leaf] = buffers[name].detach().cpu().clone()
    return fresh


def _same_shape(file: Path, name: str, saved: torch.Tensor, param: torch.Tensor) -> None:
    if tuple(saved.shape) != tuple(param.shape):
        raise XWAMError(
            f"{file}: '{name}' has shape {tuple(saved.shape)}, this recipe builds {tuple(param.shape)}; "
            "resume with the recipe the run used"
        )


def _recipe_toml(recipe: Any) -> str:
    from xwam_core.recipe import recipe_to_toml

    return recipe_to_toml(recipe)


def train(
    recipe: Any,
    init: str | Path | None = None,
    resume: str | None = None,
    progress: Progress = SILENT,
    overwrite: bool = False,
) -> TrainResult:
    """Build a Trainer and fit it: `init` fine-tunes from a checkpoint, `resume` is 'latest' or a path,
    `overwrite` replaces a run already in train.out."""
    return Trainer(recipe, init=init, resume=resume, overwrite=overwrite).fit(progress)


@torch.no_grad()
def validate(
    objective: Any, val_set: Any, recipe: Any, accelerator: Any, batches: int, plain: Any = None
) -> float:
    """Held-out loss with fixed noise (seeded by batch index), the same at every evaluation; the terms
    are weighted by train.loss_weights like the training loss. `plain` is `objective` without a DDP
    wrapper. Every process runs every forward (and the depth branch when any process needs it): a
    process whose share of a batch is empty computes one sample and counts none, so sharded blocks,
    whose forward gathers collectively, never wait on a process that skipped one."""
    plain = objective if plain is None else plain
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
        counted = 1.0 if mine else 0.0
        mine = mine or ids[:1]
        batch = collate_windows([val_set[i] for i in mine])
        with accelerator.autocast():
            noised = plain.noise(batch, recipe.seed + 1, 0, mine[0], train=False)
            if world > 1:
                depth = torch.tensor([float(noised.run_depth)], device=accelerator.device)
                noised.run_depth = bool(accelerator.reduce(depth, reduction="sum") > 0)
            losses = objective(noised)
        for t in LOSS_TERMS:
            totals[t] += counted * float((losses[t] * losses[f"{t}_mask"]).sum())
            masks[t] += counted * float(losses[f"{t}_mask"].sum())
    values = torch.tensor(
        [totals[t] for t in LOSS_TERMS] + [masks[t] for t in LOSS_TERMS], device=accelerator.device
    )
    if world > 1:
        values = accelerator.reduce(values, reduction="sum")
    k = len(LOSS_TERMS)
    weights = recipe.train.loss_weights
    return float(
        sum(
            float(weights.get(t, 1.0)) * values[i] / values[k + i].clamp_min(1.0)
            for i, t in enumerate(LOSS_TERMS)
        )
    )
