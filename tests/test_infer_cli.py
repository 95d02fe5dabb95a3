"""`xwam infer`: complete, atomic run folders; truth taken from the store; reproducible; bad input refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import read_episode
from tests.run_fixtures import (
    app,
    no_temporaries,
    one_line_error,
    other_store,
    runner,
    tiny_checkpoint,
    world_run,
)
from tests.video_helpers import decode_video
from xwam_core.cameras import hand_poses, predicted_cameras
from xwam_core.data.reader import EpisodeStore
from xwam_core.infer_options import parse_episodes
from xwam_core.infer_run import evenly_spaced
from xwam_core.runs import load_run, store_fingerprint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def test_world_run_is_complete_and_matches_the_store(ckpt, tmp_path_factory):
    store_path, checkpoint = ckpt
    run = load_run(world_run(tmp_path_factory))
    m = run.manifest
    assert m["command"].startswith("xwam infer --ckpt")
    assert m["checkpoint"] == str(checkpoint.resolve())
    assert m["store"] == str(store_path.resolve()) and m["store_fingerprint"] == store_fingerprint(store_path)
    assert m["episodes"] == [2] and "held out" in m["episodes_reason"]  # data.val_episodes=1 of 3
    assert m["inference"]["num_steps_video"] == 2 and m["future_frames"] == 4
    assert m["latency_ms"]["mean"] > 0 and m["latency_ms"]["median"] > 0
    assert m["cameras"] == {"a": "fixed: recorded pose", "b": "fixed: recorded pose"}
    n, v, t, k = 2, 2, 5, 8
    assert run["pred_rgb"].shape == run["true_rgb"].shape == (n, v, t, 32, 32, 3)
    assert run["pred_rgb"].dtype == np.uint8
    assert run["pred_depth"].shape == run["true_depth"].shape == (n, v, t, 32, 32)
    assert run["pred_actions"].shape == run["true_actions"].shape == (n, k, 4)
    assert run["intrinsics"].shape == (n, v, t, 3, 3) and run["pred_extrinsics"].shape == (n, v, t, 4, 4)
    np.testing.assert_array_equal(run["pred_extrinsics"], run["extrinsics"])  # fixed views keep their pose
    # windows evenly spaced over the 14 - 9 + 1 = 6 starts; truth in dataset units, straight from the store
    assert run["frame_index"].tolist() == [0, 5] and run["episode_index"].tolist() == [2, 2]
    episode = read_episode(EpisodeStore(store_path), 2)
    for w, start in enumerate(run["frame_index"]):
        np.testing.assert_allclose(run["true_actions"][w], episode.action[start : start + k], rtol=1e-6)
        np.testing.assert_allclose(run["true_states"][w], episode.state[start : start + 9 : 2], rtol=1e-6)
        np.testing.assert_array_equal(run["true_rgb"][w, 1], episode.views["b"].rgb[start : start + 9 : 2])
        np.testing.assert_allclose(
            run["true_depth"][w, 0], episode.views["a"].depth[start : start + 9 : 2], atol=1e-3
        )
    stats = json.loads((store_path / "meta" / "stats.json").read_text())  # the training store's
    np.testing.assert_allclose(run["mean_action"], stats["action"]["mean"], rtol=1e-6)
    # the mean-frame baseline: every window of the OTHER episodes (0 and 1, 6 starts each), by hand
    store = EpisodeStore(store_path)
    rgb = np.zeros((2, 5, 32, 32, 3))
    depth = np.zeros((2, 5, 32, 32))
    for e in (0, 1):
        episode = read_episode(store, e)
        for start in range(6):
            for vi, view in enumerate(("a", "b")):
                rgb[vi] += episode.views[view].rgb[start : start + 9 : 2] / 12
                depth[vi] += episode.views[view].depth[start : start + 9 : 2] / 12
    assert run["mean_rgb"].shape == (v, t, 32, 32, 3) and run["mean_depth"].shape == (v, t, 32, 32)
    np.testing.assert_allclose(run["mean_rgb"], rgb, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        run["mean_depth"], depth, rtol=1e-5, atol=1e-5
    )  # the store's depth is all valid
    assert m["mean_frame"] == {"windows": 12, "episodes": [0, 1]}
    for view in ("a", "b"):  # truth | prediction over depth, every frame of every window
        frames = decode_video(run.path / "videos" / f"{view}.mp4")
        assert frames.shape[0] == n * t and frames.shape[1] >= 192
    assert sorted(p.name for p in run.path.iterdir()) == ["manifest.json", "predictions.npz", "videos"]
    no_temporaries(run.path.parent)


def test_policy_mode_is_reproducible_and_fast(ckpt, tmp_path):
    store, checkpoint = ckpt
    outs = []
    for name in ("one", "two"):
        out = tmp_path / name
        args = [
            "infer",
            "--ckpt",
            str(checkpoint),
            "--data",
            str(store),
            "--out",
            str(out),
            "--mode",
            "policy",
            "--episodes",
            "0,2",
            "--windows-per-episode",
            "1",
            "--seed",
            "3",
        ]
        result = runner.invoke(app(), args)
        assert result.exit_code == 0, result.output
        assert "latency per window" in result.output
        outs.append(load_run(out))
    a, b = outs
    assert a.manifest["episodes_reason"] == "chosen with --episodes" and a["episode_index"].tolist() == [0, 2]
    np.testing.assert_array_equal(a["pred_actions"], b["pred_actions"])
    assert "pred_rgb" not in a.arrays and not (a.path / "videos").exists()
    assert a.manifest["num_denoiser_calls"] == 2  # num_steps_action from the checkpoint's recipe


def test_recorded_actions_give_the_future_they_cause(ckpt, tmp_path, tmp_path_factory):
    """--actions recorded: the video given the episode's actions and states (the action-conditioned world
    model); they are the run's actions, so evaluate leaves the action metrics out and refuses them."""
    store, checkpoint = ckpt
    out = tmp_path / "recorded"
    args = ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(out)]
    result = runner.invoke(app(), [*args, "--windows-per-episode", "2", "--actions", "recorded"])
    assert result.exit_code == 0, result.output
    run, sampled = load_run(out), load_run(world_run(tmp_path_factory))
    assert run.manifest["actions"] == "recorded" and sampled.manifest["actions"] == "sampled"
    assert "--actions recorded" in run.manifest["command"]
    np.testing.assert_array_equal(run["pred_actions"], run["true_actions"])
    np.testing.assert_array_equal(run["pred_states"][:, 1:], run["true_states"][:, 1:])
    np.testing.assert_allclose(run["pred_states"][:, 0], run["true_states"][:, 0], rtol=1e-5, atol=1e-5)
    # the same windows and noise seed as the sampled run: only the actions and states differ, and the video
    # follows them
    assert run["frame_index"].tolist() == sampled["frame_index"].tolist()
    assert not np.array_equal(run["pred_rgb"], sampled["pred_rgb"])
    observed = run["pred_rgb"][:, :, 0]
    np.testing.assert_array_equal(observed, sampled["pred_rgb"][:, :, 0])
    evaluated = runner.invoke(app(), ["evaluate", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "psnr" in metrics and "absrel" in metrics
    assert not any(m.startswith("action") for m in metrics)
    one_line_error(runner.invoke(app(), ["evaluate", str(out), "--metrics", "action_mse"]), "recorded ones")


def first_observation(episode) -> dict:
    """The Policy's observation of an episode's first frame (views a and b, with depth)."""
    return {
        "images": {v: episode.views[v].rgb[0] for v in ("a", "b")},
        "state": episode.state[0],
        "task": episode.task,
        "depth": {v: episode.views[v].depth[0] for v in ("a", "b")},
    }


def test_policy_refuses_given_streams_it_cannot_use(ckpt):
    from xwam_core.errors import XWAMError
    from xwam_core.policy import Policy

    store, checkpoint = ckpt
    policy = Policy.from_checkpoint(checkpoint)
    episode = read_episode(EpisodeStore(store), 0)
    obs = first_observation(episode)
    actions, states = episode.action[:8], episode.state[0:9:2]
    pred = policy.predict(obs, mode="world", given_actions=actions, given_states=states)
    np.testing.assert_array_equal(pred.actions[0], actions)
    cases = [
        ({"given_actions": actions}, "go together"),
        ({"given_actions": actions, "given_states": states, "mode": "policy"}, "only in world mode"),
        (
            {"given_actions": actions[:7], "given_states": states},
            "given_actions has shape (7, 4); expected (8, 4)",
        ),
        ({"given_actions": actions, "given_states": states[:3]}, "given_states has shape"),
        ({"given_actions": actions * np.nan, "given_states": states}, "NaN"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(XWAMError, match=re.escape(needle)):
            policy.predict(obs, **{"mode": "world", **kwargs})


def test_action_noise_scale_sets_where_the_actions_start(ckpt, tmp_path):
    """inference.action_noise_scale (a Policy override, `xwam infer --action-noise-scale`): the model's first
    call sees the actions' and future states' starting noise scaled by it (0: zeros), the video's unchanged;
    the run records it and a negative scale is refused in one line naming the setting."""
    from xwam_core.policy import Policy

    store, checkpoint = ckpt
    episode = read_episode(EpisodeStore(store), 0)
    obs = first_observation(episode)
    first_inputs = {}

    def first_call(scale: float) -> list[torch.Tensor]:
        policy = Policy.from_checkpoint(checkpoint, action_noise_scale=scale)
        seen: list[list[torch.Tensor]] = []  # cloned: the sampler steps its tensors in place
        hook = policy.model.register_forward_pre_hook(
            lambda m, args: seen.append([x.clone() for x in args[:3]])
        )
        policy.predict(obs, mode="policy", generator=torch.Generator().manual_seed(5))
        hook.remove()
        return seen[0]

    for scale in (1.0, 0.0):
        first_inputs[scale] = first_call(scale)
    video1, actions1, states1 = first_inputs[1.0]
    video0, actions0, states0 = first_inputs[0.0]
    assert actions1.abs().mean() > 0.3 and states1[:, 1:].abs().mean() > 0.3  # unit Gaussian noise
    assert not actions0.any() and not states0[:, 1:].any()
    torch.testing.assert_close(states0[:, 0], states1[:, 0])
    torch.testing.assert_close(video0, video1)
    out = tmp_path / "deterministic"
    args = ["infer", "--ckpt", str(checkpoint), "--data", str(store), "--out", str(out), "--mode", "policy"]
    result = runner.invoke(app(), [*args, "--action-noise-scale", "0"])
    assert result.exit_code == 0, result.output
    run = load_run(out)
    assert run.manifest["inference"]["action_noise_scale"] == 0.0
    assert "--action-noise-scale 0.0" in run.manifest["command"]
    bad = runner.invoke(app(), [*args, "--action-noise-scale", "-1", "--overwrite"])
    one_line_error(bad, "inference.action_noise_scale", "-1")


def test_existing_run_needs_overwrite_and_is_replaced_whole(ckpt, tmp_path):
    store, checkpoint = ckpt
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # an earlier run (--overwrite replaces only runs)
    (out / "stale.txt").write_text("old")
    base = [
        "infer",
        "--ckpt",
        str(checkpoint),
        "--data",
        str(store),
        "--out",
        str(out),
        "--mode",
        "policy",
        "--windows-per-episode",
        "1",
    ]
    one_line_error(runner.invoke(app(), base), "already exists", "--overwrite")
    assert (out / "stale.txt").exists()
    result = runner.invoke(app(), [*base, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()
    no_temporaries(tmp_path)


def test_a_crash_leaves_nothing(ckpt, tmp_path, monkeypatch):
    store, checkpoint = ckpt
    import xwam_core.data.video as video

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(video, "encode_video", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        from xwam_core.infer_run import InferOptions, infer_run

        infer_run(InferOptions(checkpoint, store, out, episodes=[2], windows_per_episode=1))
    assert not out.exists()
    no_temporaries(tmp_path)


def test_bad_input_one_line_nothing_written(ckpt, tmp_path, tmp_path_factory):
    store, checkpoint = ckpt
    out = tmp_path / "run"

    def infer(*extra: str, data: Path = store, ck: Path = checkpoint):
        return runner.invoke(
            app(), ["infer", "--ckpt", str(ck), "--data", str(data), "--out", str(out), *extra]
        )

    one_line_error(infer(ck=tmp_path / "nope"), "checkpoint not found")
    not_ckpt = tmp_path / "not_ckpt"
    not_ckpt.mkdir()
    one_line_error(infer(ck=not_ckpt), "not an xwam checkpoint")
    one_line_error(infer(data=tmp_path / "nostore"), "store not found")
    wrong_views = other_store(tmp_path_factory, "views-cd", views=("c", "d"))
    one_line_error(infer(data=wrong_views), "incompatible checkpoint", "view(s) ['a', 'b']")
    wrong_size = other_store(tmp_path_factory, "size-48", size=(48, 48))
    one_line_error(infer(data=wrong_size), "incompatible checkpoint", "32x32")
    new_task = other_store(tmp_path_factory, "task-open", tasks=("open",))
    one_line_error(infer(data=new_task), "task 'open'", "unseen in training")
    one_line_error(infer("--episodes", "9"), "no episode(s) [9]")
    one_line_error(infer("--episodes", "x"), "--episodes")
    one_line_error(infer("--mode", "dream"), "--mode")
    one_line_error(infer("--actions", "planned"), "--actions 'planned'", "'sampled' or 'recorded'")
    one_line_error(infer("--actions", "recorded", "--mode", "policy"), "--actions recorded", "world mode")
    one_line_error(infer("--num-steps-action", "9", "--num-steps-video", "4"), "num_steps_action")
    assert not out.exists()
    no_temporaries(tmp_path)


def test_helpers():
    assert parse_episodes("3,4") == [3, 4] and parse_episodes("0-2,7,2") == [0, 1, 2, 7]
    assert parse_episodes(None) is None
    assert (
        evenly_spaced(6, 2) == [0, 5]
        and evenly_spaced(3, 5) == [0, 1, 2]
        and evenly_spaced(9, 3) == [0, 4, 8]
    )


def test_wrist_camera_follows_the_predicted_hand():
    """A camera rigidly on the hand: predicted hand poses give back exactly the cameras they imply."""
    rng = np.random.default_rng(0)
    t = 4
    quats = rng.normal(size=(1, t, 4))
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    states = np.concatenate([rng.normal(size=(1, t, 3)), quats, rng.uniform(size=(1, t, 1))], axis=-1)
    hand = hand_poses(states, list(range(7)))  # (1, T, 4, 4)
    mount = np.eye(4)
    mount[:3, 3] = [0.0, 0.05, -0.1]
    cams = hand @ mount  # the camera's true path
    fixed = np.repeat(np.eye(4)[None, None, None], t, axis=2)
    extrinsics = np.concatenate([fixed, cams[:, None]], axis=1)  # (1, V=2, T, 4, 4)
    out = predicted_cameras(extrinsics, [False, True], states, states[:, 0], list(range(7)))
    np.testing.assert_allclose(out, extrinsics, atol=1e-5)
    # with another predicted path the wrist camera moves with it, the fixed one does not
    moved = states.copy()
    moved[..., 0] += 0.1
    out = predicted_cameras(extrinsics, [False, True], moved, states[:, 0], list(range(7)))
    np.testing.assert_allclose(out[:, 1, 1:, 0, 3], cams[:, 1:, 0, 3] + 0.1, atol=1e-5)
    np.testing.assert_allclose(out[:, 0], extrinsics[:, 0])


def test_the_recorded_command_line_comes_from_the_options():
    """Every infer option is defined once (xwam_core.infer_options): the CLI's options are generated from
    it, and the command a run records spells out each of them and parses back to the same options."""
    import shlex

    import typer

    from xwam_cli.common import options_command
    from xwam_core.infer_options import InferOptions

    opts = InferOptions(Path("ck"), Path("st"), Path("o"), episodes=[3, 4], mode="policy", videos=False)
    line = opts.command_line()
    assert line == (
        "xwam infer --ckpt ck --data st --out o --episodes 3,4 --mode policy --actions sampled "
        "--windows-per-episode 4 "
        "--batch-size 1 --seed 0 --no-videos"
    )
    parsed: list[InferOptions] = []
    app = typer.Typer()
    app.command()(options_command(InferOptions, parsed.append))
    result = runner.invoke(app, shlex.split(line)[2:])
    assert result.exit_code == 0, result.output
    assert parsed == [opts]
    overwrite = InferOptions(Path("a"), Path("b"), Path("c"), num_steps_action=3, overwrite=True)
    result = runner.invoke(app, shlex.split(overwrite.command_line())[2:])
    assert result.exit_code == 0, result.output
    assert parsed[-1] == overwrite


def test_a_copy_of_the_training_store_is_recognised_under_either_normalization(tmp_path):
    """choose_episodes takes the held-out episodes from a renamed copy of the training store, also for a
    checkpoint trained with data.normalization = "release" (whose q01/q99 are not the store's)."""
    import shutil

    from tests.conftest import SyntheticSource, write_store
    from tests.run_fixtures import TINY, tiny_overrides
    from xwam_core.infer_run import choose_episodes
    from xwam_core.policy import Policy
    from xwam_core.recipe import load_recipe
    from xwam_core.train import train

    store = tmp_path / "store"
    write_store(store, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    recipe = load_recipe(TINY, [*tiny_overrides(store, tmp_path / "run", 1), "data.normalization=release"])
    policy = Policy.from_checkpoint(train(recipe).checkpoint)
    assert policy.normalizer.normalization == "release"
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    episodes, why = choose_episodes(EpisodeStore(copy), policy, None)
    assert episodes == [2] and "held out" in why
    other = tmp_path / "other"
    write_store(other, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b"), seed=5))
    assert "not the checkpoint's training store" in choose_episodes(EpisodeStore(other), policy, None)[1]
