"""The dry-run's memory figure against measured peak memory on this CPU.

    python bench/plan_check.py                    # tiny and medium, with and without checkpointing
    python bench/plan_check.py --presets tiny --json

For bench/train.py's presets (tiny: 64x64, width 128, 4 blocks, batch 8; medium: 128x128, width 512,
8 blocks, batch 2; both 3 views, 9 frames, 32 actions, depth branch on), in fp32 as this CPU trains:
    <preset>[_grad_ckpt]_predicted_mb   xwam_core.plan's peak for one process (strategy single): weights,
                                        gradients, AdamW state, max(encoding, activations)
    <preset>[_grad_ckpt]_measured_mb    growth of the process's peak resident memory (VmHWM, reset through
                                        /proc/self/clear_refs) over two training steps (augmentation,
                                        codec, noising, transformer with depth branch, backward, AdamW),
                                        from just before the model is built: after the imports, the batch
                                        and a warm-up of the kernels; each in a fresh process, glibc's
                                        malloc with a fixed mmap threshold (freed tensors are returned)
    <preset>[_grad_ckpt]_ratio          predicted / measured
With --codec SIZE (e.g. 128): the Wan2.2 VAE (its geometry, random weights: 2.8 GB) encoding one clip of
9 frames at SIZExSIZE, the planner's live-bytes trace on meta vs the measured peak RSS growth:
    wan_vae_<SIZE>_predicted_mb, wan_vae_<SIZE>_measured_mb, wan_vae_<SIZE>_ratio
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import Report, bench_argparser  # noqa: E402
from bench.train import PRESETS  # noqa: E402

ACTION_DIM, STATE_DIM, TASKS, VIEWS, FRAMES = 4, 8, 2, 3, 9


def bench_recipe(preset: str, grad_ckpt: bool):
    """bench/train.py's configuration as a recipe, and the data shape its synthetic batch has."""
    from xwam_core.plan import DataShape
    from xwam_core.recipe import recipe_from_dict

    spec = PRESETS[preset]
    recipe = recipe_from_dict(
        {
            "name": f"bench-{preset}",
            "data": {"batch_size": spec["batch"], "future_frames": FRAMES - 1, "frame_stride": 4},
            "model": {
                "preset": "tiny",
                "text": "task",
                "action_dim": ACTION_DIM,
                "state_dim": STATE_DIM,
                "overrides": dict(spec["overrides"]),
            },
            "train": {"gradient_checkpointing": grad_ckpt, "mixed_precision": "no"},
        }
    )
    recipe.validate()
    shape = DataShape(
        views=[f"view{i}" for i in range(VIEWS)],
        image_size=(spec["size"], spec["size"]),
        num_frames=FRAMES,
        num_actions=32,
        action_dim=ACTION_DIM,
        state_dim=STATE_DIM,
        tasks=TASKS,
        text_seq_len=recipe.model.text_seq_len,
        source="bench/train.py's synthetic batch",
    )
    return recipe, shape


def predicted_bytes(preset: str, grad_ckpt: bool) -> int:
    from xwam_core.plan import plan

    recipe, shape = bench_recipe(preset, grad_ckpt)
    return plan(recipe, gpus=1, strategy="single", on_gpu=False, shape=shape).memory.total


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: the measurement needs Linux")


def measured_bytes(preset: str, grad_ckpt: bool) -> int:
    """Runs in a child process: peak RSS growth of two training steps, from before the model is built."""
    import gc

    import numpy as np
    import torch

    from xwam_core.data.augment import AugmentConfig
    from xwam_core.models.codecs import PixelCodec
    from xwam_core.models.presets import build_model
    from xwam_core.models.text import TaskEmbeddingText
    from xwam_core.objective import LOSS_TERMS, TrainingObjective
    from xwam_core.schedule.sampler import NoiseSamplerConfig

    spec = PRESETS[preset]
    b, s = spec["batch"], spec["size"]
    rng = np.random.default_rng(0)
    batch = {
        "rgb": torch.from_numpy(rng.integers(0, 255, (b, VIEWS, FRAMES, s, s, 3), dtype=np.uint8)),
        "depth": torch.from_numpy(rng.uniform(0.3, 2.0, (b, VIEWS, FRAMES, s, s)).astype(np.float32)),
        "intrinsics": torch.eye(3).expand(b, VIEWS, FRAMES, 3, 3).clone(),
        "actions": torch.randn(b, 32, ACTION_DIM),
        "states": torch.randn(b, FRAMES, STATE_DIM),
        "has_depth": torch.ones(b, dtype=torch.bool),
        "task_index": torch.zeros(b, dtype=torch.long),
    }
    # warm the kernels (thread pools, first-call buffers) on something small, outside the measurement
    w = torch.randn(64, 64, requires_grad=True)
    q = torch.randn(1, 2, 16, 32, requires_grad=True)
    warm = torch.optim.AdamW([w, q])
    (
        (torch.randn(8, 64) @ w).sum() + torch.nn.functional.scaled_dot_product_attention(q, q, q).sum()
    ).backward()
    warm.step()
    del w, q, warm
    gc.collect()
    base = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS

    torch.manual_seed(0)
    model = build_model("tiny", **spec["overrides"], action_dim=ACTION_DIM, state_dim=STATE_DIM)
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    obj = TrainingObjective(
        model,
        TaskEmbeddingText(TASKS, model.config.text_dim),
        PixelCodec(8, 4),
        NoiseSamplerConfig(),
        torch.ones(ACTION_DIM, dtype=torch.bool),
        torch.ones(STATE_DIM, dtype=torch.bool),
        AugmentConfig(),
    )
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
    for step in range(2):
        losses = obj(batch, 0, step, 0)
        loss = sum((losses[t] * losses[f"{t}_mask"]).mean() for t in LOSS_TERMS)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _peak_bytes() - base


