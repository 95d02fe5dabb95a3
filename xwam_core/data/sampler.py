"""The training data order: global batches of a mixture of stores, split over the processes (ranks),
deterministic in (seed, epoch) and resumable at any step, mid-epoch included.

An epoch draws N windows, N the mixture's window count. Each store s contributes a quota q_s: its own
window count n_s when the mixture has no weights (every window exactly once per epoch), else its weight's
share of N (largest remainders, so the quotas add up to N). A store's draws come from its own stream, its
windows in a fresh seeded order each time the stream has gone through all of them: a store drawn below
its size sees different windows each epoch and none twice before it has seen all; a store drawn above
its size repeats whole cycles. The epoch's draws are then shuffled together by a permutation seeded by
(seed, epoch), which for a single store is the order training always had.

Global batch g of epoch e holds positions [g*G, (g+1)*G) of that order; rank r takes the r-th contiguous
slice of G / world: each rank reads only its shard, the ranks together read every draw of the epoch once
(the last N mod G draws of an epoch are left out, a different few each epoch), and 1 or N processes see
the same global batches. The order is a function of the step, so a resumed run continues it exactly;
`state(step)` is saved with each checkpoint and `check(saved)` refuses a resume on other data.

Above PERMUTED_LIMIT windows (16.8 M) the permutations are not drawn whole (317 M windows: 2.5 GB and over
a minute per rank per epoch): each is a keyed bijection of [0, n) evaluated at the positions a rank
needs (a 4-round Feistel network with cycle walking, `keyed_permutation`), so a rank's epoch costs its
own N / world windows in time and memory. Same rules, another (equally seeded) order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from xwam_core.errors import XWAMError

PERMUTED_LIMIT = 2**24  # windows; above: keyed permutations evaluated per position (module docstring)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_permutation(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """The images of `positions` under a bijection of [0, n) chosen by `key`: a 4-round Feistel network
    on the smallest even bit width covering n, walked until the value falls inside [0, n)."""
    bits = max(2, int(n - 1).bit_length() + (int(n - 1).bit_length() % 2))
    half = np.uint64(bits // 2)
    low = np.uint64((1 << (bits // 2)) - 1)
    with np.errstate(over="ignore"):
        keys = _mix(np.arange(1, 5, dtype=np.uint64) + np.uint64(key % 2**63) * np.uint64(0x9E3779B97F4A7C15))

    def once(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & low
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & low)
        return (left << half) | right

    with np.errstate(over="ignore"):
        out = once(np.asarray(positions, np.uint64))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = once(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


def quotas(sizes: list[int], weights: list[float] | None) -> list[int]:
    """Draws per epoch of each store: its size without weights, else its weight's share of the total."""
    total = sum(sizes)
    if not weights or all(w == 0 for w in weights):
        return list(sizes)
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    q = np.floor(exact).astype(np.int64)
    q[np.argsort(-(exact - q), kind="stable")[: total - int(q.sum())]] += 1  # largest remainders
    return q.tolist()


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's share of each global batch (indices into the concatenated stores)."""

    def __init__(
        self,
        sizes: int | list[int],
        global_batch: int,
        rank: int,
        world: int,
        seed: int,
        start_step: int = 0,
        weights: list[float] | None = None,
    ):
        self.sizes = [int(sizes)] if isinstance(sizes, int) else [int(s) for s in sizes]
        n = sum(self.sizes)
        if global_batch % world:
            raise XWAMError(f"data.batch_size={global_batch} must be divisible by the {world} processes")
        if n < global_batch:
            raise XWAMError(f"only {n} training windows for a global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.local = global_batch // world
        self.batches_per_epoch = n // global_batch
        self.start_step = start_step
        self.quotas = quotas(self.sizes, weights)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def draws(self, epoch: int) -> np.ndarray:
        """(N,) the epoch's windows before the shuffle, store by store (its quota from its stream)."""
        if self.quotas == self.sizes:
            return np.arange(self.n, dtype=np.int64)
        parts = []
        for s, (size, quota) in enumerate(zip(self.sizes, self.quotas, strict=True)):
            positions = epoch * quota + np.arange(quota, dtype=np.int64)  # in the store's stream
            cycles, within = np.divmod(positions, size)
            picked = np.empty(quota, np.int64)
            for cycle in np.unique(cycles):
                g = torch.Generator().manual_seed(self.seed * 7919 + 104729 * (s + 1) + int(cycle))
                order = torch.randperm(size, generator=g).numpy()
                mask = cycles == cycle
                picked[mask] = order[within[mask]]
            parts.append(self.offsets[s] + picked)
        return np.concatenate(parts)

    def order(self, epoch: int) -> torch.Tensor:
        """(N,) the epoch's windows in training order (the same on every process)."""
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        if self.quotas == self.sizes:
            return perm
        return torch.from_numpy(self.draws(epoch)[perm.numpy()])

    def shard(self, epoch: int) -> torch.Tensor:
        """(batches_per_epoch, local) this rank's windows of each global batch of the epoch."""
        if self.n > PERMUTED_LIMIT:
            batch = np.arange(self.batches_per_epoch, dtype=np.int64)[:, None] * self.global_batch
            positions = batch + self.rank * self.local + np.arange(self.local, dtype=np.int64)  # (G, local)
            return torch.from_numpy(self.windows_at(epoch, positions.ravel()).reshape(positions.shape))
        used = self.order(epoch)[: self.batches_per_epoch * self.global_batch]
        return used.view(self.batches_per_epoch, self.world, self.local)[:, self.rank].clone()

    def windows_at(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """The windows at `positions` of epoch `epoch`'s order, computed per position (large mixtures)."""
        drawn = keyed_permutation(positions, self.n, self.seed * 7919 + epoch)  # (P,) into the epoch's draws
        if self.quotas == self.sizes:
            return drawn
        bounds = np.concatenate([[0], np.cumsum(self.quotas)]).astype(np.int64)
        store = np.searchsorted(bounds, drawn, side="right") - 1
        out = np.empty(len(drawn), np.int64)
        for s in np.unique(store):
            mask = store == s
            size, quota = self.sizes[s], self.quotas[s]
            cycles, within = np.divmod(epoch * quota + drawn[mask] - bounds[s], size)
            for cycle in np.unique(cycles):
                at = cycles == cycle
                key = self.seed * 7919 + 104729 * (int(s) + 1) + int(cycle) + 2**40
                within[at] = keyed_permutation(within[at], size, key)
            out[mask] = self.offsets[s] + within
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            epoch, offset = divmod(step, self.batches_per_epoch)
            mine = self.shard(epoch)
            for g in range(offset, self.batches_per_epoch):
                yield mine[g].tolist()
            step = (epoch + 1) * self.batches_per_epoch

    def __len__(self) -> int:  # infinite in practice; the loop stops at max_steps
        return 2**31

    # ---- checkpoints --------------------------------------------------------------------------------
    def state(self, step: int) -> dict[str, Any]:
        """Where the order stands after `step` global batches (saved in the training checkpoint)."""
        epoch, batch = divmod(step, self.batches_per_epoch)
        return {
            "epoch": epoch,
            "batch": batch,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "windows": self.sizes,
            "quotas": self.quotas,
        }

    def check(self, saved: dict[str, Any], step: int, where: str) -> None:
        """Refuse to continue a run whose data order was another (other stores, sizes, weights, seed or batch)."""
        mine = self.state(step)
        for key in ("seed", "global_batch", "windows", "quotas", "epoch", "batch"):
            if key in saved and saved[key] != mine[key]:
                raise XWAMError(
                    f"{where}: the run's data order had {key} {saved[key]}, this recipe and data give "
                    f"{mine[key]}; resume with the stores, weights, seed and batch size the run used"
                )
