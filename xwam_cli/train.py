"""`xwam pretrain RECIPE` and `xwam finetune RECIPE --init CKPT`: one training loop, two entry points."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xwam_cli.common import RichProgress, console, err_console, recipe_with, user_errors
from xwam_core.errors import XWAMError

EXAMPLES = """
[bold]Examples[/]

  xwam pretrain recipes/tiny_cpu.toml
  xwam pretrain recipes/tiny_cpu.toml --set train.max_steps=200 --set train.out=runs/quick
  xwam pretrain recipes/tiny_cpu.toml --resume latest      # after Ctrl-C, SIGTERM or a crash
  xwam pretrain recipes/tiny_cpu.toml --overwrite          # replace the run in train.out
  xwam pretrain recipes/base.toml --dry-run --gpus 8     # what it needs per GPU, before any work
  xwam pretrain recipes/base.toml --dry-run --gpus 256 --gpu H200 --strategy fsdp2 --json
  accelerate launch --multi_gpu --num_processes 8 -m xwam_cli.main pretrain recipes/base.toml
"""

FINETUNE_EXAMPLES = """
[bold]Examples[/]

  xwam finetune recipes/finetune_tiny.toml --init out/demo/run
  xwam finetune recipes/finetune_tiny.toml --init CKPT --set train.lora_rank=16
  xwam finetune recipes/finetune_base.toml --dry-run --gpus 8
"""

RecipeArg = Annotated[Path, typer.Argument(help="Recipe TOML (see recipes/).", exists=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: section.key=value.")]
ResumeOpt = Annotated[
    str | None,
    typer.Option(help="Continue a run: 'latest' (newest checkpoint in train.out) or a checkpoint path."),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the run already in train.out (removed once the first step has run; without this "
        "flag or --resume such a folder is refused).",
    ),
]

DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Say what the recipe needs per GPU (parameters, tokens, memory, FLOPs, step time) and exit; "
        "a recipe that cannot fit is refused with what would (exit status 1). Nothing is trained or "
        "downloaded: the model is built on the meta device.",
    ),
]
GpusOpt = Annotated[int | None, typer.Option("--gpus", help="--dry-run: GPUs in all (ranks); default 1.")]
GpuOpt = Annotated[
    str | None, typer.Option("--gpu", help="--dry-run: the GPU: H100 (default), A100 or H200.")
]
GpuMemoryOpt = Annotated[
    float | None, typer.Option("--gpu-memory", help="--dry-run: GB per GPU (default: the GPU's).")
]
StrategyOpt = Annotated[
    str | None,
    typer.Option(help="--dry-run: single, ddp or fsdp2 (default: the recipe's train.strategy, else ddp)."),
]
MicroBatchOpt = Annotated[
    int | None,
    typer.Option(
        "--micro-batch",
        help="--dry-run: samples per GPU per forward (the rest of the global batch is accumulation); "
        "default: the recipe's.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="--dry-run: print the plan as JSON.")]


def _dry_run_only(**given: object) -> None:
    """The planning options mean nothing to a training run: refuse them there rather than ignore them."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value not in (None, False)]
    if named:
        raise XWAMError(f"{', '.join(named)}: planning options, they go with --dry-run")


