"""The `[prepare]` section of a recipe: which source, its options, how the store is made.

Its own light module (no torch, no diffusers), so the worker processes of a parallel prepare can receive
it without importing the model code (xwam_core.recipe re-exports it with the other sections).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xwam_core.errors import require


@dataclass
class MetaWorldSourceConfig:
    """Options of the `metaworld` source (simulator + scripted experts)."""

    tasks: list[str] = field(default_factory=lambda: ["reach-v3", "push-v3"])
    episodes: int = 4  # per task
    views: list[str] = field(default_factory=lambda: ["corner2", "topview", "gripperPOV"])
    size: int = 64  # square image size in pixels (64..256)
    seed: int = 0
    max_steps: int = 150
    render_quality: str = "fast"  # "fast" (no shadows/reflections/multisampling) or "default"
    # "hand": 8-D hand state; "task": + the first object's pose and the goal position (18-D)
    state: str = "hand"

    def validate(self) -> None:
        """The ranges MetaWorldSource enforces, checked when the recipe is loaded (task and camera names
        need the simulator: the source checks those)."""
        from xwam_core.data.sources import metaworld as mw  # light: the simulator is imported lazily

        key = "prepare.metaworld"
        require(bool(self.tasks), f"{key}.tasks", "a non-empty list of task names", self.tasks)
        require(bool(self.views), f"{key}.views", "a non-empty list of camera names", self.views)
        require(self.episodes >= 1, f"{key}.episodes", "an integer >= 1 (episodes per task)", self.episodes)
        require(
            mw.MIN_SIZE <= self.size <= mw.MAX_SIZE,
            f"{key}.size",
            f"an image size from {mw.MIN_SIZE} to {mw.MAX_SIZE} pixels",
            self.size,
        )
        require(self.seed >= 0, f"{key}.seed", "an integer >= 0", self.seed)
        require(
            1 <= self.max_steps <= mw.MAX_STEPS_LIMIT,
            f"{key}.max_steps",
            f"an integer from 1 to {mw.MAX_STEPS_LIMIT} (Meta-World's horizon)",
            self.max_steps,
        )
        require(
            self.render_quality in mw.RENDER_QUALITIES,
            f"{key}.render_quality",
            f"one of {', '.join(mw.RENDER_QUALITIES)}",
            self.render_quality,
        )
        require(
            self.state in mw.STATE_LAYOUTS,
            f"{key}.state",
            "'hand' (8-D hand state) or 'task' (hand, first object and goal, 18-D)",
            self.state,
        )


@dataclass
class LeRobotSourceConfig:
    """Options of the `lerobot` source (import a LeRobot v2.1/v3.0 dataset folder)."""

    path: str = ""
    # camera key -> view name, e.g. {"observation.images.front" = "front"}; empty: every camera.
    views: dict[str, str] = field(default_factory=dict)
    episodes: list[int] = field(default_factory=list)  # empty: all
    state_key: str = "observation.state"
    action_key: str = "action"
    depth_scale: float = 0.0  # metres per unit for 8-bit depth video; 0: unknown

    def validate(self) -> None:
        key = "prepare.lerobot"
        require(
            self.depth_scale >= 0, f"{key}.depth_scale", "metres per unit >= 0 (0: unknown)", self.depth_scale
        )
        require(all(e >= 0 for e in self.episodes), f"{key}.episodes", "episode indices >= 0", self.episodes)
        require(bool(self.state_key), f"{key}.state_key", "a column name", self.state_key)
        require(bool(self.action_key), f"{key}.action_key", "a column name", self.action_key)


@dataclass
class XWAMReleaseSourceConfig:
    """Options of the `xwam-release` source (import the X-WAM authors' release dataset layout)."""

    path: str = ""
    raw_actions: bool = False  # true: import each episode's `raw_actions` instead of `actions`

    def validate(self) -> None:
        require(
            isinstance(self.raw_actions, bool),
            "prepare.xwam_release.raw_actions",
            "true or false",
            self.raw_actions,
        )


@dataclass
class PrepareConfig:
    """`xwam prepare`: which source, where the store goes."""

    source: str = "metaworld"  # "metaworld", "lerobot" or "xwam-release"
    out: str = ""
    overwrite: bool = False
    # 2: RGB as AV1 video, cameras of fixed views once per episode (docs/data.md); 1: the PNG-in-parquet format
    store_format: int = 2
    # format 2's RGB video: "av1" (LeRobot's default) or "h264-444" (full colour resolution, for small images),
    # at a constant rate factor (0: the codec's default, 30 for av1, 18 for h264-444); see xwam_core.data.video
    video: str = "av1"
    video_crf: int = 0
    # episodes generated and encoded by this many processes on this machine (the store is the same)
    workers: int = 1
    # "i/N": prepare only shard i (0 .. N-1) of N, a shard folder for `xwam merge` (docs/data.md)
    shard: str = ""
    # import-time conforming (xwam_core.data.conform): [height, width] for every view (empty: as recorded),
    # a frame rate dividing the source's (0: as recorded), and how actions compose when frames are dropped
    resize: list[int] = field(default_factory=list)
    fps: float = 0.0
    action_kinds: list[str] = field(default_factory=list)
    metaworld: MetaWorldSourceConfig = field(default_factory=MetaWorldSourceConfig)
    lerobot: LeRobotSourceConfig = field(default_factory=LeRobotSourceConfig)
    xwam_release: XWAMReleaseSourceConfig = field(default_factory=XWAMReleaseSourceConfig)

    def validate(self) -> None:
        # `source` is checked by xwam_core.data.sources.make_source: sources can be registered at run time
        require(self.store_format in (1, 2), "prepare.store_format", "1 or 2", self.store_format)
        from xwam_core.data.video import STORE_VIDEO_KINDS

        require(
            self.video in STORE_VIDEO_KINDS, "prepare.video", f"one of {list(STORE_VIDEO_KINDS)}", self.video
        )
        require(
            isinstance(self.video_crf, int) and 0 <= self.video_crf <= 63,
            "prepare.video_crf",
            "an integer 1..63 (0: the codec's default)",
            self.video_crf,
        )
        require(self.workers >= 1, "prepare.workers", "an integer >= 1", self.workers)
        if self.shard:
            from xwam_core.data.shards import parse_shard

            parse_shard(self.shard)
        require(
            not self.resize or (len(self.resize) == 2 and all(x >= 16 and x % 2 == 0 for x in self.resize)),
            "prepare.resize",
            "[height, width], even integers >= 16 (empty: as recorded)",
            self.resize,
        )
        require(self.fps >= 0, "prepare.fps", "a frame rate > 0 (0: as recorded)", self.fps)
        require(
            all(k in ("delta", "absolute") for k in self.action_kinds),
            "prepare.action_kinds",
            "'delta' or 'absolute' per action dimension",
            self.action_kinds,
        )
        self.metaworld.validate()
        self.lerobot.validate()
        self.xwam_release.validate()
