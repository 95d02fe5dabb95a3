"""The one small interface every episode source implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
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
    # how actions compose when frames are dropped (xwam_core.data.conform): per action dimension "delta"
    # (a change: summed over the dropped steps) or "absolute" (a target: the last one holds); None: unknown
    action_kinds: list[str] | None = None
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

    def episodes_at(self, indices: Sequence[int]) -> Iterator[Episode]:
        """The episodes numbered `indices` (positions in `episodes()`, ascending), in that order.

        What a worker or a shard of a parallel prepare produces (xwam_core.data.shards): episode i must be
        the same whoever produces it. This default walks `episodes()` and skips the others; sources that
        can go straight to an episode override it.
        """
        wanted = sorted(set(indices))
        if not wanted:
            return
        position = 0
        for index, episode in enumerate(self.episodes()):
            if index == wanted[position]:
                yield episode
                position += 1
                if position == len(wanted):
                    return
