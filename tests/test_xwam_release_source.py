"""`xwam prepare xwam-release PATH`: the X-WAM authors' release layout -> an episode store.

RGB: a store of format 2 (the default) re-encodes it as AV1, so its frames are what PyAV decoded from the
release within the codec's error (mean abs error < 3 of 255 per episode and view on these smooth
synthetic frames), and each is nearer to its own decoded release frame than to the frames either side of
it (the clip's start and end are honoured); a format-1 store (PNG) holds exactly what PyAV decoded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from typer.testing import CliRunner

from tests.conftest import read_episode
from tests.lerobot_fixtures import synthetic_rgb
from tests.run_fixtures import app, one_line_error
from tests.video_helpers import encode_gray_video
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.video import GRAY, RGB, encode_video
from xwam_core.errors import XWAMError

runner = CliRunner()
SIZE = (32, 40)
FPS = 10.0
VIDEO_FRAMES = 12
PROMPTS = ("stack the blue bowl", "hand over the cup")
RGB_MAE = 3.0  # format 2 (AV1): mean abs error per episode and view, uint8 units


def _decode(path: Path, fmt: str) -> np.ndarray:
    with av.open(os.fspath(path)) as c:
        return np.stack([f.to_ndarray(format=fmt) for f in c.decode(c.streams.video[0])])


def _grey(length: int, episode: int, cam: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = [40 + 120 * xx / w + 40 * yy / h + 5 * t + 10 * episode + 20 * cam for t in range(length)]
    return np.clip(np.stack(out), 0, 255).round().astype(np.uint8)


def _rotation_field(rotm: np.ndarray, form: str) -> list:
    """(n, 3, 3) -> the release's encodings: 3x3, flat 9 or rotation vectors."""
    n = len(rotm)
    if form == "flat":
        return rotm.reshape(n, 9).tolist()
    if form == "rotvec":
        return Rotation.from_matrix(rotm).as_rotvec().tolist()
    return rotm.tolist()


def make_release(
    root: Path,
    arms: tuple[str, ...] = ("left", "right"),
    rotm_form: str = "matrix",
    size: tuple[int, int] = SIZE,
    actions: str = "pose",
    prompt: str = "prompt",
) -> list[dict]:
    """Two episodes, views 'head' (static) and 'wrist' (dynamic), each clip frames 2..10 of a 12-frame mp4.

    actions "pose": per-arm target poses made as known small moves of the proprio poses (so the expected
    delta actions are known: `expected`); "raw": `actions.raw_actions` (7 per arm + 5 extra columns);
    "array": a numeric (T, 14) `actions` and a top-level `raw_actions` (older exports).
    prompt "prompt": a `prompt` string; "instructions": an `instructions` list instead.
    """
    rng = np.random.default_rng(0)
    truth = []
    for e in range(2):
        n, start = 8, 2
        obs, views, full = {}, {}, {}
        for cam, (view, kind) in enumerate((("wrist", "dynamic"), ("head", "static"))):
            rgb_rel, depth_rel = f"video/ep{e}_{view}.mp4", f"depth/ep{e}_{view}.mp4"
            encode_video(root / rgb_rel, synthetic_rgb(VIDEO_FRAMES, size, cam, e), FPS)
            encode_gray_video(root / depth_rel, _grey(VIDEO_FRAMES, e, cam, size), FPS)
            obs[view] = {
                "rgb_path": rgb_rel,
                "depth_path": depth_rel,
                "fps": FPS,
                "type": kind,
                "start": start,
                "end": start + n,
            }
            decoded = _decode(root / rgb_rel, RGB)
            # the clip's frames, the whole decoded video and where the clip starts in it
            views[view] = (decoded[start : start + n], _decode(root / depth_rel, GRAY)[start : start + n])
            full[view] = (decoded, start)
        proprios, targets, rot, expected = {}, {}, {}, []
        for arm in arms:
            rotm = Rotation.random(n, random_state=int(rng.integers(1000))).as_matrix()
            rot[arm] = rotm
            pos = rng.normal(size=(n, 3))
            grip = rng.uniform(size=n)
            proprios[f"{arm}_ee_pos"] = pos.tolist()
            proprios[f"{arm}_ee_rotm"] = _rotation_field(rotm, rotm_form)
            proprios[f"{arm}_gripper_pos"] = grip[:, None].tolist()
            d_pos = rng.uniform(-0.05, 0.05, size=(n, 3))
            d_rot = rng.uniform(-0.3, 0.3, size=(n, 3))  # rotation vectors well inside |angle| < pi
            target = (Rotation.from_rotvec(d_rot) * Rotation.from_matrix(rotm)).as_matrix()
            targets[f"{arm}_ee_pos"] = (pos + d_pos).tolist()
            targets[f"{arm}_ee_rotm"] = target.reshape(n, 9).tolist()
            targets[f"{arm}_gripper_pos"] = grip[:, None].tolist()  # not used by the release
            d_grip = np.append(grip[1:] - grip[:-1], 0.0)  # the last frame has no t + 1: 0
            expected.append(np.concatenate([d_pos, d_rot, d_grip[:, None]], axis=1))
        array_actions = rng.normal(size=(n, 14)).astype(np.float32)
        raw = rng.normal(size=(n, 7 * len(arms) + 5))
        meta: dict = {"num_frames": n, "observations": obs, "proprios": proprios}
        if prompt == "prompt":
            meta["prompt"] = PROMPTS[e]
        else:
            meta["instructions"] = ["  ", PROMPTS[e], "another wording"]
        if actions == "pose":
            meta["actions"] = targets
            want = np.concatenate(expected, axis=1)
        elif actions == "raw":
            meta["actions"] = {**targets, "raw_actions": raw.tolist()}
            want = raw[:, : 7 * len(arms)].copy()
            want[:, 6::7] *= -1
        else:
            meta["actions"] = array_actions.tolist()
            meta["raw_actions"] = (array_actions * 2).tolist()
            want = array_actions
        path = root / "data" / "chunk-000" / f"episode_{e:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta))
        truth.append({"meta": meta, "views": views, "full": full, "rot": rot, "actions": want})
    return truth


