"""Tiny but realistic LeRobot v2.1 / v3.0 datasets written with pyarrow + PyAV, with ground truth.

`make_lerobot_dataset(root, ...)` writes the folder and returns a dict:
    {"root", "version", "fps", "codec", "size", "cameras", "episodes": [
        {"index", "task", "length", "state" (T,Ds), "action" (T,Da), "success",
         "rgb": {cam: (T,H,W,3) uint8}, "depth": {cam: (T,H,W) float32 metres} (if with_depth),
         "intrinsics": {cam: (T,3,3)}, "extrinsics": {cam: (T,4,4)} (if with_cameras)}]}
Images are smooth (gradient + moving blob, different per camera/episode) so the codec is accurate.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.video_helpers import encode_gray_video
from xwam_core.data.video import encode_video

TASKS = ("pick up the red cube", "open the top drawer")


def synthetic_rgb(length: int, size: tuple[int, int], cam: int, episode: int) -> np.ndarray:
    """Smooth frames: a colour gradient plus a Gaussian blob moving left to right."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((length, h, w, 3), np.uint8)
    for t in range(length):
        cx = w * (0.15 + 0.7 * t / max(length - 1, 1))
        cy = h * (0.3 + 0.4 * ((episode * 0.37 + cam * 0.21) % 1.0))
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (0.12 * w) ** 2))
        r = 40 + 60 * xx / w + 120 * blob + 8 * episode
        g = 60 + 80 * yy / h + 40 * cam + 100 * blob * (cam % 2)
        b = 90 + 30 * (xx + yy) / (w + h) + 15 * episode + 80 * blob * (1 - cam % 2)
        out[t] = np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)
    return out


