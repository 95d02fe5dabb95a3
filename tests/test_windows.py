"""Training windows over a store: frames, actions and states they span, normalization, loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import SyntheticSource, write_store
from xwam_core.data.frame_cache import cache_folder
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout, make_loader, split_episodes
from xwam_core.errors import DataError
from xwam_core.normalizer import QuantileNormalizer


def test_window_contents_match_episode(synthetic_store):
    path, episodes = synthetic_store
    layout = WindowLayout(future_frames=4, frame_stride=3)  # 13 store frames per window, K = 12
    ds = WindowDataset(path, layout, views=["side", "front"], normalize=False)
    assert len(ds) == 3 * (20 - 13 + 1)
    item = ds[len(ds) - 1]  # last window of the last episode: starts at local frame 7
    ep = episodes[2]
    frames = 7 + np.arange(5) * 3
    assert item["rgb"].shape == (2, 5, 32, 40, 3) and item["rgb"].dtype == np.uint8
    np.testing.assert_array_equal(item["rgb"][0], ep.views["side"].rgb[frames])
    np.testing.assert_array_equal(item["rgb"][1], ep.views["front"].rgb[frames])
    np.testing.assert_allclose(item["depth"][1], ep.views["front"].depth[frames], atol=5e-4 + 1e-6)
    np.testing.assert_array_equal(item["extrinsics"][0], ep.views["side"].extrinsics[frames])
    np.testing.assert_array_equal(item["actions"], ep.action[7:19])
    np.testing.assert_array_equal(item["states"], ep.state[frames])
    assert int(item["episode_index"]) == 2 and int(item["frame_index"]) == 7
    assert int(item["task_index"]) == EpisodeStore(path).tasks.index(ep.task)


def test_normalization_is_the_quantile_map(synthetic_store):
    path, _ = synthetic_store
    raw = WindowDataset(path, WindowLayout(2, 2), normalize=False)[4]
    norm = WindowDataset(path, WindowLayout(2, 2))[4]
    stats = EpisodeStore(path).stats
    q01, q99 = np.asarray(stats["action"]["q01"]), np.asarray(stats["action"]["q99"])
    expected = 2 * (raw["actions"] - q01) / (q99 - q01) - 1
    np.testing.assert_allclose(norm["actions"], expected, rtol=1e-5, atol=1e-5)
    back = QuantileNormalizer(q01, q99).denormalize(torch.from_numpy(norm["actions"]))
    torch.testing.assert_close(back, torch.from_numpy(raw["actions"]), rtol=1e-5, atol=1e-5)


def test_constant_dimension_normalizes_to_zero_and_back():
    n = QuantileNormalizer(np.array([0.0, 2.0]), np.array([1.0, 2.0]))
    x = np.array([[0.5, 2.0]], np.float32)
    y = n.normalize(x)
    np.testing.assert_allclose(y, [[0.0, 0.0]])
    np.testing.assert_allclose(n.denormalize(y), x)


def test_loader_with_workers_batches(synthetic_store):
    path, _ = synthetic_store
    ds = WindowDataset(path, WindowLayout(2, 2))
    loader = make_loader(ds, batch_size=4, num_workers=2, seed=0)
    batches = list(loader)
    assert len(batches) == len(ds) // 4
    assert batches[0]["rgb"].shape == (4, 2, 3, 32, 40, 3)
    assert batches[0]["rgb"].dtype == torch.uint8 and batches[0]["depth"].dtype == torch.float32
    assert batches[0]["actions"].shape == (4, 4, 4) and batches[0]["states"].shape == (4, 3, 8)
    assert batches[0]["task_index"].shape == (4,) and batches[0]["has_depth"].dtype == torch.bool
    # same seed, same order
    again = next(iter(make_loader(ds, batch_size=4, num_workers=0, seed=0)))
    torch.testing.assert_close(again["actions"], batches[0]["actions"])


def test_store_without_depth_gives_masks(tmp_path):
    path = tmp_path / "s"
    write_store(path, SyntheticSource(episodes=1, depth=False, cameras=False))
    item = WindowDataset(path, WindowLayout(2, 2))[0]
    assert not bool(item["has_depth"]) and not bool(item["has_cameras"])
    assert float(np.abs(item["depth"]).sum()) == 0.0


def test_window_errors(synthetic_store):
    path, _ = synthetic_store
    with pytest.raises(DataError, match=r"has no view\(s\) \['top'\]"):
        WindowDataset(path, views=["top"])
    with pytest.raises(DataError, match="no episode is long enough"):
        WindowDataset(path, WindowLayout(future_frames=8, frame_stride=4))
    with pytest.raises(DataError, match="val_episodes=3"):
        split_episodes(EpisodeStore(path), 3)
    train, val = split_episodes(EpisodeStore(path), 1)
    assert train == [0, 1] and val == [2]
    train, val = split_episodes(EpisodeStore(path), 2)  # tasks reach, push, reach: one of each held out
    assert train == [0] and val == [1, 2]


def test_frame_cache_is_built_once_and_atomically(synthetic_store, tmp_path, monkeypatch):
    path, _ = synthetic_store
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    WindowDataset(path, WindowLayout(2, 2))
    cache = cache_folder(EpisodeStore(path))
    assert cache.is_relative_to(tmp_path / "cache") and (cache / "done.json").is_file()
    assert not (path / "cache").exists()  # the store itself is only read
    stamp = (cache / "done.json").stat().st_mtime_ns
    WindowDataset(path, WindowLayout(2, 2))
    assert (cache / "done.json").stat().st_mtime_ns == stamp
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")]
