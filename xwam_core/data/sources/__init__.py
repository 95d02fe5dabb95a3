"""Episode sources: everything that turns robot episodes into `Episode` objects.

Add a source by implementing `EpisodeSource` (base.py) and registering a builder in `SOURCES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.errors import DataError

if TYPE_CHECKING:
    from xwam_core.recipe import PrepareConfig


def _metaworld(cfg: PrepareConfig) -> EpisodeSource:
    try:
        from xwam_core.data.sources.metaworld import MetaWorldSource
    except ImportError as e:
        raise DataError(
            f"source 'metaworld' needs the simulator extra: pip install 'xwam[sim]' ({e})"
        ) from None
    m = cfg.metaworld
    return MetaWorldSource(
        tasks=m.tasks,
        episodes=m.episodes,
        views=m.views,
        size=m.size,
        seed=m.seed,
        max_steps=m.max_steps,
        render_quality=m.render_quality,
        state=m.state,
    )


def _lerobot(cfg: PrepareConfig) -> EpisodeSource:
    from xwam_core.data.sources.lerobot import LeRobotSource

    lr = cfg.lerobot
    if not lr.path:
        raise DataError("source 'lerobot' needs a dataset folder: xwam prepare lerobot PATH --out DIR")
    return LeRobotSource(
        path=lr.path,
        views=lr.views or None,
        episodes=lr.episodes or None,
        state_key=lr.state_key,
        action_key=lr.action_key,
        depth_scale=lr.depth_scale or None,
    )


def _xwam_release(cfg: PrepareConfig) -> EpisodeSource:
    from xwam_core.data.sources.xwam_release import XWAMReleaseSource

    xr = cfg.xwam_release
    if not xr.path:
        raise DataError(
            "source 'xwam-release' needs a dataset folder: xwam prepare xwam-release PATH --out DIR"
        )
    return XWAMReleaseSource(path=xr.path, raw_actions=xr.raw_actions)


SOURCES: dict[str, Callable[[PrepareConfig], EpisodeSource]] = {
    "metaworld": _metaworld,
    "lerobot": _lerobot,
    "xwam-release": _xwam_release,
}


def make_source(cfg: PrepareConfig) -> EpisodeSource:
    if cfg.source not in SOURCES:
        raise DataError(f"unknown source '{cfg.source}' (expected one of: {', '.join(SOURCES)})")
    return SOURCES[cfg.source](cfg)


__all__ = ["SOURCES", "EpisodeSource", "SourceInfo", "make_source"]
