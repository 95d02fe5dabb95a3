"""A mixture of episode stores: one training set drawn from several stores with sampling weights.

The recipe names the stores (`[[data.mixture]]`: store, weight, val_episodes; `data.store` is a mixture
of one). They must agree on what a window is (views, image size, fps, state and action names): the first
difference is one line naming both stores. Each store holds out its own validation episodes. Windows
are numbered store after store; the data order over them (weights included) is the sampler's
(xwam_core.data.sampler). Tasks are the union of the stores' tasks, in order of first appearance.

Normalization across the mixture (one store: its meta/stats.json, unchanged): q01/q99 are quantiles of
the mixture as training draws it, each store's frames weighted by its share of the draws (up to
SAMPLES_PER_STORE evenly spaced frames a store, read from its memory-mapped arrays); mean and std are
the mixture's (law of total variance over the stores' own), min and max the stores' extremes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset
from xwam_core.errors import DataError
from xwam_core.normalizer import Normalizer

SAMPLES_PER_STORE = 200_000


def check_compatible(stores: list[EpisodeStore], views: list[str] | None = None) -> None:
    """The stores of a mixture describe the same windows; otherwise one line naming the two stores."""
    first = stores[0]
    wanted = list(views) if views else list(first.views)
    for store in stores:
        missing = [v for v in wanted if v not in store.views]
        if missing:
            raise DataError(
                f"{store.path}: has no view(s) {missing} of the mixture's {wanted} (data.views, else the "
                f"first store's views); the stores of data.mixture must share the views trained on"
            )
    for store in stores[1:]:
        for what, mine, theirs in (
            ("image size", store.image_size, first.image_size),
            ("fps", store.fps, first.fps),
            ("state names", store.state_names, first.state_names),
            ("action names", store.action_names, first.action_names),
        ):
            if mine != theirs:
                raise DataError(
                    f"{store.path}: {what} {mine!r} differ from {first.path}'s {theirs!r}; the stores of "
                    "data.mixture must agree (re-import one with the other's settings)"
                )


def mixture_normalizer(parts: list[WindowDataset], shares: list[float]) -> Normalizer:
    """One normalizer for the mixture (module docstring); `shares` are the stores' fractions of the draws."""
    if len(parts) == 1:
        return parts[0].normalizer
    first = parts[0].store
    merged: dict[str, dict[str, list[float]]] = {}
    for key, source in (("action", "action"), ("state", "observation.state")):
        samples, weights = [], []
        for part, share in zip(parts, shares, strict=True):
            values = part.cache.action if key == "action" else part.cache.state
            rows = np.unique(
                np.linspace(0, len(values) - 1, min(len(values), SAMPLES_PER_STORE)).astype(np.int64)
            )
            samples.append(np.asarray(values[rows], np.float64))
            weights.append(np.full(len(rows), share / len(rows)))
        q01, q99 = weighted_quantiles(np.concatenate(samples), np.concatenate(weights), (0.01, 0.99))
        stats = [part.store.stats[source] for part in parts]
        p = np.asarray(shares, np.float64)[:, None]

        def column(stat: str, fallback: list[np.ndarray], stats: list[dict[str, Any]] = stats) -> np.ndarray:
            return np.stack(
                [np.asarray(s.get(stat, f), np.float64) for s, f in zip(stats, fallback, strict=True)]
            )

        means = column("mean", [x.mean(0) for x in samples])
        stds = column("std", [x.std(0) for x in samples])
        mean = (p * means).sum(0)
        var = (p * (stds**2 + means**2)).sum(0) - mean**2
        merged[key] = {
            "q01": q01.tolist(),
            "q99": q99.tolist(),
            "mean": mean.tolist(),
            "std": np.sqrt(np.maximum(var, 0.0)).tolist(),
            "min": column("min", [x.min(0) for x in samples]).min(0).tolist(),
            "max": column("max", [x.max(0) for x in samples]).max(0).tolist(),
        }
    return Normalizer(list(first.action_names), list(first.state_names), merged)


def weighted_quantiles(
    values: np.ndarray, weights: np.ndarray, qs: tuple[float, ...]
) -> tuple[np.ndarray, ...]:
    """Per column of (M, D) `values`, the quantiles `qs` of the distribution putting `weights` on the rows."""
    out = np.empty((len(qs), values.shape[1]))
    for d in range(values.shape[1]):
        order = np.argsort(values[:, d], kind="stable")
        w = weights[order]
        position = (np.cumsum(w) - 0.5 * w) / w.sum()  # each sample's mid-point in probability
        out[:, d] = np.interp(qs, position, values[order, d])
    return tuple(out)


class MixtureDataset(Dataset):
    """Windows of several WindowDatasets numbered one store after another, with one normalizer and one
    task vocabulary; items gain `store_index`."""

    def __init__(
        self,
        parts: list[WindowDataset],
        normalizer: Normalizer | None = None,
        shares: list[float] | None = None,
        tasks: list[str] | None = None,
    ):
        if not parts:
            raise DataError("a mixture needs at least one store")
        self.parts = parts
        self.sizes = [len(p) for p in parts]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        if normalizer is None:
            total = float(sum(self.sizes))
            normalizer = mixture_normalizer(parts, shares or [s / total for s in self.sizes])
        self.normalizer = normalizer
        self.tasks: list[str] = list(tasks or [])  # given: the training set's (validation maps into it)
        for part in parts:
            part.normalizer = normalizer  # items are normalized with the mixture's bounds
            self.tasks += [t for t in part.store.tasks if t not in self.tasks]
        self._task_maps = [np.array([self.tasks.index(t) for t in p.store.tasks], np.int64) for p in parts]

    @property
    def stores(self) -> list[EpisodeStore]:
        return [p.store for p in self.parts]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(store, window within that store's WindowDataset) of mixture window i."""
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range (the mixture has {len(self)})")
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return s, int(i - self.offsets[s])

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self.locate(int(i))
        item = self.parts[s][j]
        item["task_index"] = int(self._task_maps[s][item["task_index"]])
        item["store_index"] = s
        return item
