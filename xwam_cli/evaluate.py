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
  xwam evaluate --sim metaworld --ckpt CKPT --tasks reach-v3 --actions-per-query 8 --baselines expert,bc
  xwam evaluate --sim metaworld --ckpt CKPT --tasks reach-v3,push-v3 --inference-delay 4 --chunking rtc
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


SIM_TITLES = {"model": "model", "bc": "BC (state MLP)", "expert": "scripted expert", "random": "random"}


def sim_table(result: Any) -> Table:
    """Success per task and policy with its 95% Wilson interval; the caption says how it was run."""
    data = result.to_json()
    policies = list(data["success_rate"]["mean"])
    rate = data["success_rate"]
    caption = "95% Wilson score intervals in brackets"
    if result.actions_per_query is not None:
        who = "model and BC" if "bc" in policies else "model"
        delay = ""
        if result.inference_delay or result.chunking != "naive":
            delay = f"inference delay {result.inference_delay} steps, {result.chunking} chunk switching; "
        caption = (
            f"{result.actions_per_query} of {result.chunk} actions executed per query ({who}); "
            + delay
            + caption
        )
    table = Table(
        title=f"Meta-World closed loop: {result.episodes} held-out episodes per task, seed {result.seed}, "
        f"<= {result.max_steps} steps",
        caption=caption,
    )
    table.add_column("task", style="bold")
    for p in policies:
        table.add_column(SIM_TITLES[p], justify="right")

    def cell(counts: list[int], interval: list[float] | None) -> str:
        k, n = counts
        if not n or interval is None:
            return "—"
        return f"{100 * k / n:.0f}% ({k}/{n}) [{100 * interval[0]:.0f}-{100 * interval[1]:.0f}]"

    for task in result.tasks:
        table.add_row(
            task,
            *[
                cell(rate["successes"]["per_task"][task][p], rate["interval_95"]["per_task"][task][p])
                for p in policies
            ],
        )
    table.add_row(
        "mean",
        *[cell(rate["successes"]["mean"][p], rate["interval_95"]["mean"][p]) for p in policies],
        style="bold",
    )
    return table


