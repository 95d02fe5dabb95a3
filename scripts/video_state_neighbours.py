"""How far video PSNR gets from the robot state alone: the mean future of the nearest training windows.

    python scripts/video_state_neighbours.py out/demo/infer              # a world-mode run of `xwam infer`
    python scripts/video_state_neighbours.py out/demo/infer --k 1,16     # neighbours averaged

For every window of the run (the held-out episodes `xwam infer` predicted), finds the k windows of the
store's OTHER episodes of the same task whose current state is nearest (Euclidean, each state dimension
standardised over those windows) and predicts the future frames as the mean of theirs. Prints, per k, the
PSNR (dB, future frames only, capped at 100 as `xwam evaluate`) overall and per view, beside the run's model,
repeat-the-current-frame and the mean frame. k = 1 draws one plausible future (a sample); a larger k
approaches the conditional mean given the state, which PSNR rewards. What it shows: how much of the future
frames the state predicts, i.e. what a model that reads its state could reach. docs/demo.md reads it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout
from xwam_core.evaluate import PSNR_CAP_DB
from xwam_core.metrics import psnr


def _ks(text: str) -> list[int]:
    items = text.split(",")
    if not all(item.isdigit() and int(item) > 0 for item in items):
        raise SystemExit(f"error: --k {text!r}: expected positive integers separated by commas, e.g. 1,16")
    return [int(item) for item in items]


def _score(pred: np.ndarray, true: np.ndarray) -> tuple[float, list[float]]:
    """Mean PSNR over every (window, view, frame) and per view; pred/true (N, V, T, H, W, 3)."""
    flat = psnr(pred.reshape(-1, *pred.shape[-3:]), true.reshape(-1, *true.shape[-3:]), 255.0)
    per = np.minimum(np.asarray(flat, np.float64), PSNR_CAP_DB).reshape(pred.shape[:3])
    return float(per.mean()), [float(x) for x in per.mean(axis=(0, 2))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a world-mode run folder written by `xwam infer`")
    parser.add_argument(
        "--k", type=_ks, default=[1, 4, 16, 64], help="neighbours averaged (default 1,4,16,64)"
    )
    args = parser.parse_args()
    manifest_path, path = args.run / "manifest.json", args.run / "predictions.npz"
    for needed in (manifest_path, path):
        if not needed.is_file():
            raise SystemExit(f"error: {needed}: not found; expected a world-mode `xwam infer` run folder")
    manifest = json.loads(manifest_path.read_text())
    store = EpisodeStore(manifest["store"])
    layout = WindowLayout(int(manifest["future_frames"]), int(manifest["frame_stride"]))
    with np.load(path) as run:
        missing = [
            key for key in ("true_rgb", "pred_rgb", "mean_rgb", "true_states", "task") if key not in run.files
        ]
        if missing:
            raise SystemExit(f"error: {path}: no {', '.join(missing)}; expected a world-mode run with states")
        true = run["true_rgb"][:, :, 1:].astype(np.float64)  # (N, V, T, H, W, 3): future frames only
        pred = run["pred_rgb"][:, :, 1:].astype(np.float64)
        current = np.repeat(run["true_rgb"][:, :, :1].astype(np.float64), true.shape[2], axis=2)
        mean = np.broadcast_to(run["mean_rgb"][None, :, 1:].astype(np.float64), true.shape)
        query_states = run["true_states"][:, 0].astype(np.float64)  # the current state of each window
        query_tasks = [str(t) for t in run["task"]]

    held_out = set(int(e) for e in manifest["episodes"])
    others = [i for i in range(len(store.episodes)) if i not in held_out]
    dataset = WindowDataset(store, layout, views=list(manifest["views"]), episodes=others, normalize=False)
    states, futures, tasks = [], [], []
    for i in range(len(dataset)):
        item = dataset[i]
        states.append(item["states"][0])
        futures.append(item["rgb"][:, 1:])  # uint8 (V, T, H, W, 3)
        tasks.append(store.tasks[item["task_index"]])
    pool_states = np.stack(states).astype(np.float64)
    pool_futures = np.stack(futures)
    pool_tasks = np.asarray(tasks)
    scale = pool_states.std(axis=0)
    scale[scale == 0] = 1.0

    views = list(manifest["views"])
    header = f"{'predictor':<22} {'all':>6} " + " ".join(f"{v[:10]:>10}" for v in views)
    print(f"{len(true)} windows, {len(pool_futures)} windows of {len(others)} other episodes to draw from")
    print(header)
    for name, frames in (("model", pred), ("repeat frame", current), ("mean frame", mean)):
        overall, per_view = _score(frames, true)
        print(f"{name:<22} {overall:6.2f} " + " ".join(f"{x:10.2f}" for x in per_view))
    for k in args.k:
        guess = np.empty_like(true)
        for j, (state, task) in enumerate(zip(query_states, query_tasks, strict=True)):
            same = np.nonzero(pool_tasks == task)[0]
            if not len(same):
                raise SystemExit(f"error: {manifest['store']}: no window of task {task!r} outside the run")
            distance = (((pool_states[same] - state) / scale) ** 2).sum(axis=1)
            nearest = same[np.argsort(distance, kind="stable")[:k]]
            guess[j] = pool_futures[nearest].astype(np.float64).mean(axis=0)
        overall, per_view = _score(guess, true)
        print(f"{f'nearest {k} states':<22} {overall:6.2f} " + " ".join(f"{x:10.2f}" for x in per_view))


if __name__ == "__main__":
    main()
