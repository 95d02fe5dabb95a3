"""The protocol-independent half of `xwam serve`: observations in, the Policy's action chunk out.

A `PolicyService` owns one loaded Policy. It maps a client's observation onto the Policy's inputs
(`ObservationMap`), checks every key, shape, dtype and value with a one-line MessageError, runs the
Policy under a lock (one query at a time: the model is not re-entrant and a CPU has no spare cores),
and keeps latency statistics. The protocols (openpi.py, release.py) only decode, encode and route.

Noise: each client stream (an openpi connection) has its own torch.Generator, seeded with --seed when
it opens. An observation that carries `seed` reseeds it first (what `policy.reset(seed)` does in
process), so a connection's chunks are the in-process Policy's: the same observations after
`reset(seed)` give the same chunks in the same order.
"""

from __future__ import annotations

import logging
import math
import reprlib
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xwam_core.errors import XWAMError
from xwam_core.serve.wire import MessageError

logger = logging.getLogger("xwam.serve")

# observation keys every protocol understands besides the mapped ones
CONTROL_KEYS = ("seed", "prev_chunk", "inference_delay")
MAP_TARGETS = "view:NAME, state, task or ignore"
MAX_IMAGE_SIDE = 4096
MAX_SEED = 2**63 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
_SHORT = reprlib.Repr()  # a client's value in an error line: at most a few dozen characters
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = 8


def shown(value: Any) -> str:
    """A client's value for an error line: its repr, shortened; an integer too long to print (Python refuses
    over 4300 digits) by its length."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        digits = int(math.log10(abs(value))) + 1
        return f"<a{' negative' if value < 0 else 'n'} integer of about {digits} digits>"
    return _SHORT.repr(value)


# ------------------------------------------------------------------------------------ the mapping
@dataclass
class ObservationMap:
    """Which observation key feeds which Policy input: {key: "view:NAME" | "state" | "task" | "ignore"}.

    Empty: the Policy's own layout, {"images": {view: image}, "state": ..., "task": ...} ("prompt" is
    accepted for "task", as openpi's clients name it)."""

    entries: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None, views: list[str]) -> ObservationMap:
        """`obs_key=view:NAME,obs_key=state,obs_key=task,obs_key=ignore` (the --map option)."""
        entries: dict[str, str] = {}
        for item in (text or "").split(","):
            if not item.strip():
                continue
            key, sep, target = item.strip().rpartition("=")
            key, target = key.strip(), target.strip()
            if not sep or not key:
                raise XWAMError(
                    f"--map {item.strip()!r}: expected obs_key=TARGET with TARGET one of {MAP_TARGETS}"
                )
            if key in CONTROL_KEYS:
                raise XWAMError(
                    f"--map {key!r}: a control key (seed, prev_chunk, inference_delay) cannot be mapped"
                )
            if key in entries:
                raise XWAMError(f"--map {key!r}: given twice")
            if target.startswith("view:"):
                if target[5:] not in views:
                    raise XWAMError(f"--map {key}={target}: the checkpoint's views are {', '.join(views)}")
            elif target not in ("state", "task", "ignore"):
                raise XWAMError(f"--map {key}={target}: expected one of {MAP_TARGETS}")
            entries[key] = target
        if entries:
            mapped = [t for t in entries.values() if t != "ignore"]
            missing = [f"view:{v}" for v in views if f"view:{v}" not in mapped] + [
                t for t in ("state", "task") if t not in mapped
            ]
            twice = sorted({t for t in mapped if mapped.count(t) > 1})
            if missing:
                raise XWAMError(f"--map gives no observation key for {', '.join(missing)}")
            if twice:
                raise XWAMError(f"--map names {', '.join(twice)} for more than one observation key")
        return cls(entries)

    def describe(self, views: list[str]) -> dict[str, str]:
        """The observation keys a client sends, and what each feeds (for the metadata)."""
        if self.entries:
            return dict(self.entries)
        return {**{f"images/{v}": f"view:{v}" for v in views}, "state": "state", "task": "task"}


