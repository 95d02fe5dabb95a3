"""scripts/video_blend_bound.py (docs/demo.md's video limit): per future frame, the model's PSNR beside
repeat-the-frame, the mean frame and their best blend; one error line for a folder without predictions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "video_blend_bound.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_scores_and_the_blend_bound(tmp_path: Path):
    rng = np.random.default_rng(0)
    n, v, t, h, w = 4, 2, 3, 8, 8
    background = rng.uniform(0, 255, (v, 1, h, w, 3))
    true = np.repeat(np.repeat(background[None], n, axis=0), t, axis=2)
    true[:, :, 0, :2] = 255.0  # the "arm" sits in the current frame's top rows, then leaves
    mean = true.mean(axis=0)
    mean[:, 1:] = background  # the mean future frame is the background
    pred = true.copy()
    pred[:, :, 1:] = true[:, :, :1]  # a model that repeats the current frame
    np.savez(
        tmp_path / "predictions.npz",
        true_rgb=true.astype(np.uint8),
        pred_rgb=pred.astype(np.uint8),
        mean_rgb=mean.astype(np.float32),
    )
    result = _run(str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2", "all"]
    for row in rows:
        model, repeat, mean_db, best = (float(x) for x in row[1:5])
        assert model == repeat  # the model repeats the frame
        assert best >= max(repeat, mean_db) - 1e-9  # the blends include both ends
    assert float(rows[0][3]) > 45  # the mean frame is the background (up to uint8 rounding)
    assert float(rows[0][2]) < 30  # repeating keeps the arm where it was


def test_a_folder_without_predictions_is_one_error_line(tmp_path: Path):
    result = _run(str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'predictions.npz'}: not found; expected the predictions of a world-mode `xwam infer` run"
    ]