def _prepare(src: Path, out: Path, *extra: str):
    return runner.invoke(app(), ["prepare", "xwam-release", str(src), "--out", str(out), *extra])


STATE_LEFT = [
    "left_ee_x", "left_ee_y", "left_ee_z", "left_ee_qw", "left_ee_qx", "left_ee_qy", "left_ee_qz", "left_gripper",
]  # fmt: skip
ACTION_LEFT = ["left_dx", "left_dy", "left_dz", "left_drx", "left_dry", "left_drz", "left_gripper"]


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _check_av1_frames(got: np.ndarray, decoded: np.ndarray, start: int, n: int) -> None:
    """A format-2 store's clip: within the codec's error of the release's decoded frames start..start+n,
    and every frame nearest to its own decoded frame among it and its neighbours in the whole video (so a
    clip shifted by one frame fails)."""
    assert got.shape == decoded[start : start + n].shape and got.dtype == np.uint8
    assert _mae(got, decoded[start : start + n]) < RGB_MAE
    for i, frame in enumerate(got):
        own = _mae(frame, decoded[start + i])
        near = [_mae(frame, decoded[j]) for j in (start + i - 1, start + i + 1) if 0 <= j < len(decoded)]
        assert own < min(near), (i, own, near)


def _check_states_and_frames(store: EpisodeStore, truth: list[dict], arms: tuple[str, ...]) -> None:
    """States (xyz, quaternion wxyz with w >= 0, gripper per arm in slot order), prompts and frames."""
    slots = [a for a in ("left", "right") if a in arms] or list(arms)
    for e, t in enumerate(truth):
        ep = read_episode(store, e)
        assert ep.task == PROMPTS[e]
        assert ep.state.shape == (8, 8 * len(arms))
        for i, arm in enumerate(slots):
            s = ep.state[:, 8 * i : 8 * i + 8]
            np.testing.assert_array_equal(
                s[:, :3], np.asarray(t["meta"]["proprios"][f"{arm}_ee_pos"], np.float32)
            )
            np.testing.assert_array_equal(
                s[:, 7], np.asarray(t["meta"]["proprios"][f"{arm}_gripper_pos"], np.float32)[:, 0]
            )
            q = s[:, 3:7]
            assert (q[:, 0] >= 0).all()
            xyzw = Rotation.from_matrix(t["rot"][arm]).as_quat()
            wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], 1)
            dots = np.abs((q * wxyz).sum(1))
            np.testing.assert_allclose(dots, 1.0, atol=1e-5)
            np.testing.assert_allclose(
                Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix(), t["rot"][arm], atol=1e-5
            )
        for view, (rgb, grey) in t["views"].items():
            vf = ep.views[view]
            assert vf.intrinsics is None and vf.extrinsics is None
            if store.store_format == 1:
                np.testing.assert_array_equal(vf.rgb, rgb)  # the store's PNG holds exactly what PyAV decoded
            else:
                _check_av1_frames(vf.rgb, *t["full"][view], len(rgb))
            assert vf.depth is not None
            np.testing.assert_array_equal(np.rint(vf.depth * 1000) - 1, grey.astype(np.float32))