# ------------------------------------------------------------------------------------ statistics
class LatencyStats:
    """Requests, errors and latency percentiles (over the newest `window` requests); thread-safe."""

    def __init__(self, window: int = 10000) -> None:
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self.requests = 0
        self.errors = 0

    def record(self, seconds: float, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            if ok:
                self._latencies.append(seconds)
            else:
                self.errors += 1

    def percentiles_ms(self) -> tuple[float, float]:
        """(p50, p99) in milliseconds of the answered requests; nan before the first."""
        with self._lock:
            values = np.asarray(self._latencies)
        if values.size == 0:
            return math.nan, math.nan
        p50, p99 = np.percentile(values, [50, 99])
        return 1e3 * float(p50), 1e3 * float(p99)

    def summary(self) -> str:
        p50, p99 = self.percentiles_ms()
        return f"{self.requests} requests, {self.errors} errors, latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"


class SummaryLogger:
    """Logs the statistics at info level every `interval_s` seconds while requests keep coming."""

    def __init__(self, stats: LatencyStats, interval_s: float) -> None:
        self.stats, self.interval_s = stats, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xwam-serve-summary", daemon=True)
        self._logged = -1

    def start(self) -> SummaryLogger:
        if self.interval_s > 0:
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.stats.requests != self._logged:
                self._logged = self.stats.requests
                logger.info("serve: %s", self.stats.summary())

    def stop(self) -> None:
        self._stop.set()
        logger.info("serve: %s", self.stats.summary())


# ------------------------------------------------------------------------------------ requests
@dataclass
class Request:
    """A checked observation, ready for the Policy."""

    obs: dict[str, Any]  # images {view: (H, W, 3) uint8 at the checkpoint's size}, state, task
    seed: int | None = None  # reseed the stream's noise before this query
    rtc: dict[str, Any] = field(default_factory=dict)  # prev_chunk, inference_delay (real-time chunking)


def _array(value: Any, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list | tuple):
        try:
            array = np.asarray(value)
        except (ValueError, TypeError):
            array = np.asarray([], dtype=object)
        if array.dtype.kind in "biuf" and array.size:
            return array
    raise MessageError(f"{what}: {type(value).__name__}, expected a numeric array")


def resize_images(images: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """Bilinear resize of (N, 3, H, W) float images to `size` (H, W)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return torch.nn.functional.interpolate(
        images, size=size, mode="bilinear", align_corners=False, antialias=antialias
    )


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) float images in [-1, 1] -> (N, H, W, 3) uint8 (the Policy's input), rounded."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


class PolicyService:
    """One loaded Policy behind a lock, with checked inputs and latency statistics."""

    def __init__(self, policy: Any, mapping: ObservationMap | None = None, seed: int = 0) -> None:
        self.policy = policy
        self.spec = policy.spec
        self.normalizer = policy.normalizer
        self.mapping = mapping or ObservationMap()
        self.seed = seed
        self.stats = LatencyStats()
        self._lock = threading.Lock()
        # real-time chunking (docs/rtc.md): predict_chunk(obs, prev_chunk=, inference_delay=); the chunk
        # executor stays on the client, the server keeps no chunk state
        self.real_time_chunking = True

    # -------------------------------------------------------------------- what the policy expects
    @property
    def action_horizon(self) -> int:
        return int(self.spec.window.num_actions)

    def metadata(self, protocol: str, max_message_bytes: int) -> dict[str, Any]:
        """What a client must send and what it gets back (openpi sends it first on every connection)."""
        h, w = self.spec.image_size
        return {
            "server": "xwam",
            "protocol": protocol,
            "views": list(self.spec.views),
            "image_size": [int(h), int(w)],
            "image_format": "uint8 (H, W, 3) per view; other sizes are resized (bilinear)",
            "state_dim": int(self.normalizer.state_dim),
            "state_names": list(self.normalizer.state_names),
            "action_dim": int(self.normalizer.action_dim),
            "action_names": list(self.normalizer.action_names),
            "action_horizon": self.action_horizon,
            "actions_per_query": int(self.policy.actions_per_query),
            "action_noise_scale": float(self.policy.schedule_config.action_noise_scale),
            "future_frames": int(self.spec.window.future_frames),
            "frame_stride": int(self.spec.window.frame_stride),
            "tasks": list(self.spec.tasks),
            "fps": self.spec.fps,
            # how many episodes of the training store were held out: a client training a baseline on that
            # store (xwam evaluate --sim --server --data STORE) leaves the same ones out
            "val_episodes": int(self.spec.val_episodes),
            "units": "state and actions in dataset units (the server normalizes)",
            "observation_keys": self.mapping.describe(list(self.spec.views)),
            "control_keys": list(CONTROL_KEYS),
            "seed": self.seed,
            "real_time_chunking": self.real_time_chunking,
            "max_message_bytes": int(max_message_bytes),
        }

    # -------------------------------------------------------------------- checking
    def request(self, message: Any) -> Request:
        """Check an observation message and map it onto the Policy's inputs."""
        if not isinstance(message, Mapping):
            raise MessageError(f"expected a map of observation keys, got {type(message).__name__}")
        bad_keys = [k for k in message if not isinstance(k, str)]
        if bad_keys:
            raise MessageError(f"observation key {bad_keys[0]!r} is not a string")
        views, state, task = self._mapped(message)
        obs = {
            "images": {view: self.image(views[view], f"image {view!r}") for view in self.spec.views},
            "state": self.state(state),
            "task": self.task(task),
        }
        seed = None
        if "seed" in message:
            seed = message["seed"]
            if isinstance(seed, np.integer):
                seed = int(seed)
            if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
                raise MessageError(f"seed {shown(seed)}: expected an integer from 0 to 2**63 - 1")
        return Request(obs, seed, self._rtc(message))

    def _mapped(self, message: Mapping[str, Any]) -> tuple[dict[str, Any], Any, Any]:
        if self.mapping.entries:
            unknown = [k for k in message if k not in self.mapping.entries and k not in CONTROL_KEYS]
            if unknown:
                raise MessageError(
                    f"unknown observation key {unknown[0]!r}; this server maps {', '.join(self.mapping.entries)} "
                    f"(+ {', '.join(CONTROL_KEYS)})"
                )
            found: dict[str, Any] = {}
            for key, target in self.mapping.entries.items():
                if target == "ignore":
                    continue
                if key not in message:
                    raise MessageError(f"observation lacks {key!r} (mapped to {target})")
                found[target] = message[key]
            views = {v: found[f"view:{v}"] for v in self.spec.views}
            return views, found["state"], found["task"]
        task_key = "task" if "task" in message or "prompt" not in message else "prompt"
        expected = ("images", "state", task_key)
        unknown = [k for k in message if k not in expected and k not in CONTROL_KEYS]
        if unknown:
            raise MessageError(
                f"unknown observation key {unknown[0]!r}; expected images, state, task (or prompt) and "
                f"optionally {', '.join(CONTROL_KEYS)}, or start the server with --map"
            )
        for key in expected:
            if key not in message:
                raise MessageError(f"observation lacks {key!r} (expected images, state and task)")
        images = message["images"]
        if not isinstance(images, Mapping):
            raise MessageError(f"'images' is {type(images).__name__}; expected a map of view name -> image")
        extra = [v for v in images if v not in self.spec.views]
        missing = [v for v in self.spec.views if v not in images]
        if missing or extra:
            raise MessageError(
                f"'images' has views {', '.join(map(str, images)) or 'none'}; the checkpoint expects "
                f"{', '.join(self.spec.views)}"
            )
        return dict(images), message["state"], message[task_key]

    def image(self, value: Any, what: str) -> np.ndarray:
        """A (H, W, 3) uint8 image, resized (bilinear) to the checkpoint's size when it is another size."""
        if not isinstance(value, np.ndarray):
            raise MessageError(f"{what}: {type(value).__name__}, expected a uint8 (H, W, 3) array")
        if value.dtype != np.uint8:
            raise MessageError(f"{what}: dtype {value.dtype}, expected uint8 (H, W, 3)")
        if (
            value.ndim != 3
            or value.shape[2] != 3
            or not all(0 < s <= MAX_IMAGE_SIDE for s in value.shape[:2])
        ):
            raise MessageError(
                f"{what}: shape {value.shape}, expected (H, W, 3) with sides from 1 to {MAX_IMAGE_SIDE}"
            )
        size = tuple(self.spec.image_size)
        if value.shape[:2] == size:
            return value
        pixels = torch.from_numpy(np.array(value)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return to_uint8(resize_images(pixels, size, antialias=True))[0]

    def state(self, value: Any, what: str = "state") -> np.ndarray:
        """The state (D_state,) in dataset units, finite and within float32's range (`what`: the key that
        carried it)."""
        state = _array(value, what)
        d = self.normalizer.state_dim
        if state.dtype.kind not in "iuf":
            raise MessageError(f"{what}: dtype {state.dtype}, expected a float array ({d},)")
        if state.shape != (d,):
            raise MessageError(
                f"{what}: shape {state.shape}, expected ({d},) ({', '.join(self.normalizer.state_names)})"
            )
        if not np.isfinite(state).all():
            raise MessageError(f"{what}: holds NaN or infinity; expected finite numbers")
        if state.dtype.kind == "f" and state.dtype.itemsize > 4:  # float64 and wider: may not fit float32
            biggest = np.abs(state).max()
            if biggest > FLOAT32_MAX:
                big = np.format_float_scientific(biggest, precision=3, trim="-")
                raise MessageError(
                    f"{what}: a value of magnitude {big} is out of float32's range (|x| <= "
                    f"{FLOAT32_MAX:.4g}); expected finite numbers within it"
                )
        return state.astype(np.float32)

    def task(self, value: Any) -> str:
        if isinstance(value, list | tuple) and len(value) == 1:  # a batch of one prompt
            value = value[0]
        if not isinstance(value, str):
            raise MessageError(
                f"task: {type(value).__name__}, expected a string (one of the checkpoint's tasks)"
            )
        if value not in self.spec.tasks:
            shown = ", ".join(repr(t) for t in self.spec.tasks[:8]) + (
                " ..." if len(self.spec.tasks) > 8 else ""
            )
            raise MessageError(f"task {value[:80]!r} is not one of the checkpoint's tasks ({shown})")
        return value

    def _rtc(self, message: Mapping[str, Any]) -> dict[str, Any]:
        has = [k for k in ("prev_chunk", "inference_delay") if k in message]
        if not has:
            return {}
        if len(has) == 1:
            other = "inference_delay" if has[0] == "prev_chunk" else "prev_chunk"
            raise MessageError(f"{has[0]!r} without {other!r} (real-time chunking needs both)")
        # the Policy checks the chunk's shape, its values and the delay (one line each, answered as errors)
        return {
            "prev_chunk": _array(message["prev_chunk"], "prev_chunk"),
            "inference_delay": message["inference_delay"],
        }

    # -------------------------------------------------------------------- acting
    def new_generator(self, seed: int | None = None) -> torch.Generator:
        """A noise stream, as a fresh Policy's after reset(seed) (default: the server's --seed)."""
        return torch.Generator().manual_seed(self.seed if seed is None else seed)

    def act(self, request: Request, generator: torch.Generator) -> np.ndarray:
        """The chunk (K, D_action) in dataset units; `generator` is the stream's noise (advanced in place)."""
        with self._lock:
            self.policy.generator = generator
            chunk = self.policy.predict_chunk(request.obs, **request.rtc)
            latencies = getattr(self.policy, "query_latencies_s", None)
            if isinstance(latencies, list):  # kept per episode in process; a server never resets: bound it
                latencies.clear()
        return np.asarray(chunk, dtype=np.float32)

    def act_with_states(self, request: Request, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(actions (K, D_action), states (S, D_state)), dataset units: the release protocol returns both."""
        with self._lock:
            prediction = self.policy.predict(request.obs, mode="policy", generator=generator)
        return prediction.actions[0].astype(np.float32), prediction.states[0].astype(np.float32)

    def timed(self) -> _Timer:
        """`with service.timed() as t: ...; t.ok = True`: one debug line and one statistics entry."""
        return _Timer(self.stats)


class _Timer:
    def __init__(self, stats: LatencyStats) -> None:
        self.stats, self.ok, self.note = stats, False, ""

    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.start
        self.stats.record(seconds, self.ok)
        logger.debug("serve: %s in %.1f ms%s", "ok" if self.ok else "error", 1e3 * seconds, self.note)