def goal_table(result: Any) -> Table:
    """Goal following: per task and learned policy, the Pearson r of its first chunk's displacement with
    the expert's across starts (x, y, z, mean) and both spreads."""
    data = result.to_json()["goal_following"]

    def r(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.2f}"

    def spread(std: dict[str, float | None]) -> str:
        return " / ".join("—" if v is None else f"{v:.2f}" for v in std.values())

    steps = "" if result.goal_steps in (None, result.chunk) else f" (its first {result.goal_steps} actions)"
    table = Table(
        title=f"Goal following: first chunk's displacement{steps} vs the scripted expert's, same starts",
        caption="Pearson r across held-out starts (n/a: fewer than 3 starts or no variation); spread: std "
        "across starts of the summed xyz actions (x 1 cm of commanded hand motion)",
    )
    table.add_column("task", style="bold")
    table.add_column("policy")
    for axis in ("r x", "r y", "r z", "r mean"):
        table.add_column(axis, justify="right")
    table.add_column("spread x/y/z", justify="right")
    table.add_column("expert spread", justify="right")
    for task, entry in data["per_task"].items():
        for p in ("model", "bc"):
            if p not in entry:
                continue
            g = entry[p]
            table.add_row(
                task,
                SIM_TITLES[p],
                *[r(g["r"][a]) for a in ("x", "y", "z")],
                r(g["r_mean"]),
                spread(g["std"]),
                spread(g["expert_std"]),
            )
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
        Path | None,
        typer.Option(
            help="The run's episode store, if it moved (its fingerprint must match); --sim: the store BC "
            "trains on (default: the checkpoint's training store)."
        ),
    ] = None,
    max_depth: Annotated[
        float | None,
        typer.Option(help="Metres: depth/cloud pixels beyond are left out (default: the run's)."),
    ] = None,
    voxel_size: Annotated[
        float | None, typer.Option(help="Metres, at least 1e-6: voxel-downsample clouds before Chamfer.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="JSON to write (default RUN/metrics.json; --sim: none)."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace an existing --out (only a JSON `xwam evaluate` wrote); --sim: also write into a "
            "--video folder that holds files, replacing the mp4s of the same names.",
        ),
    ] = False,
    sim: Annotated[str | None, typer.Option(help="Closed loop in a simulator: 'metaworld'.")] = None,
    ckpt: Annotated[Path | None, typer.Option(help="--sim: checkpoint folder.")] = None,
    server: Annotated[
        str | None,
        typer.Option(
            help="--sim: act through a policy server instead of --ckpt: `xwam serve`'s ws://HOST:PORT "
            "(openpi protocol; docs/serve.md)."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="--server: its API key (or $XWAM_SERVE_API_KEY).")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="--sim: comma-separated tasks, each once, e.g. reach-v3,push-v3.")
    ] = None,
    episodes: Annotated[int | None, typer.Option(help="--sim: episodes per task (default: 10).")] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="--sim: seed of the held-out starts; the same seed gives the same result (default: 0)."
        ),
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="--sim: step limit per episode (default: 150).")
    ] = None,
    video: Annotated[
        Path | None,
        typer.Option(
            help="--sim: folder for the model's rollout mp4s (one holding files: with --overwrite)."
        ),
    ] = None,
    baselines: Annotated[
        str | None,
        typer.Option(
            help="--sim: comma-separated baselines on the same seeds: expert (scripted), random, bc (a "
            "state-only MLP trained on the checkpoint's training episodes; needs its store), or none "
            "(default: expert,random,bc)."
        ),
    ] = None,
    no_baselines: Annotated[
        bool, typer.Option("--no-baselines", help="--sim: the model only (same as --baselines none).")
    ] = False,
    actions_per_query: Annotated[
        int | None,
        typer.Option(
            help="--sim: actions executed open loop per query, 1 to the chunk (model and BC) "
            "(default: the checkpoint's, the whole chunk)."
        ),
    ] = None,
    action_noise_scale: Annotated[
        float | None,
        typer.Option(
            help="--sim with --ckpt: scale of the noise the model's actions start from, >= 0: 1 samples, 0 "
            "starts from its mean (default: the checkpoint's inference.action_noise_scale)."
        ),
    ] = None,
    inference_delay: Annotated[
        int | None,
        typer.Option(
            help="--sim: simulated inference delay in control steps, 0 to --actions-per-query: the executing "
            "chunk keeps running this many steps after each query before the new one takes over (default: 0)."
        ),
    ] = None,
    chunking: Annotated[
        str | None,
        typer.Option(
            help="--sim: how the model's new chunk takes over: naive (switch on arrival) or rtc (real-time "
            "chunking: the delayed actions frozen, the overlap inpainted; docs/rtc.md) (default: naive)."
        ),
    ] = None,
    render_quality: Annotated[
        str | None, typer.Option(help="--sim: 'fast' or 'default' (default: the training store's).")
    ] = None,
    goal_steps: Annotated[
        int | None,
        typer.Option(
            help="--sim: goal following sums the first chunk's first N actions, 1 to the chunk; e.g. "
            "--actions-per-query's N for what a query executes (default: the whole chunk)."
        ),
    ] = None,
) -> None:
    """Metrics with trivial baselines beside the model: offline on a run folder, or closed loop with --sim.

    Offline: RGB, depth, point clouds and actions, future frames only. --sim metaworld: success rate of the checkpoint in policy mode with its 95% interval, beside the scripted expert, a random policy and a behaviour-cloning MLP on the same held-out starts, and how the model's first chunk follows the expert's across starts (goal following).

    Offline: a table and RUN/metrics.json (written atomically). Baselines: repeat-the-current-frame for video, depth and clouds; zero and mean action for actions.
    """
    offline_only = {
        "--metrics": metrics,
        "--lpips-weights": lpips_weights,
        "--max-depth": max_depth,
        "--voxel-size": voxel_size,
    }
    sim_only = {
        "--ckpt": ckpt,
        "--server": server,
        "--api-key": api_key,
        "--tasks": tasks,
        "--video": video,
        "--render-quality": render_quality,
        "--episodes": episodes,
        "--seed": seed,
        "--max-steps": max_steps,
        "--baselines": baselines,
        "--no-baselines": no_baselines or None,
        "--actions-per-query": actions_per_query,
        "--action-noise-scale": action_noise_scale,
        "--inference-delay": inference_delay,
        "--chunking": chunking,
        "--goal-steps": goal_steps,
    }
    if sim is not None:
        if run is not None:
            fail(f"--sim evaluates a checkpoint in the simulator; drop the run folder {run} (or drop --sim)")
        for name, value in offline_only.items():
            if value is not None:
                fail(f"{name} is for evaluating a run folder offline, not for --sim")
        if no_baselines and baselines is not None:
            fail("--no-baselines and --baselines: give one")
        _evaluate_sim(
            sim,
            ckpt,
            tasks,
            10 if episodes is None else episodes,
            0 if seed is None else seed,
            150 if max_steps is None else max_steps,
            video,
            "none" if no_baselines else baselines,
            render_quality,
            out,
            actions_per_query,
            data,
            0 if inference_delay is None else inference_delay,
            "naive" if chunking is None else chunking,
            server,
            api_key,
            action_noise_scale,
            goal_steps,
            overwrite,
        )
        return
    if run is None:
        fail("give a run folder (xwam evaluate RUN) or --sim metaworld --ckpt CKPT")
    for name, value in sim_only.items():
        if value is not None:
            fail(f"{name} is for closed-loop evaluation: add --sim metaworld (and drop the run folder)")
    assert run is not None
    _evaluate_offline(run, metrics, lpips_weights, data, max_depth, voxel_size, out, overwrite)


