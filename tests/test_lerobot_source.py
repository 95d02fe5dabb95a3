"""LeRobotSource: LeRobot v2.1 / v3.0 folders written by tests/lerobot_fixtures.py round-trip into Episodes.

Tolerances: actions, states, task text, success, cameras: exact. RGB video (libx264 crf 16 yuv420p,
or mpeg4 q2): mean abs error < 3 (of 255) per episode and view on smooth synthetic images.
Depth as 16-bit PNG (mm): max error <= 1 mm. Depth as 8-bit video with depth_scale s: mean abs error
< 1.5 s, max < 10 s (codec error on the luma plane). Depth as 16-bit ffv1 video (mm): <= 1 mm.
"""

from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import xwam_core.data.video as video_mod
from tests.lerobot_fixtures import TASKS, make_lerobot_dataset
from xwam_core.data.sources.base import EpisodeSource
from xwam_core.data.sources.lerobot import LeRobotSource
from xwam_core.errors import DataError

RGB_MAE = 3.0  # mean abs error, uint8 units


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _check_roundtrip(src: LeRobotSource, gt: dict) -> list:
    got = list(src.episodes())
    assert len(got) == len(gt["episodes"]) == src.info().num_episodes
    for ep, g in zip(got, gt["episodes"], strict=True):
        assert ep.length == g["length"]
        assert ep.task == g["task"]
        assert ep.success == g["success"]
        assert ep.fps == gt["fps"]
        assert ep.extra["episode_index"] == g["index"]
        assert ep.state.dtype == np.float32 and np.array_equal(ep.state, g["state"])
        assert ep.action.dtype == np.float32 and np.array_equal(ep.action, g["action"])
        for cam in gt["cameras"]:
            rgb = ep.views[cam].rgb
            assert rgb.dtype == np.uint8 and rgb.shape == g["rgb"][cam].shape
            assert _mae(rgb, g["rgb"][cam]) < RGB_MAE, (g["index"], cam)
    return got


def _check_boundaries(got: list, gt: dict) -> None:
    """Every decoded frame is nearest to its own ground-truth frame, also across episode boundaries."""
    for cam in gt["cameras"]:
        truth = np.concatenate([g["rgb"][cam] for g in gt["episodes"]]).astype(np.float64)
        decoded = np.concatenate([ep.views[cam].rgb for ep in got]).astype(np.float64)
        for i, frame in enumerate(decoded):
            errs = [np.abs(frame - truth[j]).mean() for j in range(max(i - 1, 0), min(i + 2, len(truth)))]
            own = np.abs(frame - truth[i]).mean()
            assert own == min(errs), (cam, i, own, errs)


# ---------------------------------------------------------------- round trips


def test_v3_video_roundtrip_several_episodes_per_file(tmp_path):
    gt = make_lerobot_dataset(
        tmp_path / "ds", version="v3.0", n_episodes=3, length=[12, 9, 11], success="meta"
    )
    assert gt["codec"] in ("libx264", "mpeg4")
    src = LeRobotSource(tmp_path / "ds")
    assert isinstance(src, EpisodeSource)
    info = src.info()
    assert info.name == "lerobot" and info.robot_type == "synthetic_arm" and info.fps == 10.0
    assert info.views == ["front", "wrist"] and info.image_size == (48, 64)
    assert info.state_names == [f"joint_{i}" for i in range(6)]
    assert info.action_names == [f"motor_{i}" for i in range(7)]
    assert info.has_depth is False and info.has_cameras is False
    assert info.extra["codebase_version"] == "v3.0"
    got = _check_roundtrip(src, gt)
    _check_boundaries(got, gt)
    for ep in got:  # depth and cameras absent -> None
        for view in ep.views.values():
            assert view.depth is None and view.intrinsics is None and view.extrinsics is None


