"""`xwam serve` under load: 4 concurrent openpi clients for a bounded time on loopback, against the
in-process Policy measured in the same run.

    python bench/serve.py                 # table
    python bench/serve.py --json          # one JSON object per line
    python bench/serve.py --seconds 60 --rounds 4 --clients 4

The checkpoint is the `tiny` model preset (3 views of 64x64, 9 frames, 32 actions, 4 blocks) with the
tiny recipe's policy-mode schedule (10 action steps), freshly initialised (the cost of a query does
not depend on training) and exported to a temporary folder. `xwam serve` runs it in its own process
(OMP_NUM_THREADS=1); each client is a process with openpi-client's WebsocketClientPolicy sending
observations back to back. In-process blocks and load blocks alternate (--rounds), so each ratio
compares neighbours in time: on a shared machine other jobs' load drifts over a minute.

Figures:
  requests_answered            replies received by all clients in the load window
  requests_lost                requests sent without a reply (goal 0)
  client_latency_p50/p99_ms    a client's round trip under load (4 clients share one model: ~4 x service)
  throughput_rps               answered requests per second
  in_process_ms                Policy.predict_chunk in this process (median per round; median of rounds)
  server_ms_per_request        load block / requests answered in it: the server's time per query, saturated
  overhead_ratio               per round server_ms_per_request / in_process_ms; the median (goal <= 1.10)
  single_client_rtt_ms         one client alone, round trip median (decode + checks + Policy + encode + loopback)
  single_client_ratio          single_client_rtt_ms / in-process queries interleaved with it
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
from typing import Any

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


def client(port: int, index: int, go: Any, stop: Any, phase: Any, done: Any, results: Any) -> None:
    """One load client: back-to-back requests while `go` is set; says when it is idle; reports at the end."""
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    policy = WebsocketClientPolicy("127.0.0.1", port)
    obs = make_observation(index)
    latencies: list[tuple[int, float]] = []
    sent = errors = 0
    done.put(-1)  # connected
    while True:
        go.wait()
        if stop.is_set():
            break
        current = phase.value
        while go.is_set():
            sent += 1
            t0 = time.perf_counter()
            try:
                reply = policy.infer(obs)
                assert reply["actions"].shape == (32, len(ACTIONS))
                latencies.append((current, time.perf_counter() - t0))
            except Exception:
                errors += 1
        done.put(current)
    results.put({"sent": sent, "latencies": latencies, "errors": errors})


def in_process_ms(policy: Any, queries: int) -> float:
    """Median wall time of `queries` predict_chunk calls on one observation."""
    import numpy as np

    obs = make_observation(0)
    times = []
    for _ in range(queries):
        t0 = time.perf_counter()
        policy.predict_chunk(obs)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = bench_argparser(__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="load time in all (split over the rounds)"
    )
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of in-process and load blocks")
    parser.add_argument("--queries", type=int, default=10, help="in-process queries per round")
    args = parser.parse_args()
    import numpy as np

    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    import torch

    from xwam_core.policy import Policy

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    block_s = args.seconds / args.rounds
    report = Report(
        f"xwam serve: {args.clients} openpi clients, {args.rounds} x {block_s:.0f} s of load (tiny preset, CPU)"
    )
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
        ctx = mp.get_context("spawn")
        go, stop, phase = ctx.Event(), ctx.Event(), ctx.Value("i", -1)
        done, results = ctx.Queue(), ctx.Queue()
        procs: list[Any] = []
        try:
            assert server.stderr is not None
            port = None
            while port is None:
                line = server.stderr.readline()
                if not line and server.poll() is not None:
                    raise SystemExit("xwam serve exited before listening")
                match = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
                port = int(match.group(1)) if match else None
            policy = Policy.from_checkpoint(ckpt)
            in_process_ms(policy, 2)  # warm-up

            # one client alone: the round trip without queueing
            from openpi_client.websocket_client_policy import WebsocketClientPolicy

            single = WebsocketClientPolicy("127.0.0.1", port)
            obs = make_observation(0)
            single.infer(obs)
            rtts, alone = [], []
            for _ in range(args.queries):
                t0 = time.perf_counter()
                single.infer(obs)
                rtts.append(time.perf_counter() - t0)
                alone.append(in_process_ms(policy, 1))  # interleaved: the same machine load
            procs = [
                ctx.Process(target=client, args=(port, i, go, stop, phase, done, results))
                for i in range(args.clients)
            ]
            for p in procs:
                p.start()
            for _ in procs:
                done.get(timeout=120)  # connected
            inproc, windows = [], []
            for r in range(args.rounds):  # in-process block, then a load block: neighbours share the load
                inproc.append(in_process_ms(policy, args.queries))
                phase.value = r
                t0 = time.perf_counter()
                go.set()
                time.sleep(block_s)
                go.clear()
                for _ in procs:
                    done.get(timeout=300)  # every client idle: its last request answered
                windows.append(time.perf_counter() - t0)
            stop.set()
            go.set()
            outcomes = [results.get(timeout=60) for _ in procs]
        finally:
            stop.set()
            go.set()
            for p in procs:
                p.join(30)
            server.terminate()
            server.wait(30)

    latencies = [(r, dt) for o in outcomes for r, dt in o["latencies"]]
    answered = len(latencies)
    lost = sum(o["sent"] for o in outcomes) - answered
    per_round = [sum(1 for r, _ in latencies if r == i) for i in range(args.rounds)]
    per_request = [1e3 * w / max(n, 1) for w, n in zip(windows, per_round, strict=True)]
    ratios = [s / i for s, i in zip(per_request, inproc, strict=True)]
    p50, p99 = np.percentile([1e3 * dt for _, dt in latencies], [50, 99])
    single_ms, alone_ms = 1e3 * float(np.median(rtts)), float(np.median(alone))
    report.add("requests_answered", answered, "requests", f"{args.clients} clients, {sum(windows):.1f} s")
    report.add("requests_lost", lost, "requests", f"goal 0 ({sum(o['errors'] for o in outcomes)} errors)")
    report.add("client_latency_p50_ms", p50, "ms", "under load: ~clients x service time")
    report.add("client_latency_p99_ms", p99, "ms")
    report.add("throughput_rps", answered / sum(windows), "requests/s")
    report.add("in_process_ms", float(np.median(inproc)), "ms", "median of the rounds' medians")
    report.add("server_ms_per_request", float(np.median(per_request)), "ms", "load block / answered, median")
    report.add(
        "overhead_ratio",
        float(np.median(ratios)),
        "x",
        "goal <= 1.10; rounds " + ", ".join(f"{x:.2f}" for x in ratios),
    )
    report.add("single_client_rtt_ms", single_ms, "ms", "one client alone, median")
    report.add("single_client_ratio", single_ms / alone_ms, "x", "over interleaved in-process queries")
    report.emit(args.json)


if __name__ == "__main__":
    main()