def _evaluate_offline(
    run_path: Path,
    metrics: str | None,
    lpips_weights: Path | None,
    data: Path | None,
    max_depth: float | None,
    voxel_size: float | None,
    out: Path | None,
    overwrite: bool = False,
) -> None:
    import os

    from xwam_core.atomic import write_json_atomic
    from xwam_core.evaluate import (
        applicable_metrics,
        check_metrics,
        check_results_file,
        default_out,
        evaluate_run,
    )
    from xwam_core.metrics import LPIPS_WEIGHTS_ENV, LPIPSMetric, parse_metrics
    from xwam_core.reconstruct import check_max_depth, check_voxel_size
    from xwam_core.runs import check_store, load_run

    specs = parse_metrics(metrics) if metrics is not None else None
    check_max_depth(max_depth)  # every option before the run is read and any metric computed
    check_voxel_size(voxel_size)
    run = load_run(run_path)
    check_store(run, data)
    if specs is None:
        specs = applicable_metrics(run, with_lpips=bool(lpips_weights or os.environ.get(LPIPS_WEIGHTS_ENV)))
    check_metrics(run, specs)
    with_lpips = any(s.name == "lpips" for s in specs)
    if with_lpips:
        _check_lpips_weights(lpips_weights, os.environ.get(LPIPS_WEIGHTS_ENV), LPIPS_WEIGHTS_ENV)
    target = out or default_out(run)
    check_output(target, "--out")
    check_results_file(target, overwrite)
    lpips = LPIPSMetric(lpips_weights) if with_lpips else None
    with RichProgress("evaluate") as progress:
        report = evaluate_run(
            run, specs, lpips=lpips, max_depth=max_depth, voxel_size=voxel_size, progress=progress
        )
    path = write_json_atomic(target, report)
    console.print(offline_table(report))
    console.print(f"metrics: {path}")


