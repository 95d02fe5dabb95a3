"""Video helpers the tests need and the package does not: grey encoding (LeRobot depth videos) and decoding."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

from xwam_core.data.video import GRAY, GRAY16, RGB, available_codec


def encode_gray_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> str:
    """uint8 (T, H, W) grey in the luma plane of a yuv420p video (libx264 or mpeg4), or uint16 (T, H, W)
    as lossless ffv1 gray16le, the two forms LeRobot depth videos take; returns the codec used."""
    frames = np.asarray(frames)
    assert frames.ndim == 3 and frames.dtype in (np.uint8, np.uint16), (frames.dtype, frames.shape)
    deep = frames.dtype == np.uint16
    codec, pix_fmt = ("ffv1", GRAY16) if deep else (available_codec(), "yuv420p")
    options = {"libx264": {"crf": "16", "preset": "veryfast"}, "mpeg4": {"qmin": "1", "qmax": "2"}}.get(
        codec, {}
    )
    rate = Fraction(fps).limit_denominator(1001)
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if codec == "mpeg4":
            stream.codec_context.bit_rate = 20_000_000
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.gop_size = 10
        for i, arr in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format=GRAY16 if deep else GRAY)
            frame.pts, frame.time_base = i, 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec


def decode_video(path: str | os.PathLike) -> np.ndarray:
    """Every frame of a video file as uint8 RGB (T, H, W, 3), in order."""
    with av.open(os.fspath(path)) as container:
        return np.stack([f.to_ndarray(format=RGB) for f in container.decode(container.streams.video[0])])
