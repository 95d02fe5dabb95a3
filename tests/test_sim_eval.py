"""`xwam evaluate --sim metaworld`: same seeds give the same result, the starts are held out, the policy sees
what the store records, and bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("metaworld")

from tests.run_fixtures import app, metaworld_checkpoint, one_line_error, runner, tiny_checkpoint
from tests.video_helpers import decode_video

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from xwam_core.policy import Policy

    return Policy.from_checkpoint(metaworld_checkpoint(tmp_path_factory))


def test_same_seeds_same_result(policy):
    from xwam_core.sim.metaworld import eval_episode_seed, evaluate_metaworld
    from xwam_core.sim.scores import wilson_interval

    runs = [evaluate_metaworld(policy, ["reach-v3"], 1, seed=5, max_steps=10) for _ in range(2)]
    a, b = (r.to_json()["rollouts"] for r in runs)
    for r in a:
        r.pop("latency_ms")
    for r in b:
        r.pop("latency_ms")
    assert a == b
    assert [r["policy"] for r in a] == ["model", "expert", "random"]
    assert {r["seed"] for r in a} == {eval_episode_seed(5, "reach-v3", 0)}
    model = a[0]
    assert model["queries"] == 2 and model["steps"] == 10  # 8-action chunks: 8 + 2 steps
    assert a[0]["final_state"] != a[2]["final_state"]  # the policies really drove the robot differently
    data = runs[0].to_json()
    assert data["actions_per_query"] == 8 and data["chunk"] == 8
    rate = data["success_rate"]
    k, n = rate["successes"]["per_task"]["reach-v3"]["random"]
    assert n == 1 and rate["interval_95"]["per_task"]["reach-v3"]["random"] == list(wilson_interval(k, n))
    assert "Wilson" in rate["interval_95"]["method"]
    following = data["goal_following"]["per_task"]["reach-v3"]
    assert following["model"]["r"] == {"x": None, "y": None, "z": None}  # 1 start: n/a
    assert following["model"]["starts"] == 1 and len(following["displacements"]["expert"]) == 1


def _record_chunks(monkeypatch) -> list:
    """Every chunk the Policy predicts from now on, in order (predict_chunk wrapped for this test)."""
    from xwam_core.policy import Policy

    chunks: list = []
    predict = Policy.predict_chunk

    def recording(self, obs):
        chunks.append(predict(self, obs))
        return chunks[-1]

    monkeypatch.setattr(Policy, "predict_chunk", recording)
    return chunks


def test_actions_per_query_goal_following_and_bc_in_the_harness(policy, monkeypatch):
    """3 actions of each 8-action chunk per query (model and BC); the goal-following probe is the rollout's
    own first chunk; BC trains on the checkpoint's training episodes only and drives the robot."""
    from xwam_core.data.reader import EpisodeStore
    from xwam_core.sim.bc import BCConfig, train_bc, training_episodes
    from xwam_core.sim.metaworld import evaluate_metaworld

    store = EpisodeStore(policy.spec.store)
    episodes = training_episodes(store, policy.spec.val_episodes)
    assert episodes == [0] and policy.spec.val_episodes == 1  # the fixture holds its last episode out
    bc = train_bc(store, episodes, chunk=8, config=BCConfig(hidden=32, layers=1, steps=20))
    assert bc.info["episodes"] == [0] and bc.info["frames"] == store.episodes[0].length
    chunks = _record_chunks(monkeypatch)
    policy.actions_per_query = 3
    try:
        result = evaluate_metaworld(
            policy, ["reach-v3"], 3, seed=2, max_steps=7, baselines=["bc", "random"], bc=bc
        )
    finally:
        policy.actions_per_query = 8
    data = result.to_json()
    assert [r["policy"] for r in data["rollouts"][:3]] == ["model", "bc", "random"]
    for r in data["rollouts"]:
        if r["policy"] in ("model", "bc") and r["steps"] == 7:
            assert r["queries"] == 3  # 3 + 3 + 1 steps
    assert data["actions_per_query"] == 3 and bc.actions_per_query == 3
    assert data["bc"]["episodes"] == [0] and data["bc"]["loss_final"] > 0
    # each episode: the probe, then the rollout's first query from the same start and noise seed
    np.testing.assert_array_equal(chunks[0], chunks[1])
    following = data["goal_following"]["per_task"]["reach-v3"]
    assert following["model"]["starts"] == 3 and following["bc"]["starts"] == 3
    assert len(following["displacements"]["expert"]) == 3 and len(following["steps"]) == 3
    assert all(1 <= n <= 8 for n in following["steps"])
    assert following["model"]["expert_std"]["x"] > 0  # held-out starts differ: the expert moves differently
    assert set(data["goal_following"]["r_mean"]) == {"model", "bc"}


