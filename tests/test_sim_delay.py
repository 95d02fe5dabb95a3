"""Executing chunks under a simulated inference delay (xwam_core.rtc_executor): which action runs at each
step, naive vs real-time chunking; and the Meta-World loop's --inference-delay / --chunking with a tiny
model and any actor with the Policy's interface."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xwam_core.errors import XWAMError
from xwam_core.rtc_executor import ChunkExecutor


class CountingActor:
    """Chunk q's row i is the action [100 q + i]: the executed sequence says which chunk and row ran."""

    def __init__(self, k: int = 8):
        self.k = k
        self.calls: list[dict] = []

    def reset(self, seed=None):
        self.calls = []

    def predict_chunk(self, obs, **kwargs):
        q = len(self.calls)
        self.calls.append({"obs": obs, **kwargs})
        chunk = 100.0 * q + np.arange(self.k, dtype=np.float32)[:, None]
        if "prev_chunk" in kwargs:  # an RTC actor: the delayed prefix is the previous chunk's
            d = kwargs["inference_delay"]
            chunk[:d] = kwargs["prev_chunk"][:d]
        return chunk


def run(executor: ChunkExecutor, steps: int) -> tuple[list[float], list[int]]:
    executor.reset(seed=0)
    ran, observed = [], []
    for t in range(steps):
        if executor.wants_observation:
            observed.append(t)
        ran.append(float(executor.select_action({"t": t})[0]))
    return ran, observed


@pytest.mark.parametrize("chunking", ["naive", "rtc"])
def test_the_old_chunk_runs_during_the_delay(chunking):
    actor = CountingActor()
    ran, observed = run(ChunkExecutor(actor, actions_per_query=3, inference_delay=2, chunking=chunking), 11)
    assert observed == [0, 3, 6, 9]  # a query every 3 steps
    # chunk 0 runs rows 0..4 (its 3 + the 2 of the next query's delay), then each chunk from row d = 2
    assert ran == [0, 1, 2, 3, 4, 102, 103, 104, 202, 203, 204]
    if chunking == "rtc":
        first = actor.calls[1]
        assert first["inference_delay"] == 2
        np.testing.assert_array_equal(first["prev_chunk"][:, 0], np.arange(3, 8))  # chunk 0 from row s
        np.testing.assert_array_equal(actor.calls[2]["prev_chunk"][:, 0], 100 + np.arange(3, 8))
    else:
        assert all(set(call) == {"obs"} for call in actor.calls)  # naive: a plain predict_chunk(obs)


def test_zero_delay_is_the_synchronous_loop_and_gaps_are_recorded():
    executor = ChunkExecutor(CountingActor(), actions_per_query=4)
    ran, observed = run(executor, 9)
    assert observed == [0, 4, 8] and ran == [0, 1, 2, 3, 100, 101, 102, 103, 200]
    # each switch: the new chunk's first action (100 q) against the old chunk's row 4 (100 (q - 1) + 4)
    assert executor.switch_jumps == [96.0, 96.0] and executor.queries == 3


def test_bad_executor_options_are_one_line():
    actor = CountingActor(k=8)
    with pytest.raises(XWAMError, match="--chunking 'smooth'"):
        ChunkExecutor(actor, 4, 2, "smooth")
    with pytest.raises(XWAMError, match="--inference-delay 5: expected 0 to the actions executed per query"):
        ChunkExecutor(actor, 4, 5)
    with pytest.raises(XWAMError, match="--actions-per-query 0"):
        ChunkExecutor(actor, 0)
    executor = ChunkExecutor(actor, 6, 3)  # 6 + 3 > 8: known once the first chunk is seen
    with pytest.raises(XWAMError, match="chunks of at least 9 actions; the policy predicts 8"):
        run(executor, 1)


# ------------------------------------------------------------------------------------------ Meta-World
@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    pytest.importorskip("metaworld")
    from tests.run_fixtures import metaworld_checkpoint
    from xwam_core.policy import Policy

    return Policy.from_checkpoint(metaworld_checkpoint(tmp_path_factory), actions_per_query=4)


