"""Servers, clients and observations for the serve tests (tests/test_serve_*.py) and bench/serve.py.

The release client here is written from the protocol's facts (docs/serve.md): a ZeroMQ DEALER that sends
one pickled request dict to the broker's front end and reads one pickled reply; it reads replies with
xwam's restricted unpickler, never pickle.loads.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def observation(policy: Any, seed: int = 0, task: str | None = None) -> dict[str, Any]:
    """A random observation in the Policy's own layout (uint8 views at its size, state, task)."""
    rng = np.random.default_rng(seed)
    h, w = policy.spec.image_size
    return {
        "images": {v: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for v in policy.spec.views},
        "state": rng.normal(size=policy.normalizer.state_dim).astype(np.float32),
        "task": task or policy.spec.tasks[0],
    }


def in_process_chunks(ckpt: Path, observations: list[dict[str, Any]], seed: int) -> list[np.ndarray]:
    """What the in-process Policy answers after reset(seed), query after query."""
    from xwam_core.policy import Policy

    policy = Policy.from_checkpoint(ckpt)
    policy.reset(seed=seed)
    return [policy.predict_chunk(obs) for obs in observations]


@contextmanager
def openpi_server(policy: Any, **kwargs: Any) -> Iterator[Any]:
    """An OpenpiServer on a free loopback port, in a thread; stopped (as SIGTERM would) on exit."""
    from xwam_core.serve.openpi import OpenpiServer
    from xwam_core.serve.service import ObservationMap, PolicyService

    mapping = ObservationMap.parse(kwargs.pop("mapping", None), list(policy.spec.views))
    service = PolicyService(policy, mapping, seed=kwargs.pop("seed", 0))
    server = OpenpiServer(service, "127.0.0.1", 0, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def release_stack(policy: Any, workers: int = 1, **worker_kwargs: Any) -> Iterator[Any]:
    """A Broker on free loopback ports and `workers` ReleaseWorkers, each in a thread."""
    from xwam_core.serve.release import Broker, ReleaseWorker
    from xwam_core.serve.service import PolicyService

    broker = Broker(0, 0, "127.0.0.1", max_message_bytes=worker_kwargs.pop("broker_max_bytes", 64 << 20))
    broker_thread = threading.Thread(target=broker.run, daemon=True)
    broker_thread.start()
    assert broker.ready.wait(10)
    service = PolicyService(policy)
    started = []
    for _ in range(workers):
        worker = ReleaseWorker(service, f"tcp://127.0.0.1:{broker.back_port}", **worker_kwargs)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread))
    broker.workers = [w for w, _ in started]  # type: ignore[attr-defined]
    try:
        yield broker
    finally:
        for worker, thread in started:
            worker.stop_event.set()
            thread.join(10)
        broker.stop_event.set()
        broker_thread.join(10)


class ReleaseClient:
    """The release's evaluation client's side of the protocol: DEALER -> broker front end, pickles."""

    def __init__(self, port: int, timeout_s: float = 30.0) -> None:
        import zmq

        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        self.socket.connect(f"tcp://127.0.0.1:{port}")

    def send_raw(self, *frames: bytes) -> dict[str, Any]:
        from xwam_core.serve.wire import restricted_loads

        self.socket.send_multipart(list(frames))
        return restricted_loads(self.socket.recv())

    def infer(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.send_raw(pickle.dumps(request))

    def close(self) -> None:
        self.socket.close()


def release_request(policy: Any, seed: int = 0, step_id: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the release request dict, the equivalent in-process observation): the video is the observation's
    uint8 views scaled to [-1, 1], which the server turns back into the same uint8 pixels."""
    obs = observation(policy, seed)
    video = np.stack([obs["images"][v] for v in policy.spec.views]).astype(np.float32) / 127.5 - 1.0
    proprios = np.zeros(16)
    proprios[: policy.normalizer.state_dim] = obs["state"]
    request = {
        "video": video,
        "proprios": proprios,
        "prompt": [obs["task"]],
        "cfg": 0.0,
        "env_rank": 0,
        "rollout_id": seed,
        "step_id": step_id,
    }
    return request, obs


# ------------------------------------------------------------------------------------ subprocesses
def xwam_env() -> dict[str, str]:
    """The environment of an `xwam` subprocess: this checkout first on the path, one thread."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_xwam(*args: str) -> subprocess.Popen:
    """`python -m xwam_cli.main ARGS` with stderr piped (the server logs there)."""
    return subprocess.Popen(
        [sys.executable, "-m", "xwam_cli.main", *args],
        cwd=ROOT,
        env=xwam_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(
    process: subprocess.Popen, pattern: str, timeout_s: float = 60.0
) -> tuple[re.Match, list[str]]:
    """Read the process's stderr until a line matches `pattern`; (the match, the lines read)."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match, lines
    raise AssertionError(f"no line matching {pattern!r}; stderr so far:\n{''.join(lines)}")