@pytest.mark.parametrize(
    ("arms", "rotm_form"),
    [(("left", "right"), "matrix"), (("right", "left"), "rotvec"), (("right",), "flat")],
)
def test_roundtrip_delta_actions(tmp_path, arms, rotm_form):
    """Per-arm target poses -> the release's 7 per arm: delta xyz, delta rotation (axis-angle), gripper
    proprio delta; arms named left/right take their slots whatever their order in the json; one arm fills
    the left slots (8-D state, 7-D action)."""
    src, out = tmp_path / "release", tmp_path / "store"
    truth = make_release(src, arms, rotm_form)
    result = _prepare(src, out)
    assert result.exit_code == 0, result.output
    store = EpisodeStore(out)
    assert store.views == ["head", "wrist"] and store.image_size == SIZE and store.fps == FPS
    assert store.has_depth and not store.has_cameras and store.depth_kind == "relative"
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["xwam"]["depth_kind"] == "relative" and info["xwam"]["source"] == "xwam_release"
    slots = sorted(arms) if len(arms) == 2 else list(arms)
    assert info["xwam"]["source_extra"]["arms"] == slots
    right_state = [n.replace("left_", "right_") for n in STATE_LEFT]
    right_action = [n.replace("left_", "right_") for n in ACTION_LEFT]
    if len(arms) == 2:
        assert store.state_names == STATE_LEFT + right_state
        assert store.action_names == ACTION_LEFT + right_action
    else:
        assert store.state_names == STATE_LEFT and store.action_names == ACTION_LEFT
    _check_states_and_frames(store, truth, arms)
    for e, t in enumerate(truth):
        # the expected deltas were built independently (known moves of the proprio poses), in slot order
        order = [list(arms).index(a) for a in slots]
        want = np.concatenate([t["actions"][:, 7 * i : 7 * i + 7] for i in order], axis=1)
        got = read_episode(store, e).action
        assert got.shape == (8, 7 * len(arms))
        np.testing.assert_allclose(got, want, atol=2e-6)
        assert (got[-1, 6::7] == 0).all()  # no gripper delta after the last frame


def test_raw_actions_and_instructions(tmp_path):
    """raw_actions = true: actions.raw_actions, xyz and axis-angle as given, gripper sign-flipped, the
    columns past 7 per arm ignored; `instructions` instead of `prompt`: the first non-empty one."""
    src, out = tmp_path / "release", tmp_path / "store"
    truth = make_release(src, ("left",), actions="raw", prompt="instructions")
    # format 1 (PNG): the store holds exactly the frames PyAV decoded from the release
    result = _prepare(
        src, out, "--set", "prepare.xwam_release.raw_actions=true", "--set", "prepare.store_format=1"
    )
    assert result.exit_code == 0, result.output
    store = EpisodeStore(out)
    assert store.store_format == 1
    assert store.action_names == ACTION_LEFT and store.state_names == STATE_LEFT
    for e, t in enumerate(truth):
        np.testing.assert_allclose(read_episode(store, e).action, t["actions"], atol=1e-6)
    _check_states_and_frames(store, truth, ("left",))