class ForwardingActor:
    """A stand-in for a policy-server client: only the closed loop's actor interface, forwarded."""

    def __init__(self, policy):
        self._policy = policy
        self.spec, self.normalizer, self.actions_per_query = policy.spec, policy.normalizer, 4

    def reset(self, seed=None):
        self._policy.reset(seed=seed)

    def predict_chunk(self, obs, prev_chunk=None, inference_delay=0):
        return self._policy.predict_chunk(obs, prev_chunk=prev_chunk, inference_delay=inference_delay)


@pytest.mark.sim
def test_rtc_in_the_closed_loop(policy, monkeypatch):
    """4 of 8 actions per query, a delay of 2 steps: every later query gets the executing chunk's
    remaining 4 actions and freezes 2 of them; a forwarding actor gives the same rollouts."""
    from xwam_core.policy import Policy
    from xwam_core.sim.metaworld import evaluate_metaworld

    calls: list = []
    predict = Policy.predict_chunk

    def recording(self, obs, **kwargs):
        calls.append((kwargs, predict(self, obs, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(Policy, "predict_chunk", recording)
    result = evaluate_metaworld(
        policy, ["reach-v3"], 1, seed=3, max_steps=10, baselines=False, inference_delay=2, chunking="rtc"
    )
    data = result.to_json()
    assert data["inference_delay"] == 2 and data["chunking"] == "rtc"
    assert "2 control steps simulated per query; rtc" in data["notes"]["inference_delay"]
    rollout = data["rollouts"][0]
    assert rollout["steps"] == 10 and rollout["queries"] == 3  # at steps 0, 4 and 8
    assert rollout["switch_jump"] is not None
    probe, first, second, third = calls  # the goal-following probe, then the rollout's queries
    assert probe[0] == {} and first[0] == {}
    np.testing.assert_array_equal(second[0]["prev_chunk"], first[1][4:])
    assert second[0]["inference_delay"] == 2
    np.testing.assert_array_equal(second[1][:2], first[1][4:6])  # the frozen prefix, dataset units
    np.testing.assert_array_equal(third[0]["prev_chunk"], second[1][4:])

    forwarded = evaluate_metaworld(
        ForwardingActor(policy),
        ["reach-v3"],
        1,
        seed=3,
        max_steps=10,
        baselines=False,
        inference_delay=2,
        chunking="rtc",
    ).to_json()
    assert forwarded["rollouts"][0]["final_state"] == rollout["final_state"]


@pytest.mark.sim
def test_cli_delay_options(tmp_path, tmp_path_factory):
    pytest.importorskip("metaworld")
    from tests.run_fixtures import app, metaworld_checkpoint, one_line_error, runner

    ckpt = metaworld_checkpoint(tmp_path_factory)
    out = tmp_path / "sim.json"
    base = ["evaluate", "--sim", "metaworld", "--ckpt", str(ckpt), "--tasks", "reach-v3", "--episodes", "1"]
    base += ["--max-steps", "6", "--no-baselines", "--actions-per-query", "4"]
    result = runner.invoke(app(), [*base, "--inference-delay", "3", "--chunking", "naive", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "inference delay 3 steps, naive chunk switching" in " ".join(result.output.split())
    data = json.loads(out.read_text())
    assert (
        data["inference_delay"] == 3 and data["chunking"] == "naive" and data["rollouts"][0]["queries"] == 2
    )
    one_line_error(runner.invoke(app(), [*base, "--chunking", "smooth"]), "--chunking 'smooth'")
    one_line_error(runner.invoke(app(), [*base, "--inference-delay", "-1"]), "--inference-delay -1")
    one_line_error(
        runner.invoke(app(), [*base, "--inference-delay", "5"]),
        "--inference-delay 5",
        "actions executed per query",
    )
    one_line_error(
        runner.invoke(app(), [*base[:-2], "--actions-per-query", "6", "--inference-delay", "3"]),
        "chunks of at least 9 actions",
    )
    for option in (["--inference-delay", "2"], ["--chunking", "rtc"]):
        one_line_error(runner.invoke(app(), ["evaluate", str(tmp_path), *option]), option[0])
