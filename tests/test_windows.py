"""Training windows over a store: frames, actions and states they span, normalization, loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SyntheticSource, read_episode, write_store
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
    decoded = read_episode(EpisodeStore(path), 2)  # RGB: the video's frames (the codec is lossy)
    np.testing.assert_array_equal(item["rgb"][0], decoded.views["side"].rgb[frames])
    np.testing.assert_array_equal(item["rgb"][1], decoded.views["front"].rgb[frames])
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


# ---- windows at episode ends (data.pad_episode_ends) ------------------------------------------------
OLD_KEYS = {  # an item's keys before the padding masks existed
    "rgb", "depth", "intrinsics", "extrinsics", "actions", "states", "has_depth", "has_cameras",
    "task_index", "episode_index", "frame_index",
}  # fmt: skip


def test_window_count_with_and_without_padding(synthetic_store):
    path, _ = synthetic_store
    layout = WindowLayout(future_frames=4, frame_stride=3)  # span 13
    padded = WindowDataset(path, layout, pad_episode_ends=True)
    assert len(padded) == 3 * 20  # a window at every frame
    assert padded.windows[:, 2].tolist() == list(range(20)) * 3
    full = WindowDataset(path, layout)  # the class's default: full windows only
    assert not full.pad_episode_ends and len(full) == 3 * (20 - 13 + 1)
    assert len(WindowDataset(path, layout, pad_episode_ends=False)) == len(full)
    # padding fills windows' ends, but a layout longer than every episode is refused either way (a stride
    # meant for another frame rate, not something to pad)
    for pad in (True, False):
        with pytest.raises(DataError, match="no episode is long enough for a window of 33 frames"):
            WindowDataset(path, WindowLayout(8, 4), pad_episode_ends=pad)


def test_window_at_the_last_frame_repeats_it(synthetic_store):
    path, episodes = synthetic_store
    layout = WindowLayout(future_frames=4, frame_stride=3)
    ds = WindowDataset(path, layout, views=["side", "front"], normalize=False, pad_episode_ends=True)
    item = ds[len(ds) - 1]  # episode 2, local frame 19: its last
    ep = episodes[2]
    assert int(item["frame_index"]) == 19 and int(item["episode_index"]) == 2
    decoded = read_episode(EpisodeStore(path), 2)
    for j, v in enumerate(["side", "front"]):
        np.testing.assert_array_equal(item["rgb"][j], np.repeat(decoded.views[v].rgb[19:20], 5, 0))
        np.testing.assert_array_equal(item["extrinsics"][j], np.repeat(ep.views[v].extrinsics[19:20], 5, 0))
        assert (item["depth"][j] == item["depth"][j, :1]).all()
    np.testing.assert_array_equal(item["states"], np.repeat(ep.state[19:20], 5, 0))
    np.testing.assert_array_equal(item["actions"], np.repeat(ep.action[19:20], 12, 0))  # the last action
    assert item["action_is_pad"].dtype == bool and item["action_is_pad"].shape == (12,)
    assert item["action_is_pad"].all()
    assert item["state_is_pad"].tolist() == [False, True, True, True, True]


def test_a_window_with_r_real_steps_has_r_real_actions(synthetic_store):
    path, episodes = synthetic_store
    layout = WindowLayout(future_frames=4, frame_stride=3)  # K = 12
    ds = WindowDataset(path, layout, views=["front"], normalize=False, pad_episode_ends=True)
    ep, last = episodes[1], 19
    decoded = read_episode(EpisodeStore(path), 1)
    for row in np.nonzero(ds.windows[:, 0] == 1)[0]:
        item = ds[int(row)]
        s = int(item["frame_index"])
        r = min(12, last - s)  # actions whose outcome frame is in the episode
        assert int((~item["action_is_pad"]).sum()) == r
        assert not item["action_is_pad"][:r].any() and item["action_is_pad"][r:].all()
        np.testing.assert_array_equal(item["actions"][:r], ep.action[s : s + r])
        np.testing.assert_array_equal(item["actions"][r:], np.repeat(ep.action[last:], 12 - r, 0))
        local = s + np.arange(5) * 3
        assert item["state_is_pad"].tolist() == (local > last).tolist()
        clamped = np.minimum(local, last)
        np.testing.assert_array_equal(item["states"], ep.state[clamped])
        np.testing.assert_array_equal(item["rgb"][0], decoded.views["front"].rgb[clamped])
        np.testing.assert_array_equal(item["intrinsics"][0], ep.views["front"].intrinsics[clamped])


def test_without_padding_items_are_the_old_items(synthetic_store):
    """pad_episode_ends=False: every item equals what the code before the padding gave (computed here the
    old way, from the cache's arrays: contiguous frames and actions), bit for bit; masks all False."""
    path, _ = synthetic_store
    layout = WindowLayout(future_frames=3, frame_stride=2)
    for normalize in (False, True):
        ds = WindowDataset(path, layout, normalize=normalize, pad_episode_ends=False)
        padded = WindowDataset(path, layout, normalize=normalize, pad_episode_ends=True)
        cache, store = ds.cache, ds.store
        assert len(ds) == 3 * (20 - 7 + 1)
        for i in range(len(ds)):
            item = ds[i]
            assert set(item) == OLD_KEYS | {"action_is_pad", "state_is_pad"}
            assert not item["action_is_pad"].any() and not item["state_is_pad"].any()
            episode, start, local = (int(x) for x in ds.windows[i])
            frames = start + np.arange(4) * 2
            actions = cache.action[start : start + 6]
            states = cache.state[frames]
            if normalize:
                actions = ds.normalizer.action.normalize(actions)
                states = ds.normalizer.state.normalize(states)
            expected = {
                "rgb": np.stack([cache.rgb(v, frames) for v in store.views]),
                "depth": np.stack([cache.depth_mm(v, frames) * np.float32(0.001) for v in store.views]),
                "intrinsics": np.stack([cache.cameras(v, frames, episode)[0] for v in store.views]),
                "extrinsics": np.stack([cache.cameras(v, frames, episode)[1] for v in store.views]),
                "actions": np.ascontiguousarray(actions, dtype=np.float32),
                "states": np.ascontiguousarray(states, dtype=np.float32),
            }
            for key, value in expected.items():
                assert item[key].dtype == value.dtype and item[key].shape == value.shape, key
                assert item[key].tobytes() == value.tobytes(), key
            assert (item["episode_index"], item["frame_index"]) == (episode, local)
            # the same window with padding on is the same item
            same = padded[int(np.nonzero((padded.windows == ds.windows[i]).all(1))[0][0])]
            for key in OLD_KEYS:
                assert np.asarray(same[key]).tobytes() == np.asarray(item[key]).tobytes(), key


def test_loader_batches_the_padding_masks(synthetic_store):
    path, _ = synthetic_store
    ds = WindowDataset(path, WindowLayout(2, 2), pad_episode_ends=True)
    batch = next(iter(make_loader(ds, batch_size=5, num_workers=0, shuffle=False)))
    assert batch["action_is_pad"].dtype == torch.bool and batch["action_is_pad"].shape == (5, 4)
    assert batch["state_is_pad"].dtype == torch.bool and batch["state_is_pad"].shape == (5, 3)


def test_recipe_setting_pad_episode_ends():
    from xwam_core.errors import RecipeError
    from xwam_core.recipe import DataConfig, load_recipe

    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.toml"
    assert load_recipe(tiny).data.pad_episode_ends is True
    assert load_recipe(tiny, ["data.pad_episode_ends=false"]).data.pad_episode_ends is False
    with pytest.raises(RecipeError, match="pad_episode_ends") as err:
        load_recipe(tiny, ["data.pad_episode_ends=1"])
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=r"data\.pad_episode_ends.*true or false") as err:
        DataConfig(pad_episode_ends="yes").validate()  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


