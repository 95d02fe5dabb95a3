"""`xwam evaluate RUN --metrics ...` (offline, beside trivial baselines) and `xwam evaluate --sim metaworld`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from xwam_cli.common import RichProgress, check_output, console, fail, split_csv, user_errors

EXAMPLES = """
[bold]Examples[/]

  xwam evaluate out/demo/infer --metrics psnr,ssim,absrel,delta1,chamfer,action_mse,action_l1
  xwam evaluate out/demo/infer --metrics psnr,lpips --lpips-weights ~/weights/alexnet.safetensors
  xwam evaluate --sim metaworld --ckpt CKPT --tasks reach-v3,push-v3 --episodes 10 --video out/demo/rollouts
"""

BASELINE_TITLES = {
    "repeat_frame": "repeat frame",
    "mean_frame": "mean frame",
    "zero_action": "zero act.",
    "mean_action": "mean act.",
}


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "—"
    if unit == "m":
        return f"{1000 * x:.2f}"
    if abs(x) >= 100 or unit == "dB":
        return f"{x:.2f}"
    return f"{x:.4f}"


def _pick(values: dict[str, Any], key: str) -> float | None:
    return values.get("overall") if key == "overall" else values.get("per_view", {}).get(key)


def offline_table(report: dict[str, Any]) -> Table:
    """Rows: each metric overall (with its direction), then its views dimmed; columns: model, baselines."""
    from xwam_core.evaluate import model_ahead

    table = Table(
        title=f"{report['windows']} windows of episodes {report['episodes']} ({report['episodes_reason']}); "
        "future frames only",
        caption="ahead: the model beats every baseline; chamfer in mm; psnr capped at 100 dB",
    )
    # numbers never shrink (min_width holds the widest, e.g. "0.7103"); long labels and titles wrap instead
    table.add_column("metric", style="bold", overflow="fold")
    table.add_column("model", justify="right", min_width=6)
    used = [b for b in BASELINE_TITLES if any(b in e["baselines"] for e in report["metrics"].values())]
    for b in used:
        table.add_column(BASELINE_TITLES[b], justify="right", min_width=6)
    table.add_column("ahead", justify="center", min_width=5)
    for name, entry in report["metrics"].items():
        unit = entry["unit"]
        arrow = "↑" if entry["higher_is_better"] else "↓"
        for key in ["overall", *(entry["model"].get("per_view") or {})]:
            ahead = model_ahead(
                {
                    "model": {"v": _pick(entry["model"], key)},
                    "higher_is_better": entry["higher_is_better"],
                    "baselines": {b: {"v": _pick(v, key)} for b, v in entry["baselines"].items()},
                },
                "v",
            )
            mark = "—" if ahead is None else ("[green]yes[/]" if ahead else "[red]no[/]")
            label = f"{name} {arrow}" if key == "overall" else f"  {key}"
            row = [label, _fmt(_pick(entry["model"], key), unit)]
            row += [
                _fmt(_pick(entry["baselines"][b], key), unit) if b in entry["baselines"] else "" for b in used
            ]
            table.add_row(*row, mark, style=None if key == "overall" else "dim")
    return table


def sim_table(result: Any) -> Table:
    data = result.to_json()
    policies = list(data["success_rate"]["mean"])
    table = Table(
        title=f"Meta-World closed loop: {result.episodes} held-out episodes per task, seed {result.seed}, "
        f"<= {result.max_steps} steps"
    )
    table.add_column("task", style="bold")
    for p in policies:
        table.add_column(
            {"model": "model", "expert": "scripted expert", "random": "random"}[p], justify="right"
        )

    def cell(rate: float | None, n: int) -> str:
        return "—" if rate is None else f"{100 * rate:.0f}% ({round(rate * n)}/{n})"

    for task, rates in data["success_rate"]["per_task"].items():
        table.add_row(task, *[cell(rates[p], result.episodes) for p in policies])
    total = result.episodes * len(result.tasks)
    table.add_row("mean", *[cell(data["success_rate"]["mean"][p], total) for p in policies], style="bold")
    return table


@user_errors
def evaluate(
    run: Annotated[
        Path | None, typer.Argument(help="Run folder written by `xwam infer` (not with --sim).")
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: psnr,ssim,lpips,absrel,delta1,chamfer,action_mse,action_l1. "
            "Default: every metric the run allows (lpips only with weights)."
        ),
    ] = None,
    lpips_weights: Annotated[
        Path | None, typer.Option(help="Local AlexNet weights for LPIPS (or $XWAM_LPIPS_WEIGHTS).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="The run's episode store, if it moved (its fingerprint must match).")
    ] = None,
    max_depth: Annotated[
        float | None,
        typer.Option(help="Metres: depth/cloud pixels beyond are left out (default: the run's)."),
    ] = None,
    voxel_size: Annotated[
        float | None, typer.Option(help="Metres: voxel-downsample clouds before Chamfer.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="JSON to write (default RUN/metrics.json; --sim: none)."),
    ] = None,
    sim: Annotated[str | None, typer.Option(help="Closed loop in a simulator: 'metaworld'.")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="--sim: checkpoint folder.")] = None,
    tasks: Annotated[
        str | None, typer.Option(help="--sim: comma-separated tasks, e.g. reach-v3,push-v3.")
    ] = None,
    episodes: Annotated[int | None, typer.Option(help="--sim: episodes per task [default: 10].")] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="--sim: seed of the held-out starts (same seed, same result) [default: 0]."),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="--sim: step limit per episode [default: 150].")
    ] = None,
    video: Annotated[Path | None, typer.Option(help="--sim: folder for the model's rollout mp4s.")] = None,
    baselines: Annotated[
        bool | None,
        typer.Option(
            help="--sim: also roll out the scripted expert and a random policy on the same seeds [default: yes]."
        ),
    ] = None,
    render_quality: Annotated[
        str | None, typer.Option(help="--sim: 'fast' or 'default' (default: the training store's).")
    ] = None,
) -> None:
    """Metrics with trivial baselines beside the model: offline on a run folder, or closed loop with --sim.

    Offline: RGB, depth, point clouds and actions, future frames only. --sim metaworld: success rate of the checkpoint in policy mode, beside the scripted expert and a random policy on the same held-out starts.

    Offline: a table and RUN/metrics.json (written atomically). Baselines: repeat-the-current-frame for video, depth and clouds; zero and mean action for actions.
    """
    offline_only = {
        "--metrics": metrics,
        "--lpips-weights": lpips_weights,
        "--data": data,
        "--max-depth": max_depth,
        "--voxel-size": voxel_size,
    }
    sim_only = {
        "--ckpt": ckpt,
        "--tasks": tasks,
        "--video": video,
        "--render-quality": render_quality,
        "--episodes": episodes,
        "--seed": seed,
        "--max-steps": max_steps,
        "--baselines/--no-baselines": baselines,
    }
    if sim is not None:
        if run is not None:
            fail(f"--sim evaluates a checkpoint in the simulator; drop the run folder {run} (or drop --sim)")
        for name, value in offline_only.items():
            if value is not None:
                fail(f"{name} is for evaluating a run folder offline, not for --sim")
        _evaluate_sim(
            sim,
            ckpt,
            tasks,
            10 if episodes is None else episodes,
            0 if seed is None else seed,
            150 if max_steps is None else max_steps,
            video,
            baselines is not False,
            render_quality,
            out,
        )
        return
    if run is None:
        fail("give a run folder (xwam evaluate RUN) or --sim metaworld --ckpt CKPT")
    for name, value in sim_only.items():
        if value is not None:
            fail(f"{name} is for closed-loop evaluation: add --sim metaworld (and drop the run folder)")
    assert run is not None
    _evaluate_offline(run, metrics, lpips_weights, data, max_depth, voxel_size, out)


def _evaluate_offline(
    run_path: Path,
    metrics: str | None,
    lpips_weights: Path | None,
    data: Path | None,
    max_depth: float | None,
    voxel_size: float | None,
    out: Path | None,
) -> None:
    import os

    from xwam_core.atomic import write_json_atomic
    from xwam_core.errors import XWAMError
    from xwam_core.evaluate import applicable_metrics, check_metrics, default_out, evaluate_run
    from xwam_core.metrics import LPIPS_WEIGHTS_ENV, LPIPSMetric, parse_metrics
    from xwam_core.runs import check_store, load_run

    specs = parse_metrics(metrics) if metrics is not None else None
    run = load_run(run_path)
    check_store(run, data)
    if max_depth is not None and max_depth <= 0:
        raise XWAMError(f"--max-depth {max_depth}: expected a depth > 0 in metres")
    if voxel_size is not None and voxel_size <= 0:
        raise XWAMError(f"--voxel-size {voxel_size}: expected a length > 0 in metres")
    if specs is None:
        specs = applicable_metrics(run, with_lpips=bool(lpips_weights or os.environ.get(LPIPS_WEIGHTS_ENV)))
    check_metrics(run, specs)
    check_output(out or default_out(run), "--out")
    lpips = LPIPSMetric(lpips_weights) if any(s.name == "lpips" for s in specs) else None
    with RichProgress("evaluate") as progress:
        report = evaluate_run(
            run, specs, lpips=lpips, max_depth=max_depth, voxel_size=voxel_size, progress=progress
        )
    path = write_json_atomic(out or default_out(run), report)
    console.print(offline_table(report))
    console.print(f"metrics: {path}")


def _evaluate_sim(
    sim: str,
    ckpt: Path | None,
    tasks: str | None,
    episodes: int,
    seed: int,
    max_steps: int,
    video: Path | None,
    baselines: bool,
    render_quality: str | None,
    out: Path | None,
) -> None:
    from xwam_core.errors import XWAMError

    if sim != "metaworld":
        raise XWAMError(f"--sim {sim!r}: the simulators are: metaworld")
    if ckpt is None:
        raise XWAMError("--sim metaworld needs --ckpt CKPT (the checkpoint to roll out)")
    if seed < 0:
        raise XWAMError(f"--seed {seed}: expected an integer >= 0")
    if out is not None:
        check_output(out, "--out")
    if video is not None:
        check_output(video, "--video", folder=True)
    from xwam_core.atomic import write_json_atomic
    from xwam_core.policy import Policy
    from xwam_core.sim.metaworld import evaluate_metaworld

    policy = Policy.from_checkpoint(ckpt)
    task_list = split_csv(tasks) or []
    if not task_list:
        raise XWAMError("--sim metaworld needs --tasks, e.g. --tasks reach-v3,push-v3")
    with RichProgress("closed loop") as progress:
        result = evaluate_metaworld(
            policy,
            task_list,
            episodes,
            seed=seed,
            max_steps=max_steps,
            render_quality=render_quality,
            video_dir=video,
            baselines=baselines,
            progress=progress,
        )
    console.print(sim_table(result))
    data = result.to_json()
    if data["model_latency_ms_mean"] is not None:
        console.print(
            f"model: {data['model_latency_ms_mean']:.1f} ms per query (policy mode, "
            f"{policy.actions_per_query} actions executed per query)"
        )
    if video is not None:
        console.print(f"rollout videos: {video}")
    if out is not None:
        data["checkpoint"] = str(Path(ckpt).resolve())
        console.print(f"results: {write_json_atomic(out, data)}")
