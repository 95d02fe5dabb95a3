"""`xwam serve` under load: 4 concurrent openpi clients for a bounded time on loopback, against the
in-process Policy measured in the same run.

    python bench/serve.py                 # table
    python bench/serve.py --json          # one JSON object per line
    python bench/serve.py --seconds 30 --clients 4

The checkpoint is the `tiny` model preset (3 views of 64x64, 9 frames, 32 actions, 4 blocks) with the
tiny recipe's policy-mode schedule (10 action steps), freshly initialised (the cost of a query does
not depend on training) and exported to a temporary folder. `xwam serve` runs it in its own process
(OMP_NUM_THREADS=1); each client is a process with openpi-client's WebsocketClientPolicy sending
observations back to back.

Figures:
  requests_answered            replies received by all clients in the load window
  requests_lost                requests sent without a reply (goal 0)
  client_latency_p50/p99_ms    a client's round trip under load (4 clients share one model: ~4 x service)
  throughput_rps               answered requests per second
  in_process_ms                Policy.predict_chunk in this process, mean of rounds before and after the load
  server_ms_per_request        load window / answered requests: the server's time per query when saturated
  overhead_ratio               server_ms_per_request / in_process_ms (goal <= 1.10)
  single_client_rtt_ms         one client alone, round trip p50 (decode + checks + Policy + encode + loopback)
  single_client_ratio          single_client_rtt_ms / in_process_ms
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import Report, bench_argparser  # noqa: E402

TASKS = ["reach-v3", "push-v3"]
STATE = ["ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz", "gripper_opening"]
ACTIONS = ["dx", "dy", "dz", "gripper"]


def export_tiny(folder: Path) -> Path:
    """The tiny preset as a checkpoint folder (random weights, the tiny recipe's schedule)."""
    import torch

    from xwam_core.checkpoint import DataSpec, PolicyParts, export_checkpoint
    from xwam_core.data.windows import WindowLayout
    from xwam_core.models.codecs import describe_codec
    from xwam_core.models.presets import build_model
    from xwam_core.models.text import TaskEmbeddingText
    from xwam_core.normalizer import Normalizer
    from xwam_core.schedule.inference import InferenceScheduleConfig

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    stats = {
        "action": {"q01": [-1.0] * len(ACTIONS), "q99": [1.0] * len(ACTIONS)},
        "state": {"q01": [-1.0] * len(STATE), "q99": [1.0] * len(STATE)},
    }
    parts = PolicyParts(
        model=model,
        text=TaskEmbeddingText(len(TASKS), model.config.text_dim),
        codec=describe_codec("tiny"),
        normalizer=Normalizer(action_names=ACTIONS, state_names=STATE, stats=stats),
        data=DataSpec(
            views=["corner2", "topview", "gripperPOV"],
            image_size=(64, 64),
            window=WindowLayout(8, 4),
            tasks=TASKS,
            fps=80.0,
        ),
        inference=InferenceScheduleConfig(num_steps_video=50, num_steps_action=10, actions_per_query=8),
    )
    return export_checkpoint(parts, folder / "ckpt")


def make_observation(seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {
        "images": {
            v: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for v in ("corner2", "topview", "gripperPOV")
        },
        "state": rng.uniform(-1, 1, len(STATE)).astype(np.float32),
        "task": TASKS[seed % 2],
    }


def client(port: int, seconds: float, start_at: float, index: int, results: mp.Queue) -> None:
    """One load client: back-to-back requests from start_at for `seconds`; reports its latencies."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = WebsocketClientPolicy("127.0.0.1", port)
    obs = make_observation(index)
    latencies, sent, errors = [], 0, 0
    while time.time() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    while time.time() < end:
        sent += 1
        t0 = time.perf_counter()
        try:
            reply = policy.infer(obs)
            assert reply["actions"].shape == (32, len(ACTIONS))
            latencies.append(time.perf_counter() - t0)
        except Exception:
            errors += 1
    results.put({"sent": sent, "latencies": latencies, "errors": errors, "finished": time.time()})


def in_process_ms(ckpt: Path, rounds: int) -> float:
    import numpy as np

    from xwam_core.policy import Policy

    policy = Policy.from_checkpoint(ckpt)
    obs = make_observation(0)
    policy.predict_chunk(obs)  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        policy.predict_chunk(obs)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.mean(times))


def main() -> None:
    parser = bench_argparser(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the load window")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=40, help="in-process queries before and after the load")
    args = parser.parse_args()
    import numpy as np

    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    report = Report(f"xwam serve: {args.clients} openpi clients for {args.seconds:.0f} s (tiny preset, CPU)")
    with tempfile.TemporaryDirectory(prefix="xwam-bench-serve-") as tmp:
        ckpt = export_tiny(Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        server = subprocess.Popen(
            [sys.executable, "-m", "xwam_cli.main", "serve", "--ckpt", str(ckpt), "--port", "0"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stderr is not None
            port = None
            while port is None:
                line = server.stderr.readline()
                if not line and server.poll() is not None:
                    raise SystemExit("xwam serve exited before listening")
                match = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
                port = int(match.group(1)) if match else None
            before = in_process_ms(ckpt, args.rounds)

            # one client alone: the round trip without queueing
            from openpi_client.websocket_client_policy import WebsocketClientPolicy

            single = WebsocketClientPolicy("127.0.0.1", port)
            obs = make_observation(0)
            single.infer(obs)
            rtts = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                single.infer(obs)
                rtts.append(time.perf_counter() - t0)

            ctx = mp.get_context("spawn")
            results: mp.Queue = ctx.Queue()
            start_at = time.time() + 8.0  # the clients import and connect first
            procs = [
                ctx.Process(target=client, args=(port, args.seconds, start_at, i, results))
                for i in range(args.clients)
            ]
            for p in procs:
                p.start()
            outcomes = [results.get(timeout=args.seconds + 120) for _ in procs]
            for p in procs:
                p.join(30)
            window = max(o["finished"] for o in outcomes) - start_at
            after = in_process_ms(ckpt, args.rounds)
        finally:
            server.terminate()
            server.wait(30)

    latencies = np.concatenate([o["latencies"] for o in outcomes])
    answered = len(latencies)
    lost = sum(o["sent"] for o in outcomes) - answered
    inproc = (before + after) / 2
    per_request = 1e3 * window / max(answered, 1)
    p50, p99 = np.percentile(1e3 * latencies, [50, 99])
    single_ms = 1e3 * float(np.median(rtts))
    report.add("requests_answered", answered, "requests", f"{args.clients} clients, {window:.1f} s")
    report.add("requests_lost", lost, "requests", "goal 0")
    report.add("client_latency_p50_ms", p50, "ms", "under load: ~clients x service time")
    report.add("client_latency_p99_ms", p99, "ms")
    report.add("throughput_rps", answered / window, "requests/s")
    report.add("in_process_ms", inproc, "ms", f"before {before:.1f}, after {after:.1f}")
    report.add("server_ms_per_request", per_request, "ms", "load window / answered")
    report.add("overhead_ratio", per_request / inproc, "x", "goal <= 1.10")
    report.add("single_client_rtt_ms", single_ms, "ms", "one client alone, p50")
    report.add("single_client_ratio", single_ms / inproc, "x")
    report.emit(args.json)


if __name__ == "__main__":
    main()
