"""Data benchmarks: simulated episodes per minute and training windows per second.

    python bench/data.py            # table
    python bench/data.py --json     # one JSON object per line

Figures: sim_episodes_per_min (Meta-World, 128x128, 3 views, fast render quality, expert policy,
whole episodes written to a store), cache_build_s (decoding the store into the frame cache once),
loader_windows_per_s_workers0 / _workers2 (128x128, 3 views, 9 frames at stride 4, batch 8),
store_kb_per_frame_format1 / _format2 (the same Meta-World episodes, 3 views at 256x256 with depth and
cameras, written in both store formats; also scaled by pixel count to the paper's 256x320);
prepare_frames_per_s_workers1 / _workers2 (`xwam prepare` of Meta-World, 3 views with depth at
--prepare-size, store format 2, wall time of the whole command: worker start, simulation, rendering, AV1
and PNG encoding, assembly; per worker = that rate divided by the workers); and the
loader at scale (bench/data_scale.py): loader_windows_per_s_per_worker_video (a format-2 store decoded per
window, 3 views 256x320, 9 frames), loader_rss_mb_per_rank, index_build_s / index_peak_rss_mb for a store
description of 1.49 M episodes (metadata only).

    python bench/data.py --only prepare --prepare-size 128   # just the prepare figures
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Report, bench_argparser


def main() -> None:
    parser = bench_argparser(__doc__ or "")
    parser.add_argument("--episodes", type=int, default=6, help="simulated episodes to generate")
    parser.add_argument("--batches", type=int, default=40, help="loader batches to time per setting")
    parser.add_argument("--size-episodes", type=int, default=2, help="256x256 episodes for the store sizes")
    parser.add_argument("--index-episodes", type=int, default=1_490_000, help="episodes of the index figure")
    parser.add_argument("--prepare-episodes", type=int, default=4, help="episodes per prepare timing")
    parser.add_argument("--prepare-size", type=int, default=128, help="image size of the prepare timing")
    parser.add_argument("--only", choices=["prepare"], help="run only these figures")
    args = parser.parse_args()

    from bench.data_scale import PAPER_EPISODES, PAPER_FRAMES, decode_figures, index_figures

    report = Report("xwam data benchmarks")
    # first: it imports the recipe (diffusers) before any OpenGL context exists in this process
    prepare_rates(report, args.prepare_episodes, args.prepare_size)
    if args.only == "prepare":
        report.emit(args.json)
        return

    from xwam_core.data.reader import EpisodeStore
    from xwam_core.data.sources.metaworld import MetaWorldSource
    from xwam_core.data.store import StoreWriter
    from xwam_core.data.windows import WindowDataset, WindowLayout, make_loader

    store_sizes(report, args.size_episodes)
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(tmp) / "store"
        tasks = ["reach-v3", "push-v3"]
        source = MetaWorldSource(
            tasks=tasks,
            episodes=max(1, args.episodes // len(tasks)),
            views=["corner2", "topview", "gripperPOV"],
            size=128,
            seed=0,
            render_quality="fast",
        )
        t0 = time.perf_counter()
        with StoreWriter(store_path, source.info()) as writer:
            for episode in source.episodes():
                writer.add(episode)
        sim_s = time.perf_counter() - t0
        n_eps = source.info().num_episodes
        report.add(
            "sim_episodes_per_min",
            60 * n_eps / sim_s,
            "episodes/min",
            f"{n_eps} episodes, 128x128, 3 views, incl. PNG encoding and store writing",
        )

        store = EpisodeStore(store_path)
        t0 = time.perf_counter()
        store.frame_cache()
        report.add("cache_build_s", time.perf_counter() - t0, "s", f"{store.num_frames} frames x 3 views")

        dataset = WindowDataset(store, WindowLayout(future_frames=8, frame_stride=4))
        batch = 8
        for workers in (0, 2):
            loader = make_loader(dataset, batch_size=batch, num_workers=workers, seed=0)
            it = iter(loader)
            next(it)  # start workers, warm the page cache
            count, t0 = 0, time.perf_counter()
            while count < args.batches:
                try:
                    next(it)
                except StopIteration:
                    it = iter(loader)
                    continue
                count += 1
            rate = count * batch / (time.perf_counter() - t0)
            report.add(
                f"loader_windows_per_s_workers{workers}",
                rate,
                "windows/s",
                f"{len(dataset)} windows, 9 frames x 3 views, batch {batch}",
            )
            del it, loader
    decode_figures(report, episodes=3, length=60, windows=40)
    index_figures(report, args.index_episodes, PAPER_FRAMES * args.index_episodes // PAPER_EPISODES)
    report.emit(args.json)


def prepare_rates(report: Report, n_episodes: int, size: int) -> None:
    """Frames per second of `xwam prepare` (Meta-World, 3 views, store format 2) with 1 and 2 workers."""
    from xwam_core.data.prepare import prepare_store
    from xwam_core.recipe import Recipe

    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            recipe = Recipe()
            cfg = recipe.prepare
            cfg.source, cfg.out, cfg.workers = "metaworld", str(Path(tmp) / f"workers{workers}"), workers
            mw = cfg.metaworld
            mw.tasks, mw.episodes, mw.size = ["reach-v3", "push-v3"], max(1, n_episodes // 2), size
            mw.views = ["corner2", "topview", "gripperPOV"]
            t0 = time.perf_counter()
            summary = prepare_store(recipe)
            seconds = time.perf_counter() - t0
            rate = summary.frames / seconds
            report.add(
                f"prepare_frames_per_s_workers{workers}",
                rate,
                "frames/s",
                f"{summary.episodes} episodes, {summary.frames} frames, 3 views {size}x{size} + depth, "
                f"{rate / workers:.1f} frames/s per worker, {os.cpu_count()} CPUs",
            )


def store_sizes(report: Report, n_episodes: int) -> None:
    """Bytes per 3-view frame (RGB + depth + cameras + state/action) in store formats 1 and 2."""
    from xwam_core.data.sources.metaworld import MetaWorldSource
    from xwam_core.data.store import StoreWriter

    source = MetaWorldSource(
        tasks=["push-v3"], episodes=n_episodes, views=["corner2", "topview", "gripperPOV"], size=256, seed=0
    )
    episodes = list(source.episodes())
    frames = sum(e.length for e in episodes)
    with tempfile.TemporaryDirectory() as tmp:
        for store_format in (1, 2):
            out = Path(tmp) / f"format{store_format}"
            t0 = time.perf_counter()
            with StoreWriter(out, source.info(), store_format=store_format) as writer:
                for episode in episodes:
                    writer.add(episode)
            seconds = time.perf_counter() - t0
            kb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / frames / 1000
            report.add(
                f"store_kb_per_frame_format{store_format}",
                kb,
                "KB/frame",
                f"{frames} frames, 3 views 256x256 + depth; {kb * 320 / 256:.1f} KB scaled to 256x320; "
                f"written at {1000 * seconds / frames:.0f} ms/frame",
            )


if __name__ == "__main__":
    main()
