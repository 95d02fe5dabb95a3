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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


# AV1 at LeRobot's crf 30 on the synthetic images (saturated colour stripes a few pixels wide, 32x40):
# measured 30.4 dB; Meta-World renders give 34 dB (docs/data.md)
MIN_PSNR = 28.0


def test_layout_is_lerobot_v3(synthetic_store):
    path, episodes = synthetic_store
    info = json.loads((path / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["xwam"]["store_format"] == 2
    assert info["total_episodes"] == 3 and info["total_frames"] == 60 and info["total_tasks"] == 2
    for key in (
        "observation.images.front",
        "observation.depth.side",
        "observation.state",
        "action",
        "timestamp",
        "frame_index",
        "episode_index",
        "index",
        "task_index",
    ):
        assert key in info["features"], key
    assert info["features"]["observation.images.front"]["dtype"] == "video"
    assert info["features"]["observation.images.front"]["info"]["video.codec"] == "av1"
    # the synthetic cameras never move: stored once per episode, not per frame
    assert info["xwam"]["moving_views"] == []
    assert not any(k.startswith("observation.cameras.") for k in info["features"])
    assert (path / "meta" / "tasks.parquet").is_file()
    episodes_meta = pq.read_table(path / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
    for i, row in enumerate(episodes_meta):
        video = path / info["video_path"].format(
            video_key="observation.images.side",
            chunk_index=row["videos/observation.images.side/chunk_index"],
            file_index=row["videos/observation.images.side/file_index"],
        )
        assert (
            video == path / f"videos/observation.images.side/chunk-000/file-{i:03d}.mp4" and video.is_file()
        )
        assert row["videos/observation.images.side/to_timestamp"] == pytest.approx(20 / 20.0)
        assert row["meta/episodes/chunk_index"] == 0 and row["meta/episodes/file_index"] == 0
        assert row["cameras/front/intrinsics"] == episodes[i].views["front"].intrinsics[0].reshape(9).tolist()
        assert np.asarray(row["stats/observation.images.front/mean"]).shape == (3, 1, 1)
        assert row["stats/action/count"] == [20]
        np.testing.assert_allclose(row["stats/action/max"], episodes[i].action.max(0), rtol=1e-6)
    table = pq.read_table(path / "data" / "chunk-000" / "file-000.parquet")
    assert set(table.column_names) == {k for k, f in info["features"].items() if f["dtype"] != "video"}
    assert table.num_rows == 60
    # Hugging Face datasets (LeRobot's reader) decodes the depth images from the schema's metadata
    import datasets

    ds = datasets.Dataset.from_parquet(str(path / "data" / "chunk-000" / "file-000.parquet"))
    depth = np.asarray(ds[5]["observation.depth.front"])
    np.testing.assert_array_equal(depth, np.rint(episodes[0].views["front"].depth[5] * 1000))


def test_round_trip(synthetic_store):
    """RGB within the codec's tolerance, depth exact to the millimetre, everything else exact."""
    path, episodes = synthetic_store
    store = EpisodeStore(path)
    assert store.views == ["front", "side"] and store.tasks == ["reach", "push"]
    for i, original in enumerate(episodes):
        back = read_episode(store, i)
        assert back.task == original.task and back.success == original.success
        np.testing.assert_array_equal(back.state, original.state)
        np.testing.assert_array_equal(back.action, original.action)
        for v in store.views:
            assert back.views[v].rgb.shape == original.views[v].rgb.shape
            assert psnr(back.views[v].rgb, original.views[v].rgb) > MIN_PSNR
            np.testing.assert_allclose(back.views[v].depth, original.views[v].depth, atol=0.0005 + 1e-6)
            np.testing.assert_array_equal(back.views[v].intrinsics, original.views[v].intrinsics)
            np.testing.assert_array_equal(back.views[v].extrinsics, original.views[v].extrinsics)


def test_full_colour_video_option(tmp_path):
    """`h264-444` keeps every pixel's colour (4:4:4) and records how it was coded; it decodes closer to the
    truth than LeRobot's 4:2:0 AV1 on the synthetic stripes, and a lower crf closer still."""
    from xwam_core.data.video import store_video

    source = SyntheticSource(episodes=1)
    (episode,) = list(source.episodes())
    quality = {}
    for name, video in {
        "av1": store_video(),
        "444": store_video("h264-444"),
        "444_crf30": store_video("h264-444", 30),
    }.items():
        with StoreWriter(tmp_path / name, source.info(), video=video) as writer:
            writer.add(episode)
        info = json.loads((tmp_path / name / "meta" / "info.json").read_text())
        feature = info["features"]["observation.images.front"]["info"]
        assert info["xwam"]["video_crf"] == video.crf and feature["video.pix_fmt"] == video.pix_fmt
        back = read_episode(EpisodeStore(tmp_path / name), 0)
        quality[name] = psnr(back.views["front"].rgb, episode.views["front"].rgb)
    assert store_video("h264-444").pix_fmt == "yuv444p" and store_video().crf == 30
    assert quality["444"] > quality["444_crf30"] and quality["444"] > quality["av1"] + 3, quality
    with pytest.raises(DataError, match=r"prepare.video='vp9': expected one of \['av1', 'h264-444'\]"):
        store_video("vp9")
    with pytest.raises(DataError, match=r"prepare.video_crf=60: expected 1..51 for libx264"):
        store_video("h264-444", 60)


def test_format_1_still_written_and_read_exactly(tmp_path):
    source = SyntheticSource(episodes=2)
    episodes = list(source.episodes())
    with StoreWriter(tmp_path / "v1", source.info(), store_format=1) as writer:
        for ep in episodes:
            writer.add(ep)
    store = EpisodeStore(tmp_path / "v1")
    assert store.store_format == 1 and store.video_files() == [] and store.moving_views == store.views
    for i, original in enumerate(episodes):
        back = read_episode(store, i)
        for v in store.views:
            np.testing.assert_array_equal(back.views[v].rgb, original.views[v].rgb)
            np.testing.assert_array_equal(back.views[v].extrinsics, original.views[v].extrinsics)
    # a store written before format 2 existed has no store_format: read as format 1
    info_path = tmp_path / "v1" / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    del info["xwam"]["store_format"]
    info_path.write_text(json.dumps(info))
    assert EpisodeStore(tmp_path / "v1").store_format == 1
    with pytest.raises(DataError, match="store_format=3: expected one of"):
        StoreWriter(tmp_path / "v3", source.info(), store_format=3)


def test_moving_cameras_per_frame_static_once_per_episode(tmp_path):
    source = SyntheticSource(episodes=2)
    episodes = list(source.episodes())
    for ep in episodes:  # the side camera moves along x during each episode (a wrist camera)
        ep.views["side"].extrinsics[:, 0, 3] += np.linspace(0, 0.2, ep.length, dtype=np.float32)
    write_store_of(tmp_path / "s", source, episodes)
    info = json.loads((tmp_path / "s" / "meta" / "info.json").read_text())
    assert info["xwam"]["moving_views"] == ["side"]
    assert info["features"]["observation.cameras.side.extrinsics"]["shape"] == [16]  # flat, not Array2D
    assert "observation.cameras.front.extrinsics" not in info["features"]
    store = EpisodeStore(tmp_path / "s")
    cache = store.frame_cache()
    for i, ep in enumerate(episodes):
        frames = slice(store.episodes[i].start, store.episodes[i].start + ep.length)
        np.testing.assert_array_equal(cache.extrinsics["side"][frames], ep.views["side"].extrinsics)
        np.testing.assert_array_equal(cache.extrinsics["front"][frames], ep.views["front"].extrinsics)
        np.testing.assert_array_equal(cache.intrinsics["front"][frames], ep.views["front"].intrinsics)
    # a view that was static in the first episode and moves later: one line naming it and the fix
    later = list(SyntheticSource(episodes=2).episodes())
    later[1].views["front"].extrinsics[5, 1, 3] = 1.0
    with pytest.raises(DataError, match=r"episode 1 .*view 'front' moves.*moving_views"):
        write_store_of(tmp_path / "t", SyntheticSource(episodes=2), later)
    assert not (tmp_path / "t").exists()


def write_store_of(path, source, episodes):
    with StoreWriter(path, source.info()) as writer:
        for ep in episodes:
            writer.add(ep)


def test_depth_beyond_int16_is_invalid_not_wrapped(tmp_path):
    """LeRobot reads 16-bit PNG depth as int16: nothing above 32767 mm is stored (0 = invalid)."""
    source = SyntheticSource(episodes=1)
    (ep,) = source.episodes()
    ep.views["front"].depth[4, :4] = 40.0  # 40 m: would read as -25536 mm in an int16 tensor
    ep.views["front"].depth[4, 4:8] = 32.767  # (frame 4, rows 0 and 4: in the statistics' subsample)
    write_store_of(tmp_path / "s", source, [ep])
    back = read_episode(EpisodeStore(tmp_path / "s"), 0).views["front"].depth
    assert (back[4, :4] == 0).all() and np.allclose(back[4, 4:8], 32.767)
    stats = EpisodeStore(tmp_path / "s").stats["observation.depth.front"]
    assert stats["max"] == [
        [[32767.0]]
    ]  # millimetres: the unit of the stored depth (and of LeRobot's tensor)


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
    depth_mm = np.concatenate(
        [np.rint(e.views["front"].depth[::4, ::4, ::4] * 1000).reshape(-1) for e in episodes]
    )
    np.testing.assert_allclose(stats["observation.depth.front"]["mean"], [[[depth_mm.mean()]]], rtol=1e-6)


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
