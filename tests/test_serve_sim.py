"""The Meta-World closed loop through `xwam serve`: a RemotePolicy (openpi protocol) acts as the in-process
Policy does, on the same held-out starts, with naive switching and with real-time chunking under a
simulated inference delay; `xwam evaluate --sim --server` runs it from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("metaworld")
pytest.importorskip("websockets")
pytest.importorskip("msgpack")

from tests.run_fixtures import app, metaworld_checkpoint, one_line_error, runner
from tests.serve_fixtures import openpi_server
from xwam_core.policy import Policy

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return metaworld_checkpoint(tmp_path_factory)


def same_rollouts(a: dict, b: dict) -> None:
    assert len(a["rollouts"]) == len(b["rollouts"])
    for x, y in zip(a["rollouts"], b["rollouts"], strict=True):
        assert (x["task"], x["success"], x["steps"], x["queries"]) == (
            y["task"],
            y["success"],
            y["steps"],
            y["queries"],
        )
        np.testing.assert_allclose(x["final_state"], y["final_state"], rtol=0, atol=1e-4)
    assert a["success_rate"] == b["success_rate"]


@pytest.mark.parametrize("delay,chunking", [(0, "naive"), (2, "rtc")])
def test_the_closed_loop_through_the_server_is_the_in_process_one(ckpt, delay, chunking):
    from xwam_core.serve.client import RemotePolicy
    from xwam_core.sim.metaworld import evaluate_metaworld

    kwargs = dict(seed=3, max_steps=12, baselines=False, inference_delay=delay, chunking=chunking)
    local = evaluate_metaworld(
        Policy.from_checkpoint(ckpt, actions_per_query=4), ["reach-v3"], 2, **kwargs
    ).to_json()
    # every query goes over the wire: the goal-following probe (one per start) and the rollouts' queries
    local_queries = sum(r["queries"] + 1 for r in local["rollouts"] if r["policy"] == "model")
    with openpi_server(Policy.from_checkpoint(ckpt)) as server:
        with RemotePolicy(f"ws://127.0.0.1:{server.port}", actions_per_query=4) as remote:
            served = evaluate_metaworld(remote, ["reach-v3"], 2, **kwargs).to_json()
        assert server.service.stats.requests == local_queries and server.service.stats.errors == 0
    same_rollouts(local, served)
    assert served["model_latency_ms_mean"] is not None


def test_evaluate_sim_server_option(ckpt, tmp_path):
    base = ["evaluate", "--sim", "metaworld", "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "6"]
    base += ["--no-baselines", "--actions-per-query", "4", "--seed", "2"]
    local = runner.invoke(app(), [*base, "--ckpt", str(ckpt), "--out", str(tmp_path / "local.json")])
    assert local.exit_code == 0, local.output
    with openpi_server(Policy.from_checkpoint(ckpt)) as server:
        url = f"ws://127.0.0.1:{server.port}"
        served = runner.invoke(app(), [*base, "--server", url, "--out", str(tmp_path / "served.json")])
        assert served.exit_code == 0, served.output
        # bc trains on the checkpoint's store, which a server does not name
        one_line_error(
            runner.invoke(app(), [*base[:-5], "--baselines", "bc", "--server", url]), "pass --data STORE"
        )
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "served"))
    same_rollouts(a, b)
    assert b["server"] == url and "checkpoint" not in b
    # the server's scale, from its metadata: the checkpoint's (the tiny recipe's 0)
    assert a["action_noise_scale"] == b["action_noise_scale"] == 0.0
    one_line_error(runner.invoke(app(), [*base, "--ckpt", str(ckpt), "--server", url]), "give one")
    one_line_error(runner.invoke(app(), [*base, "--ckpt", str(ckpt), "--api-key", "k"]), "add --server")
    one_line_error(
        runner.invoke(app(), [*base, "--server", "ws://127.0.0.1:1", "--action-noise-scale", "0"]),
        "xwam serve --action-noise-scale",
    )
    one_line_error(
        runner.invoke(app(), [*base, "--server", "ws://127.0.0.1:1"]), "cannot reach the policy server"
    )
