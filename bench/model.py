"""Model bench: the tiny preset on the issue's workload (3 views, 9 frames of 64x64, 32 actions, 9 states).

    python bench/model.py            # a table
    python bench/model.py --json     # one JSON object per figure

Times are medians over `--repeats` runs after `--warmup` runs, in this process. Peak RSS is this
process's own high-water mark (getrusage), so run it as a fresh process: it includes Python, torch and
diffusers themselves, which is what a user running the tiny recipe pays.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Report, bench_argparser
from xwam_core.models.presets import build_model, preset_codec
from xwam_core.models.text import TaskEmbeddingText


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def median_ms(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median ms per function; the functions are interleaved so load drift hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = bench_argparser(__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model("tiny")
    codec = preset_codec("tiny")
    text_conditioner = TaskEmbeddingText(num_tasks=1, text_dim=model.config.text_dim)
    cfg = model.config
    video = codec.encode_views(torch.rand(1, cfg.num_views, 3, 9, 64, 64) * 2 - 1)  # (1, 3, 768, 3, 8, 8)
    actions = torch.randn(1, cfg.num_actions, cfg.action_dim)
    states = torch.randn(1, cfg.num_states, cfg.state_dim)
    t_video, t_action = torch.tensor([600.0]), torch.tensor([300.0])
    with torch.no_grad():
        text = text_conditioner(torch.tensor([0]))  # (1, 8, 64)
    long_text = torch.randn(1, 512, cfg.text_dim)  # UMT5 length, for the step-cache figure
    args_step = (video, actions, states, t_video, t_action)
    rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # libraries + model + inputs

    def forward(run_depth: bool = True, prompt: torch.Tensor = text, cache=None) -> None:
        with torch.no_grad():
            model(*args_step, prompt, run_depth=run_depth, cache=cache)

    def forward_backward() -> None:
        out = model(*args_step, text)
        loss = sum(x.square().mean() for x in (out.video, out.actions, out.states, out.depth))
        loss.backward()
        model.zero_grad(set_to_none=True)

    model.eval()
    cache = model.build_step_cache(long_text, video.shape)
    inference = median_ms(
        {
            "depth_on": forward,
            "depth_off": lambda: forward(run_depth=False),
            "long_text": lambda: forward(run_depth=False, prompt=long_text),
            "long_text_cached": lambda: forward(run_depth=False, prompt=None, cache=cache),
        },
        args.warmup,
        args.repeats,
    )
    model.train()
    training = median_ms({"forward_backward": forward_backward}, args.warmup, args.repeats)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    setup = f"B=1, 3 views, 9x64x64, 32 actions, {torch.get_num_threads()} threads"
    report = Report("xwam model bench (tiny preset)")
    report.add("tiny_forward_ms", inference["depth_on"], "ms", f"no grad, depth on; {setup}")
    report.add("tiny_forward_backward_ms", training["forward_backward"], "ms", "all four losses, depth on")
    report.add("tiny_peak_rss_mb", peak_rss_mb, "MiB", "whole process (getrusage)")
    report.add("tiny_rss_before_run_mb", rss_before_mb, "MiB", "after imports and model build")
    report.add(
        "depth_on_vs_off_forward_ratio",
        inference["depth_on"] / inference["depth_off"],
        "x",
        "no grad forward",
    )
    report.add("tiny_policy_forward_ms", inference["depth_off"], "ms", "no grad, depth off")
    report.add(
        "tiny_step_cache_speedup",
        inference["long_text"] / inference["long_text_cached"],
        "x",
        "depth off, 512 text tokens: uncached / cached",
    )
    report.emit(args.json)


if __name__ == "__main__":
    main()
