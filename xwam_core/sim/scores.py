"""The numbers a closed-loop table reports beside success: its 95% interval and a goal-following check.

    wilson_interval(4, 10)                     # (0.168, 0.687): the 95% Wilson score interval of 4/10
    goal_following(model_xyz, expert_xyz)      # Pearson r per axis across starts, and the spreads

Wilson score interval (Wilson 1927), not the normal approximation: it stays inside [0, 1] and is not
empty at 0/n or n/n, where the normal one collapses to a point. For k successes in n trials, z = 1.96:
    centre = (p + z^2 / 2n) / (1 + z^2 / n),  half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)
(the same as statsmodels' proportion_confint(method="wilson"); tests/test_sim_eval.py checks known values).

Goal following: for each held-out start, a policy's displacement over its first chunk (xyz, one row per
start) against the scripted expert's from the same start over the same number of steps. A policy that
follows the goal moves where the expert moves: its displacements correlate with the expert's across
starts, per axis. One that ignores the goal makes nearly the same move from every start: no correlation,
and a much smaller spread (std across starts) than the expert's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal
AXES = ("x", "y", "z")
MIN_STARTS = 3  # a correlation of fewer points says nothing


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of `successes` out of `trials` (>= 1)."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(
            f"wilson_interval({successes}, {trials}): expected 0 <= successes <= trials, trials >= 1"
        )
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two equally long 1-D samples; None with fewer than MIN_STARTS points or
    when either does not vary (a constant has no correlation)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < MIN_STARTS or len(a) != len(b):
        return None
    da, db = a - a.mean(), b - b.mean()
    na, nb = math.sqrt(float(da @ da)), math.sqrt(float(db @ db))
    if na <= 1e-12 * max(1.0, float(np.abs(a).max())) or nb <= 1e-12 * max(1.0, float(np.abs(b).max())):
        return None
    return float(np.clip(da @ db / (na * nb), -1.0, 1.0))


def goal_following(policy_xyz: np.ndarray, expert_xyz: np.ndarray) -> dict[str, Any]:
    """How a policy's displacements (starts, 3) follow the expert's (starts, 3) from the same starts.

    Returns {"starts": n, "r": {x, y, z} (None: n/a), "r_mean": mean of the axes' r (None if none),
    "std": {x, y, z} of the policy, "expert_std": {x, y, z}}; with fewer than MIN_STARTS starts every r
    is None (n/a).
    """
    p, e = np.asarray(policy_xyz, np.float64), np.asarray(expert_xyz, np.float64)
    if p.shape != e.shape or p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"goal_following: shapes {p.shape} and {e.shape}, expected two (starts, 3)")
    r = {axis: pearson(p[:, i], e[:, i]) for i, axis in enumerate(AXES)}
    known = [v for v in r.values() if v is not None]
    n = len(p)
    return {
        "starts": n,
        "r": r,
        "r_mean": float(np.mean(known)) if known else None,
        "std": {axis: float(p[:, i].std()) if n else None for i, axis in enumerate(AXES)},
        "expert_std": {axis: float(e[:, i].std()) if n else None for i, axis in enumerate(AXES)},
    }