def test_goal_steps_sums_the_first_actions_of_the_first_chunk(policy, monkeypatch):
    """--goal-steps N: goal following compares the first N actions of the model's first chunk with the
    expert's first N from the same start (what a query executes, with N = actions per query)."""
    from xwam_core.sim import metaworld as sim_mw

    chunks = _record_chunks(monkeypatch)
    result = sim_mw.evaluate_metaworld(
        policy, ["reach-v3"], 3, seed=4, max_steps=2, baselines=False, goal_steps=3
    )
    data = result.to_json()
    following = data["goal_following"]["per_task"]["reach-v3"]
    assert data["goal_following"]["goal_steps"] == 3 and data["chunk"] == 8
    assert following["steps"] == [3, 3, 3]  # the expert runs 3 actions from each start, not the chunk's 8
    probes = chunks[::2]  # per start: the goal-following probe, then the rollout's single query
    assert len(probes) == 3
    for chunk, moved in zip(probes, following["displacements"]["model"], strict=True):
        np.testing.assert_allclose(moved, np.clip(chunk[:3, :3], -1, 1).sum(0), rtol=1e-6)
        assert not np.allclose(moved, np.clip(chunk[:, :3], -1, 1).sum(0))  # not the whole chunk
    full = sim_mw.evaluate_metaworld(policy, ["reach-v3"], 3, seed=4, max_steps=2, baselines=False)
    assert full.to_json()["goal_following"]["goal_steps"] == 8
    assert full.to_json()["goal_following"]["per_task"]["reach-v3"]["steps"] == [8, 8, 8]
    for bad in (0, 9):
        with pytest.raises(Exception, match=f"--goal-steps {bad}: expected 1 to the checkpoint's chunk of 8"):
            sim_mw.evaluate_metaworld(policy, ["reach-v3"], 1, max_steps=2, baselines=False, goal_steps=bad)


def test_evaluation_starts_are_held_out(tmp_path):
    from xwam_core.data.sources.metaworld import MetaWorldSource
    from xwam_core.sim.metaworld import eval_episode_seed, training_seeds

    for seed in range(3):
        source = MetaWorldSource(["reach-v3", "push-v3"], 1, ["corner2"], seed=seed)
        for task in ("reach-v3", "push-v3"):
            train = {source.episode_seed(task, i) for i in range(50)}
            evaluation = {eval_episode_seed(s, task, i) for s in range(3) for i in range(50)}
            assert not train & evaluation
    info = {"xwam": {"source": "metaworld", "source_extra": {"seed": 2, "episodes_per_task": 4}}}
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text(json.dumps(info))
    source = MetaWorldSource(["push-v3"], 4, ["corner2"], seed=2)
    assert training_seeds(tmp_path, "push-v3") == {source.episode_seed("push-v3", i) for i in range(4)}


def test_the_policy_sees_what_the_store_records():
    """Same seed: the closed loop's first observation equals the recorded episode's frame 0, bit for bit."""
    from xwam_core.data.sources import metaworld as mw
    from xwam_core.sim.metaworld import observe

    views = ["corner2", "gripperPOV"]
    episode = next(mw.MetaWorldSource(["reach-v3"], 1, views, size=64, max_steps=1).episodes())
    gl = mw.gl_context(64, 64)
    try:
        gl.make_current()
        task_sim = mw.TaskSim(mw._sim(), "reach-v3", views, 64, 64, "fast")
        try:
            task_sim.reset(int(episode.extra["episode_seed"]))
            rgb, state = observe(task_sim, gl)
        finally:
            task_sim.free()
    finally:
        gl.free()
    for v, view in enumerate(views):
        np.testing.assert_array_equal(rgb[v], episode.views[view].rgb[0])
    np.testing.assert_array_equal(state, episode.state[0])