# ---- a store decoded in the loader, the index at scale ------------------------------------------------
def test_decoding_in_the_loader_gives_the_cached_items(synthetic_store):
    """frame_cache="off" (large stores): video and depth PNGs decoded per window, items identical to the
    decoded-frame cache's; only the per-frame arrays are cached (memory-mapped, outside the store)."""
    path, _ = synthetic_store
    layout = WindowLayout(future_frames=4, frame_stride=3)
    cached = WindowDataset(path, layout, pad_episode_ends=True, frame_cache="on")
    decoded = WindowDataset(path, layout, pad_episode_ends=True, frame_cache="off")
    assert cached.decoded and not decoded.decoded and decoded.decoder is not None
    assert not (decoded.cache.path / "rgb.front.npy").exists()
    for i in [0, 5, 19, 33, 59, 21, 2]:  # forwards, backwards, episode ends (clamped frames)
        a, b = cached[i], decoded[i]
        for key in a:
            assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), (i, key)
    assert isinstance(np.load(decoded.cache.path / "state.npy", mmap_mode="r"), np.memmap)
    with pytest.raises(DataError, match="frame_cache 'maybe'"):
        WindowDataset(path, layout, frame_cache="maybe")


def test_a_window_decodes_each_wanted_frame_from_its_keyframe(synthetic_store, monkeypatch):
    """With the store's keyframe every 2 frames, a frame costs at most 2 decodes wherever the window lies,
    also when the loader jumps back to an earlier window (reopen, then seek: not decode from the start)."""
    from xwam_core.data import video as video_mod
    from xwam_core.data.decode import StoreDecoder
    from xwam_core.data.reader import EpisodeStore

    decoded: list[float] = []
    real_peek = video_mod.VideoReader._peek

    def counting_peek(self):
        fresh = self._pending is None
        item = real_peek(self)
        if fresh and item is not None:
            decoded.append(round(item[0] * self.fps))
        return item

    monkeypatch.setattr(video_mod.VideoReader, "_peek", counting_peek)
    path, episodes = synthetic_store
    decoder = StoreDecoder(EpisodeStore(path))
    for start in (8, 1, 6, 5, 0):  # forwards and backwards in one episode, even and odd frames
        frames = start + 3 * np.arange(4)
        decoded.clear()
        rgb = decoder.rgb("front", 0, frames)
        assert rgb.shape == (4, *episodes[0].views["front"].rgb.shape[1:])
        expected = [f - f % 2 + k for f in frames for k in range(f % 2 + 1)]  # keyframe, then the frame
        assert decoded == expected, (start, decoded)


