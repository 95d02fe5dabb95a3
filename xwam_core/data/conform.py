"""Import-time conforming of a source's episodes: image resizing and frame-rate resampling.

Applied to every episode before it is encoded (`xwam prepare`, `prepare.resize` and `prepare.fps`), so a
store holds what training reads and nothing larger:

- Resize to (H, W) for every view: RGB with PIL's bilinear filter (antialiased when shrinking), depth with
  the nearest pixel (averaging depth across an object's edge would invent points between foreground and
  background), intrinsics scaled to match with pixel centres at integer coordinates (OpenCV):
  fx' = fx * sx, cx' = (cx + 0.5) * sx - 0.5, likewise fy, cy with sy (sx = W' / W, sy = H' / H).
- Resample to a rate that divides the source's (fps / k for an integer k): frames 0, k, 2k, ... are kept
  with their state, images and cameras as recorded. The action after kept frame j must take the robot to
  kept frame j + 1, so the k actions between them are composed per dimension: a "delta" (a change, e.g.
  Meta-World's hand displacement) is summed, an "absolute" one (a target, e.g. a joint position or a
  gripper level) is the last of the k. The last kept frame composes the actions left after it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.sources.base import SourceInfo
from xwam_core.errors import DataError

ACTION_KINDS = ("delta", "absolute")
MIN_SIZE = 16


@dataclass(frozen=True)
class Conform:
    """What to do to every episode of a source: `resize` to (H, W) or keep; keep every `step`-th frame."""

    size: tuple[int, int]  # the source's (H, W)
    resize: tuple[int, int] | None
    step: int
    fps: float  # after resampling
    action_kinds: tuple[str, ...] | None  # per action dimension when step > 1

    @property
    def identity(self) -> bool:
        return self.resize is None and self.step == 1


def make_conform(
    info: SourceInfo, resize: list[int] | None = None, fps: float = 0.0, action_kinds: list[str] | None = None
) -> Conform:
    """Check `prepare.resize`, `prepare.fps` and `prepare.action_kinds` against the source; one line if wrong."""
    size = (int(info.image_size[0]), int(info.image_size[1]))
    target: tuple[int, int] | None = None
    if resize:
        if len(resize) != 2 or any(not isinstance(x, int) or x < MIN_SIZE or x % 2 for x in resize):
            raise DataError(
                f"prepare.resize={list(resize)!r}: expected [height, width], even integers >= {MIN_SIZE} "
                "(video needs even sizes)"
            )
        target = (resize[0], resize[1])
        if target == size:
            target = None
    step = 1
    if fps:
        ratio = info.fps / fps
        step = round(ratio)
        if fps <= 0 or step < 1 or abs(ratio - step) > 1e-6 * ratio:
            choices = ", ".join(f"{info.fps / k:g}" for k in range(1, 6))
            raise DataError(
                f"prepare.fps={fps!r}: the source records at {info.fps:g} fps; expected its rate divided by "
                f"an integer ({choices}, ...)"
            )
    kinds: tuple[str, ...] | None = None
    if step > 1:
        given = action_kinds or info.action_kinds
        names = info.action_names
        if not given:
            raise DataError(
                f"prepare.fps={fps!r} drops frames, and the source does not say how its actions compose: "
                f"set prepare.action_kinds to 'delta' (summed) or 'absolute' (last) for each of {names}"
            )
        if len(given) != len(names) or any(k not in ACTION_KINDS for k in given):
            raise DataError(
                f"prepare.action_kinds={list(given)!r}: expected 'delta' or 'absolute' for each of the "
                f"{len(names)} action dimensions {names}"
            )
        kinds = tuple(given)
    return Conform(size=size, resize=target, step=step, fps=info.fps / step, action_kinds=kinds)


def conform_info(info: SourceInfo, conform: Conform) -> SourceInfo:
    """The source's description after conforming; what was done is recorded in `extra["import"]`."""
    if conform.identity:
        return info
    record: dict[str, object] = {}
    if conform.resize is not None:
        record["resized_from"] = list(conform.size)
    if conform.step > 1:
        record.update(
            {
                "fps_from": info.fps,
                "frame_step": conform.step,
                "action_kinds": list(conform.action_kinds or []),
            }
        )
    return dataclasses.replace(
        info,
        image_size=conform.resize or info.image_size,
        fps=conform.fps,
        extra={**info.extra, "import": record},
    )


def conform_episode(episode: Episode, conform: Conform) -> Episode:
    """`episode` resampled, then resized (fewer frames to resize)."""
    if conform.step > 1:
        episode = _resample(episode, conform.step, conform.fps, conform.action_kinds or ())
    if conform.resize is not None:
        episode = _resize(episode, conform.resize)
    return episode


def _resample(episode: Episode, step: int, fps: float, kinds: tuple[str, ...]) -> Episode:
    n = episode.length
    keep = np.arange(0, n, step)  # (T',)
    action = episode.action.astype(np.float64)
    summed = np.add.reduceat(action, keep, axis=0)  # (T', D): actions keep[j] .. keep[j+1] - 1
    last = action[np.minimum(keep + step, n) - 1]  # (T', D)
    delta = np.array([k == "delta" for k in kinds])
    composed = np.where(delta[None], summed, last).astype(np.float32)
    views = {
        name: ViewFrames(
            rgb=view.rgb[keep],
            depth=None if view.depth is None else view.depth[keep],
            intrinsics=None if view.intrinsics is None else view.intrinsics[keep],
            extrinsics=None if view.extrinsics is None else view.extrinsics[keep],
        )
        for name, view in episode.views.items()
    }
    return dataclasses.replace(episode, views=views, state=episode.state[keep], action=composed, fps=fps)


def _resize(episode: Episode, size: tuple[int, int]) -> Episode:
    height, width = size
    views = {}
    for name, view in episode.views.items():
        h, w = view.rgb.shape[1:3]
        rgb = np.stack(
            [
                np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BILINEAR))
                for f in view.rgb
            ]
        )
        depth = None
        if view.depth is not None:
            depth = np.stack(
                [
                    np.asarray(
                        Image.fromarray(d.astype(np.float32), mode="F").resize(
                            (width, height), Image.Resampling.NEAREST
                        )
                    )
                    for d in view.depth
                ]
            )
        intrinsics = None
        if view.intrinsics is not None:
            sx, sy = width / w, height / h
            intrinsics = view.intrinsics.astype(np.float64).copy()  # (T, 3, 3)
            intrinsics[:, 0, 0] *= sx
            intrinsics[:, 0, 1] *= sx
            intrinsics[:, 0, 2] = (intrinsics[:, 0, 2] + 0.5) * sx - 0.5
            intrinsics[:, 1, 1] *= sy
            intrinsics[:, 1, 2] = (intrinsics[:, 1, 2] + 0.5) * sy - 0.5
            intrinsics = intrinsics.astype(np.float32)
        views[name] = ViewFrames(rgb=rgb, depth=depth, intrinsics=intrinsics, extrinsics=view.extrinsics)
    return dataclasses.replace(episode, views=views)
