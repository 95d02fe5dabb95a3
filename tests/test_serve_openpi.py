"""`xwam serve --protocol openpi`: openpi's own client gets the in-process Policy's chunks; API key,
metadata, the observation mapping, RemotePolicy, real-time chunking and SIGTERM."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

pytest.importorskip("websockets")
pytest.importorskip("msgpack")
openpi_client = pytest.importorskip("openpi_client.websocket_client_policy")

from tests.run_fixtures import tiny_checkpoint  # noqa: E402
from tests.serve_fixtures import (  # noqa: E402
    in_process_chunks,
    observation,
    openpi_server,
    start_xwam,
    wait_for_line,
)
from xwam_core.errors import XWAMError  # noqa: E402
from xwam_core.policy import Policy  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def policy(ckpt):
    return Policy.from_checkpoint(ckpt)


def test_openpi_client_gets_the_in_process_chunks(ckpt, policy):
    """openpi-client's WebsocketClientPolicy: metadata first; an observation with `seed` gives the chunk of
    reset(seed) + predict_chunk in process, and later observations continue that noise stream."""
    observations = [observation(policy, i) for i in range(3)]
    expected = in_process_chunks(ckpt, observations, seed=11)
    with openpi_server(policy, seed=5) as server:
        client = openpi_client.WebsocketClientPolicy("127.0.0.1", server.port)
        meta = client.get_server_metadata()
        assert meta["server"] == "xwam" and meta["views"] == ["a", "b"] and meta["image_size"] == [32, 32]
        assert meta["state_dim"] == 8 and meta["action_dim"] == 4 and meta["action_horizon"] == 8
        assert meta["tasks"] == policy.spec.tasks and meta["seed"] == 5
        replies = [client.infer({**observations[0], "seed": 11})]
        replies += [client.infer(obs) for obs in observations[1:]]
        for reply, chunk in zip(replies, expected, strict=True):
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (8, 4)
            np.testing.assert_allclose(reply["actions"], chunk, rtol=0, atol=1e-6)
        assert reply["server_timing"]["infer_ms"] > 0
        # a fresh connection starts from the server's --seed, as a fresh Policy after reset(5)
        other = openpi_client.WebsocketClientPolicy("127.0.0.1", server.port)
        np.testing.assert_allclose(
            other.infer(observations[0])["actions"],
            in_process_chunks(ckpt, observations[:1], 5)[0],
            atol=1e-6,
        )


def test_mapping_resizes_and_remote_policy(ckpt, policy):
    """--map feeds flat openpi-style keys to the views/state/task; other image sizes are resized;
    RemotePolicy has the Policy's interface and gives its chunks."""
    obs = observation(policy, 3)
    mapping = "observation/image=view:a,observation/wrist_image=view:b,observation/state=state,prompt=task,extra=ignore"
    flat = {
        "observation/image": obs["images"]["a"],
        "observation/wrist_image": obs["images"]["b"],
        "observation/state": obs["state"],
        "prompt": obs["task"],
        "extra": np.zeros(3),
    }
    from xwam_core.serve.client import RemotePolicy

    with openpi_server(policy, mapping=mapping) as server:
        client = openpi_client.WebsocketClientPolicy("127.0.0.1", server.port)
        assert client.get_server_metadata()["observation_keys"]["observation/image"] == "view:a"
        got = client.infer({**flat, "seed": 2})["actions"]
        np.testing.assert_allclose(got, in_process_chunks(ckpt, [obs], 2)[0], atol=1e-6)
        big = dict(flat, **{"observation/image": np.repeat(np.repeat(obs["images"]["a"], 2, 0), 2, 1)})
        assert client.infer(big)["actions"].shape == (8, 4)  # 64x64 resized to the checkpoint's 32x32
    with (
        openpi_server(policy) as server,
        RemotePolicy(f"127.0.0.1:{server.port}", actions_per_query=3) as remote,
    ):
        assert remote.spec.views == ["a", "b"] and remote.normalizer.state_dim == 8
        remote.reset(seed=4)
        chunks = [remote.predict_chunk(obs), remote.predict_chunk(obs)]
        expected = in_process_chunks(ckpt, [obs, obs], 4)
        for chunk, want in zip(chunks, expected, strict=True):
            np.testing.assert_allclose(chunk, want, atol=1e-6)
        remote.reset(seed=4)
        actions = [remote.select_action(obs) for _ in range(4)]  # 3 from the first chunk, then a new query
        np.testing.assert_allclose(actions[:3], expected[0][:3], atol=1e-6)
        np.testing.assert_allclose(actions[3], expected[1][0], atol=1e-6)
        with pytest.raises(XWAMError, match="not one of the checkpoint's tasks"):
            remote.predict_chunk({**obs, "task": "fly"})