def _check_lpips_weights(flag_path: Path | None, env_path: str | None, env: str) -> None:
    """LPIPS weights are one file: a folder is named as such (not as weights that "do not exist")."""
    from xwam_core.errors import XWAMError

    where, given = ("--lpips-weights", str(flag_path)) if flag_path is not None else (f"${env}", env_path)
    if given and Path(given).expanduser().is_dir():
        raise XWAMError(
            f"{where} {given}: is a folder; expected the weights file "
            "(torchvision alexnet state dict, safetensors or .pth)"
        )


def _evaluate_sim(
    sim: str,
    ckpt: Path | None,
    tasks: str | None,
    episodes: int,
    seed: int,
    max_steps: int,
    video: Path | None,
    baselines: str | None,
    render_quality: str | None,
    out: Path | None,
    actions_per_query: int | None = None,
    data: Path | None = None,
    inference_delay: int = 0,
    chunking: str = "naive",
    server: str | None = None,
    api_key: str | None = None,
    action_noise_scale: float | None = None,
    goal_steps: int | None = None,
    overwrite: bool = False,
) -> None:
    import os

    from xwam_core.errors import XWAMError
    from xwam_core.evaluate import check_results_file, check_video_folder
    from xwam_core.rtc_executor import CHUNKINGS

    if sim != "metaworld":
        raise XWAMError(f"--sim {sim!r}: the simulators are: metaworld")
    if ckpt is None and server is None:
        raise XWAMError("--sim metaworld needs --ckpt CKPT (the checkpoint to roll out) or --server URL")
    if ckpt is not None and server is not None:
        raise XWAMError("--ckpt and --server: give one (the server loads its own checkpoint)")
    if api_key is not None and server is None:
        raise XWAMError("--api-key is the key of a policy server: add --server URL")
    if action_noise_scale is not None and server is not None:
        raise XWAMError(
            "--action-noise-scale: the server samples with its own (xwam serve --action-noise-scale); drop it"
        )
    if seed < 0:
        raise XWAMError(f"--seed {seed}: expected an integer >= 0")
    if actions_per_query is not None and actions_per_query < 1:
        raise XWAMError(f"--actions-per-query {actions_per_query}: expected 1 to the checkpoint's chunk")
    if chunking not in CHUNKINGS:
        raise XWAMError(f"--chunking {chunking!r}: expected one of {', '.join(CHUNKINGS)}")
    if inference_delay < 0:
        raise XWAMError(f"--inference-delay {inference_delay}: expected an integer >= 0 (control steps)")
    chosen = ["expert", "random", "bc"] if baselines is None else (split_csv(baselines) or [])
    if chosen == ["none"]:
        chosen = []
    from xwam_core.sim.metaworld import BASELINES

    unknown = [b for b in chosen if b not in BASELINES]
    if unknown:
        raise XWAMError(
            f"--baselines: unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)} (or none)"
        )
    task_list = split_csv(tasks) or []
    seen: set[str] = set()
    for task in task_list:
        if task in seen:  # its seeded starts would run twice and count as twice the evidence
            raise XWAMError(f"--tasks {tasks}: {task} is given twice; expected each task once")
        seen.add(task)
    if out is not None:
        check_output(out, "--out")
        check_results_file(out, overwrite)
    if video is not None:
        check_output(video, "--video", folder=True)
        check_video_folder(video, overwrite)
    from xwam_core.atomic import write_json_atomic
    from xwam_core.policy import Policy
    from xwam_core.sim.metaworld import evaluate_metaworld

    policy: Any
    if server is not None:  # every query over the wire (xwam_core.serve.client): the Policy's interface
        from xwam_core.serve.client import RemotePolicy

        policy = RemotePolicy(server, api_key or os.environ.get("XWAM_SERVE_API_KEY"))
    else:
        assert ckpt is not None
        policy = Policy.from_checkpoint(ckpt, action_noise_scale=action_noise_scale)
    k = policy.spec.window.num_actions
    if actions_per_query is not None:
        if actions_per_query > k:
            raise XWAMError(
                f"--actions-per-query {actions_per_query}: expected 1 to the checkpoint's chunk of {k} actions"
            )
        policy.actions_per_query = actions_per_query
    if not task_list:
        raise XWAMError("--sim metaworld needs --tasks, e.g. --tasks reach-v3,push-v3")
    from xwam_core.sim.metaworld import check_request

    # every check before the minute of BC
    check_request(
        policy, task_list, episodes, max_steps, render_quality, inference_delay, chunking, goal_steps
    )
    store = None
    if "bc" in chosen:
        store = _bc_store(policy, data)
    elif data is not None:
        raise XWAMError("--data is the store the bc baseline trains on; --baselines excludes bc")
    with RichProgress("closed loop") as progress:
        bc = None
        if store is not None:
            from xwam_core.sim.bc import train_bc, training_episodes

            episodes_seen = training_episodes(store, policy.spec.val_episodes)
            bc = train_bc(store, episodes_seen, k, policy.actions_per_query, progress=progress)
        result = evaluate_metaworld(
            policy,
            task_list,
            episodes,
            seed=seed,
            max_steps=max_steps,
            render_quality=render_quality,
            video_dir=video,
            baselines=chosen,
            progress=progress,
            bc=bc,
            inference_delay=inference_delay,
            chunking=chunking,
            goal_steps=goal_steps,
        )
    console.print(sim_table(result))
    console.print(goal_table(result))
    data_json = result.to_json()
    if data_json["model_latency_ms_mean"] is not None:
        noise = (
            ""
            if server is not None
            else f", action noise scale {policy.schedule_config.action_noise_scale:g}"
        )
        console.print(
            f"model: {data_json['model_latency_ms_mean']:.1f} ms per query (policy mode, "
            f"{policy.actions_per_query} of {k} actions executed per query{noise})"
        )
    if data_json["model_switch_jump_mean"] is not None:
        console.print(
            f"model: mean gap between the new and the old chunk's action where one takes over "
            f"{data_json['model_switch_jump_mean']:.3f} (action units; "
            f"inference delay {inference_delay} steps, {chunking} switching)"
        )
    if bc is not None:
        info = bc.info
        console.print(
            f"BC: trained {info['train_seconds']:.0f} s on the checkpoint's {len(info['episodes'])} training "
            f"episode{'s' if len(info['episodes']) != 1 else ''} "
            f"({info['frames']} frames; held-out episodes excluded), loss {info['loss_first']:.4f} -> "
            f"{info['loss_final']:.4f}"
        )
    if video is not None:
        console.print(f"rollout videos: {video}")
    if out is not None:
        if ckpt is not None:
            data_json["checkpoint"] = str(Path(ckpt).resolve())
            data_json["action_noise_scale"] = float(policy.schedule_config.action_noise_scale)
        else:
            data_json["server"] = server
            data_json["action_noise_scale"] = policy.metadata.get("action_noise_scale")
        console.print(f"results: {write_json_atomic(out, data_json)}")


def _bc_store(policy: Any, data: Path | None) -> Any:
    """The store BC trains on: --data, else the checkpoint's training store; one line if it is not there."""
    from xwam_core.data.reader import EpisodeStore
    from xwam_core.errors import XWAMError

    path = data if data is not None else (Path(policy.spec.store) if policy.spec.store else None)
    if path is None or not path.is_dir():
        where = f"{path} is not there" if path is not None else "the checkpoint names no training store"
        raise XWAMError(
            f"the bc baseline trains on the checkpoint's store and {where}: pass --data STORE, "
            "or leave bc out (--baselines expert,random)"
        )
    return EpisodeStore(path)