def synthetic_depth(length: int, size: tuple[int, int], cam: int, episode: int) -> np.ndarray:
    """Smooth metric depth in metres (a tilted plane with a bump), a 4x4 invalid corner (0)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((length, h, w), np.float32)
    for t in range(length):
        cx = w * (0.2 + 0.6 * t / max(length - 1, 1))
        bump = 0.08 * np.exp(-((xx - cx) ** 2 + (yy - h / 2) ** 2) / (2 * (0.15 * w) ** 2))
        out[t] = 0.45 + 0.25 * xx / w + 0.1 * yy / h - bump + 0.02 * episode + 0.03 * cam
        out[t, :4, :4] = 0.0
    return out


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image_cells(frames: np.ndarray) -> pa.Array:
    return pa.array(
        [{"bytes": _png(f), "path": f"frame_{i:06d}.png"} for i, f in enumerate(frames)],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )


def _vector(values: np.ndarray, fixed: bool) -> pa.Array:
    values = np.asarray(values, np.float32)
    flat = pa.array(values.reshape(-1), pa.float32())
    d = int(np.prod(values.shape[1:]))
    if fixed:
        return pa.FixedSizeListArray.from_arrays(flat, d)
    offsets = pa.array(np.arange(0, len(values) * d + 1, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def _matrix(values: np.ndarray) -> pa.Array:
    """(T, R, C) float32 as a nested list column (what HF datasets writes for Array2D-like values)."""
    _, r, c = values.shape
    inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), c)
    return pa.FixedSizeListArray.from_arrays(inner, r)


def _video_feature(
    h: int, w: int, channels: int, fps: int, codec: str, is_depth: bool, pix_fmt: str = "yuv420p"
) -> dict:
    return {
        "dtype": "video",
        "shape": [h, w, channels],
        "names": ["height", "width", "channels"],
        "info": {
            "video.height": h,
            "video.width": w,
            "video.codec": {"libx264": "h264"}.get(codec, codec),
            "video.pix_fmt": pix_fmt,
            "video.is_depth_map": is_depth,
            "video.fps": fps,
            "video.channels": channels,
            "has_audio": False,
        },
    }


def make_lerobot_dataset(
    root: str | os.PathLike,
    version: str = "v3.0",
    n_episodes: int = 3,
    length: int | list[int] = 12,
    size: tuple[int, int] = (48, 64),
    cameras: tuple[str, ...] = ("front", "wrist"),
    with_depth: bool = False,
    depth_form: str = "image",
    depth_scale: float = 0.004,
    rgb_form: str = "video",
    with_cameras: bool = False,
    success: str | None = "meta",
    episodes_per_file: int | None = None,
    fps: int = 10,
    state_dim: int = 6,
    action_dim: int = 7,
    nan_action: tuple[int, int] | None = None,
    seed: int = 0,
) -> dict:
    """Write a LeRobot dataset at `root` and return its ground truth (see the module docstring).

    depth_form "image": 16-bit PNG in millimetres; "video": 8-bit luma video, value = depth / depth_scale;
    "video16": lossless 16-bit video (ffv1, gray16le) in millimetres.
    Depth keys are observation.images.<cam>_depth (v3.0) or observation.depth.<cam> (v2.1).
    success: "meta" (episodes metadata column), "frame" (next.success column) or None.
    episodes_per_file (v3.0): how many episodes share a data parquet and an mp4 (default: all).
    nan_action=(episode, frame) writes a NaN into that action.
    """
    assert (
        version in ("v3.0", "v2.1")
        and depth_form in ("image", "video", "video16")
        and rgb_form in ("video", "image")
    )
    root = os.fspath(root)
    h, w = size
    rng = np.random.default_rng(seed)
    lengths = list(length) if isinstance(length, (list, tuple)) else [int(length)] * n_episodes
    v3 = version == "v3.0"
    rgb_key = {c: f"observation.images.{c}" for c in cameras}
    depth_key = {c: (f"observation.images.{c}_depth" if v3 else f"observation.depth.{c}") for c in cameras}

    episodes = []
    for e, n in enumerate(lengths):
        ep = {
            "index": e,
            "task": TASKS[e % len(TASKS)],
            "length": n,
            "state": rng.normal(size=(n, state_dim)).astype(np.float32),
            "action": rng.normal(size=(n, action_dim)).astype(np.float32),
            "success": e % 2 == 0 if success else False,
            "rgb": {c: synthetic_rgb(n, size, i, e) for i, c in enumerate(cameras)},
        }
        if nan_action is not None and nan_action[0] == e:
            ep["action"][nan_action[1], 0] = np.nan
        if with_depth:
            ep["depth"] = {c: synthetic_depth(n, size, i, e) for i, c in enumerate(cameras)}
        if with_cameras:
            ep["intrinsics"], ep["extrinsics"] = {}, {}
            for i, c in enumerate(cameras):
                k = np.array([[60.0 + i, 0, w / 2], [0, 60.0 + i, h / 2], [0, 0, 1]], np.float32)
                ep["intrinsics"][c] = np.repeat(k[None], n, 0)
                ext = np.repeat(np.eye(4, dtype=np.float32)[None], n, 0)
                ext[:, 0, 3] = 0.3 * i + 0.01 * np.arange(n)  # moving camera
                ext[:, 2, 3] = 1.0 + 0.1 * e
                ep["extrinsics"][c] = ext
        episodes.append(ep)

    # ---- features (meta/info.json)
    features: dict[str, dict] = {}
    for c in cameras:
        if rgb_form == "video":
            features[rgb_key[c]] = _video_feature(h, w, 3, fps, "libx264", False)
        else:
            features[rgb_key[c]] = {
                "dtype": "image",
                "shape": [h, w, 3],
                "names": ["height", "width", "channel"],
            }
        if with_depth:
            if depth_form == "video":
                features[depth_key[c]] = _video_feature(h, w, 1, fps, "libx264", True)
            elif depth_form == "video16":
                features[depth_key[c]] = _video_feature(h, w, 1, fps, "ffv1", True, pix_fmt="gray16le")
            else:
                features[depth_key[c]] = {
                    "dtype": "image",
                    "shape": [h, w, 1],
                    "names": ["height", "width", "channel"],
                }
        if with_cameras:
            features[f"observation.cameras.{c}.intrinsics"] = {
                "dtype": "float32",
                "shape": [3, 3],
                "names": None,
            }
            features[f"observation.cameras.{c}.extrinsics"] = {
                "dtype": "float32",
                "shape": [16],
                "names": None,
            }
    features["observation.state"] = {
        "dtype": "float32",
        "shape": [state_dim],
        "names": [f"joint_{i}" for i in range(state_dim)],
    }
    features["action"] = {
        "dtype": "float32",
        "shape": [action_dim],
        "names": {"motors": [f"motor_{i}" for i in range(action_dim)]},
    }
    if success == "frame":
        features["next.success"] = {"dtype": "bool", "shape": [1], "names": None}
    for k, dt in (
        ("timestamp", "float32"),
        ("frame_index", "int64"),
        ("episode_index", "int64"),
        ("index", "int64"),
        ("task_index", "int64"),
    ):
        features[k] = {"dtype": dt, "shape": [1], "names": None}

    def frame_table(eps: list[dict], start_index: int) -> pa.Table:
        cols: dict[str, pa.Array] = {}
        for c in cameras:
            if rgb_form == "image":
                cols[rgb_key[c]] = pa.concat_arrays([_image_cells(ep["rgb"][c]) for ep in eps])
            if with_depth and depth_form == "image":
                mm = [np.round(ep["depth"][c] * 1000).astype(np.uint16) for ep in eps]
                cols[depth_key[c]] = pa.concat_arrays([_image_cells(m) for m in mm])
            if with_cameras:
                cols[f"observation.cameras.{c}.intrinsics"] = _matrix(
                    np.concatenate([ep["intrinsics"][c] for ep in eps])
                )
                cols[f"observation.cameras.{c}.extrinsics"] = _vector(
                    np.concatenate([ep["extrinsics"][c].reshape(-1, 16) for ep in eps]), fixed=v3
                )
        cols["observation.state"] = _vector(np.concatenate([ep["state"] for ep in eps]), fixed=v3)
        cols["action"] = _vector(np.concatenate([ep["action"] for ep in eps]), fixed=v3)
        if success == "frame":
            cols["next.success"] = pa.array(
                np.concatenate([(np.arange(ep["length"]) == ep["length"] - 1) & ep["success"] for ep in eps])
            )
        fi = np.concatenate([np.arange(ep["length"]) for ep in eps])
        cols["timestamp"] = pa.array((fi / fps).astype(np.float32))
        cols["frame_index"] = pa.array(fi.astype(np.int64))
        cols["episode_index"] = pa.array(
            np.concatenate([np.full(ep["length"], ep["index"]) for ep in eps]).astype(np.int64)
        )
        cols["index"] = pa.array(np.arange(start_index, start_index + len(fi), dtype=np.int64))
        cols["task_index"] = pa.array(
            np.concatenate([np.full(ep["length"], TASKS.index(ep["task"])) for ep in eps]).astype(np.int64)
        )
        return pa.table(cols)

    def write_videos(eps: list[dict], path_for: callable) -> str:
        used = ""
        for c in cameras:
            if rgb_form == "video":
                used = encode_video(path_for(rgb_key[c]), np.concatenate([ep["rgb"][c] for ep in eps]), fps)
            if with_depth and depth_form == "video":
                units = [
                    np.clip(np.round(ep["depth"][c] / depth_scale), 0, 255).astype(np.uint8) for ep in eps
                ]
                used = encode_gray_video(path_for(depth_key[c]), np.concatenate(units), fps)
            if with_depth and depth_form == "video16":
                mm = [np.round(ep["depth"][c] * 1000).astype(np.uint16) for ep in eps]
                encode_gray_video(path_for(depth_key[c]), np.concatenate(mm), fps)  # ffv1 gray16le
        return used

    video_keys = [rgb_key[c] for c in cameras if rgb_form == "video"]
    video_keys += [depth_key[c] for c in cameras if with_depth and depth_form in ("video", "video16")]
    os.makedirs(os.path.join(root, "meta"), exist_ok=True)
    used_codec = ""
    total = sum(lengths)
    if v3:
        data_path = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
        video_path = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        per = episodes_per_file or n_episodes
        rows = []
        start = 0
        for f0 in range(0, n_episodes, per):
            group = episodes[f0 : f0 + per]
            fidx = f0 // per
            p = os.path.join(root, data_path.format(chunk_index=0, file_index=fidx))
            os.makedirs(os.path.dirname(p), exist_ok=True)
            pq.write_table(frame_table(group, start), p)
            used_codec = (
                write_videos(
                    group,
                    lambda k, fidx=fidx: os.path.join(
                        root, video_path.format(video_key=k, chunk_index=0, file_index=fidx)
                    ),
                )
                or used_codec
            )
            t_in_file = 0.0
            for ep in group:
                row = {
                    "episode_index": ep["index"],
                    "tasks": [ep["task"]],
                    "length": ep["length"],
                    "data/chunk_index": 0,
                    "data/file_index": fidx,
                    "dataset_from_index": start,
                    "dataset_to_index": start + ep["length"],
                }
                for k in video_keys:
                    row[f"videos/{k}/chunk_index"] = 0
                    row[f"videos/{k}/file_index"] = fidx
                    row[f"videos/{k}/from_timestamp"] = t_in_file
                    row[f"videos/{k}/to_timestamp"] = t_in_file + ep["length"] / fps
                row["meta/episodes/chunk_index"] = 0
                row["meta/episodes/file_index"] = 0
                if success == "meta":
                    row["success"] = bool(ep["success"])
                rows.append(row)
                t_in_file += ep["length"] / fps
                start += ep["length"]
        ep_meta = os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet")
        os.makedirs(os.path.dirname(ep_meta), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), ep_meta)
        # tasks.parquet as LeRobot writes it: pandas frame, task text as the (unnamed) index
        import pandas as pd

        pd.DataFrame({"task_index": range(len(TASKS))}, index=list(TASKS)).to_parquet(
            os.path.join(root, "meta", "tasks.parquet")
        )
        extra = {"data_files_size_in_mb": 100, "video_files_size_in_mb": 500}
    else:
        data_path = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
        video_path = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
        start = 0
        with open(os.path.join(root, "meta", "episodes.jsonl"), "w") as f_ep:
            for ep in episodes:
                e = ep["index"]
                p = os.path.join(root, data_path.format(episode_chunk=0, episode_index=e))
                os.makedirs(os.path.dirname(p), exist_ok=True)
                pq.write_table(frame_table([ep], start), p)
                start += ep["length"]
                used_codec = (
                    write_videos(
                        [ep],
                        lambda k, e=e: os.path.join(
                            root, video_path.format(episode_chunk=0, video_key=k, episode_index=e)
                        ),
                    )
                    or used_codec
                )
                row = {"episode_index": e, "tasks": [ep["task"]], "length": ep["length"]}
                if success == "meta":
                    row["success"] = bool(ep["success"])
                f_ep.write(json.dumps(row) + "\n")
        with open(os.path.join(root, "meta", "tasks.jsonl"), "w") as f_t:
            for i, t in enumerate(TASKS):
                f_t.write(json.dumps({"task_index": i, "task": t}) + "\n")
        extra = {"total_chunks": 1, "total_videos": len(video_keys) * n_episodes}

    def stats(eps: list[dict]) -> dict:
        out = {}
        for k, s in (("observation.state", "state"), ("action", "action")):
            x = np.concatenate([ep[s] for ep in eps])
            out[k] = {
                "mean": np.nanmean(x, 0).tolist(),
                "std": np.nanstd(x, 0).tolist(),
                "min": np.nanmin(x, 0).tolist(),
                "max": np.nanmax(x, 0).tolist(),
                "count": [len(x)],
            }
        return out

    if v3:  # v3.0: one meta/stats.json; v2.1: one line per episode in meta/episodes_stats.jsonl
        with open(os.path.join(root, "meta", "stats.json"), "w") as f:
            json.dump(stats(episodes), f)
    else:
        with open(os.path.join(root, "meta", "episodes_stats.jsonl"), "w") as f:
            for ep in episodes:
                f.write(json.dumps({"episode_index": ep["index"], "stats": stats([ep])}) + "\n")
    info = {
        "codebase_version": version,
        "robot_type": "synthetic_arm",
        "total_episodes": n_episodes,
        "total_frames": total,
        "total_tasks": len(TASKS),
        "chunks_size": 1000,
        **extra,
        "fps": fps,
        "splits": {"train": f"0:{n_episodes}"},
        "data_path": data_path,
        "video_path": video_path if video_keys else None,
        "features": features,
    }
    with open(os.path.join(root, "meta", "info.json"), "w") as f:
        json.dump(info, f, indent=4)
    return {
        "root": root,
        "version": version,
        "fps": fps,
        "codec": used_codec or None,
        "size": size,
        "cameras": tuple(cameras),
        "rgb_keys": rgb_key,
        "depth_keys": depth_key,
        "episodes": episodes,
    }
