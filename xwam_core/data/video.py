"""PyAV helpers: sequential video decoding (for sources and stores), RGB encoding (run and rollout
videos) and the episode store's RGB video (AV1 as LeRobot writes it).

Decoding is streaming: a `VideoReader` keeps one container open and decodes forward, handing out
the frames nearest to the requested timestamps. Several consecutive requests on one file (e.g. the
episodes of a LeRobot v3 mp4, which holds many episodes back to back) never reopen the file; a
request that lies behind the decoder reopens it, a request far ahead seeks to the keyframe before it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
import numpy as np

from xwam_core.errors import DataError

# Output formats of VideoReader.read: RGB uint8 (H, W, 3), luma uint8 (H, W), 16-bit luma (H, W).
RGB = "rgb24"
GRAY = "gray"
GRAY16 = "gray16le"

_PREFERRED_CODECS = ("libx264", "mpeg4")
_SEEK_AHEAD_S = 2.0  # forward jumps longer than this seek instead of decoding every frame


def available_codec(preferred: tuple[str, ...] = _PREFERRED_CODECS) -> str:
    """The first encoder in `preferred` that this PyAV build has (libx264, else mpeg4)."""
    for name in preferred:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises several types for an unknown codec
            continue
    raise DataError(f"PyAV has none of the video encoders {list(preferred)}; expected at least one")


def pix_fmt_bits(pix_fmt: str | None) -> int:
    """Bits per component of an ffmpeg pixel format name (8 when unknown)."""
    if not pix_fmt:
        return 8
    try:
        fmt = av.VideoFormat(pix_fmt)
        return max(int(c.bits) for c in fmt.components)
    except Exception:
        return 8


def _checked_frames(path: str | os.PathLike, frames: np.ndarray) -> tuple[np.ndarray, int, int]:
    """uint8 (T, H, W, 3) frames with even H and W (yuv420p), else one line naming the file."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DataError(
            f"{path}: cannot encode frames {frames.dtype} {frames.shape}; expected uint8 (T,H,W,3)"
        )
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise DataError(f"{path}: yuv420p video needs even image sizes, got {h}x{w}")
    return frames, h, w


def _mux_frames(container: Any, stream: Any, frames: np.ndarray, rate: Fraction) -> None:
    """Encode frame i at pts i in a 1/rate time base, then flush the encoder."""
    for i, arr in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format=RGB)
        frame.pts = i
        frame.time_base = 1 / rate
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def encode_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> str:
    """Write uint8 (T, H, W, 3) RGB frames (H, W even) to a yuv420p video; return the codec used.

    libx264 at crf 16 (else mpeg4 with the quantiser pinned low): near-lossless, a keyframe every 10 frames.
    """
    frames, h, w = _checked_frames(path, frames)
    codec = available_codec()
    options = {"crf": "16", "preset": "veryfast"} if codec == "libx264" else {"qmin": "1", "qmax": "2"}
    rate = Fraction(fps).limit_denominator(1001)
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        assert isinstance(stream, av.video.stream.VideoStream)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "mpeg4":  # near-lossless: quantiser pinned low, bit rate unconstrained
            stream.codec_context.bit_rate = 20_000_000
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.gop_size = 10
        _mux_frames(container, stream, frames, rate)
    return codec


# The store's RGB video. "av1" (the default) is LeRobot's: AV1 through SVT-AV1, crf 30, a keyframe every 2
# frames, preset 12, yuv420p, so LeRobot's tools treat xwam's videos like their own (H.264 when this PyAV has
# no SVT-AV1). "h264-444" keeps full colour resolution (H.264 High 4:4:4, crf 18): on small images 4:2:0
# chroma costs more than the compression (64x64 Meta-World: 32.6 dB for the 4:2:0 round trip alone, 30.0
# dB coded at AV1 crf 30, 37.3 dB at H.264 4:4:4 crf 18, about the same bytes). Both decode with PyAV.
STORE_CODECS = ("libsvtav1", "libx264")
STORE_VIDEO_KINDS = ("av1", "h264-444")
STORE_GOP = 2
_DEFAULT_CRF = {"av1": 30, "h264-444": 18}
_MAX_CRF = {"libsvtav1": 63, "libx264": 51}


