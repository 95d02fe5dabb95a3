"""Training benchmarks: throughput, achieved FLOP/s vs this machine's matmul, peak memory.

    python bench/train.py            # table
    python bench/train.py --json     # one JSON object per line

Per preset (tiny: 64x64, width 128, 4 blocks; medium: 128x128, width 512, 8 blocks; both 3 views,
9 frames, 32 actions), a full training step (augmentation, codec, ANS noising, transformer with depth
branch, backward, AdamW) on synthetic windows:
    <preset>_train_samples_per_s
    <preset>_train_flops_fraction_of_matmul   achieved model FLOP/s (counted with torch's
                                              FlopCounterMode) / dense float32 matmul FLOP/s measured
                                              in the same process
    <preset>_peak_rss_mb, <preset>_peak_rss_mb_grad_ckpt   each in a fresh process
    medium_fsdp2_over_ddp_step_time_2proc     seconds per step of FSDP2 (xwam_core.fsdp.shard_fsdp2)
                                              over DDP, both on 2 gloo CPU processes (torchrun) with
                                              the preset's global batch split over them, measured in
                                              the same run (--dist-presets; "" skips it)
Each measurement runs in its own subprocess so peak RSS is honest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import Report, bench_argparser  # noqa: E402

PRESETS = {
    "tiny": {"size": 64, "batch": 8, "overrides": {}},
    "medium": {
        "size": 128,
        "batch": 2,
        "overrides": {
            "num_attention_heads": 8,
            "attention_head_dim": 64,
            "ffn_dim": 2048,
            "num_layers": 8,
            "num_depth_blocks": 2,
            "text_dim": 256,
        },
    },
}


def objective_and_batch(preset: str, grad_ckpt: bool) -> tuple[Any, dict[str, Any]]:
    """The preset's TrainingObjective and a synthetic batch of its size."""
    import numpy as np
    import torch

    from xwam_core.data.augment import AugmentConfig
    from xwam_core.models.codecs import PixelCodec
    from xwam_core.models.presets import build_model
    from xwam_core.models.text import TaskEmbeddingText
    from xwam_core.objective import TrainingObjective
    from xwam_core.schedule.sampler import NoiseSamplerConfig

    spec = PRESETS[preset]
    torch.manual_seed(0)
    model = build_model("tiny", **spec["overrides"], action_dim=4, state_dim=8)
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    text = TaskEmbeddingText(2, model.config.text_dim)
    obj = TrainingObjective(
        model,
        text,
        PixelCodec(8, 4),
        NoiseSamplerConfig(),
        torch.ones(4, dtype=torch.bool),
        torch.ones(8, dtype=torch.bool),
        AugmentConfig(),
    )
    b, s = spec["batch"], spec["size"]
    rng = np.random.default_rng(0)
    batch = {
        "rgb": torch.from_numpy(rng.integers(0, 255, (b, 3, 9, s, s, 3), dtype=np.uint8)),
        "depth": torch.from_numpy(rng.uniform(0.3, 2.0, (b, 3, 9, s, s)).astype(np.float32)),
        "intrinsics": torch.eye(3).expand(b, 3, 9, 3, 3).clone(),
        "actions": torch.randn(b, 32, 4),
        "states": torch.randn(b, 9, 8),
        "has_depth": torch.ones(b, dtype=torch.bool),
        "task_index": torch.zeros(b, dtype=torch.long),
    }
    return obj, batch


