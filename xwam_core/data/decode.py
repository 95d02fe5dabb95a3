"""Frames read where the store keeps them, in the process that needs them (a DataLoader worker).

Large stores are not decoded up front: a window's RGB comes from its episode's video (format 2; PNG cells
in format 1) and its depth from the 16-bit PNG cells of the data file, decoded for the window's frames
only. Each process keeps a few video files and the last row group it read open. With the store's
keyframe every 2 frames, a frame is at most one decode after a seek: the reader seeks whenever the next
wanted frame is more than 1.5 frames ahead, instead of decoding the frames between.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xwam_core.data.store import decode_png, depth_key, rgb_key
from xwam_core.errors import DataError

if TYPE_CHECKING:
    from xwam_core.data.reader import EpisodeStore
    from xwam_core.data.video import VideoReader

OPEN_VIDEOS = 12  # video files kept open per process (a window opens one per view)


class StoreDecoder:
    """`rgb(view, episode, local_frames)` and `depth_mm(view, episode, local_frames)` of one store, decoded
    on demand; picklable (open files are re-opened in each worker)."""

    def __init__(self, store: EpisodeStore):
        self.store = store
        self._videos: OrderedDict[str, VideoReader] = OrderedDict()
        self._row_groups: dict[str, tuple[np.ndarray, int]] = {}  # file -> (row group offsets, first frame)
        self._table: tuple[str, int, pa.Table] | None = None  # the last row group read

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_videos"], state["_row_groups"], state["_table"] = OrderedDict(), {}, None
        return state

    def close(self) -> None:
        for reader in self._videos.values():
            reader.close()
        self._videos.clear()

    # ---- RGB --------------------------------------------------------------------------------------
    def rgb(
        self, view: str, episode: int, local_frames: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """(T, H, W, 3) uint8 frames of `view` at the episode's local frame indices."""
        if self.store.store_format == 1:
            frames = self._cells(rgb_key(view), episode, local_frames)
        else:
            frames = self._video_frames(view, episode, np.asarray(local_frames))
        if out is None:
            return frames
        out[...] = frames
        return out

    def _video_frames(self, view: str, episode: int, local_frames: np.ndarray) -> np.ndarray:
        from xwam_core.data.video import VideoReader

        store = self.store
        meta_videos = store.episodes.videos[view]
        chunk, file, from_ts = (
            int(meta_videos[0][episode]),
            int(meta_videos[1][episode]),
            float(meta_videos[2][episode]),
        )
        path = str(
            store.path
            / store.info["video_path"].format(video_key=rgb_key(view), chunk_index=chunk, file_index=file)
        )
        reader = self._videos.get(path)
        if reader is None:
            reader = VideoReader(path, store.fps, seek_ahead_s=1.5 / store.fps, threads=1)
            self._videos[path] = reader
            while len(self._videos) > OPEN_VIDEOS:
                self._videos.popitem(last=False)[1].close()
        else:
            self._videos.move_to_end(path)
        wanted, back = np.unique(local_frames, return_inverse=True)
        decoded = np.stack([reader.read([from_ts + int(f) / store.fps])[0] for f in wanted])
        h, w = store.image_size
        if decoded.shape[1:] != (h, w, 3):
            raise DataError(
                f"{path}: frames are {decoded.shape[1]}x{decoded.shape[2]}, expected {h}x{w} "
                "(meta/info.json image_size)"
            )
        return decoded[back]

    # ---- depth and PNG cells ------------------------------------------------------------------------
    def depth_mm(self, view: str, episode: int, local_frames: np.ndarray) -> np.ndarray:
        """(T, H, W) uint16 millimetres of `view` at the episode's local frame indices."""
        return self._cells(depth_key(view), episode, local_frames)

    def _cells(self, key: str, episode: int, local_frames: np.ndarray) -> np.ndarray:
        """PNG cells of column `key` at an episode's local frames, decoded."""
        store = self.store
        table = store.episodes
        path = store.path / store.info["data_path"].format(
            chunk_index=int(table.chunk_index[episode]), file_index=int(table.file_index[episode])
        )
        offsets, file_first = self._layout(
            str(path), int(table.chunk_index[episode]), int(table.file_index[episode])
        )
        rows = int(table.start[episode]) - file_first + np.asarray(local_frames, np.int64)  # rows in the file
        wanted, back = np.unique(rows, return_inverse=True)
        images = []
        for row in wanted:
            group = int(np.searchsorted(offsets, row, side="right") - 1)
            cells = self._row_group(str(path), group)
            cell = cells.column(key)[int(row - offsets[group])].as_py()
            try:
                image = decode_png(cell["bytes"])
            except Exception as exc:  # PIL raises several types for damaged bytes; None cells give TypeError
                raise DataError(
                    f"{path}: row {row} {key}: not a readable PNG image ({type(exc).__name__})"
                ) from None
            images.append(image)
        decoded = np.stack(images)
        h, w = store.image_size
        if decoded.shape[1:3] != (h, w):
            raise DataError(f"{path}: {key} images are {decoded.shape[1:]}, expected {h}x{w}")
        return decoded[back]

    def _layout(self, path: str, chunk: int, file: int) -> tuple[np.ndarray, int]:
        """Row group offsets of a data file and the global frame of its first row."""
        found = self._row_groups.get(path)
        if found is None:
            try:
                meta = pq.ParquetFile(path).metadata
            except (pa.ArrowException, OSError) as exc:
                raise DataError(
                    f"{path}: not a readable Parquet data file ({type(exc).__name__}: {exc})"
                ) from None
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            table = self.store.episodes
            in_file = (table.chunk_index == chunk) & (table.file_index == file)
            first = int(table.start[in_file].min())
            found = self._row_groups[path] = (np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), first)
        return found

    def _row_group(self, path: str, group: int) -> pa.Table:
        if self._table is None or self._table[:2] != (path, group):
            columns = [depth_key(v) for v in self.store.views] if self.store.has_depth else []
            if self.store.store_format == 1:
                columns += [rgb_key(v) for v in self.store.views]
            try:
                table = pq.ParquetFile(path).read_row_group(group, columns=columns)
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"{path}: data file unreadable ({type(exc).__name__}: {exc})") from None
            self._table = (path, group, table)
        return self._table[2]
