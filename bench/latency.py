"""Inference latency of the ANS schedule: policy mode vs synchronous joint denoising, and loop overhead.

    python bench/latency.py            # table
    python bench/latency.py --json     # one JSON object per line, names prefixed by preset

Presets: `tiny` (the model preset: 3 views, 9 frames, 64x64, 32 actions, 9 states) and `medium`
(tiny with width 512 = 8 heads x 64, FFN 2048, 8 blocks, M = 3 depth blocks; 3 views, 9 frames,
128x128). Pixel-codec latents, batch 1, an 8-token prompt. The step cache (RoPE, text K/V) is
built once per prompt outside the timed queries, as a policy server would.

Clock: by default one CPU thread, timed by that thread's CPU time (time.thread_time). On an idle
machine that equals wall time; on a shared one (this 2-core box with other jobs) it is what the
query costs without the other jobs' preemption, which wall time adds at random (seen: the tiny
speedup read 6.3x by wall clock and 5.1x by CPU clock in the same session). `--clock wall` (with
any --threads) times wall-clock latency instead; use it on a dedicated machine.

Figures, per preset:
  policy_ms                  one policy query: T_action = 10 joint steps, no depth (noise draw included)
  sync50_ms                  synchronous schedule: 50 joint steps of every stream, depth on the last
  policy_vs_sync_speedup     sync50_ms / policy_ms (paper: 4.5x; goal >= 5x)
  policy_overhead_vs_floor   policy_ms / (T_action x forward_ms) (goal <= 1.10)
  forward_ms                 one bare forward without the depth branch (timed as T_action in a row: the floor)
  forward_depth_ms           the same with the depth branch
  step_cache_ms              building the step cache (once per prompt)
  world_ms                   (tiny) async world mode: 50 video steps, actions done at 10, depth last
  policy_overhead_vs_floor_diffusers_unipc   (tiny) the same ratio, stepping with diffusers' UniPC `step`
Every figure is timed once per round with the rounds interleaved, and each is the best over the
rounds: other load only adds time, so the minimum is the repeatable estimate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Report, bench_argparser

MEDIUM = {
    "num_attention_heads": 8,
    "attention_head_dim": 64,  # width 512
    "ffn_dim": 2048,
    "num_layers": 8,
    "num_depth_blocks": 3,
}
# preset: (model overrides, frame size, timed rounds, extras: world mode and diffusers' UniPC)
PRESETS = {
    "tiny": ({}, 64, 8, True),
    "medium": (MEDIUM, 128, 2, False),
}


CLOCK = time.perf_counter  # --clock cpu (the default): time.thread_time


def timed_ms(fn: Callable[[], object]) -> float:
    start = CLOCK()
    fn()
    return 1e3 * (CLOCK() - start)


def bench_preset(name: str, report: Report, runs_scale: float) -> None:
    import torch

    from xwam_core.models import build_model, preset_codec
    from xwam_core.schedule.inference import (
        DenoisingSchedule,
        InferenceScheduleConfig,
        initial_latents,
        model_denoiser,
    )

    overrides, size, rounds, extras = PRESETS[name]
    rounds = max(1, round(rounds * runs_scale))
    torch.manual_seed(0)
    model = build_model("tiny", **overrides).eval()
    cfg = model.config
    channels, frames, height, width = preset_codec("tiny").latent_shape(9, size, size)
    views = cfg.num_views
    text = torch.randn(1, 8, cfg.text_dim)
    video_context = torch.randn(1, views, channels, 1, height, width)
    state_context = torch.randn(1, cfg.state_dim)
    generator = torch.Generator().manual_seed(0)

    def start():
        return initial_latents(
            video_context, state_context, frames, cfg.num_actions, cfg.action_dim, cfg.num_states, generator
        )

    video, actions, states = start()
    cache_ms = min(
        timed_ms(lambda: model.build_step_cache(text, video.shape, cfg.num_actions, cfg.num_states))
        for _ in range(3)
    )
    cache = model.build_step_cache(text, video.shape, cfg.num_actions, cfg.num_states)
    denoiser = model_denoiser(model, text, cache=cache)
    schedules = {
        "policy": DenoisingSchedule(InferenceScheduleConfig()),
        "diffusers": DenoisingSchedule(InferenceScheduleConfig(unipc_impl="diffusers")),
        "sync": DenoisingSchedule(InferenceScheduleConfig(schedule="sync")),
    }
    t = torch.full((1,), 500.0)

    def forward(run_depth: bool):
        with torch.inference_mode():
            model(video, actions, states, t, t, None, run_depth=run_depth, cache=cache)

    # Every figure is timed once per round, rounds interleaved, so load changes hit all figures alike.
    steps = schedules["policy"].num_steps_action

    def floor():  # T_action bare forwards back to back: the same kind of sum as a policy query
        for _ in range(steps):
            forward(False)

    measures: dict[str, Callable[[], object]] = {
        "floor": floor,
        "policy": lambda: schedules["policy"](denoiser, *start(), mode="policy"),
        "forward_depth": lambda: forward(True),
        "sync": lambda: schedules["sync"](denoiser, *start(), mode="world"),
    }
    if extras:
        measures["diffusers"] = lambda: schedules["diffusers"](denoiser, *start(), mode="policy")
        measures["world"] = lambda: schedules["policy"](denoiser, *start(), mode="world")
    for key in ("forward_depth", "floor", "policy", "diffusers"):  # warm-up
        if key in measures:
            measures[key]()
    best = dict.fromkeys(measures, float("inf"))
    for _ in range(rounds):
        for key, fn in measures.items():
            best[key] = min(best[key], timed_ms(fn))

    floor_ms, policy_ms, sync_ms = best["floor"], best["policy"], best["sync"]
    geometry = (
        f"width {model.inner_dim}, {cfg.num_layers} blocks, M={cfg.num_depth_blocks}, {views} views, "
        f"9 frames {size}x{size}, {cfg.num_actions} actions"
    )
    report.add(f"{name}_policy_ms", policy_ms, "ms", f"{steps} steps, no depth; best of {rounds}")
    report.add(f"{name}_sync50_ms", sync_ms, "ms", f"50 joint steps + depth; best of {rounds}")
    report.add(f"{name}_policy_vs_sync_speedup", sync_ms / policy_ms, "x", "paper 4.5x, goal >= 5x")
    report.add(
        f"{name}_policy_overhead_vs_floor",
        policy_ms / floor_ms,
        "x",
        f"floor {floor_ms:.1f} ms; goal <= 1.10",
    )
    report.add(f"{name}_forward_ms", floor_ms / steps, "ms", f"{geometry}; floor / {steps}")
    report.add(f"{name}_forward_depth_ms", best["forward_depth"], "ms", "depth branch on")
    report.add(f"{name}_step_cache_ms", cache_ms, "ms", "once per prompt")
    if extras:
        report.add(
            f"{name}_world_ms", best["world"], "ms", "async: 50 video steps, 10 action steps, depth last"
        )
        report.add(
            f"{name}_policy_overhead_vs_floor_diffusers_unipc",
            best["diffusers"] / floor_ms,
            "x",
            "stepping with UniPCMultistepScheduler.step",
        )


def main() -> None:
    parser = bench_argparser(__doc__ or "")
    parser.add_argument("--presets", default="tiny,medium", help="comma-separated: tiny, medium")
    parser.add_argument("--runs-scale", type=float, default=1.0, help="multiply the number of timed rounds")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="this thread's CPU time (default; needs --threads 1) or wall time",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable on a shared CPU; 0: torch's)",
    )
    args = parser.parse_args()

    import torch

    global CLOCK
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu measures one thread: use --threads 1, or --clock wall")
        CLOCK = time.thread_time
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report(f"xwam inference latency ({args.clock} clock, CPU threads: {torch.get_num_threads()})")
    for name in args.presets.split(","):
        if name not in PRESETS:
            parser.error(f"unknown preset {name!r}, expected one of {', '.join(PRESETS)}")
        bench_preset(name, report, args.runs_scale)
    report.emit(args.json)


if __name__ == "__main__":
    main()
