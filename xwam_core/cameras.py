"""Where the cameras of a predicted future are: fixed views keep their pose, a wrist view follows the
predicted end-effector (docs/method.md section 6).

A moving view's future poses are the PREDICTED end-effector pose times the hand-eye transform measured
at the observed frame, when the state holds the pose (ee_x..ee_qz); otherwise the recorded poses are
used (they reveal where the camera went, and the run's manifest says so).
"""

from __future__ import annotations

import numpy as np

from xwam_core.data.reader import EpisodeStore

EE_POSE_NAMES = ("ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz")
FIXED_TOLERANCE = 1e-5  # a view is fixed if its recorded pose never moves more than this


def pose_indices(state_names: list[str]) -> list[int] | None:
    """Indices of ee_x..ee_qz in the state, or None when the state does not hold the end-effector pose."""
    if not all(n in state_names for n in EE_POSE_NAMES):
        return None
    return [state_names.index(n) for n in EE_POSE_NAMES]


def quaternion_matrix(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions w, x, y, z (normalised here) -> (..., 3, 3) rotations."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    w, x, y, z = np.moveaxis(q, -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def hand_poses(states: np.ndarray, indices: list[int]) -> np.ndarray:
    """(..., Ds) states -> (..., 4, 4) end-effector-to-world poses from the ee_x..ee_qz dimensions."""
    s = np.asarray(states, dtype=np.float64)[..., indices]
    pose = np.zeros((*s.shape[:-1], 4, 4))
    pose[..., :3, :3] = quaternion_matrix(s[..., 3:7])
    pose[..., :3, 3] = s[..., :3]
    pose[..., 3, 3] = 1.0
    return pose


def predicted_cameras(
    extrinsics: np.ndarray,
    moving: list[bool],
    pred_states: np.ndarray,
    true_state0: np.ndarray,
    pose_indices: list[int] | None,
) -> np.ndarray:
    """Camera-to-world poses (N, V, T, 4, 4) to unproject the prediction with (see the module docstring).

    extrinsics (N, V, T, 4, 4) recorded; pred_states (N, T, Ds); true_state0 (N, Ds) the observed state.
    """
    out = np.repeat(extrinsics[:, :, :1].astype(np.float64), extrinsics.shape[2], axis=2)  # frame 0's pose
    for v, is_moving in enumerate(moving):
        if not is_moving:
            continue
        if pose_indices is None:
            out[:, v] = extrinsics[:, v]
            continue
        hand_eye = np.linalg.inv(hand_poses(true_state0, pose_indices)) @ extrinsics[:, v, 0]  # (N, 4, 4)
        out[:, v] = hand_poses(pred_states, pose_indices) @ hand_eye[:, None]
        out[:, v, 0] = extrinsics[:, v, 0]
    return out.astype(np.float32)


def moving_views(store: EpisodeStore, views: list[str]) -> list[bool]:
    """Whether each view's recorded camera ever moves in the store (a wrist camera)."""
    if not store.has_cameras:
        return [False] * len(views)
    cache = store.frame_cache()
    out = []
    for v in views:
        poses = cache.extrinsics[v]
        out.append(bool(len(poses) and np.abs(poses - poses[:1]).max() > FIXED_TOLERANCE))
    return out
