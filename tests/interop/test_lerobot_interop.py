"""LeRobot's own code on xwam's stores, in LeRobot's own environment (`nox -s lerobot_interop`).

LeRobot's released package pins an older torch, so it is not part of xwam's environment: this file is
skipped unless `lerobot` (and `torchcodec`, LeRobot's video decoder: torchvision 0.29 has no video
reader) import. The session installs lerobot with --no-deps beside xwam's own dependencies.

Shown here: LeRobotDataset reads a format-2 store frame by frame (RGB within the AV1 codec's tolerance,
depth exact, state, action and moving cameras exact); LeRobot's delete_episodes and merge_datasets work on
it and xwam imports their output; a dataset written by LeRobot's own writer with 3x3/4x4 camera columns
imports into xwam.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lerobot", reason="lerobot is not installed here: run `nox -s lerobot_interop`")
pytest.importorskip("torchcodec", reason="torchcodec (LeRobot's video decoder) is not installed here")

from lerobot.datasets.dataset_tools import delete_episodes, merge_datasets
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from tests.conftest import SyntheticSource
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.sources.lerobot import LeRobotSource
from xwam_core.data.store import StoreWriter
from xwam_core.data.video import store_video

MIN_PSNR = 28.0  # AV1 crf 30 on the synthetic stripes (tests/test_store.py)
DECODER_MAX_DIFF = 3  # LeRobot's decoder (FFmpeg through torchcodec) vs xwam's (PyAV): YUV->RGB rounding


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """LeRobot and datasets keep their caches in the test's folder and never reach the hub."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def xwam_store(path: Path, seed: int = 0, video=None):
    """3 episodes, views front (fixed camera) and side (moving: a wrist camera), depth."""
    source = SyntheticSource(episodes=3, length=12, seed=seed)
    episodes = list(source.episodes())
    for ep in episodes:
        ep.views["side"].extrinsics[:, 0, 3] += np.linspace(0, 0.2, ep.length, dtype=np.float32)
    with StoreWriter(path, source.info(), video=video) as writer:
        for ep in episodes:
            writer.add(ep)
    return episodes


def check_lerobot_reads(dataset: LeRobotDataset, episodes, xwam_decoded) -> None:
    starts = np.cumsum([0] + [e.length for e in episodes])
    assert len(dataset) == starts[-1]
    for i, ep in enumerate(episodes):
        for t in range(ep.length):
            item = dataset[int(starts[i] + t)]
            assert int(item["episode_index"]) == i and int(item["frame_index"]) == t
            np.testing.assert_array_equal(item["action"].numpy(), ep.action[t])
            np.testing.assert_array_equal(item["observation.state"].numpy(), ep.state[t])
            for v in ("front", "side"):
                rgb = np.rint(item[f"observation.images.{v}"].numpy().transpose(1, 2, 0) * 255)
                assert psnr(rgb, ep.views[v].rgb[t]) > MIN_PSNR
                assert np.abs(rgb - xwam_decoded[i].views[v].rgb[t]).max() <= DECODER_MAX_DIFF
                depth = item[f"observation.depth.{v}"].numpy()  # int16 millimetres, (1, H, W)
                np.testing.assert_array_equal(depth[0], np.rint(ep.views[v].depth[t] * 1000))
            k = item["observation.cameras.side.intrinsics"].numpy().reshape(3, 3)
            x = item["observation.cameras.side.extrinsics"].numpy().reshape(4, 4)
            np.testing.assert_array_equal(k, ep.views["side"].intrinsics[t])
            np.testing.assert_array_equal(x, ep.views["side"].extrinsics[t])


def test_lerobot_reads_a_format_2_store_frame_exactly(tmp_path):
    episodes = xwam_store(tmp_path / "store")
    store = EpisodeStore(tmp_path / "store")
    decoded = [store.read_episode(i) for i in range(3)]
    dataset = LeRobotDataset("xwam/store", root=tmp_path / "store")
    check_lerobot_reads(dataset, episodes, decoded)


def test_lerobot_reads_a_full_colour_store(tmp_path):
    """`xwam prepare --video h264-444` (the demo's store): H.264 4:4:4, which LeRobot's decoder reads."""
    episodes = xwam_store(tmp_path / "store", video=store_video("h264-444"))
    store = EpisodeStore(tmp_path / "store")
    decoded = [store.read_episode(i) for i in range(3)]
    dataset = LeRobotDataset("xwam/store", root=tmp_path / "store")
    check_lerobot_reads(dataset, episodes, decoded)