def test_numeric_action_arrays_still_import(tmp_path):
    """Older exports: a numeric (T, D) `actions`, and a top-level `raw_actions` with raw_actions = true."""
    src = tmp_path / "release"
    truth = make_release(src, actions="array")
    assert _prepare(src, tmp_path / "a").exit_code == 0
    store = EpisodeStore(tmp_path / "a")
    assert store.action_names == [f"action_{i}" for i in range(14)] and len(store.state_names) == 16
    np.testing.assert_array_equal(read_episode(store, 1).action, truth[1]["actions"])
    result = _prepare(src, tmp_path / "b", "--set", "prepare.xwam_release.raw_actions=true")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(
        read_episode(EpisodeStore(tmp_path / "b"), 1).action, truth[1]["actions"] * 2
    )


def test_reconstruct_refuses_relative_depth(tmp_path):
    from tests.run_fixtures import scene_run
    from xwam_core.reconstruct import require_geometry
    from xwam_core.runs import load_run

    run = scene_run(tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["store_depth_kind"] = "relative"
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        XWAMError, match="depth is relative \\(imported from the xwam release\\): point clouds"
    ):
        require_geometry(load_run(run), "reconstruction")
    result = runner.invoke(app(), ["reconstruct", str(run)])
    one_line_error(result, "depth is relative", "point clouds need metric depth")


def _edit(src: Path, e: int, change) -> None:
    p = src / "data" / "chunk-000" / f"episode_{e:06d}.json"
    meta = json.loads(p.read_text())
    change(meta)
    p.write_text(json.dumps(meta))


def _bad_cases(src: Path):
    def drop_prompt(m):
        del m["prompt"]

    def empty_instructions(m):
        del m["prompt"]
        m["instructions"] = ["", 3]

    def short_actions(m):
        m["actions"]["left_ee_pos"] = m["actions"]["left_ee_pos"][:-1]

    def no_target_rotm(m):
        del m["actions"]["right_ee_rotm"]

    def poses_replaced_by_raw(m):
        m["actions"] = {"raw_actions": [[0.0] * 14] * 8}

    def quaternion_rotm(m):
        m["proprios"]["left_ee_rotm"] = [[1.0, 0.0, 0.0, 0.0]] * 8

    def array_actions(m):
        m["actions"] = [[0.0] * 14] * 8

    def short_pos(m):
        m["proprios"]["left_ee_pos"] = m["proprios"]["left_ee_pos"][:-2]

    def clip_outside(m):
        m["observations"]["head"]["start"] = 8
        m["observations"]["head"]["end"] = 16

    def no_rgb(m):
        m["observations"]["wrist"]["rgb_path"] = "video/missing.mp4"

    def other_fps(m):
        m["observations"]["wrist"]["fps"] = 15

    ep1 = "episode_000001.json"
    return [
        (other_fps, [ep1, "fps", "expected 10.0 for every view"]),
        (drop_prompt, [ep1, "missing key 'prompt' (or an 'instructions' list)"]),
        (empty_instructions, [ep1, "instructions is ['', 3]", "at least one non-empty string"]),
        (short_actions, [ep1, "actions['left_ee_pos'] has shape (7, 3)", "num_frames 8"]),
        (no_target_rotm, [ep1, "actions is missing key 'right_ee_rotm'", "rotation vectors"]),
        (
            poses_replaced_by_raw,
            [ep1, "missing key 'left_ee_pos'", "prepare.xwam_release.raw_actions = true"],
        ),
        (quaternion_rotm, [ep1, "proprios['left_ee_rotm'] has shape (8, 4)", "(T, 9) or (T, 3, 3)"]),
        (array_actions, [ep1, "actions are a numeric array (14-D), expected target poses (14-D)"]),
        (short_pos, [ep1, "left_ee_pos", "(6, 3)"]),
        (clip_outside, [ep1, "head", "clip frames 8..16", "inside the video"]),
        (no_rgb, [ep1, "missing.mp4", "not found"]),
    ]


