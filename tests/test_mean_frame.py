"""The mean-frame baseline: the average window of the episodes a run does not evaluate."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import RecordingProgress, SyntheticSource, write_store
from xwam_core import mean_frame
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout
from xwam_core.mean_frame import mean_future_frames


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> EpisodeStore:
    path = tmp_path_factory.mktemp("mean_frame") / "store"
    write_store(path, SyntheticSource(episodes=3, length=8, size=(16, 16), views=("a", "b"), seed=3))
    return EpisodeStore(path)


def by_hand(store: EpisodeStore, window: WindowLayout, episodes: list[int], rows: list[int] | None = None):
    data = WindowDataset(store, window, views=["a", "b"], episodes=episodes, normalize=False)
    rows = list(range(len(data))) if rows is None else rows
    items = [data[i] for i in rows]
    rgb = np.mean([np.asarray(x["rgb"], np.float64) for x in items], axis=0)
    depth = np.stack([np.asarray(x["depth"], np.float64) for x in items])
    valid = depth > 0
    mean_depth = np.where(valid, depth, 0).sum(0) / np.maximum(valid.sum(0), 1)
    return rgb, mean_depth, len(data)


def test_mean_of_the_other_episodes_windows(store):
    window = WindowLayout(future_frames=2, frame_stride=2)
    progress = RecordingProgress()
    frames = mean_future_frames(store, window, ["a", "b"], exclude=[1], progress=progress)
    rgb, depth, count = by_hand(store, window, [0, 2])
    assert frames is not None and frames.windows == count and frames.episodes == [0, 2]
    bar = progress.tasks["mean-frame baseline"]
    assert bar["total"] == bar["done"] == count
    assert frames.rgb.shape == (2, 3, 16, 16, 3) and frames.rgb.dtype == np.float32
    np.testing.assert_allclose(frames.rgb, rgb, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(frames.depth, depth, rtol=1e-5, atol=1e-6)
    # the excluded episode matters: its windows would change the mean
    with_it = mean_future_frames(store, window, ["a", "b"], exclude=[])
    assert with_it is not None and not np.allclose(with_it.rgb, frames.rgb)


def test_invalid_depth_is_left_out_of_the_mean(store, monkeypatch):
    window = WindowLayout(future_frames=1, frame_stride=1)
    original = WindowDataset.__getitem__

    def holes(self, index):  # every pixel of view "a" invalid in the even windows
        item = dict(original(self, index))
        if index % 2 == 0:
            depth = np.array(item["depth"], copy=True)
            depth[0] = 0
            item["depth"] = depth
        return item

    monkeypatch.setattr(WindowDataset, "__getitem__", holes)
    frames = mean_future_frames(store, window, ["a", "b"], exclude=[1, 2])
    data = WindowDataset(store, window, views=["a", "b"], episodes=[0], normalize=False)
    odd = np.mean([np.asarray(data[i]["depth"], np.float64)[0] for i in range(1, len(data), 2)], axis=0)
    assert frames is not None
    np.testing.assert_allclose(frames.depth[0], odd, rtol=1e-5)  # not pulled towards 0 by the holes


def test_at_most_max_windows_evenly_spaced_and_none_without_other_episodes(store, monkeypatch):
    window = WindowLayout(future_frames=2, frame_stride=2)
    monkeypatch.setattr(mean_frame, "MAX_WINDOWS", 3)  # the cap, small enough for this store
    frames = mean_future_frames(store, window, ["a", "b"], exclude=[])
    count = len(WindowDataset(store, window, episodes=[0, 1, 2]))
    rows = np.unique(np.linspace(0, count - 1, 3).round().astype(int)).tolist()
    rgb, _, _ = by_hand(store, window, [0, 1, 2], rows)
    assert frames is not None and frames.windows == 3 and rows[0] == 0 and rows[-1] == count - 1
    np.testing.assert_allclose(frames.rgb, rgb, rtol=1e-5, atol=1e-4)
    assert mean_future_frames(store, window, ["a", "b"], exclude=[0, 1, 2]) is None
    # episodes too short for one window give none: no baseline rather than a refusal of the store
    assert (
        mean_future_frames(store, WindowLayout(future_frames=4, frame_stride=2), ["a", "b"], exclude=[])
        is None
    )