@dataclass(frozen=True)
class StoreVideo:
    """How a store encodes its RGB video: the encoder, its pixel format and its constant rate factor."""

    kind: str  # one of STORE_VIDEO_KINDS
    codec: str  # PyAV encoder name
    pix_fmt: str
    crf: int


def store_codec() -> str:
    """The encoder of the default ("av1") store video: libsvtav1 (LeRobot's default), else libx264."""
    return available_codec(STORE_CODECS)


def store_video(kind: str = "av1", crf: int = 0) -> StoreVideo:
    """The store video of `kind` (STORE_VIDEO_KINDS) at `crf` (0: the kind's default)."""
    if kind not in STORE_VIDEO_KINDS:
        raise DataError(f"prepare.video={kind!r}: expected one of {list(STORE_VIDEO_KINDS)}")
    codec = store_codec() if kind == "av1" else available_codec(("libx264",))
    pix_fmt = "yuv444p" if kind == "h264-444" else "yuv420p"
    crf = crf or _DEFAULT_CRF[kind]
    if not 0 < crf <= _MAX_CRF[codec]:
        raise DataError(
            f"prepare.video_crf={crf}: expected 1..{_MAX_CRF[codec]} for {codec} (0: the default)"
        )
    return StoreVideo(kind, codec, pix_fmt, crf)


def encode_store_video(
    path: str | os.PathLike, frames: np.ndarray, fps: float, video: StoreVideo | None = None
) -> None:
    """Write uint8 (T, H, W, 3) RGB frames (H, W even) as the store writes every view's episode video:
    frame i at pts i in a 1/fps time base (timestamp i / fps, what LeRobot's decoders look for)."""
    video = video or store_video()
    frames, h, w = _checked_frames(path, frames)
    options = {"crf": str(video.crf), "g": str(STORE_GOP)}
    if video.codec == "libsvtav1":
        options.update({"preset": "12", "svtav1-params": "lp=1"})  # one thread: prepare runs in workers
    else:
        options.update({"preset": "veryfast", "threads": "1"})
    rate = Fraction(fps).limit_denominator(1001)
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration to stderr unless told not to
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(video.codec, rate=rate, options=options)
        assert isinstance(stream, av.video.stream.VideoStream)
        stream.width, stream.height, stream.pix_fmt = w, h, video.pix_fmt
        stream.codec_context.time_base = 1 / rate
        _mux_frames(container, stream, frames, rate)


def video_feature_info(video: StoreVideo, height: int, width: int, fps: float) -> dict[str, object]:
    """The `info` of a video feature in meta/info.json, with the keys LeRobot writes."""
    return {
        "video.height": height,
        "video.width": width,
        "video.codec": {"libsvtav1": "av1", "libx264": "h264"}.get(video.codec, video.codec),
        "video.pix_fmt": video.pix_fmt,
        "video.is_depth_map": False,
        "video.fps": fps,
        "video.channels": 3,
        "has_audio": False,
    }