def test_bad_inputs_one_line_each(tmp_path):
    result = _prepare(tmp_path / "nope", tmp_path / "s0")
    one_line_error(result, "nope", "folder not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(_prepare(empty, tmp_path / "s1"), "no episode json", "data/chunk-*/episode_*.json")
    src = tmp_path / "release"
    make_release(src)
    pristine = (src / "data" / "chunk-000" / "episode_000001.json").read_text()
    for i, (change, needles) in enumerate(_bad_cases(src)):
        (src / "data" / "chunk-000" / "episode_000001.json").write_text(pristine)
        _edit(src, 1, change)
        out = tmp_path / f"bad{i}"
        one_line_error(_prepare(src, out), *needles)
        assert not out.exists()
    (src / "data" / "chunk-000" / "episode_000001.json").write_text(pristine)
    raw = _prepare(src, tmp_path / "no_raw", "--set", "prepare.xwam_release.raw_actions=true")
    one_line_error(raw, "episode_000000.json", "actions has no 'raw_actions' (raw_actions = true)")
    (src / "depth" / "ep1_head.mp4").write_bytes(b"not a video")
    one_line_error(_prepare(src, tmp_path / "bad_mp4"), "ep1_head.mp4", "cannot open video")


def test_views_option_rejected(tmp_path):
    src = tmp_path / "release"
    src.mkdir()
    result = runner.invoke(
        app(), ["prepare", "xwam-release", str(src), "--views", "a=b", "--out", str(tmp_path / "s")]
    )
    one_line_error(result, "--views", "xwam-release")


def test_recipe_section_and_help():
    from xwam_core.errors import RecipeError
    from xwam_core.recipe import load_recipe

    r = load_recipe(None, ["prepare.xwam_release.raw_actions=true", "prepare.xwam_release.path='x'"])
    assert r.prepare.xwam_release.raw_actions is True and r.prepare.xwam_release.path == "x"
    with pytest.raises(RecipeError, match=r"prepare\.xwam_release\.raw_actions"):
        load_recipe(None, ["prepare.xwam_release.raw_actions=3"])
    result = runner.invoke(app(), ["prepare", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "xwam-release" in result.output


def test_missing_path_one_line(tmp_path):
    one_line_error(
        runner.invoke(app(), ["prepare", "xwam-release", "--out", str(tmp_path / "s")]), "xwam-release"
    )


def test_trains_and_reconstruct_refuses_its_infer_run(tmp_path):
    """Training uses the relative depth (here with data.normalization = "release", which the checkpoint
    records); `xwam reconstruct` on an infer run of the store refuses in one line."""
    from tests.run_fixtures import TINY, tiny_overrides
    from xwam_core.recipe import load_recipe
    from xwam_core.train import train

    make_release(tmp_path / "release", size=(64, 64))
    store = tmp_path / "store"
    assert _prepare(tmp_path / "release", store).exit_code == 0
    overrides = [
        *tiny_overrides(store, tmp_path / "run"),
        "data.frame_stride=1",
        "inference.actions_per_query=0",  # the whole (4-action) chunk
        "data.normalization='release'",
    ]
    ckpt = train(load_recipe(TINY, [*overrides, "model.depth_near=0.001", "model.depth_far=0.3"])).checkpoint
    normalizer = json.loads((Path(ckpt) / "normalizer.json").read_text())
    assert normalizer["normalization"] == "release" and "X-WAM release" in normalizer["rule"]
    assert normalizer["stats"]["state"]["q01"][3:7] == [-1.0] * 4  # the quaternion: identity
    run = tmp_path / "infer"
    args = [
        "infer",
        "--ckpt",
        str(ckpt),
        "--data",
        str(store),
        "--out",
        str(run),
        "--windows-per-episode",
        "1",
    ]
    result = runner.invoke(app(), args)
    assert result.exit_code == 0, result.output
    assert json.loads((run / "manifest.json").read_text())["store_depth_kind"] == "relative"
    one_line_error(
        runner.invoke(app(), ["reconstruct", str(run)]),
        "depth is relative (imported from the xwam release): point clouds need metric depth",
    )
