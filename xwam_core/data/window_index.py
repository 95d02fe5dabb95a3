"""The window index: which (episode, start frame) every training window is, without a list of windows.

A store of 1.49 M episodes has ~317 M windows (one at every frame); as rows of three int64 that would be
7.6 GB per rank. The index keeps one count per episode instead (tens of MB) and finds window i's episode
by a binary search over the cumulative counts, for one index or a whole batch at once (numpy).
"""

from __future__ import annotations

import numpy as np


class WindowIndex:
    """Windows of `episodes` (ids, in this order): `pad` a window at every frame of an episode, else one at
    every frame that starts a full window of `span` frames. `lengths` and `starts` are the store's, by id."""

    def __init__(self, episodes: np.ndarray, lengths: np.ndarray, starts: np.ndarray, span: int, pad: bool):
        ids = np.asarray(episodes, np.int64)
        length = np.asarray(lengths, np.int64)[ids]
        counts = length if pad else np.maximum(length - span + 1, 0)
        keep = counts > 0
        self.episodes = ids[keep]  # (E',) episodes with at least one window
        self.counts = counts[keep]  # (E',) their windows
        self.first_frame = np.asarray(starts, np.int64)[self.episodes]  # (E',) global frame of local 0
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # (E' + 1,)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, windows: np.ndarray | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(episode, global start frame, local start frame) of each window index."""
        windows = np.asarray(windows, np.int64)
        if windows.size and (windows.min() < 0 or windows.max() >= len(self)):
            raise IndexError(f"window index out of range (the index has {len(self)} windows)")
        k = np.searchsorted(self.offsets, windows, side="right") - 1
        local = windows - self.offsets[k]
        return self.episodes[k], self.first_frame[k] + local, local

    def array(self) -> np.ndarray:
        """Every window as rows (episode, global start, local start): (N, 3) int64 (small stores, tests)."""
        return np.stack(self.locate(np.arange(len(self))), axis=1)