def test_v3_streams_one_container_per_file_and_selects_episodes(tmp_path, monkeypatch):
    gt = make_lerobot_dataset(
        tmp_path / "ds", version="v3.0", n_episodes=5, length=8, episodes_per_file=3, cameras=("front",)
    )
    opened: list[str] = []
    real_open = video_mod.av.open

    def counting_open(path, *a, **k):
        opened.append(os.fspath(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(video_mod.av, "open", counting_open)
    got = _check_roundtrip(LeRobotSource(tmp_path / "ds"), gt)
    _check_boundaries(got, gt)
    assert len(opened) == 2 and len(set(opened)) == 2  # file-000 (episodes 0-2) and file-001 (3-4)

    opened.clear()
    sub = LeRobotSource(tmp_path / "ds", episodes=[4, 1, 2])
    assert sub.info().num_episodes == 3
    eps = list(sub.episodes())
    assert [e.extra["episode_index"] for e in eps] == [1, 2, 4]
    for ep in eps:
        g = gt["episodes"][ep.extra["episode_index"]]
        assert np.array_equal(ep.action, g["action"])
        assert _mae(ep.views["front"].rgb, g["rgb"]["front"]) < RGB_MAE
    with pytest.raises(DataError, match=r"episodes: \[7\]"):
        LeRobotSource(tmp_path / "ds", episodes=[1, 7])


def test_v21_video_roundtrip(tmp_path):
    gt = make_lerobot_dataset(
        tmp_path / "ds", version="v2.1", n_episodes=3, length=[10, 12, 7], success="frame"
    )
    src = LeRobotSource(tmp_path / "ds")
    assert src.info().extra["codebase_version"] == "v2.1"
    assert src.info().views == ["front", "wrist"]
    got = _check_roundtrip(src, gt)
    assert [e.success for e in got] == [True, False, True]  # from next.success


def test_image_form_rgb_is_exact_and_view_mapping(tmp_path):
    gt = make_lerobot_dataset(tmp_path / "ds", version="v2.1", n_episodes=2, rgb_form="image", success=None)
    src = LeRobotSource(tmp_path / "ds", views={"observation.images.wrist": "hand"})
    assert src.info().views == ["hand"]
    for ep, g in zip(src.episodes(), gt["episodes"], strict=True):
        assert list(ep.views) == ["hand"]
        assert np.array_equal(ep.views["hand"].rgb, g["rgb"]["wrist"])  # PNG: lossless
        assert ep.success is False  # no success column anywhere


def test_v3_task_text_from_tasks_parquet(tmp_path):
    gt = make_lerobot_dataset(tmp_path / "ds", version="v3.0", n_episodes=2, cameras=("front",))
    p = tmp_path / "ds" / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    pq.write_table(pq.read_table(p).drop_columns(["tasks"]), p)
    eps = list(LeRobotSource(tmp_path / "ds").episodes())
    assert [e.task for e in eps] == [g["task"] for g in gt["episodes"]] == list(TASKS)


# ---------------------------------------------------------------- depth and cameras


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_depth_png_millimetres_and_cameras(tmp_path, version):
    gt = make_lerobot_dataset(
        tmp_path / "ds", version=version, n_episodes=2, with_depth=True, depth_form="image", with_cameras=True
    )
    src = LeRobotSource(tmp_path / "ds")
    info = src.info()
    assert info.has_depth is True and info.has_cameras is True
    for ep, g in zip(src.episodes(), gt["episodes"], strict=True):
        for cam in gt["cameras"]:
            v = ep.views[cam]
            assert v.depth.dtype == np.float32 and v.depth.shape == g["depth"][cam].shape
            assert np.abs(v.depth - g["depth"][cam]).max() <= 1e-3
            assert (v.depth[:, :4, :4] == 0).all()  # invalid stays 0
            assert v.intrinsics.shape == (ep.length, 3, 3) and np.array_equal(
                v.intrinsics, g["intrinsics"][cam]
            )
            assert v.extrinsics.shape == (ep.length, 4, 4) and np.array_equal(
                v.extrinsics, g["extrinsics"][cam]
            )


def test_depth_video_needs_depth_scale(tmp_path):
    scale = 0.004
    gt = make_lerobot_dataset(
        tmp_path / "ds", version="v3.0", n_episodes=2, with_depth=True, depth_form="video", depth_scale=scale
    )
    src = LeRobotSource(tmp_path / "ds", depth_scale=scale)
    assert src.info().has_depth is True
    for ep, g in zip(src.episodes(), gt["episodes"], strict=True):
        for cam in gt["cameras"]:
            err = np.abs(ep.views[cam].depth - g["depth"][cam])
            assert err.mean() < 1.5 * scale and err.max() < 10 * scale, (float(err.mean()), float(err.max()))

    with pytest.warns(UserWarning, match="depth_scale"):
        src = LeRobotSource(tmp_path / "ds")
    assert src.info().has_depth is False and src.info().views == ["front", "wrist"]
    ep = next(iter(src.episodes()))
    assert all(v.depth is None for v in ep.views.values())


def test_depth_video_16bit_millimetres(tmp_path):
    gt = make_lerobot_dataset(
        tmp_path / "ds",
        version="v2.1",
        n_episodes=2,
        with_depth=True,
        depth_form="video16",
        cameras=("front",),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = LeRobotSource(tmp_path / "ds")  # 16-bit: millimetres by default, no depth_scale needed
    for ep, g in zip(src.episodes(), gt["episodes"], strict=True):
        assert np.abs(ep.views["front"].depth - g["depth"]["front"]).max() <= 1e-3


def test_explicit_depth_mapping(tmp_path):
    make_lerobot_dataset(
        tmp_path / "ds", version="v2.1", n_episodes=1, with_depth=True, cameras=("front", "wrist")
    )
    views = {"observation.images.front": "cam0", "observation.depth.wrist": "cam0"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = LeRobotSource(tmp_path / "ds", views=views)
    assert src.info().extra["depth_keys"] == {"cam0": "observation.depth.wrist"}


# ---------------------------------------------------------------- bad input


def _info(root) -> tuple[str, dict]:
    p = os.path.join(root, "meta", "info.json")
    with open(p) as f:
        return p, json.load(f)


def _write_info(p: str, info: dict) -> None:
    with open(p, "w") as f:
        json.dump(info, f)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no_such_dataset"):
        LeRobotSource(tmp_path / "no_such_dataset")


def test_bad_info_json(tmp_path):
    make_lerobot_dataset(tmp_path / "ds", n_episodes=1, cameras=("front",))
    p, info = _info(tmp_path / "ds")
    with open(p, "w") as f:
        f.write("{not json")
    with pytest.raises(DataError, match=r"info\.json: not valid JSON"):
        LeRobotSource(tmp_path / "ds")
    _write_info(p, {k: v for k, v in info.items() if k != "features"})
    with pytest.raises(DataError, match=r"info\.json: missing key 'features'"):
        LeRobotSource(tmp_path / "ds")
    _write_info(p, {**info, "codebase_version": "v2.0"})
    with pytest.raises(DataError, match=r"info\.json: codebase_version 'v2.0' is not supported"):
        LeRobotSource(tmp_path / "ds")
    os.remove(p)
    with pytest.raises(DataError, match=r"info\.json: not found"):
        LeRobotSource(tmp_path / "ds")


def test_unknown_camera_key(tmp_path):
    make_lerobot_dataset(tmp_path / "ds", n_episodes=1, cameras=("front",))
    with pytest.raises(DataError, match=r"camera key 'observation\.images\.top' is not a feature"):
        LeRobotSource(tmp_path / "ds", views={"observation.images.top": "top"})
    with pytest.raises(DataError, match=r"'action' has dtype 'float32'; expected a camera"):
        LeRobotSource(tmp_path / "ds", views={"action": "top"})
    with pytest.raises(DataError, match=r"observation\.joints"):
        LeRobotSource(tmp_path / "ds", state_key="observation.joints")


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_nan_action_names_episode_and_frame(tmp_path, version):
    make_lerobot_dataset(
        tmp_path / "ds", version=version, n_episodes=3, nan_action=(1, 5), cameras=("front",)
    )
    it = LeRobotSource(tmp_path / "ds").episodes()
    assert next(it).extra["episode_index"] == 0
    with pytest.raises(DataError, match=r"episode 1 frame 5: action 'action' has NaN"):
        next(it)


def test_mismatched_frame_shapes(tmp_path):
    make_lerobot_dataset(tmp_path / "ds", n_episodes=1)
    p, info = _info(tmp_path / "ds")
    bad = json.loads(json.dumps(info))
    bad["features"]["observation.images.wrist"]["shape"] = [32, 64, 3]
    _write_info(p, bad)
    with pytest.raises(DataError, match=r"features\['observation\.images\.wrist'\] frames are 32x64"):
        LeRobotSource(tmp_path / "ds")
    # declared sizes agree but the mp4 holds other sizes
    for key in ("observation.images.front", "observation.images.wrist"):
        bad["features"][key]["shape"] = [32, 64, 3]
    _write_info(p, bad)
    with pytest.raises(DataError, match=r"front/chunk-000/file-000\.mp4: frames are 48x64, expected 32x64"):
        list(LeRobotSource(tmp_path / "ds").episodes())


def test_image_frame_of_other_size(tmp_path):
    make_lerobot_dataset(tmp_path / "ds", version="v2.1", n_episodes=1, rgb_form="image", cameras=("front",))
    p = tmp_path / "ds" / "data" / "chunk-000" / "episode_000000.parquet"
    table = pq.read_table(p)
    cells = table.column("observation.images.front").to_pylist()
    buf = io.BytesIO()
    Image.new("RGB", (32, 16)).save(buf, format="PNG")
    cells[3] = {"bytes": buf.getvalue(), "path": None}
    i = table.column_names.index("observation.images.front")
    table = table.set_column(i, "observation.images.front", pa.array(cells, type=table.schema.field(i).type))
    pq.write_table(table, p)
    with pytest.raises(
        DataError,
        match=r"episode_000000\.parquet: episode 0 frame 3: 'observation\.images\.front' image is 16x32",
    ):
        list(LeRobotSource(tmp_path / "ds").episodes())


def test_missing_or_corrupt_files(tmp_path):
    make_lerobot_dataset(
        tmp_path / "ds", version="v3.0", n_episodes=2, cameras=("front",), episodes_per_file=1
    )
    mp4 = tmp_path / "ds" / "videos" / "observation.images.front" / "chunk-000" / "file-001.mp4"
    data = tmp_path / "ds" / "data" / "chunk-000" / "file-000.parquet"
    good_mp4, good_data = mp4.read_bytes(), data.read_bytes()

    os.remove(mp4)
    with pytest.raises(DataError, match=r"file-001\.mp4: video file not found \(episode 1"):
        LeRobotSource(tmp_path / "ds")
    LeRobotSource(tmp_path / "ds", episodes=[0])  # only the selected episodes' files must exist

    mp4.write_bytes(b"\x00not an mp4" * 100)
    it = LeRobotSource(tmp_path / "ds").episodes()
    next(it)
    with pytest.raises(DataError, match=r"file-001\.mp4: cannot (open|decode) video"):
        next(it)
    mp4.write_bytes(good_mp4)

    data.write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"file-000\.parquet: cannot read parquet"):
        list(LeRobotSource(tmp_path / "ds").episodes())
    os.remove(data)
    with pytest.raises(DataError, match=r"file-000\.parquet: parquet file not found"):
        LeRobotSource(tmp_path / "ds")
    data.write_bytes(good_data)
    assert len(list(LeRobotSource(tmp_path / "ds").episodes())) == 2

    os.remove(tmp_path / "ds" / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    with pytest.raises(DataError, match=r"meta/episodes: no chunk"):
        LeRobotSource(tmp_path / "ds")


def test_far_episode_seeks_instead_of_decoding_everything(tmp_path, monkeypatch):
    gt = make_lerobot_dataset(tmp_path / "ds", version="v3.0", n_episodes=4, length=30, cameras=("front",))
    seeks: list[float] = []
    real_seek = video_mod.VideoReader._seek

    def spy(self, t):
        seeks.append(t)
        return real_seek(self, t)

    monkeypatch.setattr(video_mod.VideoReader, "_seek", spy)
    eps = list(LeRobotSource(tmp_path / "ds", episodes=[0, 3]).episodes())
    assert seeks == [pytest.approx(9.0)]  # episode 3 starts 9 s into the shared mp4
    for ep in eps:
        g = gt["episodes"][ep.extra["episode_index"]]
        assert _mae(ep.views["front"].rgb, g["rgb"]["front"]) < RGB_MAE
    _check_boundaries(eps[1:], {"cameras": ("front",), "episodes": [gt["episodes"][3]]})


# ------------------------------------------------------------------------------ xwam's own stores
def _xwam_store(path, store_format: int, moving_side: bool = False):
    from tests.conftest import SyntheticSource
    from xwam_core.data.store import StoreWriter

    source = SyntheticSource(episodes=2)
    episodes = list(source.episodes())
    if moving_side:
        for ep in episodes:
            ep.views["side"].extrinsics[:, 0, 3] += np.linspace(0, 0.2, ep.length, dtype=np.float32)
    with StoreWriter(path, source.info(), store_format=store_format) as writer:
        for ep in episodes:
            writer.add(ep)
    return episodes


@pytest.mark.parametrize("store_format", [1, 2])
def test_reimports_xwam_stores_with_their_cameras(tmp_path, store_format):
    """Format 1 holds 3x3/4x4 cameras as Hugging Face Array2D columns (LeRobot's writer makes the same);
    format 2 keeps fixed cameras in meta/episodes and moving ones as flat per-frame vectors."""
    from xwam_core.data.reader import EpisodeStore

    _xwam_store(tmp_path / "store", store_format, moving_side=True)
    stored = EpisodeStore(tmp_path / "store")
    src = LeRobotSource(tmp_path / "store")
    info = src.info()
    assert info.has_cameras and info.has_depth and info.views == ["front", "side"]
    for i, ep in enumerate(src.episodes()):
        ref = stored.read_episode(i)
        np.testing.assert_array_equal(ep.action, ref.action)
        np.testing.assert_array_equal(ep.state, ref.state)
        assert ep.task == ref.task and ep.success == ref.success
        for v in ("front", "side"):
            np.testing.assert_array_equal(ep.views[v].rgb, ref.views[v].rgb)  # the same decoded frames
            # depth: the same millimetres (metres differ in the last float bit: x * 0.001 vs x / 1000)
            np.testing.assert_array_equal(
                np.rint(ep.views[v].depth * 1000), np.rint(ref.views[v].depth * 1000)
            )
            np.testing.assert_array_equal(ep.views[v].intrinsics, ref.views[v].intrinsics)
            np.testing.assert_array_equal(ep.views[v].extrinsics, ref.views[v].extrinsics)


def test_prepare_lerobot_on_an_xwam_store_makes_a_store(tmp_path):
    """`xwam prepare lerobot` on a store with Array2D camera columns (it used to end in a traceback)."""
    from typer.testing import CliRunner

    from xwam_cli.main import app
    from xwam_core.data.reader import EpisodeStore

    episodes = _xwam_store(tmp_path / "v1", 1)
    result = CliRunner().invoke(
        app, ["prepare", "lerobot", str(tmp_path / "v1"), "--out", str(tmp_path / "v2")]
    )
    assert result.exit_code == 0, result.output
    store = EpisodeStore(tmp_path / "v2")
    assert store.store_format == 2 and store.has_cameras and store.moving_views == []
    back = store.read_episode(1)
    np.testing.assert_array_equal(back.views["front"].extrinsics, episodes[1].views["front"].extrinsics)
    np.testing.assert_allclose(back.views["side"].depth, episodes[1].views["side"].depth, atol=5e-4 + 1e-6)
