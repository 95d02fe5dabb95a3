"""Preview videos of a world-mode run: truth | prediction, RGB over colour-mapped depth."""

from __future__ import annotations

import math

import numpy as np

VIDEO_FPS = 4.0
VIDEO_MIN_HEIGHT = 192  # small frames are enlarged (nearest neighbour) to at least this many rows


def turbo(x: np.ndarray) -> np.ndarray:
    """Google's Turbo colour map (polynomial fit): values in [0, 1] -> uint8 RGB (..., 3)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    r = 0.13572138 + x * (
        4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396 + x * 59.28637943)))
    )
    g = 0.09140261 + x * (
        2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604)))
    )
    b = 0.10667330 + x * (
        12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912 + x * 27.34824973)))
    )
    return (np.clip(np.stack([r, g, b], -1), 0, 1) * 255).round().astype(np.uint8)


def colour_depth(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """Depth (..., H, W) metres -> RGB (..., H, W, 3): near red, far blue, invalid (<= 0) black."""
    depth = np.asarray(depth, dtype=np.float64)
    valid = np.isfinite(depth) & (depth > 0)
    x = 1.0 - (np.where(valid, depth, far) - near) / max(far - near, 1e-9)
    rgb = turbo(x)
    rgb[~valid] = 0
    return rgb


def depth_display_range(
    true_depth: np.ndarray, pred_depth: np.ndarray, max_depth: float
) -> tuple[float, float]:
    """One colour scale per view for truth and prediction: the 1-99th percentile of the valid truth."""
    valid = true_depth[(true_depth > 0) & (true_depth <= max_depth)]
    source = valid if valid.size else pred_depth[(pred_depth > 0) & (pred_depth <= max_depth)]
    if not source.size:
        return 0.0, max_depth
    lo, hi = (float(v) for v in np.percentile(source, [1, 99]))
    return lo, hi if hi > lo else lo + 1e-3


def side_by_side_frames(
    true_rgb: np.ndarray,
    pred_rgb: np.ndarray,
    true_depth: np.ndarray,
    pred_depth: np.ndarray,
    depth_range: tuple[float, float],
) -> np.ndarray:
    """(T, H, W, 3) x 2 and (T, H, W) x 2 -> (T, 2H', 2W', 3): truth | prediction, RGB over depth."""
    gap = 2
    top = np.concatenate([true_rgb, np.full_like(true_rgb[:, :, :gap], 255), pred_rgb], axis=2)
    lo, hi = depth_range
    td, pd = colour_depth(true_depth, lo, hi), colour_depth(pred_depth, lo, hi)
    bottom = np.concatenate([td, np.full_like(td[:, :, :gap], 255), pd], axis=2)
    frames = np.concatenate([top, np.full_like(top[:, :gap], 255), bottom], axis=1)
    scale = max(1, math.ceil(VIDEO_MIN_HEIGHT / frames.shape[1]))
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2  # yuv420p needs even sizes
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=255)
    return frames
