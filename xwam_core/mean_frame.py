"""The mean-frame baseline: the average future frame of the store's other episodes.

For every view and window frame, the mean RGB and the mean depth over windows of the episodes a run
does NOT evaluate (so it never sees the frames it is scored on). It is the video counterpart of the
mean-action baseline, and a hard one under PSNR in scenes with fixed cameras: wherever the background
never changes it is exact, and it blurs the robot over the places it tends to be. A model that
predicts the conditional mean of the future should beat it; one that does not has not learnt the
scene's statistics yet.

    frames = mean_future_frames(store, layout.window, layout.views, exclude=[9, 19])
    frames.rgb    (V, T, H, W, 3) float32 in [0, 255]
    frames.depth  (V, T, H, W) float32 metres, the mean over valid (> 0) pixels; 0 where none is valid
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout
from xwam_core.progress import SILENT, Progress

MAX_WINDOWS = 512  # windows averaged at most, evenly spaced over all of them (a large store stays quick)


@dataclass
class MeanFrames:
    rgb: np.ndarray  # (V, T, H, W, 3) float32
    depth: np.ndarray | None  # (V, T, H, W) float32, None when the store has no depth
    episodes: list[int]  # the episodes averaged over
    windows: int  # how many windows were averaged


def mean_future_frames(
    store: EpisodeStore,
    window: WindowLayout,
    views: list[str],
    exclude: list[int],
    progress: Progress = SILENT,
) -> MeanFrames | None:
    """The mean frame of up to MAX_WINDOWS windows of every episode not in `exclude`; None if there is none."""
    excluded = set(exclude)
    episodes = [  # episodes too short for one window give none (WindowDataset refuses a set with none)
        i for i, e in enumerate(store.episodes) if i not in excluded and e.length >= window.span
    ]
    if not episodes:
        return None
    dataset = WindowDataset(store, window, views=views, episodes=episodes, normalize=False)
    rows = np.unique(np.linspace(0, len(dataset) - 1, min(MAX_WINDOWS, len(dataset))).round().astype(int))
    bar = progress.task("mean-frame baseline", total=len(rows))
    shape = (len(views), window.num_frames, *store.image_size)
    rgb_sum = np.zeros((*shape, 3), np.float64)
    depth_sum = np.zeros(shape, np.float64)
    depth_count = np.zeros(shape, np.int64)
    for row in rows:
        item = dataset[int(row)]
        rgb_sum += item["rgb"]
        if store.has_depth:
            depth = item["depth"]  # (V, T, H, W) metres, 0 = invalid
            valid = depth > 0
            depth_sum += np.where(valid, depth, 0.0)
            depth_count += valid
        bar.advance(info="other episodes")
    mean_depth = (depth_sum / np.maximum(depth_count, 1)).astype(np.float32) if store.has_depth else None
    used = sorted({int(dataset.windows[int(r), 0]) for r in rows})
    return MeanFrames((rgb_sum / len(rows)).astype(np.float32), mean_depth, used, len(rows))
