"""The release's ZeroMQ protocol through the broker: the in-process Policy's actions, the release's seed and
image preprocessing, a code-running pickle refused, REQ clients, leaving workers, SIGTERM."""

from __future__ import annotations

import os
import pickle
import signal
import threading

import numpy as np
import pytest

pytest.importorskip("zmq")

from tests.run_fixtures import tiny_checkpoint
from tests.serve_fixtures import (
    ReleaseClient,
    in_process_chunks,
    release_request,
    release_stack,
    start_xwam,
    wait_for_line,
)
from xwam_core.policy import Policy
from xwam_core.serve.release import ReleaseAdapter, release_seed
from xwam_core.serve.service import PolicyService


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def policy(ckpt):
    return Policy.from_checkpoint(ckpt)


def test_release_seed_is_the_releases_derivation():
    import hashlib

    assert release_seed(3, 14, 15) == int(hashlib.md5(b"3_14_15").hexdigest(), 16) % 2**32
    assert release_seed(0, 0, 0) != release_seed(0, 0, 1)


class _RunsCode:
    """Unpickling this would run a shell command (the payload a hostile client could send)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_release_client_through_the_broker(ckpt, policy, tmp_path):
    """Same actions as in process (noise seed from env_rank/rollout_id/step_id); proprios (9, 16); a pickle
    that would run code is refused with an error reply, runs nothing, and the worker keeps serving."""
    with release_stack(policy) as broker:
        client = ReleaseClient(broker.front_port)
        for step in range(2):
            request, obs = release_request(policy, seed=1, step_id=step)
            reply = client.infer(request)
            want = in_process_chunks(ckpt, [obs], release_seed(0, 1, step))[0]
            assert set(reply) == {"proprios", "actions"}
            assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (8, 4)
            np.testing.assert_allclose(reply["actions"], want, atol=1e-6)
            assert reply["proprios"].shape == (9, 16)
        # proprios: the predicted states (5 x 8 here), the last row repeated, zeros past the state's 8 columns
        p = reply["proprios"]
        assert np.all(p[:, 8:] == 0) and np.all(p[5:] == p[4]) and not np.all(p[:5, :8] == 0)

        marker = tmp_path / "pwned"
        bad = client.send_raw(pickle.dumps(_RunsCode(marker)))
        assert "forbidden global" in bad["error"] and "system" in bad["error"]
        assert not marker.exists()
        np.testing.assert_allclose(client.infer(request)["actions"], want, atol=1e-6)
        client.close()


def test_req_clients_and_two_workers_and_a_leaving_worker(policy, caplog):
    """A REQ client (empty delimiter) is answered; with two workers every request is answered; a worker that
    vanished is skipped; a worker that stops says BYE and the broker stops dispatching to it."""
    import zmq

    with release_stack(policy, workers=2) as broker:
        request, _ = release_request(policy, seed=2)
        req = zmq.Context.instance().socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 30000)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://127.0.0.1:{broker.front_port}")
        from xwam_core.serve.wire import restricted_loads

        req.send(pickle.dumps(request))
        assert restricted_loads(req.recv())["actions"].shape == (8, 4)
        req.close()

        clients = [ReleaseClient(broker.front_port) for _ in range(3)]
        results = []

        def ask(c):
            results.append(c.infer(request)["actions"])

        threads = [threading.Thread(target=ask, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 3 and all(np.array_equal(r, results[0]) for r in results)

        # a worker that vanished without BYE (a crash): the broker skips it instead of losing the request
        crashed = zmq.Context.instance().socket(zmq.DEALER)
        crashed.setsockopt(zmq.LINGER, 0)
        crashed.connect(f"tcp://127.0.0.1:{broker.back_port}")
        crashed.send_multipart([b"READY"])
        import time

        time.sleep(0.2)
        crashed.close()
        time.sleep(0.2)
        with caplog.at_level("WARNING", logger="xwam.serve"):
            for _ in range(4):  # one of these is dispatched to the vanished worker first
                assert clients[1].infer(request)["actions"].shape == (8, 4)
        assert any("is gone" in r.getMessage() for r in caplog.records)

        leaving = broker.workers[0]
        leaving.stop_event.set()
        time.sleep(0.5)  # BYE, acknowledged
        for _ in range(3):
            assert clients[0].infer(request)["actions"].shape == (8, 4)
        for c in clients:
            c.close()


def test_release_checkpoints_get_the_releases_crop(policy):
    """A release-normalized checkpoint's video is resized to its size, centre-cropped to 0.95 and resized
    back (bilinear, no antialias), as the release's server does (torchvision as the reference)."""
    tf = pytest.importorskip("torchvision.transforms.functional")
    import copy

    import torch

    service = PolicyService(policy)
    service.normalizer = copy.copy(policy.normalizer)
    service.normalizer.normalization = "release"
    adapter = ReleaseAdapter(service)
    rng = np.random.default_rng(0)
    video = rng.uniform(-1, 1, (2, 48, 40, 3)).astype(np.float32)
    got = adapter.images(video)
    frames = torch.from_numpy(video).permute(0, 3, 1, 2)
    h, w = policy.spec.image_size
    bilinear = tf.InterpolationMode.BILINEAR
    frames = tf.resize(frames, [h, w], interpolation=bilinear, antialias=False)
    ch, cw = int(h * 0.95), int(w * 0.95)
    frames = tf.crop(frames, (h - ch) // 2, (w - cw) // 2, ch, cw)
    frames = tf.resize(frames, [h, w], interpolation=bilinear, antialias=False)
    want = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, view in enumerate(policy.spec.views):
        assert got[view].shape == (h, w, 3) and got[view].dtype == np.uint8
        assert np.abs(got[view].astype(int) - want[i]).max() <= 1
    assert ReleaseAdapter(PolicyService(policy)).images(video)["a"].shape == (h, w, 3)  # native: resize only


def test_xwam_broker_and_worker_commands_exit_0_on_sigterm(ckpt, policy):
    """`xwam broker` and `xwam serve --protocol xwam-release` as processes: the in-process actions; SIGTERM
    while a request is in flight answers it, then both exit 0."""
    import socket
    import time

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    front, back = free_port(), free_port()
    broker = start_xwam("broker", "--front", str(front), "--back", str(back))
    worker = None
    steps = ["--num-steps-video", "300", "--num-steps-action", "300"]  # ~1 s a query: time to signal
    try:
        wait_for_line(broker, r"broker: clients on")
        worker = start_xwam(
            "serve", "--ckpt", str(ckpt), "--protocol", "xwam-release", "--port", str(back), *steps
        )
        wait_for_line(worker, r"xwam-release worker")
        client = ReleaseClient(front)
        request, obs = release_request(policy, seed=4)
        slow = Policy.from_checkpoint(ckpt, num_steps_video=300, num_steps_action=300)
        slow.reset(seed=release_seed(0, 4, 0))
        np.testing.assert_allclose(client.infer(request)["actions"], slow.predict_chunk(obs), atol=1e-6)
        client.socket.send(pickle.dumps(request))
        time.sleep(0.3)
        worker.send_signal(signal.SIGTERM)
        from xwam_core.serve.wire import restricted_loads

        assert restricted_loads(client.socket.recv())["actions"].shape == (8, 4)  # answered, then it left
        assert worker.wait(30) == 0
        client.close()
        broker.send_signal(signal.SIGTERM)
        assert broker.wait(30) == 0
    finally:
        for p in (broker, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