class VideoReader:
    """One open video file, decoded forward. `read(times)` returns the frames at those timestamps."""

    def __init__(
        self, path: str | os.PathLike, fps: float, seek_ahead_s: float = _SEEK_AHEAD_S, threads: int = 0
    ):
        self.path = os.fspath(path)
        self.fps = float(fps)
        self._seek_ahead_s = float(seek_ahead_s)  # forward jumps longer than this seek
        self._threads = int(threads)  # decoder threads; 0: the codec's choice
        self._tol = 0.5 / self.fps  # a frame belongs to a timestamp if within half a frame period
        self._container: av.container.InputContainer | None = None
        self._frames: Iterator[av.VideoFrame] | None = None
        self._pending: tuple[float, av.VideoFrame] | None = None
        self._last_time = -np.inf  # time of the last frame handed out or skipped
        self._count = 0
        # one converter for every frame: `frame.to_ndarray(format=...)` builds a new swscale context per frame,
        # 5 ms at 256x320 against 0.15 ms reused (most of a window's decode time before it was shared)
        self._reformatter = av.video.reformatter.VideoReformatter()
        self._open()

    # -- container management -------------------------------------------------------------
    def _open(self) -> None:
        self.close()
        if not os.path.isfile(self.path):
            raise DataError(f"{self.path}: video file not found")
        try:
            self._container = av.open(self.path)
            if not self._container.streams.video:
                raise DataError(f"{self.path}: has no video stream")
            self._stream = self._container.streams.video[0]
            if self._threads:
                self._stream.codec_context.thread_count = self._threads
            else:
                self._stream.thread_type = "AUTO"
            tb = self._stream.time_base
            self._time_base = float(tb) if tb else 1.0 / self.fps
        except DataError:
            self.close()
            raise
        except Exception as exc:  # av.error.* / OSError for corrupt files
            self.close()
            raise DataError(f"{self.path}: cannot open video ({type(exc).__name__}: {exc})") from None
        self._frames = self._container.decode(self._stream)
        self._pending = None
        self._last_time = -np.inf
        self._count = 0

    def _seek(self, t: float) -> None:
        assert self._container is not None
        # the last keyframe at or before t: a quarter frame past t absorbs timestamp rounding and never
        # reaches the next frame (seeking to t minus a margin lands a keyframe early: 2 frames more to decode)
        target = int((t + 0.25 / self.fps) / self._time_base)
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        except Exception:  # fall back to decoding from the start
            self._open()
            return
        self._frames = self._container.decode(self._stream)
        self._pending = None
        self._last_time = -np.inf
        self._count = -1  # frame counting is meaningless after a seek; pts are required

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            finally:
                self._container = None
                self._frames = None
                self._pending = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decoding ---------------------------------------------------------------------------
    def _peek(self) -> tuple[float, av.VideoFrame] | None:
        if self._pending is None:
            assert self._frames is not None
            try:
                frame = next(self._frames)
            except StopIteration:
                return None
            except Exception as exc:  # av.error.InvalidDataError etc.
                raise DataError(f"{self.path}: cannot decode video ({type(exc).__name__}: {exc})") from None
            if frame.pts is not None:
                t = frame.pts * self._time_base
            elif self._count >= 0:
                t = self._count / self.fps
            else:
                raise DataError(
                    f"{self.path}: video frames have no timestamps; cannot locate frames after a seek"
                )
            if self._count >= 0:
                self._count += 1
            self._pending = (t, frame)
        return self._pending

    def read(self, times: np.ndarray | list[float], fmt: str = RGB) -> np.ndarray:
        """Frames at the given ascending timestamps (seconds), stacked: (N, H, W[, 3])."""
        times = np.asarray(times, dtype=np.float64)
        if times.size == 0:
            raise DataError(f"{self.path}: no timestamps requested")
        if not np.isfinite(times).all():
            bad = times[~np.isfinite(times)][0]
            raise DataError(f"{self.path}: frame time {bad} requested; expected finite times in seconds")
        if self._container is None:
            self._open()
        first = float(times[0])
        if first < self._last_time + self._tol:
            self._open()  # behind the decoder: start over (episodes requested out of order), then seek
        if first - max(self._last_time, 0.0) > self._seek_ahead_s:
            self._seek(first)  # far ahead: jump to the keyframe before it, then decode forward
            try:
                return self._read_forward(times, fmt)
            except DataError:
                self._open()  # the seek landed badly (odd keyframe index): decode from the start
        return self._read_forward(times, fmt)

    def _read_forward(self, times: np.ndarray, fmt: str) -> np.ndarray:
        out: list[np.ndarray] = []
        for q in times:
            while True:
                item = self._peek()
                if item is None:
                    raise DataError(
                        f"{self.path}: video ends at {max(self._last_time, 0.0):.3f}s, expected a frame at {q:.3f}s"
                    )
                t, frame = item
                if t < q - self._tol:  # before the requested time: skip
                    self._pending = None
                    self._last_time = t
                    continue
                if t > q + self._tol:
                    raise DataError(f"{self.path}: no frame at {q:.3f}s (next frame is at {t:.3f}s)")
                try:
                    out.append(self._reformatter.reformat(frame, format=fmt).to_ndarray())
                except Exception as exc:
                    raise DataError(
                        f"{self.path}: cannot convert frame at {t:.3f}s to {fmt} ({exc})"
                    ) from None
                self._pending = None
                self._last_time = t
                break
        return np.stack(out)

    @property
    def pix_fmt(self) -> str | None:
        if self._container is None:
            return None
        return self._stream.codec_context.pix_fmt
