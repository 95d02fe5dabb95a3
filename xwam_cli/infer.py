"""`xwam infer --ckpt CKPT --data STORE --out RUN`: actions + future RGB-D for windows of recorded episodes."""

from __future__ import annotations

from rich.table import Table

from xwam_cli.common import RichProgress, check_output, console, options_command, user_errors
from xwam_core.infer_options import InferOptions

EXAMPLES = """
[bold]Examples[/]

  xwam infer --ckpt out/demo/run --data out/demo/store --out out/demo/infer
  xwam infer --ckpt CKPT --data STORE --episodes 6,7 --windows-per-episode 2 --out RUN --overwrite
  xwam infer --ckpt CKPT --data STORE --mode policy --num-steps-action 5 --out RUN_POLICY
"""


def run(opts: InferOptions) -> None:
    """Predict action chunks (world mode: also every view's future RGB and depth) for recorded episodes.

    Each prediction sits beside the ground truth, with the latency per window.

    RUN gets predictions.npz, videos/VIEW.mp4 (truth | prediction) and manifest.json. It is written under a temporary name and renamed when complete.
    """
    from xwam_core.infer_run import infer_run

    check_output(opts.out, "--out", folder=True)  # before the model is loaded and any window predicted
    opts.command = opts.command_line()
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
    if summary.mode == "world" and m.get("store_depth_kind", "metric") == "metric":
        console.print(f"next: xwam reconstruct {summary.run_dir}  /  xwam evaluate {summary.run_dir}")
    elif summary.mode == "world":  # relative depth (an imported xwam-release store): no point clouds
        console.print(f"next: xwam evaluate {summary.run_dir}")


infer = user_errors(options_command(InferOptions, run))
infer.__doc__ = run.__doc__
