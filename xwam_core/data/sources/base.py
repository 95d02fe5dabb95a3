"""The one small interface every episode source implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

from xwam_core.data.episode import Episode


@dataclass
class SourceInfo:
    """What a source knows before producing any episode (written to meta/info.json)."""

    name: str  # e.g. "metaworld", "lerobot"
    robot_type: str
    fps: float
    views: list[str]  # view names in the store's fixed order
    image_size: tuple[int, int]  # (H, W)
    state_names: list[str]
    action_names: list[str]
    num_episodes: int  # how many episodes iterating will yield (for the progress bar)
    has_depth: bool
    has_cameras: bool
    # "metric": depth in metres; "relative": not metric (e.g. the xwam release), no point clouds
    depth_kind: str = "metric"
    # views whose cameras move within an episode (a wrist camera): their intrinsics/extrinsics are stored
    # per frame, the others' once per episode; None: the views whose cameras change in the first episode
    moving_views: list[str] | None = None
    extra: dict[str, object] = field(default_factory=dict)


class EpisodeSource(ABC):
    """Produces episodes one at a time. Validation of options happens in __init__ (fail early)."""

    @abstractmethod
    def info(self) -> SourceInfo: ...

    @abstractmethod
    def episodes(self) -> Iterator[Episode]: ...
