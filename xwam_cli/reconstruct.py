"""`xwam reconstruct RUN`: predicted RGB-D + cameras -> per-step world-frame point clouds (PLY, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from xwam_cli.common import RichProgress, console, user_errors

EXAMPLES = """
[bold]Examples[/]

  xwam reconstruct out/demo/infer
  xwam reconstruct out/demo/infer --tsdf --voxel-size 0.01 --overwrite
"""


@user_errors
def reconstruct(
    run: Annotated[Path, typer.Argument(help="Run folder written by `xwam infer --mode world`.")],
    tsdf: Annotated[bool, typer.Option("--tsdf", help="Also fuse a TSDF mesh per step (open3d).")] = False,
    voxel_size: Annotated[
        float | None,
        typer.Option(
            help="Metres, at least 1e-6: voxel-downsample the clouds (and the TSDF voxel). Default: every "
            "pixel; TSDF voxel 1/100 of the scene."
        ),
    ] = None,
    max_depth: Annotated[
        float | None, typer.Option(help="Metres: drop deeper pixels (default: the run's, 0.9 x far plane).")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing RUN/points.")] = False,
) -> None:
    """Fuse predicted RGB-D into one world-frame point cloud per future step, beside the truth's.

    For each window and future step, every view's predicted depth is unprojected with its camera and coloured by the predicted RGB; the same for the ground truth.

    Writes RUN/points/window-NNN/: tK_pred.ply, tK_true.ply, tK.png (prediction beside truth, same camera), overview.png, and with --tsdf tK_pred_mesh.ply / tK_true_mesh.ply; RUN/points/index.json lists them.
    """
    from xwam_core.reconstruct import reconstruct_run

    with RichProgress("reconstruct") as progress:
        s = reconstruct_run(
            run, tsdf=tsdf, voxel_size=voxel_size, max_depth=max_depth, overwrite=overwrite, progress=progress
        )
    table = Table(title=f"point clouds {s.out_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("windows x future steps", f"{s.windows} x {s.steps}")
    table.add_row(
        "points per cloud (mean)",
        f"prediction {sum(s.points_pred) / max(len(s.points_pred), 1):.0f}, "
        f"truth {sum(s.points_true) / max(len(s.points_true), 1):.0f}",
    )
    table.add_row("files", str(s.files))
    table.add_row(
        "look at", f"{s.out_dir / 'window-000' / 'overview.png'}, {s.out_dir / 'window-000' / 't1.png'}"
    )
    table.add_row("index", str(s.out_dir / "index.json"))
    console.print(table)
