"""The in-memory episode: what every source produces and what the store writes.

Conventions (shared by every source, the store and the geometry code):
- RGB: uint8 (T, H, W, 3) per view, row 0 is the top of the image.
- Depth: float32 (T, H, W) metric depth in metres along the camera's optical axis (z), 0 = invalid.
- Intrinsics: float32 (T, 3, 3) pinhole K in pixels, for the stored image size.
- Extrinsics: float32 (T, 4, 4) camera-to-world, OpenCV camera axes (x right, y down, z forward).
- State / action: float32 (T, D). action[t] is the command applied after observing frame t.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xwam_core.errors import DataError


@dataclass
class ViewFrames:
    """All frames of one camera view in one episode."""

    rgb: np.ndarray  # (T, H, W, 3) uint8
    depth: np.ndarray | None = None  # (T, H, W) float32 metres, 0 = invalid
    intrinsics: np.ndarray | None = None  # (T, 3, 3) float32
    extrinsics: np.ndarray | None = None  # (T, 4, 4) float32 camera-to-world (OpenCV axes)


@dataclass
class Episode:
    """One recorded episode with every view, the robot state and the actions."""

    task: str
    views: dict[str, ViewFrames]
    state: np.ndarray  # (T, D_state) float32
    action: np.ndarray  # (T, D_action) float32
    fps: float
    success: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.state.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        first = next(iter(self.views.values()))
        return int(first.rgb.shape[1]), int(first.rgb.shape[2])

    def validate(self, where: str = "episode") -> None:
        """Raise DataError with one clear line if shapes, dtypes or values are inconsistent."""
        n = self.length
        if n < 1:
            raise DataError(f"{where}: has no frames")
        if self.action.ndim != 2 or self.action.shape[0] != n:
            raise DataError(
                f"{where}: action has shape {self.action.shape}, expected ({n}, D) to match state"
            )
        if self.state.ndim != 2:
            raise DataError(f"{where}: observation.state has shape {self.state.shape}, expected (T, D)")
        for key, arr in (("action", self.action), ("observation.state", self.state)):
            if not np.isfinite(arr).all():
                bad = int(np.argwhere(~np.isfinite(arr))[0][0])
                raise DataError(f"{where}: {key} has NaN/inf at frame {bad}; expected finite values")
        if not self.views:
            raise DataError(f"{where}: has no camera views")
        size = self.image_size
        for name, view in self.views.items():
            vw = f"{where}: view '{name}'"
            if view.rgb.dtype != np.uint8 or view.rgb.ndim != 4 or view.rgb.shape[-1] != 3:
                raise DataError(
                    f"{vw} rgb has {view.rgb.dtype} {view.rgb.shape}, expected uint8 (T, H, W, 3)"
                )
            if view.rgb.shape[0] != n:
                raise DataError(f"{vw} has {view.rgb.shape[0]} frames, expected {n} like observation.state")
            if tuple(view.rgb.shape[1:3]) != size:
                raise DataError(
                    f"{vw} images are {tuple(view.rgb.shape[1:3])}, expected {size} like the other views"
                )
            if view.depth is not None and view.depth.shape != (n, *size):
                raise DataError(f"{vw} depth has shape {view.depth.shape}, expected {(n, *size)}")
            if view.depth is not None and not np.isfinite(view.depth).all():
                raise DataError(f"{vw} depth has NaN/inf; expected finite metres (0 = invalid)")
            if view.intrinsics is not None and view.intrinsics.shape != (n, 3, 3):
                raise DataError(f"{vw} intrinsics have shape {view.intrinsics.shape}, expected ({n}, 3, 3)")
            if view.extrinsics is not None and view.extrinsics.shape != (n, 4, 4):
                raise DataError(f"{vw} extrinsics have shape {view.extrinsics.shape}, expected ({n}, 4, 4)")