# glibc's malloc with a fixed mmap threshold: a freed tensor's memory goes back to the system (as a GPU
# caching allocator reuses it), instead of staying in the heap as fragments under the default dynamic
# threshold (which adds ~50% to the tiny preset's RSS growth; --default-malloc shows it)
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def codec_bytes(size: int) -> tuple[int, int]:
    """Runs in a child process: (predicted, measured) peak of the Wan2.2 VAE encoding one clip."""
    import gc

    import torch
    from accelerate import init_empty_weights

    from xwam_core.models.codecs import empty_codec
    from xwam_core.plan import _LiveBytes, _storage_bytes

    with init_empty_weights(include_buffers=False):
        codec = empty_codec("base")
    live = _LiveBytes(ignore={_storage_bytes(t)[0] for t in [*codec.parameters(), *codec.buffers()]})
    with torch.no_grad(), live:
        clip = torch.empty(1, 3, FRAMES, size, size, device="meta")
        live.track(clip)
        codec.encode(clip)
    predicted = live.peak
    del codec, clip, live
    gc.collect()
    codec = empty_codec("base")  # the real geometry, randomly initialised
    codec.requires_grad_(False)
    with torch.no_grad():
        codec.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)  # warm the kernels
    gc.collect()
    base = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with torch.no_grad():
        codec.encode(torch.rand(1, 3, FRAMES, size, size) * 2 - 1)
    return predicted, _peak_bytes() - base


def run_child(
    preset: str, grad_ckpt: bool, default_malloc: bool = False, extra: list[str] | None = None
) -> Any:
    cmd = [sys.executable, __file__, "--child", preset, *(extra or [])] + (
        ["--grad-ckpt"] if grad_ckpt else []
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if not default_malloc:
        env.update(FIXED_MMAP_THRESHOLD)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"plan_check child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(preset: str, grad_ckpt: bool, default_malloc: bool = False) -> dict[str, float]:
    """Predicted and measured peak (bytes) for one configuration; the measurement in a fresh process."""
    predicted = predicted_bytes(preset, grad_ckpt)
    measured = run_child(preset, grad_ckpt, default_malloc)
    return {"predicted": predicted, "measured": measured, "ratio": predicted / measured}


def main() -> None:
    import argparse

    parser = bench_argparser(__doc__ or "")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--presets", default="tiny,medium", help="comma-separated; empty: none")
    parser.add_argument("--codec", type=int, default=0, help="also check the Wan2.2 VAE at SIZExSIZE")
    parser.add_argument(
        "--default-malloc", action="store_true", help="measure under glibc's default (dynamic) mmap threshold"
    )
    args = parser.parse_args()
    if args.child:
        if args.child == "codec":
            print(json.dumps(codec_bytes(args.codec)))
        else:
            print(json.dumps(measured_bytes(args.child, args.grad_ckpt)))
        return
    report = Report("xwam dry-run memory vs measured peak (CPU, fp32)")
    for preset in filter(None, args.presets.split(",")):
        for grad_ckpt in (False, True):
            name = preset + ("_grad_ckpt" if grad_ckpt else "")
            r = compare(preset, grad_ckpt, args.default_malloc)
            report.add(f"{name}_predicted_mb", r["predicted"] / 2**20, "MB", "xwam_core.plan")
            report.add(f"{name}_measured_mb", r["measured"] / 2**20, "MB", "peak RSS growth of 2 steps")
            report.add(f"{name}_ratio", r["ratio"], "ratio", "predicted / measured")
    if args.codec:
        predicted, measured = run_child("codec", False, extra=["--codec", str(args.codec)])
        name = f"wan_vae_{args.codec}"
        report.add(f"{name}_predicted_mb", predicted / 2**20, "MB", "one clip, live-bytes trace on meta")
        report.add(f"{name}_measured_mb", measured / 2**20, "MB", "peak RSS growth of the encode")
        report.add(f"{name}_ratio", predicted / measured, "ratio", "predicted / measured")
    report.emit(args.json)


if __name__ == "__main__":
    main()
