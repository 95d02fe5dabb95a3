"""Per-dimension statistics of a store (meta/stats.json); xwam_core.normalizer turns them into the normalization (docs/method.md, 2).

Every key gets min, max, mean, std, count, q01 and q99. Images get per-channel statistics in [0, 1]
(LeRobot's convention, shape (3, 1, 1)) from a frame subsample; depth gets millimetres over valid pixels
(shape (1, 1, 1)), the unit of the stored depth and so of the tensor LeRobot reads. The same statistics
per episode go into meta/episodes as LeRobot's `stats/<key>/<stat>` columns (`episode_stats`), which
LeRobot's merge and delete aggregate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from xwam_core.data.episode import Episode
    from xwam_core.data.sources.base import SourceInfo

IMAGE_FRAME_STRIDE = 4  # image statistics from every 4th frame: plenty for channel means
IMAGE_PIXEL_STRIDE = 4


def describe(values: np.ndarray) -> dict[str, list]:
    """Statistics over axis 0 of a (N, ...) array."""
    values = values.astype(np.float64)
    return {
        "min": values.min(axis=0).tolist(),
        "max": values.max(axis=0).tolist(),
        "mean": values.mean(axis=0).tolist(),
        "std": values.std(axis=0).tolist(),
        "count": [int(values.shape[0])],
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def stats_samples(episode: Episode, info: SourceInfo) -> dict[str, np.ndarray]:
    """What one episode adds to the statistics, per key: every state and action, and a subsample of the
    image and depth pixels. Computed where the episode is encoded (a worker) and kept with it, so the
    statistics of a store are the same however its episodes were produced and merged."""
    samples = {"observation.state": episode.state, "action": episode.action}
    for name in info.views:
        view = episode.views[name]
        sub = view.rgb[::IMAGE_FRAME_STRIDE, ::IMAGE_PIXEL_STRIDE, ::IMAGE_PIXEL_STRIDE]
        samples[f"observation.images.{name}"] = sub.reshape(-1, 3).astype(np.float32) / 255.0
        if info.has_depth and view.depth is not None:
            d = view.depth[::IMAGE_FRAME_STRIDE, ::IMAGE_PIXEL_STRIDE, ::IMAGE_PIXEL_STRIDE].reshape(-1, 1)
            samples[f"observation.depth.{name}"] = _depth_mm(d[d[:, 0] > 0])
    return samples


class RunningStats:
    """Collects what the store's statistics need while episodes are written."""

    def __init__(self) -> None:
        self._columns: dict[str, list[np.ndarray]] = {}

    def add(self, samples: dict[str, np.ndarray]) -> None:
        """One episode's `stats_samples`."""
        for key, values in samples.items():
            self._columns.setdefault(key, []).append(values)

    def update(self, episode: Episode, info: SourceInfo) -> None:
        self.add(stats_samples(episode, info))

    def result(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key, chunks in self._columns.items():
            values = np.concatenate(chunks, axis=0)
            if values.shape[0] == 0:
                continue
            out[key] = _lerobot_shapes(key, describe(values))
        return out


def _depth_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> millimetres as the store keeps them (xwam_core.data.store.depth_to_mm)."""
    from xwam_core.data.store import depth_to_mm

    return depth_to_mm(depth_m).astype(np.float32)


def _lerobot_shapes(key: str, stats: dict[str, list]) -> dict[str, list]:
    """LeRobot's image statistics are per channel with shape (C, 1, 1)."""
    if key.startswith(("observation.images.", "observation.depth.")):
        return {k: [[[x]] for x in v] if k != "count" else v for k, v in stats.items()}
    return stats


def episode_stats(episode: Episode, info: SourceInfo) -> dict[str, Any]:
    """One episode's statistics as meta/episodes columns `stats/<key>/<stat>` (LeRobot's layout)."""
    return episode_stats_from(stats_samples(episode, info))


def episode_stats_from(samples: dict[str, np.ndarray]) -> dict[str, Any]:
    """`episode_stats` from the episode's `stats_samples`.

    Depth has none: LeRobot's delete_episodes reshapes the per-episode statistics of every image feature
    to 3 channels and fails on 1-channel depth (meta/stats.json keeps depth's statistics)."""
    columns: dict[str, Any] = {}
    for key, values in samples.items():
        if key.startswith("observation.depth."):
            continue
        if values.shape[0] == 0:  # no valid depth pixel: zeros, so aggregated counts stay > 0
            values = np.zeros((1, *values.shape[1:]), np.float32)
        for stat, value in _lerobot_shapes(key, describe(values)).items():
            columns[f"stats/{key}/{stat}"] = value
    return columns
