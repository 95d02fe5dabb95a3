"""`xwam prepare SOURCE... --out DATA`: robot episodes -> one episode store (+ stats)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from xwam_cli.common import (
    RichProgress,
    check_output,
    console,
    fail,
    human_bytes,
    interrupted,
    recipe_with,
    split_csv,
    user_errors,
)

if TYPE_CHECKING:
    from xwam_core.data.store import StoreSummary

EXAMPLES = """
[bold]Examples[/]

  xwam prepare metaworld --tasks reach-v3,push-v3 --episodes 4 --views corner2,topview --size 64 --seed 0 --out data/mw
  xwam prepare metaworld --tasks reach-v3 --episodes 4 --views corner2 --state task --out data/mw_task
  xwam prepare lerobot path/to/lerobot_dataset --views observation.images.front=front --out data/mine
  xwam prepare xwam-release path/to/release_dataset --out data/release
  xwam prepare --recipe recipes/tiny_cpu.toml --set prepare.metaworld.episodes=8
"""


@user_errors
def prepare(
    source: Annotated[
        list[str] | None,
        typer.Argument(
            help="'metaworld', 'lerobot PATH' (a LeRobot v2.1/v3.0 dataset folder), or 'xwam-release PATH' "
            "(the X-WAM authors' release layout: data/chunk-*/episode_*.json, video/, depth/; relative depth, no cameras)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Store folder to create.")] = None,
    tasks: Annotated[
        str | None, typer.Option(help="metaworld: comma-separated tasks, e.g. reach-v3,push-v3.")
    ] = None,
    episodes: Annotated[int | None, typer.Option(help="metaworld: episodes per task.")] = None,
    views: Annotated[
        str | None,
        typer.Option(help="metaworld: cameras, e.g. corner2,topview,gripperPOV. lerobot: key=view pairs."),
    ] = None,
    size: Annotated[int | None, typer.Option(help="metaworld: image size in pixels (64-256).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="metaworld: seed; the same seed gives the same store.")
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="metaworld: step limit per episode.")] = None,
    render_quality: Annotated[
        str | None, typer.Option(help="metaworld: 'fast' (no shadows/reflections) or 'default'.")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="metaworld: 'hand' (8-D hand state) or 'task' (+ first object's pose and the goal, 18-D)."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Processes generating/encoding episodes on this machine (same store).")
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            help="'i/N': prepare only shard i (0..N-1) of N into a shard folder; `xwam merge` joins them."
        ),
    ] = None,
    resize: Annotated[
        str | None, typer.Option(help="Resize every view at import: HxW, e.g. 256x320 (even sizes).")
    ] = None,
    fps: Annotated[
        float | None,
        typer.Option(help="Resample at import to this rate (the source's divided by an integer)."),
    ] = None,
    video: Annotated[
        str | None,
        typer.Option(help="RGB video: 'av1' (LeRobot's default) or 'h264-444' (full colour, small images)."),
    ] = None,
    crf: Annotated[
        int | None,
        typer.Option(help="The video's constant rate factor (lower: better; 0: the codec's default)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing store; start an unfinished prepare over.")
    ] = False,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe TOML; its \\[prepare] section gives defaults.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe key: section.key=value.")
    ] = None,
) -> None:
    """Turn robot episodes into the episode store that every later command reads.

    The store is a LeRobot v3.0 dataset folder with RGB, metric depth and cameras per view (xwam-release: relative depth, no cameras). It is built in a temporary folder and renamed when complete: an interrupted run leaves nothing behind.
    """
    cli: dict[str, object] = {
        "prepare.out": str(out) if out else None,
        "prepare.workers": workers,
        "prepare.shard": shard,
        "prepare.fps": fps,
        "prepare.video": video,
        "prepare.video_crf": crf,
    }
    if resize is not None:
        parts = resize.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            fail(f"--resize {resize!r}: expected HEIGHTxWIDTH, e.g. 256x320")
        cli["prepare.resize"] = [int(p) for p in parts]
    if overwrite:
        cli["prepare.overwrite"] = True
    if source:
        name, *rest = source
        cli["prepare.source"] = name
        metaworld_only = {
            "--tasks": tasks,
            "--episodes": episodes,
            "--size": size,
            "--seed": seed,
            "--max-steps": max_steps,
            "--render-quality": render_quality,
            "--state": state,
        }
        if name in ("xwam-release", "lerobot"):  # sources that read a dataset folder
            if len(rest) != 1:
                fail(f"{name} source takes one dataset folder: xwam prepare {name} PATH --out DIR")
            refused = metaworld_only if name == "lerobot" else {**metaworld_only, "--views": views}
            given = [flag for flag, value in refused.items() if value is not None]
            if given and name == "lerobot":
                fail(f"{given[0]} is an option of the metaworld source, not of lerobot")
            if given:
                fail(f"{given[0]} is not an option of the {name} source")
        if name == "xwam-release":
            cli["prepare.xwam_release.path"] = rest[0]
        elif name == "lerobot":
            cli["prepare.lerobot.path"] = rest[0]
            if views:
                pairs = split_csv(views) or []
                bad = [p for p in pairs if "=" not in p]
                if bad:
                    fail(f"--views {bad[0]!r}: for lerobot expected camera_key=view_name pairs")
                cli["prepare.lerobot.views"] = dict(p.split("=", 1) for p in pairs)
        elif rest:
            fail(f"source '{name}' takes no path argument (got {' '.join(rest)!r})")
        if name not in ("lerobot", "xwam-release"):
            cli.update(
                {
                    "prepare.metaworld.tasks": split_csv(tasks),
                    "prepare.metaworld.episodes": episodes,
                    "prepare.metaworld.views": split_csv(views),
                    "prepare.metaworld.size": size,
                    "prepare.metaworld.seed": seed,
                    "prepare.metaworld.max_steps": max_steps,
                    "prepare.metaworld.render_quality": render_quality,
                    "prepare.metaworld.state": state,
                }
            )
    resolved = recipe_with(recipe, set_, cli)
    if resolved.prepare.out:
        check_output(Path(resolved.prepare.out), "--out", folder=True)

    from xwam_core.data.prepare import prepare_shard, prepare_store
    from xwam_core.data.shards import PartsFolder

    parts = PartsFolder.beside(Path(resolved.prepare.out))
    try:
        with RichProgress("prepare") as progress:
            if resolved.prepare.shard:
                folder = prepare_shard(resolved, progress)
            else:
                summary = prepare_store(resolved, progress)
    except KeyboardInterrupt:
        if parts.is_dir():
            interrupted(
                f"the finished episodes are kept in {parts}; the same command continues (--overwrite starts over)"
            )
        raise
    if resolved.prepare.shard:
        console.print(
            f"shard {resolved.prepare.shard} written to {folder}; join all shards with `xwam merge`"
        )
    else:
        print_summary(summary)


MERGE_EXAMPLES = """
[bold]Examples[/]

  xwam prepare metaworld --episodes 50 --shard 0/2 --out shards/0   (one per machine or array task)
  xwam prepare metaworld --episodes 50 --shard 1/2 --out shards/1
  xwam merge shards/0 shards/1 --out data/mw
