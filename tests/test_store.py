"""The episode store: LeRobot v3 layout, exact round trip, stats, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import SyntheticSource, read_episode, synthetic_episode, write_store
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.store import StoreWriter
from xwam_core.errors import DataError


def test_layout_is_lerobot_v3(synthetic_store):
    path, episodes = synthetic_store
    info = json.loads((path / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["total_episodes"] == 3 and info["total_frames"] == 60 and info["total_tasks"] == 2
    for key in (
        "observation.images.front",
        "observation.depth.side",
        "observation.cameras.front.intrinsics",
        "observation.cameras.side.extrinsics",
        "observation.state",
        "action",
        "timestamp",
        "frame_index",
        "episode_index",
        "index",
        "task_index",
    ):
        assert key in info["features"], key
    assert (path / "meta" / "tasks.parquet").is_file()
    assert (path / "meta" / "episodes" / "chunk-000" / "file-000.parquet").is_file()
    table = pq.read_table(path / "data" / "chunk-000" / "file-000.parquet")
    assert set(table.column_names) == set(info["features"])
    assert table.num_rows == 60
    # Hugging Face datasets (LeRobot's reader) decodes the images from the schema's metadata
    import datasets

    ds = datasets.Dataset.from_parquet(str(path / "data" / "chunk-000" / "file-000.parquet"))
    img = ds[5]["observation.images.front"]
    np.testing.assert_array_equal(np.asarray(img), episodes[0].views["front"].rgb[5])


def test_round_trip_exact(synthetic_store):
    path, episodes = synthetic_store
    store = EpisodeStore(path)
    assert store.views == ["front", "side"] and store.tasks == ["reach", "push"]
    for i, original in enumerate(episodes):
        back = read_episode(store, i)
        assert back.task == original.task and back.success == original.success
        np.testing.assert_array_equal(back.state, original.state)
        np.testing.assert_array_equal(back.action, original.action)
        for v in store.views:
            np.testing.assert_array_equal(back.views[v].rgb, original.views[v].rgb)
            np.testing.assert_allclose(back.views[v].depth, original.views[v].depth, atol=0.0005 + 1e-6)
            np.testing.assert_array_equal(back.views[v].intrinsics, original.views[v].intrinsics)
            np.testing.assert_array_equal(back.views[v].extrinsics, original.views[v].extrinsics)


def test_stats_match_numpy(synthetic_store):
    path, episodes = synthetic_store
    stats = EpisodeStore(path).stats
    actions = np.concatenate([e.action for e in episodes])
    for name, ref in (
        ("min", actions.min(0)),
        ("max", actions.max(0)),
        ("mean", actions.mean(0)),
        ("std", actions.std(0)),
        ("q01", np.quantile(actions, 0.01, axis=0)),
        ("q99", np.quantile(actions, 0.99, axis=0)),
    ):
        np.testing.assert_allclose(stats["action"][name], ref, rtol=1e-5, atol=1e-6, err_msg=name)
    assert "observation.state" in stats and "observation.images.front" in stats
    assert np.asarray(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)


def test_existing_store_not_replaced_without_overwrite(synthetic_store):
    path, _ = synthetic_store
    before = sorted(p.name for p in path.rglob("*"))
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        StoreWriter(path, SyntheticSource().info())
    assert sorted(p.name for p in path.rglob("*")) == before
    # with overwrite the new store replaces the old one whole
    write_overwrite = StoreWriter(path, SyntheticSource(episodes=1).info(), overwrite=True)
    with write_overwrite as w:
        for ep in SyntheticSource(episodes=1).episodes():
            w.add(ep)
    assert EpisodeStore(path).info["total_episodes"] == 1
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("defect", ["nan_action", "frame_mismatch", "image_size", "state_dim"])
def test_bad_episode_leaves_nothing(tmp_path, defect):
    source = SyntheticSource(episodes=2)
    rng = np.random.default_rng(0)
    good = synthetic_episode(rng, 20, (32, 40), ["front", "side"], "reach")
    bad = synthetic_episode(rng, 20, (32, 40), ["front", "side"], "reach")
    if defect == "nan_action":
        bad.action[7, 2] = np.nan
        expected = "action has NaN/inf at frame 7"
    elif defect == "frame_mismatch":
        bad.views["side"].rgb = bad.views["side"].rgb[:-1]
        expected = "view 'side' has 19 frames, expected 20"
    elif defect == "image_size":
        bad = synthetic_episode(rng, 20, (16, 40), ["front", "side"], "reach")
        expected = "images are"
    else:
        bad.state = np.zeros((20, 5), np.float32)
        expected = "observation.state has 5 dimensions, expected 8"
    out = tmp_path / "store"
    with pytest.raises(DataError, match=expected), StoreWriter(out, source.info()) as writer:
        writer.add(good)
        writer.add(bad)
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_folders_are_made_and_removed_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "store"
    write_store(out, SyntheticSource(episodes=1))
    assert EpisodeStore(out).info["total_episodes"] == 1
    failed = tmp_path / "c" / "d" / "store"
    with pytest.raises(KeyboardInterrupt), StoreWriter(failed, SyntheticSource().info()):
        raise KeyboardInterrupt
    assert not (tmp_path / "c").exists()


def test_interrupt_leaves_nothing(tmp_path):
    source = SyntheticSource(episodes=3)
    out = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt), StoreWriter(out, source.info()) as writer:
        for i, ep in enumerate(source.episodes()):
            writer.add(ep)
            if i == 1:
                raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_store_without_depth_or_cameras(tmp_path):
    path = tmp_path / "store"
    write_store(path, SyntheticSource(episodes=1, depth=False, cameras=False))
    store = EpisodeStore(path)
    assert not store.has_depth and not store.has_cameras
    assert "observation.depth.front" not in store.info["features"]
    ep = read_episode(store, 0)
    assert ep.views["front"].depth is None and ep.views["front"].intrinsics is None


@pytest.mark.parametrize("damage", ["missing", "bad_json", "not_xwam"])
def test_reader_rejects_broken_store(synthetic_store, damage):
    path, _ = synthetic_store
    info = path / "meta" / "info.json"
    if damage == "missing":
        info.unlink()
        expected = "info.json: missing"
    elif damage == "bad_json":
        info.write_text("{ not json")
        expected = "not valid JSON"
    else:
        data = json.loads(info.read_text())
        data.pop("xwam")
        info.write_text(json.dumps(data))
        expected = "not an xwam store"
    with pytest.raises(DataError, match=expected):
        EpisodeStore(path)
    with pytest.raises(DataError, match="store not found"):
        EpisodeStore(path.parent / "nope")
