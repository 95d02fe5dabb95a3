"""`xwam infer --ckpt CKPT --data STORE --out RUN`: actions + future RGB-D for windows of recorded episodes."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xwam_cli.common import RichProgress, console, user_errors

EXAMPLES = """
[bold]Examples[/]

  xwam infer --ckpt out/demo/run --data out/demo/store --out out/demo/infer
  xwam infer --ckpt CKPT --data STORE --episodes 6,7 --windows-per-episode 2 --out RUN --overwrite
  xwam infer --ckpt CKPT --data STORE --mode policy --num-steps-action 5 --out RUN_POLICY
"""


def _command_line(
    ckpt: Path,
    data: Path,
    out: Path,
    episodes: str | None,
    mode: str,
    windows_per_episode: int,
    batch_size: int,
    num_steps_video: int | None,
    num_steps_action: int | None,
    seed: int,
    videos: bool,
    overwrite: bool,
) -> str:
    """The command with every option spelled out: rerunning it gives the same run."""
    args = [
        "xwam",
        "infer",
        "--ckpt",
        str(ckpt),
        "--data",
        str(data),
        "--out",
        str(out),
        "--mode",
        mode,
        "--windows-per-episode",
        str(windows_per_episode),
        "--batch-size",
        str(batch_size),
        "--seed",
        str(seed),
    ]
    if episodes is not None:
        args += ["--episodes", episodes]
    if num_steps_video is not None:
        args += ["--num-steps-video", str(num_steps_video)]
    if num_steps_action is not None:
        args += ["--num-steps-action", str(num_steps_action)]
    args += [] if videos else ["--no-videos"]
    args += ["--overwrite"] if overwrite else []
    return shlex.join(args)


@user_errors
def infer(
    ckpt: Annotated[
        Path, typer.Option("--ckpt", help="Checkpoint folder, or a run folder (its newest checkpoint).")
    ],
    data: Annotated[Path, typer.Option("--data", help="Episode store to take the windows from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    episodes: Annotated[
        str | None,
        typer.Option(
            help="Episodes, e.g. 3,4 or 0-2. Default: the checkpoint's held-out episodes if this is "
            "its training store, else all."
        ),
    ] = None,
    mode: Annotated[
        str, typer.Option(help="'world' (actions + future RGB-D) or 'policy' (actions only, fast).")
    ] = "world",
    windows_per_episode: Annotated[int, typer.Option(help="Windows per episode, evenly spaced.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Windows per model call (latency is per window).")] = 1,
    num_steps_video: Annotated[
        int | None, typer.Option(help="Video denoising steps (default: the recipe's).")
    ] = None,
    num_steps_action: Annotated[
        int | None, typer.Option(help="Action/state denoising steps (default: the recipe's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Noise seed; the same seed gives the same predictions.")] = 0,
    videos: Annotated[bool, typer.Option(help="Write the side-by-side mp4 per view (world mode).")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
) -> None:
    """Predict action chunks (world mode: also every view's future RGB and depth) for recorded episodes.

    Each prediction sits beside the ground truth, with the latency per window.

    RUN gets predictions.npz, videos/VIEW.mp4 (truth | prediction) and manifest.json. It is written under a temporary name and renamed when complete.
    """
    from xwam_core.infer_run import InferOptions, infer_run, parse_episodes

    opts = InferOptions(
        checkpoint=ckpt,
        store=data,
        out=out,
        episodes=parse_episodes(episodes),
        mode=mode,
        windows_per_episode=windows_per_episode,
        batch_size=batch_size,
        seed=seed,
        num_steps_video=num_steps_video,
        num_steps_action=num_steps_action,
        overwrite=overwrite,
        videos=videos,
        command=_command_line(
            ckpt,
            data,
            out,
            episodes,
            mode,
            windows_per_episode,
            batch_size,
            num_steps_video,
            num_steps_action,
            seed,
            videos,
            overwrite,
        ),
    )
    with RichProgress("infer") as progress:
        summary = infer_run(opts, progress)
    m = summary.manifest
    table = Table(title=f"run {summary.run_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("mode", summary.mode)
    table.add_row("episodes", f"{', '.join(map(str, summary.episodes))} ({summary.episodes_reason})")
    table.add_row(
        "windows",
        f"{summary.windows} ({m['future_frames']} future frames, "
        f"{m['future_frames'] * m['frame_stride']} actions each)",
    )
    table.add_row(
        "latency per window",
        f"mean {summary.latency_ms_mean:.1f} ms, median {summary.latency_ms_median:.1f} ms",
    )
    table.add_row("denoiser calls", str(summary.num_denoiser_calls))
    if "mean_frame" in m:
        mf = m["mean_frame"]
        table.add_row(
            "mean-frame baseline",
            f"{mf['windows']} windows of {len(mf['episodes'])} other episodes"
            if mf["windows"]
            else mf["reason"],
        )
    for name in summary.files:
        table.add_row("file", str(summary.run_dir / name))
    console.print(table)
    if summary.mode == "world":
        console.print(f"next: xwam reconstruct {summary.run_dir}  /  xwam evaluate {summary.run_dir}")
