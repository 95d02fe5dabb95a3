"""Training windows: the current frame + F future frames at a frame stride, with the actions and states
they span, every view's RGB, depth and cameras, normalized with the store's statistics (the bounds chosen
by `normalization`: xwam_core.data.release_stats).

A window starting at store frame s covers frames s, s + stride, ..., s + F * stride; its K = F * stride
actions are action[s : s + K] and its F + 1 states are the states at the window's frames.

Episode ends (`pad_episode_ends=True`, the recipe's `data.pad_episode_ends`, the trainer's default): a
window starts at every frame of an episode, its last included. Every index past the episode's last frame
L - 1 is clamped to it: frames, depth, cameras and states repeat the last frame's (the world stays still
after the end; the video loss keeps these frames), and actions repeat the episode's last action. Masks
say which steps are padding, as LeRobot's `*_is_pad`:
    state_is_pad[j]   frame s + j * stride > L - 1                 (the current state, j = 0, never)
    action_is_pad[k]  s + k + 1 > L - 1: the action's outcome frame is past the end; so action[L - 1],
                      whose outcome the episode did not record, is padding too, and a window starting
                      r < K frames before the last has exactly r real actions (a full window: K)
The objective gives padded actions and padded states no loss (xwam_core.objective). Repeating the last
action rather than zeros: a zero in normalized units is the middle of the q01/q99 range, and a raw zero
is "stay" only for delta commands; for absolute targets and gripper commands repeating the last command
is what holds the robot still, matching the repeated frames (and clamping is one rule for every key). With `pad_episode_ends=False` (the class's default: `xwam infer` and the mean-frame baseline
compare against true future frames) only full windows exist, as before, and the masks are all False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xwam_core.data.decode import StoreDecoder
from xwam_core.data.frame_cache import needed_bytes
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.release_stats import NORMALIZATIONS, build_normalizer
from xwam_core.data.window_index import WindowIndex
from xwam_core.errors import DataError

FRAME_CACHE_MODES = ("auto", "on", "off")
# "auto" decodes a store up front when its decoded frames take at most this much disk (the demo's store:
# ~20 MB); larger stores are decoded window by window in the loader workers
AUTO_FRAME_CACHE_BYTES = 2 * 1024**3


def use_frame_cache(store: EpisodeStore, mode: str) -> bool:
    """Whether the decoded-frame cache serves `store` under `data.frame_cache` = auto, on or off."""
    if mode not in FRAME_CACHE_MODES:
        raise DataError(f"frame_cache {mode!r}; expected one of {', '.join(FRAME_CACHE_MODES)}")
    if mode == "auto":
        return needed_bytes(store, frames=True) <= AUTO_FRAME_CACHE_BYTES
    return mode == "on"


@dataclass(frozen=True)
class WindowLayout:
    future_frames: int = 8
    frame_stride: int = 4

    @property
    def num_frames(self) -> int:
        return self.future_frames + 1

    @property
    def num_actions(self) -> int:
        return self.future_frames * self.frame_stride

    @property
    def span(self) -> int:
        """Store frames a window covers, first and last included."""
        return self.future_frames * self.frame_stride + 1


class WindowDataset(Dataset):
    """Every full window of the chosen episodes of a store, or (`pad_episode_ends`) a window at every frame.

    Each item is a dict of numpy arrays and Python scalars (`make_loader` batches them into tensors):
        rgb          (V, T, H, W, 3) uint8            T = F + 1 frames, views in `views` order
        depth        (V, T, H, W) float32 metres      0 = invalid; zeros when the store has no depth
        intrinsics   (V, T, 3, 3) float32             identity when the store has no cameras
        extrinsics   (V, T, 4, 4) float32             camera-to-world, OpenCV axes
        actions      (K, D_action) float32            quantile-normalized to [-1, 1]
        states       (T, D_state) float32             quantile-normalized
    (q01/q99 by `normalization`: "quantile", the store's, or "release", see xwam_core.data.release_stats)
        action_is_pad (K,) bool, state_is_pad (T,) bool   steps past the episode's end (module docstring)
        has_depth, has_cameras  bool tensors (loss masks / reconstruction guards)
        task_index, episode_index, frame_index  int64 (frame_index = the window's first frame)
    RGB stays uint8 here (4x less to move between processes); the model side scales it.
    """

    def __init__(
        self,
        store: EpisodeStore | str,
        layout: WindowLayout = WindowLayout(),
        views: list[str] | None = None,
        episodes: list[int] | None = None,
        normalize: bool = True,
        normalization: str = "quantile",
        pad_episode_ends: bool = False,
        frame_cache: str = "auto",
    ):
        self.store = store if isinstance(store, EpisodeStore) else EpisodeStore(store)
        self.layout = layout
        if layout.future_frames < 1 or layout.frame_stride < 1:
            raise DataError(
                f"window layout future_frames={layout.future_frames}, frame_stride={layout.frame_stride}: "
                "expected both >= 1"
            )
        self.views = list(views) if views else list(self.store.views)
        unknown = [v for v in self.views if v not in self.store.views]
        if unknown:
            raise DataError(f"{self.store.path}: has no view(s) {unknown}; it has {self.store.views}")
        table = self.store.episodes
        n_episodes = len(table)
        self.episode_ids = list(episodes) if episodes is not None else list(range(n_episodes))
        ids = np.asarray(self.episode_ids, np.int64)
        bad = ids[(ids < 0) | (ids >= n_episodes)]
        if len(bad):
            raise DataError(
                f"{self.store.path}: has no episode(s) {bad.tolist()}; it has 0..{n_episodes - 1}"
            )
        self.pad_episode_ends = bool(pad_episode_ends)
        if len(ids) and int(table.length[ids].max()) < layout.span:
            # padding fills a window's end, but a window no episode can hold whole is a mistake (a stride
            # meant for another frame rate), not something to pad
            raise DataError(
                f"{self.store.path}: no episode is long enough for a window of {layout.span} frames "
                f"(future_frames={layout.future_frames} x frame_stride={layout.frame_stride} + 1)"
            )
        self.index = WindowIndex(ids, table.length, table.start, layout.span, self.pad_episode_ends)
        if not len(self.index):
            raise DataError(
                f"{self.store.path}: no episode is long enough for a window of {layout.span} frames "
                f"(future_frames={layout.future_frames} x frame_stride={layout.frame_stride} + 1)"
            )
        self.decoded = use_frame_cache(self.store, frame_cache)
        self.cache = self.store.frame_cache(frames=self.decoded)
        self.decoder = None if self.decoded else StoreDecoder(self.store)
        if normalization not in NORMALIZATIONS:
            raise DataError(f"normalization {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")
        self.normalize = normalize
        self.normalizer = build_normalizer(
            self.store.stats,
            self.store.action_names,
            self.store.state_names,
            normalization,
            self.cache.action,
            self.cache.state,
            table.length.tolist() if normalization == "release" else None,
        )
        self._frame_offsets = np.arange(layout.num_frames) * layout.frame_stride
        self._action_offsets = np.arange(layout.num_actions)
        self._last_frame = table.length - 1  # by episode
        self._task_of_episode = table.task_index

    @property
    def windows(self) -> np.ndarray:
        """Every window as rows (episode, global start, local start), (N, 3) int64; made on each access
        (the dataset keeps per-episode counts only: xwam_core.data.window_index)."""
        return self.index.array()

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        located = self.index.locate(i)
        episode, start, local_start = int(located[0]), int(located[1]), int(located[2])
        last = int(self._last_frame[episode])  # the episode's last local frame
        local_frames = local_start + self._frame_offsets  # (T,)
        local_actions = local_start + self._action_offsets  # (K,)
        state_is_pad = local_frames > last
        action_is_pad = local_actions + 1 > last  # the action's outcome frame is past the end
        episode_start = start - local_start
        if state_is_pad[-1]:  # past the end: clamp to the last frame / action (cache indices stay inside)
            frames = episode_start + np.minimum(local_frames, last)
            action_rows: slice | np.ndarray = episode_start + np.minimum(local_actions, last)
        else:
            frames = start + self._frame_offsets  # (T,) global frame indices
            action_rows = slice(start, start + self.layout.num_actions)
        cache, n_views, t, (h, w) = self.cache, len(self.views), len(frames), self.store.image_size
        rgb = np.empty((n_views, t, h, w, 3), np.uint8)
        depth = np.zeros((n_views, t, h, w), np.float32)
        decoder = self.decoder
        for j, v in enumerate(self.views):
            if decoder is None:
                cache.rgb(v, frames, out=rgb[j])
            else:
                decoder.rgb(v, episode, frames - episode_start, out=rgb[j])
            if cache.has_depth:
                mm = (
                    cache.depth_mm(v, frames)
                    if decoder is None
                    else decoder.depth_mm(v, episode, frames - episode_start)
                )
                np.multiply(mm, np.float32(0.001), out=depth[j])
        if cache.has_cameras:
            pairs = [cache.cameras(v, frames, episode) for v in self.views]
            intr = np.stack([k for k, _ in pairs])
            extr = np.stack([e for _, e in pairs])
        else:
            intr = np.broadcast_to(np.eye(3, dtype=np.float32), (n_views, t, 3, 3)).copy()
            extr = np.broadcast_to(np.eye(4, dtype=np.float32), (n_views, t, 4, 4)).copy()
        actions = cache.action[action_rows]
        states = cache.state[frames]
        if self.normalize:
            actions = self.normalizer.action.normalize(actions)
            states = self.normalizer.state.normalize(states)
        return {
            "rgb": rgb,
            "depth": depth,
            "intrinsics": intr,
            "extrinsics": extr,
            "actions": np.array(actions, dtype=np.float32),  # a copy: the cache's maps are read-only
            "states": np.array(states, dtype=np.float32),
            "action_is_pad": action_is_pad,
            "state_is_pad": state_is_pad,
            "has_depth": cache.has_depth,
            "has_cameras": cache.has_cameras,
            "task_index": int(self._task_of_episode[episode]),
            "episode_index": episode,
            "frame_index": local_start,
        }


def split_episodes(store: EpisodeStore, val_episodes: int) -> tuple[list[int], list[int]]:
    """Hold out `val_episodes` episodes, spread over the tasks: each task in turn gives up its last
    episode (tasks whose last episode is newest first), so every task is evaluated when N >= tasks.
    Vectorised (numpy): a store of 1.49 M episodes splits in a fraction of a second."""
    n = len(store.episodes)
    if not 0 <= val_episodes < n:
        raise DataError(f"{store.path}: val_episodes={val_episodes} but the store has {n} episodes")
    task = np.unique(store.episodes.task_index, return_inverse=True)[1]  # (n,) dense task ids
    order = np.lexsort((np.arange(n), task))  # by task, then episode
    sizes = np.bincount(task)
    group_first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    from_end = np.empty(n, np.int64)  # 0 for a task's newest episode, 1 for the one before, ...
    from_end[order] = sizes[task[order]] - 1 - (np.arange(n) - group_first[task[order]])
    newest = np.zeros(len(sizes), np.int64)
    np.maximum.at(newest, task, np.arange(n))
    turn = np.empty(len(sizes), np.int64)  # tasks whose newest episode is newest go first
    turn[np.argsort(-newest, kind="stable")] = np.arange(len(sizes))
    held = np.argsort(from_end * len(sizes) + turn[task], kind="stable")[:val_episodes]
    keep = np.ones(n, bool)
    keep[held] = False
    return np.nonzero(keep)[0].tolist(), sorted(held.tolist())


def collate_windows(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack window dicts with numpy (several times faster than torch.stack on fresh CPU memory).

    In a DataLoader worker the batch is written straight into shared memory, so handing it to the
    main process is a file descriptor, not another copy.
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    batch = {}
    for key, first in items[0].items():
        if isinstance(first, np.ndarray):
            out = torch.empty((len(items), *first.shape), dtype=torch.from_numpy(first[:0]).dtype)
            if in_worker:
                out.share_memory_()
            np.stack([item[key] for item in items], out=out.numpy())
            batch[key] = out
        else:
            batch[key] = torch.tensor([item[key] for item in items])
    return batch


def make_loader(
    dataset: WindowDataset,
    batch_size: int,
    num_workers: int = 2,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
) -> DataLoader:
    """A DataLoader that keeps up with training: persistent workers, each mapping the cache once."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        drop_last=drop_last,
        generator=generator,
        collate_fn=collate_windows,
    )
