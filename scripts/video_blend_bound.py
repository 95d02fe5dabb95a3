"""How far video PSNR gets without predicting motion: blends of the current frame and the mean frame.

    python scripts/video_blend_bound.py out/demo/infer        # a world-mode run folder of `xwam infer`

Reads the run's predictions.npz (true frames, the model's frames and the mean-frame baseline the run saved,
xwam_core.mean_frame) and prints, per future frame and over all of them, the PSNR (dB, future frames only,
as `xwam evaluate`) of the model, of repeat-the-current-frame, of the mean frame, and of the best blend
a * current + (1 - a) * mean with `a` chosen per future frame on these same windows (an oracle: an upper
bound for any predictor that only blends the two, i.e. that knows the scene's statistics but not where the
arm goes). docs/demo.md reads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from xwam_core.metrics import psnr

ALPHAS = np.round(np.linspace(0.0, 1.0, 11), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a world-mode run folder written by `xwam infer`")
    args = parser.parse_args()
    path = args.run / "predictions.npz"
    if not path.is_file():
        raise SystemExit(
            f"error: {path}: not found; expected the predictions of a world-mode `xwam infer` run"
        )
    with np.load(path) as run:
        if "mean_rgb" not in run.files or "pred_rgb" not in run.files:
            raise SystemExit(
                f"error: {path}: no pred_rgb/mean_rgb; expected a world-mode run with the mean frame"
            )
        true = run["true_rgb"][:, :, 1:].astype(np.float64)  # (N, V, T, H, W, 3): future frames only
        pred = run["pred_rgb"][:, :, 1:].astype(np.float64)
        current = np.repeat(run["true_rgb"][:, :, :1].astype(np.float64), true.shape[2], axis=2)
        mean = np.repeat(run["mean_rgb"][None, :, 1:].astype(np.float64), true.shape[0], axis=0)

    def score(x: np.ndarray, f: int | None = None) -> float:
        sel = (slice(None), slice(None), slice(f, f + 1)) if f is not None else (slice(None),)
        return float(
            psnr(x[sel].reshape(-1, *x.shape[-3:]), true[sel].reshape(-1, *x.shape[-3:]), 255.0).mean()
        )

    frames = true.shape[2]
    print(f"{'future frame':>12} {'model':>7} {'repeat':>7} {'mean':>7} {'best blend':>10} {'a':>5}")
    best_rows = []
    for f in range(frames):
        blends = [score(a * current + (1 - a) * mean, f) for a in ALPHAS]
        k = int(np.argmax(blends))
        best_rows.append(blends[k])
        print(
            f"{f + 1:>12} {score(pred, f):7.2f} {score(current, f):7.2f} {score(mean, f):7.2f} "
            f"{blends[k]:10.2f} {ALPHAS[k]:5.1f}"
        )
    print(
        f"{'all':>12} {score(pred):7.2f} {score(current):7.2f} {score(mean):7.2f} {np.mean(best_rows):10.2f}"
    )


if __name__ == "__main__":
    main()