def test_delete_episodes_then_xwam_imports_the_result(tmp_path):
    episodes = xwam_store(tmp_path / "store")
    dataset = LeRobotDataset("xwam/store", root=tmp_path / "store")
    kept = delete_episodes(dataset, [1], output_dir=tmp_path / "deleted", repo_id="xwam/deleted")
    assert kept.meta.total_episodes == 2 and len(kept) == 24
    decoded = [EpisodeStore(tmp_path / "store").read_episode(i) for i in (0, 2)]
    check_lerobot_reads(kept, [episodes[0], episodes[2]], decoded)
    # LeRobot rewrites meta/episodes with its own columns only: the per-frame data survive, xwam's
    # per-episode columns (success, the fixed front camera) do not
    source = LeRobotSource(tmp_path / "deleted")
    imported = list(source.episodes())
    assert [e.length for e in imported] == [12, 12]
    np.testing.assert_array_equal(imported[1].action, episodes[2].action)
    np.testing.assert_array_equal(imported[1].views["side"].extrinsics, episodes[2].views["side"].extrinsics)
    np.testing.assert_array_equal(
        np.rint(imported[1].views["front"].depth * 1000), np.rint(episodes[2].views["front"].depth * 1000)
    )


def test_merge_datasets_then_xwam_imports_the_result(tmp_path):
    first = xwam_store(tmp_path / "a", seed=0)
    second = xwam_store(tmp_path / "b", seed=1)
    merged = merge_datasets(
        [LeRobotDataset("xwam/a", root=tmp_path / "a"), LeRobotDataset("xwam/b", root=tmp_path / "b")],
        output_repo_id="xwam/merged",
        output_dir=tmp_path / "merged",
    )
    assert merged.meta.total_episodes == 6 and len(merged) == 72
    decoded = [EpisodeStore(tmp_path / p).read_episode(i) for p in ("a", "b") for i in range(3)]
    check_lerobot_reads(merged, first + second, decoded)
    source = LeRobotSource(tmp_path / "merged")
    assert source.info().has_cameras and source.info().has_depth
    imported = list(source.episodes())
    for ep, original in zip(imported, first + second, strict=True):
        np.testing.assert_array_equal(ep.action, original.action)
        np.testing.assert_array_equal(ep.views["front"].extrinsics, original.views["front"].extrinsics)
        np.testing.assert_array_equal(ep.views["side"].extrinsics, original.views["side"].extrinsics)
        assert psnr(ep.views["side"].rgb, original.views["side"].rgb) > MIN_PSNR


def test_a_dataset_written_by_lerobot_with_camera_matrices_imports(tmp_path):
    h, w, n = 32, 40, 8
    features = {
        "observation.images.front": {
            "dtype": "video",
            "shape": (h, w, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["a", "b", "c", "d"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "observation.cameras.front.intrinsics": {"dtype": "float32", "shape": (3, 3), "names": None},
        "observation.cameras.front.extrinsics": {"dtype": "float32", "shape": (4, 4), "names": None},
    }
    root = tmp_path / "written"
    dataset = LeRobotDataset.create("xwam/written", fps=10, features=features, root=root, use_videos=True)
    rng = np.random.default_rng(0)
    frames = []
    for episode in range(2):
        for t in range(n):
            pose = np.eye(4, dtype=np.float32)
            pose[:3, 3] = [0.1 * t, episode, 0.0]
            frame = {
                "observation.images.front": np.full((h, w, 3), 40 * episode + 10 * t, np.uint8),
                "observation.state": rng.normal(size=4).astype(np.float32),
                "action": rng.normal(size=2).astype(np.float32),
                "observation.cameras.front.intrinsics": np.array(
                    [[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float32
                ),
                "observation.cameras.front.extrinsics": pose,
                "task": "reach",
            }
            frames.append(frame)
            dataset.add_frame(dict(frame))
        dataset.save_episode()
    dataset.finalize()
    source = LeRobotSource(root)
    info = source.info()
    assert info.has_cameras and info.views == ["front"] and info.fps == 10
    for episode, ep in enumerate(source.episodes()):
        mine = frames[episode * n : (episode + 1) * n]
        np.testing.assert_array_equal(ep.action, np.stack([f["action"] for f in mine]))
        np.testing.assert_array_equal(
            ep.views["front"].extrinsics, np.stack([f["observation.cameras.front.extrinsics"] for f in mine])
        )
        np.testing.assert_array_equal(
            ep.views["front"].intrinsics, np.stack([f["observation.cameras.front.intrinsics"] for f in mine])
        )
        assert ep.task == "reach"
        assert (
            np.abs(
                ep.views["front"].rgb.astype(int) - np.stack([f["observation.images.front"] for f in mine])
            ).max()
            <= 3
        )
    # and `xwam prepare` makes a store of it, whose moving camera is kept per frame
    from xwam_core.data.store import StoreWriter as Writer

    with Writer(tmp_path / "store", source.info()) as writer:
        for ep in LeRobotSource(root).episodes():
            writer.add(ep)
    assert EpisodeStore(tmp_path / "store").moving_views == ["front"]
    assert os.path.isdir(tmp_path / "store" / "videos")