def measure(preset: str, grad_ckpt: bool, steps: int) -> dict[str, float]:
    """Runs in a child process: one configuration, returns its figures."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    obj, batch = objective_and_batch(preset, grad_ckpt)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
    b = PRESETS[preset]["batch"]

    def step(i: int) -> None:
        losses = obj(batch, 0, i, 0)
        loss = sum((losses[t] * losses[f"{t}_mask"]).mean() for t in ("video", "action", "state", "depth"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    t0 = time.perf_counter()
    for i in range(steps):
        step(2 + i)
    seconds = (time.perf_counter() - t0) / steps
    # dense matmul throughput of this machine, same dtype, same process, same threads
    n = 1024
    x, y = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        x @ y
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        x @ y
    matmul_flops = 2 * n**3 * reps / (time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "samples_per_s": b / seconds,
        "flops_fraction": flops / seconds / matmul_flops,
        "model_gflop_per_step": flops / 1e9,
        "matmul_gflops": matmul_flops / 1e9,
        "peak_rss_mb": peak_mb,
        "step_s": seconds,
    }


def measure_distributed(preset: str, strategy: str, steps: int) -> dict[str, float] | None:
    """Runs in each of 2 torchrun processes (gloo): the preset's global batch split over them, wrapped in
    DDP or sharded with FSDP2 as the Trainer shards it; seconds per step (rank 0 returns them)."""
    import torch
    import torch.distributed as dist

    from xwam_core.fsdp import shard_fsdp2

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    obj, batch = objective_and_batch(preset, grad_ckpt=False)
    local = PRESETS[preset]["batch"] // world
    mine = {k: v[rank * local : (rank + 1) * local] for k, v in batch.items()}
    if strategy == "fsdp2":
        shard_fsdp2(obj, torch.device("cpu"), "no")
        model: Any = obj
    else:
        model = torch.nn.parallel.DistributedDataParallel(obj)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)

    def step(i: int) -> None:
        losses = model(mine, 0, i, rank * local)
        loss = sum((losses[t] * losses[f"{t}_mask"]).mean() for t in ("video", "action", "state", "depth"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        step(1 + i)
    dist.barrier()
    seconds = (time.perf_counter() - t0) / steps
    dist.destroy_process_group()
    return {"step_s": seconds} if rank == 0 else None


def run_distributed(preset: str, strategy: str, steps: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--dist-child", f"{preset}:{strategy}", "--steps", str(steps)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"bench child failed:\n{out.stderr[-2000:]}")
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def run_child(preset: str, grad_ckpt: bool, steps: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", preset, "--steps", str(steps)] + (
        ["--grad-ckpt"] if grad_ckpt else []
    )
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"bench child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = bench_argparser(__doc__ or "")
    parser.add_argument("--child", help=argparse_hidden())
    parser.add_argument("--grad-ckpt", action="store_true", help=argparse_hidden())
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--presets", default="tiny,medium")
    parser.add_argument("--dist-presets", default="medium", help="FSDP2 over DDP on 2 processes ('' skips)")
    parser.add_argument("--dist-child", help=argparse_hidden())
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.grad_ckpt, args.steps)))
        return
    if args.dist_child:
        preset, strategy = args.dist_child.split(":")
        figures = measure_distributed(preset, strategy, args.steps)
        if figures is not None:
            print(json.dumps(figures), flush=True)
        return
    report = Report("xwam training benchmarks")
    for preset in filter(None, args.presets.split(",")):
        plain = run_child(preset, False, args.steps)
        ckpt = run_child(preset, True, max(2, args.steps // 2))
        report.add(
            f"{preset}_train_samples_per_s",
            plain["samples_per_s"],
            "samples/s",
            f"{plain['step_s']:.2f} s/step, {plain['model_gflop_per_step']:.1f} GFLOP/step",
        )
        report.add(
            f"{preset}_train_flops_fraction_of_matmul",
            plain["flops_fraction"],
            "ratio",
            f"matmul {plain['matmul_gflops']:.1f} GFLOP/s fp32",
        )
        report.add(f"{preset}_peak_rss_mb", plain["peak_rss_mb"], "MB", "no gradient checkpointing")
        report.add(f"{preset}_peak_rss_mb_grad_ckpt", ckpt["peak_rss_mb"], "MB", "gradient checkpointing")
    for preset in filter(None, args.dist_presets.split(",")):
        steps = max(2, args.steps // 2)
        ddp = run_distributed(preset, "ddp", steps)
        fsdp2 = run_distributed(preset, "fsdp2", steps)
        report.add(
            f"{preset}_fsdp2_over_ddp_step_time_2proc",
            fsdp2["step_s"] / ddp["step_s"],
            "ratio",
            f"FSDP2 {fsdp2['step_s']:.2f} s/step, DDP {ddp['step_s']:.2f} s/step (2 gloo CPU processes)",
        )
    report.emit(args.json)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
