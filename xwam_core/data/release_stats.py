"""Which q01/q99 normalise actions and states (`data.normalization`), for any store.

Both settings use the one arithmetic of xwam_core.normalizer, 2 (x - q01) / (q99 - q01) - 1 per dimension;
they differ in the bounds:

- "quantile" (default): each dimension's 1st/99th percentile over the store (its meta/stats.json).
- "release": the X-WAM authors' statistics rules (their scripts/compute_stats.py), generalised by
  dimension names, computed from the store's actions and states:
  * state dimensions named `*_qw`, `*_qx`, `*_qy`, `*_qz` (quaternions): q01 = -1, q99 = 1, i.e. identity;
  * state dimensions whose name contains "gripper": one q01/q99 pooled over all of them (the release
    pools the arms' gripper positions);
  * other state dimensions: their own percentiles, as "quantile";
  * action dimensions: their own percentiles made symmetric, -M/+M with M = max(|q01|, |q99|);
  * action dimensions whose name contains "gripper": one pair pooled over all of them, over the steps
    where the gripper moves only, then symmetric. A step t (not an episode's last frame) moves when the
    matching state gripper g (the state dimension of the same name, else the k-th state gripper for the
    k-th action gripper) changes by |2 (g[t+1] - g[t]) / (q99 - q01)| >= 0.01, with the pooled state
    gripper bounds. For the release's delta gripper action a[t] = g[t+1] - g[t] this is exactly its rule
    |2 a / (q99 - q01)| >= 0.01. An action gripper with no state gripper to match uses all its steps; when
    no step moves at all, all steps are used.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xwam_core.normalizer import STAT_KEYS, Normalizer

NORMALIZATIONS = ("quantile", "release")
QUATERNION_SUFFIXES = ("_qw", "_qx", "_qy", "_qz")
STATIC_THRESHOLD = 0.01  # the release's: in normalised gripper units


def is_quaternion(name: str) -> bool:
    return name.endswith(QUATERNION_SUFFIXES)


def is_gripper(name: str) -> bool:
    return "gripper" in name.lower()


def _quantiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of (N, D): 1st and 99th percentiles (float64)."""
    values = np.asarray(values, np.float64)
    return np.quantile(values, 0.01, axis=0), np.quantile(values, 0.99, axis=0)


def _symmetric(q01: np.ndarray, q99: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.maximum(np.abs(q01), np.abs(q99))
    return -m, m


def moving_steps(gripper: np.ndarray, has_next: np.ndarray, span: float) -> np.ndarray:
    """(N,) bool: steps t with a next frame in the same episode where the gripper moves (the release's
    |2 (g[t+1] - g[t]) / span| >= STATIC_THRESHOLD)."""
    delta = np.zeros(len(gripper))
    delta[:-1] = gripper[1:] - gripper[:-1]
    return has_next & (np.abs(2.0 * delta / max(span, 1e-6)) >= STATIC_THRESHOLD)


def release_quantiles(
    action: np.ndarray,
    state: np.ndarray,
    episode_lengths: list[int],
    action_names: list[str],
    state_names: list[str],
) -> dict[str, dict[str, list[float]]]:
    """{"action"|"state": {"q01", "q99"}} by the release's rules (module docstring) from a store's
    (N, Da) actions and (N, Ds) states in frame order, episodes back to back with these lengths."""
    action = np.asarray(action, np.float64)
    state = np.asarray(state, np.float64)
    has_next = np.ones(len(state), bool)
    has_next[np.cumsum(episode_lengths) - 1] = False  # an episode's last frame has no t + 1

    s01, s99 = _quantiles(state)
    state_grip = [i for i, n in enumerate(state_names) if is_gripper(n)]
    if state_grip:
        g01, g99 = _quantiles(state[:, state_grip].reshape(-1, 1))
        s01[state_grip], s99[state_grip] = g01[0], g99[0]
    quat = [i for i, n in enumerate(state_names) if is_quaternion(n)]
    s01[quat], s99[quat] = -1.0, 1.0

    a01, a99 = _symmetric(*_quantiles(action))
    action_grip = [j for j, n in enumerate(action_names) if is_gripper(n)]
    if action_grip:
        span = float(s99[state_grip[0]] - s01[state_grip[0]]) if state_grip else 0.0
        pooled, everything = [], []
        for k, j in enumerate(action_grip):
            name = action_names[j]
            if name in state_names and state_names.index(name) in state_grip:
                match: int | None = state_names.index(name)
            else:
                match = state_grip[k] if k < len(state_grip) else None
            steps = (
                moving_steps(state[:, match], has_next, span)
                if match is not None
                else np.ones(len(action), bool)
            )
            pooled.append(action[steps, j])
            everything.append(action[:, j])
        values = np.concatenate(pooled)
        if values.size == 0:
            values = np.concatenate(everything)
        g01, g99 = _symmetric(*_quantiles(values.reshape(-1, 1)))
        a01[action_grip], a99[action_grip] = g01[0], g99[0]
    return {
        "action": {"q01": a01.tolist(), "q99": a99.tolist()},
        "state": {"q01": s01.tolist(), "q99": s99.tolist()},
    }


def build_normalizer(
    stats: dict[str, Any],
    action_names: list[str],
    state_names: list[str],
    normalization: str = "quantile",
    action: np.ndarray | None = None,
    state: np.ndarray | None = None,
    episode_lengths: list[int] | None = None,
) -> Normalizer:
    """The Normalizer of `data.normalization` for a store: its meta/stats.json `stats` (mean, std, min,
    max are kept either way), and for "release" its (N, D) actions and states and episode lengths."""
    base = Normalizer.from_store_stats(stats, action_names, state_names)
    if normalization == "quantile":
        return base
    if normalization != "release":
        raise ValueError(f"normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
    if action is None or state is None or episode_lengths is None:
        raise ValueError("the release normalization needs the store's actions, states and episode lengths")
    picked = release_quantiles(action, state, episode_lengths, list(action_names), list(state_names))
    merged = {
        key: {**{k: v for k, v in base.stats[key].items() if k in STAT_KEYS}, **picked[key]}
        for key in ("action", "state")
    }
    return Normalizer(list(action_names), list(state_names), merged, normalization="release")