def test_cli_video_json_and_bad_input(tmp_path, tmp_path_factory, monkeypatch):
    import functools

    from xwam_core.sim import bc

    monkeypatch.setattr(bc, "BCConfig", functools.partial(bc.BCConfig, steps=50))  # the CLI's BC, quickly
    ckpt = metaworld_checkpoint(tmp_path_factory)
    out, video = tmp_path / "sim.json", tmp_path / "videos"
    base = ["evaluate", "--sim", "metaworld", "--ckpt", str(ckpt), "--episodes", "1", "--max-steps", "4"]
    result = runner.invoke(
        app(), [*base, "--tasks", "reach-v3", "--no-baselines", "--video", str(video), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "reach-v3" in result.output and "ms per query" in result.output
    assert "8 of 8 actions executed per query" in result.output and "Goal following" in result.output
    data = json.loads(out.read_text())
    assert data["success_rate"]["per_task"]["reach-v3"].keys() == {"model"}
    assert data["actions_per_query"] == 8 and data["bc"] is None
    assert data["action_noise_scale"] == 0.0 and "action noise scale 0" in " ".join(
        result.output.split()
    )  # the recipe's
    assert data["max_steps"] == 4 and data["notes"]["render_quality"] == "fast"
    frames = decode_video(video / "reach-v3_ep000_model.mp4")
    assert (
        frames.shape[0] == 5 and frames.shape[2] == 2 * frames.shape[1]
    )  # start + 4 steps, 2 views side by side
    result = runner.invoke(
        app(),
        [
            *base,
            "--tasks",
            "reach-v3",
            "--actions-per-query",
            "4",
            "--action-noise-scale",
            "0.5",
            "--goal-steps",
            "4",
            "--baselines",
            "expert,bc",
            "--out",
            str(out),
            "--overwrite",  # the first run above wrote it
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "BC (state MLP)" in result.output
        and "4 of 8 actions executed per query (model and BC)" in result.output
    )
    assert "[" in result.output and "n/a" in result.output  # intervals; 1 start: no correlation
    assert "held-out episodes excluded" in " ".join(result.output.split())  # the BC line, however wrapped
    data = json.loads(out.read_text())
    assert data["actions_per_query"] == 4 and data["bc"]["episodes"] == [0]
    assert data["goal_following"]["goal_steps"] == 4 and "its first 4 actions" in " ".join(
        result.output.split()
    )
    assert data["action_noise_scale"] == 0.5 and "action noise scale 0.5" in " ".join(result.output.split())
    assert data["success_rate"]["interval_95"]["per_task"]["reach-v3"].keys() == {"model", "bc", "expert"}
    one_line_error(
        runner.invoke(app(), [*base, "--tasks", "reach-v3", "--actions-per-query", "0"]),
        "--actions-per-query 0",
    )
    one_line_error(
        runner.invoke(app(), [*base, "--tasks", "reach-v3", "--action-noise-scale", "-0.5"]),
        "inference.action_noise_scale",
        "-0.5",
    )
    one_line_error(
        runner.invoke(app(), [*base, "--tasks", "reach-v3", "--actions-per-query", "9"]),
        "--actions-per-query 9",
        "chunk of 8",
    )
    one_line_error(
        runner.invoke(app(), [*base, "--tasks", "reach-v3", "--goal-steps", "9"]),
        "--goal-steps 9",
        "chunk of 8",
    )
    one_line_error(runner.invoke(app(), [*base, "--tasks", "reach-v3", "--baselines", "expert,mlp"]), "'mlp'")
    one_line_error(
        runner.invoke(app(), [*base, "--tasks", "reach-v3", "--data", str(tmp_path / "gone")]),
        "gone is not there",
        "--baselines expert,random",
    )
    one_line_error(
        runner.invoke(app(), [*base, "--tasks", "reach-v3", "--baselines", "none", "--no-baselines"]),
        "give one",
    )
    one_line_error(runner.invoke(app(), [*base, "--tasks", "reach-v9"]), "unknown Meta-World task 'reach-v9'")
    one_line_error(runner.invoke(app(), [*base, "--tasks", "push-v3"]), "'push-v3' was not seen in training")
    one_line_error(runner.invoke(app(), [*base]), "--tasks")
    one_line_error(runner.invoke(app(), [*base, "--tasks", "reach-v3", "--max-steps", "0"]), "--max-steps")
    _, synthetic = tiny_checkpoint(tmp_path_factory)
    bad = ["evaluate", "--sim", "metaworld", "--ckpt", str(synthetic), "--tasks", "reach-v3"]
    one_line_error(runner.invoke(app(), bad), "not Meta-World cameras")
    one_line_error(
        runner.invoke(app(), ["evaluate", "--sim", "robocasa", "--ckpt", str(ckpt)]), "--sim 'robocasa'"
    )
    one_line_error(
        runner.invoke(app(), ["evaluate", "--sim", "metaworld", "--ckpt", str(tmp_path / "no")]),
        "checkpoint not found",
    )
    one_line_error(
        runner.invoke(app(), ["evaluate", str(tmp_path), "--sim", "metaworld"]), "drop the run folder"
    )
    one_line_error(
        runner.invoke(app(), [*base, "--tasks", "reach-v3", "--metrics", "psnr"]), "--metrics is for"
    )
    one_line_error(
        runner.invoke(app(), ["evaluate", str(tmp_path), "--tasks", "reach-v3"]), "add --sim metaworld"
    )


def test_closed_loop_options_without_sim_are_refused(tmp_path):
    """--episodes/--seed/--max-steps/--baselines/--actions-per-query only mean something with --sim: never silently ignored."""
    for option in (
        ["--episodes", "3"],
        ["--seed", "1"],
        ["--max-steps", "5"],
        ["--no-baselines"],
        ["--baselines", "bc"],
        ["--actions-per-query", "2"],
        ["--goal-steps", "8"],
    ):
        one_line_error(
            runner.invoke(app(), ["evaluate", str(tmp_path), *option]), option[0].split("=")[0][:10]
        )