"""


@user_errors
def merge(
    shards: Annotated[
        list[Path], typer.Argument(help="The shard folders of one prepare (--shard i/N), all N.")
    ],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Store folder to create.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store.")] = False,
) -> None:
    """Join the shard folders of a sharded `xwam prepare` into one episode store.

    The store is the one a single `xwam prepare` with the same settings writes: the same episodes in the same order, statistics over all of them. Built in a temporary folder and renamed when complete.
    """
    if out is None:
        fail("no output folder: pass --out DIR")
    check_output(out, "--out", folder=True)
    from xwam_core.data.prepare import merge as merge_store

    with RichProgress("merge") as progress:
        summary = merge_store(shards, out, overwrite, progress)
    print_summary(summary)


def print_summary(s: StoreSummary) -> None:
    table = Table(title=f"episode store {s.path}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("episodes", str(s.episodes))
    table.add_row("frames", str(s.frames))
    table.add_row("expert success rate", f"{100 * s.success_rate:.1f}%")
    table.add_row("views", ", ".join(s.views))
    table.add_row("image size", f"{s.image_size[0]}x{s.image_size[1]}")
    table.add_row(
        "depth / cameras", f"{'yes' if s.has_depth else 'missing'} / {'yes' if s.has_cameras else 'missing'}"
    )
    table.add_row("bytes on disk", human_bytes(s.bytes_on_disk))
    table.add_row("seconds", f"{s.seconds:.1f}")
    console.print(table)
