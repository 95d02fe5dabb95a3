"""Shared fixtures: tiny synthetic episodes and stores built on the spot (no simulator, no download)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from xwam_core.data.episode import Episode, ViewFrames
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.data.store import StoreWriter


@pytest.fixture(autouse=True, scope="session")
def frame_cache_in_session_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Frame caches go to the session's temporary folder, never to the user's ~/.cache/xwam."""
    from xwam_core.data.frame_cache import CACHE_ENV

    root = tmp_path_factory.getbasetemp() / "xwam-cache"
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(root)
    yield root
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


def synthetic_episode(
    rng: np.random.Generator,
    length: int,
    size: tuple[int, int],
    views: list[str],
    task: str,
    state_dim: int = 8,
    action_dim: int = 4,
    cameras: bool = True,
    depth: bool = True,
) -> Episode:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    frames = {}
    for vi, name in enumerate(views):
        phase = rng.uniform(0, 2 * np.pi)
        t = np.arange(length)[:, None, None]
        base = 127 + 100 * np.sin(xx[None] / 7.0 + yy[None] / 11.0 + t * 0.3 + phase + vi)
        rgb = np.stack([base, np.roll(base, 3, axis=2), 255 - base], axis=-1).clip(0, 255).astype(np.uint8)
        d = (0.5 + 0.3 * (yy / h) + 0.01 * t + 0.1 * vi).astype(np.float32) if depth else None
        if d is not None:
            d = np.broadcast_to(d, (length, h, w)).copy()
        k = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float32)
        pose = np.eye(4, dtype=np.float32)
        pose[:3, 3] = [0.1 * vi, 0.0, 0.0]
        frames[name] = ViewFrames(
            rgb=rgb,
            depth=d,
            intrinsics=np.repeat(k[None], length, 0) if cameras else None,
            extrinsics=np.repeat(pose[None], length, 0) if cameras else None,
        )
    state = np.cumsum(rng.normal(0, 0.01, (length, state_dim)), axis=0).astype(np.float32)
    action = rng.uniform(-1, 1, (length, action_dim)).astype(np.float32)
    return Episode(
        task=task, views=frames, state=state, action=action, fps=20.0, success=bool(rng.uniform() > 0.3)
    )


class SyntheticSource(EpisodeSource):
    """Deterministic smooth images, depth and cameras; for tests of the store and the loader."""

    def __init__(
        self,
        episodes: int = 3,
        length: int = 20,
        size: tuple[int, int] = (32, 40),
        views: tuple[str, ...] = ("front", "side"),
        seed: int = 0,
        depth: bool = True,
        cameras: bool = True,
        tasks: tuple[str, ...] = ("reach", "push"),
        state_names: tuple[str, ...] = tuple(f"s{i}" for i in range(8)),  # 8 names
    ):
        self.n, self.length, self.size, self.views = episodes, length, size, list(views)
        self.seed, self.depth, self.cameras, self.tasks = seed, depth, cameras, tasks
        self.state_names = list(state_names)

    def info(self) -> SourceInfo:
        return SourceInfo(
            name="synthetic",
            robot_type="test",
            fps=20.0,
            views=self.views,
            image_size=self.size,
            state_names=list(self.state_names),
            action_names=[f"a{i}" for i in range(4)],
            num_episodes=self.n,
            has_depth=self.depth,
            has_cameras=self.cameras,
        )

    def episodes(self) -> Iterator[Episode]:
        rng = np.random.default_rng(self.seed)
        for i in range(self.n):
            yield synthetic_episode(
                rng,
                self.length,
                self.size,
                self.views,
                self.tasks[i % len(self.tasks)],
                cameras=self.cameras,
                depth=self.depth,
            )


class RecordingProgress:
    """A `xwam_core.progress.Progress` that records every task: label -> {total, done, info}."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict] = {}
        self.lines: list[str] = []

    def task(self, label: str, total: int, completed: int = 0) -> _RecordedTask:
        self.tasks[label] = {"total": total, "done": completed, "info": None}
        return _RecordedTask(self.tasks[label])

    def log(self, message: str) -> None:
        self.lines.append(message)


class _RecordedTask:
    def __init__(self, record: dict) -> None:
        self.record = record

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.record["done"] += n
        if info is not None:
            self.record["info"] = info


def write_store(path: Path, source: EpisodeSource) -> list[Episode]:
    episodes = list(source.episodes())
    with StoreWriter(path, source.info()) as writer:
        for ep in episodes:
            writer.add(ep)
    return episodes


def read_episode(store: EpisodeStore, index: int) -> Episode:
    """Decode one whole episode straight from the store's files (not through the frame cache)."""
    return store.read_episode(index)


@pytest.fixture
def synthetic_store(tmp_path: Path) -> tuple[Path, list[Episode]]:
    path = tmp_path / "store"
    return path, write_store(path, SyntheticSource())


def synthetic_builder(cfg: object) -> SyntheticSource:
    """An importable builder of a small synthetic source, so worker processes (spawned) can build it."""
    return SyntheticSource(episodes=5, length=12, size=(32, 32))


def free_port() -> int:
    """A TCP port free on loopback now (for torchrun's --master_port and servers in tests): fixed numbers
    collide between parallel test workers and with what other runs left in use."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