def test_real_time_chunking_through_the_server(ckpt, policy):
    """prev_chunk + inference_delay (real-time chunking, docs/rtc.md) travel with the observation: the server
    answers what the in-process Policy's predict_chunk(obs, prev_chunk, inference_delay) gives with the
    same seed, its first d actions the previous chunk's exactly; incomplete or inconsistent requests get
    one line and the connection keeps serving."""
    obs = observation(policy, 1)
    prev = np.linspace(-0.5, 0.5, 32, dtype=np.float32).reshape(8, 4)
    local = Policy.from_checkpoint(ckpt)
    local.reset(seed=3)
    expected = local.predict_chunk(obs, prev_chunk=prev, inference_delay=3)
    with openpi_server(policy) as server:
        client = openpi_client.WebsocketClientPolicy("127.0.0.1", server.port)
        assert client.get_server_metadata()["real_time_chunking"] is True
        reply = client.infer({**obs, "seed": 3, "prev_chunk": prev, "inference_delay": 3})["actions"]
        np.testing.assert_allclose(reply, expected, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(reply[:3], prev[:3])
        assert np.abs(reply[3:] - prev[3:]).max() > 0  # only the delayed prefix is frozen
        with pytest.raises(RuntimeError, match="'prev_chunk' without 'inference_delay'"):
            client.infer({**obs, "prev_chunk": prev})
        with pytest.raises(RuntimeError, match="inference_delay 9"):
            client.infer({**obs, "prev_chunk": prev, "inference_delay": 9})
        assert client.infer(obs)["actions"].shape == (8, 4)
        # RemotePolicy sends them as keywords, as the chunk executor calls the in-process Policy
        from xwam_core.serve.client import RemotePolicy

        with RemotePolicy(f"127.0.0.1:{server.port}") as remote:
            remote.reset(seed=3)
            chunk = remote.predict_chunk(obs, prev_chunk=prev, inference_delay=3)
        np.testing.assert_allclose(chunk, expected, rtol=0, atol=1e-6)


def test_xwam_serve_command_api_key_and_sigterm(ckpt, policy):
    """The `xwam serve` command: a connection without the API key is closed with a reason; with it, the
    in-process chunk (its options, --action-noise-scale among them, reach the sampler); SIGTERM while a request is in flight answers it, then exits 0 with a summary."""
    import websockets.sync.client
    from websockets.exceptions import ConnectionClosed

    from xwam_core.serve.wire import packb, unpackb

    process = start_xwam(
        "serve", "--ckpt", str(ckpt), "--port", "0", "--api-key", "k3y", "--num-steps-video", "300", "--num-steps-action", "300",
        "--log-level", "debug", "--seed", "9", "--action-noise-scale", "0",
    )  # fmt: skip
    try:
        match, _ = wait_for_line(process, r"ws://127\.0\.0\.1:(\d+)")
        port = int(match.group(1))
        with pytest.raises(ConnectionClosed, match="unauthorized"):
            openpi_client.WebsocketClientPolicy("127.0.0.1", port)
        with pytest.raises(ConnectionClosed, match="unauthorized"):
            openpi_client.WebsocketClientPolicy("127.0.0.1", port, api_key="wrong")
        client = openpi_client.WebsocketClientPolicy("127.0.0.1", port, api_key="k3y")
        assert client.get_server_metadata()["action_noise_scale"] == 0.0
        obs = observation(policy, 6)
        slow = Policy.from_checkpoint(ckpt, num_steps_video=300, num_steps_action=300, action_noise_scale=0)
        slow.reset(seed=9)
        np.testing.assert_allclose(client.infer(obs)["actions"], slow.predict_chunk(obs), atol=1e-6)
        # a request in flight when SIGTERM arrives is answered
        ws = websockets.sync.client.connect(
            f"ws://127.0.0.1:{port}", additional_headers={"Authorization": "Api-Key k3y"}, max_size=None
        )
        ws.recv()
        ws.send(packb(obs))
        time.sleep(0.3)  # the query takes ~1 s at 300 action steps
        process.send_signal(signal.SIGTERM)
        assert unpackb(ws.recv(timeout=30))["actions"].shape == (8, 4)
        assert process.wait(30) == 0
        err = process.stderr.read()
        assert "ok in" in err and "requests, 0 errors, latency p50" in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