def test_window_index_is_per_episode_counts():
    from xwam_core.data.window_index import WindowIndex

    lengths = np.array([5, 2, 7, 3])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    full = WindowIndex(np.array([2, 0, 1, 3]), lengths, starts, span=3, pad=False)
    expected = [(e, starts[e] + s, s) for e in (2, 0, 1, 3) for s in range(lengths[e] - 3 + 1)]
    assert full.array().tolist() == [list(map(int, row)) for row in expected]
    padded = WindowIndex(np.arange(4), lengths, starts, span=3, pad=True)
    assert len(padded) == lengths.sum() and padded.array()[:, 1].tolist() == list(range(lengths.sum()))
    with pytest.raises(IndexError):
        padded.locate(int(lengths.sum()))


def test_split_episodes_round_robin_over_tasks(tmp_path):
    path = tmp_path / "s"
    write_store(path, SyntheticSource(episodes=7, length=6, tasks=("a", "b", "c")))  # a b c a b c a
    store = EpisodeStore(path)
    assert split_episodes(store, 0) == (list(range(7)), [])
    assert split_episodes(store, 1)[1] == [6]  # task a's newest is the newest
    assert split_episodes(store, 3)[1] == [4, 5, 6]
    assert split_episodes(store, 4)[1] == [3, 4, 5, 6]  # then a's episode before it
    assert split_episodes(store, 6)[1] == [1, 2, 3, 4, 5, 6]