def _dry_run(
    recipe_path: Path,
    set_: list[str] | None,
    gpus: int | None,
    gpu: str | None,
    gpu_memory: float | None,
    strategy: str | None,
    micro_batch: int | None,
    as_json: bool,
) -> None:
    from xwam_core.plan import plan, plan_json, plan_rows

    recipe = recipe_with(recipe_path, set_, {})
    result = plan(
        recipe,
        gpus=1 if gpus is None else gpus,
        gpu=gpu,
        gpu_memory_gb=gpu_memory,
        strategy=strategy,
        micro_batch=micro_batch,
    )
    if as_json:
        print(plan_json(result))
    else:
        table = Table(title=f"dry run: {recipe_path}", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        for label, value in plan_rows(result):
            table.add_row(label, value)
        console.print(table)
    if not result.fits:
        err_console.print(f"error: {result.advice}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _run(
    recipe_path: Path, set_: list[str] | None, init: str | None, resume: str | None, overwrite: bool
) -> None:
    recipe = recipe_with(recipe_path, set_, {})
    from xwam_core.train import Trainer, TrainingInterrupted

    trainer = Trainer(recipe, init=init, resume=resume, overwrite=overwrite)
    try:
        info = trainer.describe()
        console.print(
            f"[bold]{recipe.name}[/]: {info['parameters'] / 1e6:.2f} M trainable parameters, "
            f"{info['train_windows']} training / {info['val_windows']} held-out windows, "
            f"{info['processes']} process(es) on {info['device']}, precision {info['mixed_precision']}\n"
            f"strategy {info['strategy']}: micro-batch {info['micro_batch']} per process x "
            f"accumulation {info['accumulation']}"
        )
        resumed = f"resumed from {info['resumed_from']} at step {info['start_step']} of {info['max_steps']}"
        console.print(f"model: {resumed if info['resumed_from'] else info['init']}", soft_wrap=True)
        for note in trainer.notes:  # a stale lock taken over, leftovers of interrupted runs removed
            err_console.print(note, highlight=False, soft_wrap=True)
        trainer.notes.clear()
        with RichProgress("train") as progress:
            result = trainer.fit(progress)
    except TrainingInterrupted as e:
        err_console.print(f"[bold yellow]{e}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    finally:
        trainer.close()
    if result.start_step >= result.steps:
        console.print(
            f"nothing to train: {result.checkpoint} is at step {result.steps} and train.max_steps is "
            f"{recipe.train.max_steps}; raise train.max_steps to train further",
            soft_wrap=True,
        )
        return
    table = Table(title=f"run {result.run_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    last = result.history[-1] if result.history else {}
    table.add_row("steps", str(result.steps))
    for term in ("loss", "video", "action", "state", "depth"):
        if term in last:
            table.add_row("final loss" if term == "loss" else f"final {term} loss", f"{last[term]:.5f}")
    if result.final_val_loss is not None:
        table.add_row("held-out loss", f"{result.final_val_loss:.5f}")
    table.add_row("seconds", f"{result.seconds:.1f}")
    table.add_row("samples/s", f"{result.samples_per_s:.2f}")
    table.add_row("checkpoint", str(result.checkpoint))
    table.add_row("loss curve", str(result.run_dir / "loss_curve.png"))
    table.add_row("tensorboard", f"tensorboard --logdir {result.run_dir / 'logs'}")
    console.print(table)


@user_errors
def pretrain(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False,
    gpus: GpusOpt = None,
    gpu: GpuOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    strategy: StrategyOpt = None,
    micro_batch: MicroBatchOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a world-action model from a video prior (model.init) or from scratch (tiny recipes).

    Ctrl-C or SIGTERM ends the run after the current step with a checkpoint of it."""
    if dry_run:
        _dry_run(recipe, set_, gpus, gpu, gpu_memory, strategy, micro_batch, as_json)
        return
    _dry_run_only(
        gpus=gpus, gpu=gpu, gpu_memory=gpu_memory, strategy=strategy, micro_batch=micro_batch, json=as_json
    )
    _run(recipe, set_, None, resume, overwrite)


@user_errors
def finetune(
    recipe: RecipeArg,
    init: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint folder to start from, or a run folder (its newest checkpoint); required "
            "except with --dry-run."
        ),
    ] = None,
    set_: SetOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False,
    gpus: GpusOpt = None,
    gpu: GpuOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    strategy: StrategyOpt = None,
    micro_batch: MicroBatchOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Adapt a checkpoint to new data; mismatched heads/embeddings are re-initialised and listed.

    Ctrl-C or SIGTERM ends the run after the current step with a checkpoint of it."""
    if dry_run:
        _dry_run(recipe, set_, gpus, gpu, gpu_memory, strategy, micro_batch, as_json)
        return
    _dry_run_only(
        gpus=gpus, gpu=gpu, gpu_memory=gpu_memory, strategy=strategy, micro_batch=micro_batch, json=as_json
    )
    if init is None:
        raise XWAMError("finetune needs --init CKPT: the checkpoint (or run folder) to start from")
    _run(recipe, set_, init, resume, overwrite)
