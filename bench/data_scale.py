"""The loader at scale, for bench/data.py: windows/s per worker decoding a format-2 store (3 views,
256x320, 9 frames), RSS per rank, and the index/metadata build for a store description of 1.49 M
episodes (metadata only, no pixels).

    python bench/data_scale.py [--json] [--only decode|index]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Report, bench_argparser

PAPER_EPISODES = 1_490_000
PAPER_FRAMES = 317_000_000  # 5,874 h at 15 Hz


def rss_mb() -> float:
    """This process's resident memory now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_store(path: Path, episodes: int, length: int) -> None:
    """A format-2 store of smooth moving images: 3 views at 256x320 with depth and static cameras."""
    from xwam_core.data.episode import Episode, ViewFrames
    from xwam_core.data.sources.base import SourceInfo
    from xwam_core.data.store import StoreWriter

    h, w, views = 256, 320, ["front", "side", "wrist"]
    info = SourceInfo(
        name="synthetic", robot_type="bench", fps=15.0, views=views, image_size=(h, w),
        state_names=[f"s{i}" for i in range(8)], action_names=[f"a{i}" for i in range(7)],
        num_episodes=episodes, has_depth=True, has_cameras=True,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    k = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float32)
    with StoreWriter(path, info) as writer:
        for e in range(episodes):
            frames = {}
            for vi, v in enumerate(views):
                t = np.arange(length)[:, None, None]
                base = 127 + 100 * np.sin(xx[None] / 9.0 + yy[None] / 13.0 + t * 0.2 + vi + e)
                rgb = np.stack([base, np.roll(base, 5, 2), 255 - base], -1).clip(0, 255).astype(np.uint8)
                depth = np.broadcast_to((0.6 + 0.4 * yy / h + 0.01 * t).astype(np.float32), (length, h, w))
                frames[v] = ViewFrames(
                    rgb=rgb, depth=depth.copy(), intrinsics=np.repeat(k[None], length, 0),
                    extrinsics=np.repeat(np.eye(4, dtype=np.float32)[None], length, 0),
                )  # fmt: skip
            writer.add(
                Episode(
                    task="reach",
                    views=frames,
                    fps=15.0,
                    success=True,
                    state=rng.normal(size=(length, 8)).astype(np.float32),
                    action=rng.normal(size=(length, 7)).astype(np.float32),
                )
            )


def decode_figures(report: Report, episodes: int, length: int, windows: int) -> None:
    from xwam_core.data.windows import WindowDataset, WindowLayout

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        os.environ["XWAM_CACHE"] = str(Path(tmp) / "cache")
        path = Path(tmp) / "store"
        synthetic_store(path, episodes, length)
        before = rss_mb()
        dataset = WindowDataset(path, WindowLayout(8, 4), pad_episode_ends=True, frame_cache="off")
        order = np.random.default_rng(0).permutation(len(dataset))[:windows]
        dataset[int(order[0])]  # open the first files
        t0 = time.perf_counter()
        for i in order[1:]:
            dataset[int(i)]
        rate = (len(order) - 1) / (time.perf_counter() - t0)
        report.add(
            "loader_windows_per_s_per_worker_video",
            rate,
            "windows/s",
            f"format-2 store decoded per window (AV1 RGB + 16-bit PNG depth), 3 views 256x320, 9 frames at "
            f"stride 4, random windows of {episodes} episodes x {length} frames, one process",
        )
        report.add(
            "loader_rss_mb_per_rank",
            rss_mb(),
            "MB",
            f"process RSS after reading {len(order)} windows (+{rss_mb() - before:.0f} MB for the dataset, "
            "its memory-mapped arrays and open decoders); each DataLoader worker is a fork of it",
        )


