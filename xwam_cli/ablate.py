"""`xwam ablate RECIPE`: the paper's Table 4 (noise schedule, depth branch) trained and evaluated at the recipe's scale."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from xwam_cli.common import RichProgress, check_output, console, err_console, user_errors

EXAMPLES = """
[bold]Examples[/]

  xwam ablate recipes/tiny_cpu.toml --out out/ablate
  xwam ablate recipes/tiny_cpu.toml --variants ans,sync --set train.max_steps=100 --episodes 5
  xwam ablate recipes/tiny_cpu.toml --store out/demo/store --out out/ablate --overwrite

[bold]Variants[/]

  ans        ANS training + async inference (the recipe's)
  sync       synchronous training + synchronous inference (num_steps_video steps for every stream)
  decoupled  independent video/action noise in training + async inference
  no-depth   ANS + async without the depth branch (num_depth_blocks = 0, depth_condition off)
"""


def table(result: Any) -> Table:
    """Rows: the variants, then the baselines; columns: success [interval], latency, PSNR, AbsRel, train s."""
    from xwam_core.ablate import fmt_number, fmt_paper, fmt_success

    loop = result.closed_loop
    title = (
        f"Ablation: {loop['episodes_per_task']} held-out closed-loop episodes per task, seed {loop['seed']}"
        if loop["ran"]
        else "Ablation (no closed loop)"
    )
    sources = sorted({r.evaluation.get("latency_source") for r in result.variants} - {None})
    caption = (
        f"success: 95% Wilson interval in brackets; latency: policy mode, ms per query ({' / '.join(sources)}); "
        f"PSNR/AbsRel: world mode, future frames, {result.offline['windows']} held-out windows"
    )
    t = Table(title=title, caption=caption)
    t.add_column("variant", style="bold")
    t.add_column("success [95%]", justify="right")
    t.add_column("latency ms", justify="right")
    t.add_column("PSNR dB", justify="right")
    t.add_column("AbsRel", justify="right")
    t.add_column("train s", justify="right")
    t.add_column("paper", justify="right", style="dim")
    for v in result.variants:
        ev = v.evaluation
        t.add_row(
            v.name,
            fmt_success(ev),
            fmt_number(ev.get("latency_ms"), 1),
            fmt_number(ev.get("psnr_db"), 2),
            fmt_number(ev.get("absrel"), 4),
            fmt_number(v.train_seconds, 1),
            fmt_paper(v.name),
        )
    for name, values in result.baselines["offline"].items():
        t.add_row(
            name.replace("_", " "),
            "",
            "",
            fmt_number(values.get("psnr"), 2),
            fmt_number(values.get("absrel"), 4),
            "",
            "",
            style="dim",
        )
    for name, values in result.baselines["closed_loop"].items():
        t.add_row(name, fmt_success(values), "", "", "", "", "", style="dim")
    return t


@user_errors
def ablate(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML the variants start from.")],
    variants: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of ans,sync,decoupled,no-depth (default: all four)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="section.key=value for every variant, e.g. --set train.max_steps=100 (repeatable); "
            "noise.mode, inference.schedule and train.out are the ablation's.",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Folder: OUT/VARIANT/run, OUT/ablation.json, OUT/ablation.md.")
    ] = Path("out/ablate"),
    store: Annotated[
        Path | None, typer.Option(help="Episode store (default: the recipe's data.store).")
    ] = None,
    episodes: Annotated[
        int, typer.Option(help="Closed loop: held-out episodes per task (Meta-World stores).")
    ] = 10,
    seed: Annotated[int, typer.Option(help="Closed loop: seed of the held-out starts.")] = 1000,
    max_steps: Annotated[
        int, typer.Option(help="Closed loop: step limit per episode, 1 to 500 (checked before training).")
    ] = 150,
    windows_per_episode: Annotated[
        int, typer.Option(help="Offline: windows per held-out episode, evenly spaced.")
    ] = 4,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Retrain and re-evaluate every variant (default: a finished run is kept and not retrained).",
        ),
    ] = False,
) -> None:
    """Train the variants of the paper's Table 4 (ANS / sync / decoupled noise, with and without the depth branch) and evaluate each: closed-loop success with its 95% interval, policy latency, PSNR, AbsRel, training time.

    Each variant trains into OUT/VARIANT/run; a finished run is kept on a rerun (said so) unless --overwrite. The table is printed and written to OUT/ablation.json and OUT/ablation.md (atomically), beside the paper's numbers. A store other than Meta-World gets no closed loop (said in the table).
    """
    from xwam_core.ablate import check_overrides, parse_variants, run_ablation, scale_line
    from xwam_core.train import TrainingInterrupted

    names = parse_variants(variants)  # an unknown variant: one line, before anything loads
    check_overrides(list(set_ or []))
    check_output(out, "--out", folder=True)
    try:
        with RichProgress("ablate") as progress:
            result = run_ablation(
                recipe,
                names,
                list(set_ or []),
                out,
                episodes=episodes,
                seed=seed,
                store=store,
                windows_per_episode=windows_per_episode,
                max_steps=max_steps,
                overwrite=overwrite,
                progress=progress,
            )
    except TrainingInterrupted as e:
        err_console.print(
            f"[bold yellow]{e}[/] (rerun `xwam ablate` to continue: finished variants are kept)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(e.exit_code) from None
    for v in result.variants:
        if v.training.startswith("skipped"):
            console.print(f"{v.name}: finished run {v.run} kept, not retrained (--overwrite retrains)")
    console.print(table(result))
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True)
    console.print(scale_line(result), soft_wrap=True, highlight=False)
    console.print(f"written: {result.json_path}, {result.md_path}")