def write_description(root: Path, episodes: int, frames: int) -> None:
    """meta/ of a store of `episodes` episodes and about `frames` frames, 3 views: no data, no videos."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from xwam_core.data.store import episode_camera_column, rgb_key

    rng = np.random.default_rng(0)
    mean = frames / episodes
    length = rng.integers(int(mean * 0.5), int(mean * 1.5) + 1, episodes).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(length)[:-1]])
    views = ["front", "side", "wrist"]
    tasks = [f"task {i}" for i in range(1000)]
    task_of = rng.integers(0, len(tasks), episodes)
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    columns: dict[str, pa.Array] = {
        "episode_index": pa.array(np.arange(episodes)),
        "tasks": pa.ListArray.from_arrays(
            pa.array(np.arange(episodes + 1, dtype=np.int32)), pa.array(tasks).take(pa.array(task_of))
        ),
        "length": pa.array(length),
        "success": pa.array(np.ones(episodes, bool)),
        "dataset_from_index": pa.array(start),
        "data/chunk_index": pa.array(np.arange(episodes) // 100_000),
        "data/file_index": pa.array(np.arange(episodes) // 1000 % 100),
    }

    def fixed(width: int, values: np.ndarray) -> pa.Array:
        offsets = pa.array(np.arange(episodes + 1, dtype=np.int32) * width)
        return pa.ListArray.from_arrays(offsets, pa.array(np.tile(values, episodes).astype(np.float32)))

    for v in views:
        key = f"videos/{rgb_key(v)}"
        columns[f"{key}/chunk_index"] = pa.array(np.arange(episodes) // 1000)
        columns[f"{key}/file_index"] = pa.array(np.arange(episodes) % 1000)
        columns[f"{key}/from_timestamp"] = pa.array(np.zeros(episodes))
        if v != "wrist":
            columns[episode_camera_column(v, "intrinsics")] = fixed(9, np.eye(3).ravel())
            columns[episode_camera_column(v, "extrinsics")] = fixed(16, np.eye(4).ravel())
    pq.write_table(pa.table(columns), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    info = {
        "codebase_version": "v3.0", "fps": 15, "total_frames": int(length.sum()),
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "xwam": {"views": views, "image_size": [256, 320], "has_depth": True, "has_cameras": True,
                 "store_format": 2, "moving_views": ["wrist"]},
    }  # fmt: skip
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "tasks.json").write_text(json.dumps(tasks))


def index_child(root: str) -> None:
    """In a fresh process: read the description, build the index, split and the first epoch's shard."""
    from xwam_core.data.reader import read_episode_table
    from xwam_core.data.sampler import GlobalBatchSampler
    from xwam_core.data.window_index import WindowIndex

    path = Path(root)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    info = json.loads((path / "meta" / "info.json").read_text())
    table = read_episode_table(path, info, json.loads((path / "meta" / "tasks.json").read_text()))
    t_meta = time.perf_counter() - t0
    index = WindowIndex(np.arange(len(table)), table.length, table.start, span=33, pad=True)
    t_index = time.perf_counter() - t0
    probe = index.locate(np.random.default_rng(0).integers(0, len(index), 4096))  # a batch's lookups
    assert len(probe[0]) == 4096
    sampler = GlobalBatchSampler(len(index), 256, rank=0, world=64, seed=0)
    shard = sampler.shard(0)
    t_all = time.perf_counter() - t0
    print(json.dumps({
        "episodes": len(table), "windows": len(index), "meta_s": t_meta, "index_s": t_index - t_meta,
        "sampler_s": t_all - t_index, "total_s": t_all, "peak_mb": peak_rss_mb(), "base_mb": base,
        "shard": int(shard.numel()),
    }))  # fmt: skip


def index_figures(report: Report, episodes: int, frames: int) -> None:
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        t0 = time.perf_counter()
        write_description(Path(tmp), episodes, frames)
        written = time.perf_counter() - t0
        size = (Path(tmp) / "meta" / "episodes" / "chunk-000" / "file-000.parquet").stat().st_size
        done = subprocess.run(
            [sys.executable, __file__, "--index-child", tmp], capture_output=True, text=True, check=True
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
    report.add(
        "index_build_s_1.49M_episodes",
        r["total_s"],
        "s",
        f"{r['episodes']:,} episodes, {r['windows']:,} windows: meta/episodes ({size / 1e6:.0f} MB parquet, "
        f"3 views, static cameras) read and checked {r['meta_s']:.1f} s, window index {r['index_s']:.2f} s, "
        f"first epoch's shard of rank 0 of 64 {r['sampler_s']:.1f} s (description written in {written:.0f} s)",
    )
    report.add(
        "index_peak_rss_mb_1.49M_episodes",
        r["peak_mb"],
        "MB",
        f"peak RSS of that process ({r['base_mb']:.0f} MB after imports); the epoch permutation of all "
        f"windows is the peak, a rank keeps its {r['shard']:,} draws",
    )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--index-child":
        index_child(sys.argv[2])
        return
    parser = bench_argparser(__doc__ or "")
    parser.add_argument("--only", choices=["decode", "index"], default=None)
    parser.add_argument("--episodes", type=int, default=3, help="256x320 episodes for the decode figure")
    parser.add_argument("--length", type=int, default=60, help="frames per episode for the decode figure")
    parser.add_argument("--windows", type=int, default=40, help="windows to read for the decode figure")
    parser.add_argument("--index-episodes", type=int, default=PAPER_EPISODES)
    parser.add_argument("--index-frames", type=int, default=PAPER_FRAMES)
    args = parser.parse_args()
    report = Report("xwam loader at scale")
    if args.only in (None, "decode"):
        decode_figures(report, args.episodes, args.length, args.windows)
    if args.only in (None, "index"):
        index_figures(report, args.index_episodes, args.index_frames)
    report.emit(args.json)


if __name__ == "__main__":
    main()
