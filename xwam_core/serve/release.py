"""The X-WAM release's evaluation protocol (ZeroMQ), so its RoboCasa and RoboTwin clients evaluate xwam.

    clients (DEALER) -> broker front end (ROUTER, 10086) -> broker back end (ROUTER, 10087) <- workers (DEALER)

A worker (`xwam serve --protocol xwam-release`) sends [b"READY"], receives [b"WORK", client_id, payload]
and answers [b"RESULT", client_id, reply], then READY again. The broker (`xwam broker`) hands each
request to one idle worker, in arrival order. Payloads are pickles of
    video     float32 (V, H, W, 3) in [-1, 1], the checkpoint's views in its order
    proprios  (16,) raw state: [left xyz, quat wxyz, gripper, right xyz, quat wxyz, gripper]
    prompt    [str], one of the checkpoint's tasks
    cfg       float, the release's guidance (0 = off); must match the checkpoint's guidance_scale
    env_rank, rollout_id, step_id   ints; the noise seed is the release's: md5("{env_rank}_{rollout_id}_{step_id}") mod 2**32
read only with wire.restricted_loads. The video is resized to the checkpoint's image size (bilinear);
for a converted release checkpoint (release normalization) it is then centre-cropped to 0.95 and resized
back, as the release's server does. The reply pickle is {"proprios": (9, 16), "actions": (K, D_action)}
in dataset units (K = 32 for the release's checkpoints): proprios are the predicted states, rows past the
model's S states repeat its last, columns past its D_state are 0 (a one-arm model's right arm, which
the release's clients send as zeros). A refused request is answered {"error": "one line"}.

Beyond the release's broker: a worker that stops sends [b"BYE"] (the release's broker ignores it; ours
stops dispatching to it and acknowledges, and the worker answers anything already dispatched); a worker
that vanished is skipped (ROUTER_MANDATORY); REQ clients (an empty delimiter frame) are answered too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np
import torch
import zmq

from xwam_core.errors import XWAMError, network_error_line
from xwam_core.serve.service import (
    PolicyService,
    Request,
    SummaryLogger,
    resize_images,
    shown,
    to_uint8,
)
from xwam_core.serve.wire import MessageError, dumps_reply, restricted_loads

logger = logging.getLogger("xwam.serve")
PROTOCOL = "xwam-release"
FRONT_PORT, BACK_PORT = 10086, 10087
RELEASE_STATE_DIM = 16
RELEASE_STATES = 9  # the reply's proprios rows: the release's 8 future frames + the current one
RELEASE_CROP = 0.95
REQUEST_KEYS = ("video", "proprios", "prompt", "cfg", "env_rank", "rollout_id", "step_id")
ID_RANGE = (-(2**63), 2**63 - 1)  # env_rank, rollout_id, step_id: 64-bit integers
POLL_MS = 100


def release_seed(env_rank: int, rollout_id: int, step_id: int) -> int:
    """The release's noise seed for one request: md5 of "env_rank_rollout_id_step_id", modulo 2**32."""
    digest = hashlib.md5(f"{env_rank}_{rollout_id}_{step_id}".encode()).hexdigest()
    return int(digest, 16) % 2**32


# ------------------------------------------------------------------------------------ requests
class ReleaseAdapter:
    """Release request dicts -> Policy observations; predictions -> release reply dicts."""

    def __init__(self, service: PolicyService) -> None:
        self.service = service
        self.spec = service.spec
        self.state_dim = service.normalizer.state_dim
        if self.state_dim > RELEASE_STATE_DIM:
            raise XWAMError(
                f"the release protocol carries a {RELEASE_STATE_DIM}-D state; this checkpoint's is "
                f"{self.state_dim}-D (serve it with --protocol openpi)"
            )
        self.release_checkpoint = getattr(service.normalizer, "normalization", "") == "release"
        guidance = float(getattr(service.policy.schedule_config, "guidance_scale", 1.0))
        self.cfg = 0.0 if guidance == 1.0 else guidance  # the release's cfg: 0 = off, else the scale

    def request(self, data: Any) -> Request:
        if not isinstance(data, dict):
            raise MessageError(f"expected a dict of {', '.join(REQUEST_KEYS)}, got {type(data).__name__}")
        unknown = [k for k in data if k not in REQUEST_KEYS]
        if unknown:
            raise MessageError(f"unknown request key {unknown[0]!r}; expected {', '.join(REQUEST_KEYS)}")
        missing = [k for k in REQUEST_KEYS if k not in data and k != "cfg"]
        if missing:
            raise MessageError(f"request lacks {missing[0]!r} (expected {', '.join(REQUEST_KEYS)})")
        ids = [self._integer(data[k], k) for k in ("env_rank", "rollout_id", "step_id")]
        cfg = self._cfg(data.get("cfg", 0.0))
        if not np.isclose(cfg, self.cfg):
            raise MessageError(
                f"cfg {cfg}: this server runs the checkpoint's guidance (cfg {self.cfg}); serve a "
                "checkpoint converted with the guidance you want (xwam convert xwam-release --guidance-scale)"
            )
        proprios = data["proprios"]
        if not isinstance(proprios, np.ndarray):
            raise MessageError(
                f"proprios: {type(proprios).__name__}, expected a float array ({RELEASE_STATE_DIM},)"
            )
        if proprios.dtype.kind not in "iuf":
            raise MessageError(
                f"proprios: dtype {proprios.dtype}, expected a float array ({RELEASE_STATE_DIM},)"
            )
        if proprios.shape != (RELEASE_STATE_DIM,):
            raise MessageError(f"proprios: shape {proprios.shape}, expected ({RELEASE_STATE_DIM},)")
        obs = {
            "images": self.images(data["video"]),
            "state": self.service.state(proprios[: self.state_dim], "proprios"),
            "task": self.service.task(data["prompt"]),
        }
        return Request(obs, release_seed(*ids))

    @staticmethod
    def _integer(value: Any, key: str) -> int:
        if isinstance(value, np.integer):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise MessageError(f"{key} {shown(value)}: expected an integer")
        low, high = ID_RANGE
        if not low <= value <= high:  # the seed's md5 formats it: bounded, so is the work
            raise MessageError(f"{key} {shown(value)}: expected an integer from -2**63 to 2**63 - 1")
        return value

    def _cfg(self, value: Any) -> float:
        """The request's cfg as a float: a finite number (the checkpoint's guidance)."""
        expected = f"expected a finite number (this server's guidance, cfg {self.cfg})"
        if not isinstance(value, int | float | np.floating | np.integer) or isinstance(
            value, bool | np.bool_
        ):
            raise MessageError(f"cfg {shown(value)}: {expected}")
        try:
            cfg = float(value)
        except OverflowError:  # an integer beyond float's range (10**400)
            raise MessageError(f"cfg {shown(value)}: {expected}") from None
        if not math.isfinite(cfg):
            raise MessageError(f"cfg {cfg}: {expected}")
        return cfg

    def images(self, video: Any) -> dict[str, np.ndarray]:
        """(V, H, W, 3) float in [-1, 1] -> {view: (H, W, 3) uint8} at the checkpoint's size."""
        views = self.spec.views
        if not isinstance(video, np.ndarray):
            raise MessageError(f"video: {type(video).__name__}, expected a float32 (V, H, W, 3) array")
        if video.dtype.kind != "f":
            raise MessageError(f"video: dtype {video.dtype}, expected float32 in [-1, 1]")
        if video.ndim != 4 or video.shape[3] != 3 or not all(0 < s <= 4096 for s in video.shape[1:3]):
            raise MessageError(f"video: shape {video.shape}, expected ({len(views)}, H, W, 3)")
        if video.shape[0] != len(views):
            raise MessageError(
                f"video: {video.shape[0]} views, the checkpoint expects {len(views)} ({', '.join(views)})"
            )
        if not np.isfinite(video).all() or np.abs(video).max() > 1.001:
            raise MessageError("video: values outside [-1, 1] (or NaN); expected images scaled to [-1, 1]")
        frames = torch.from_numpy(np.array(video, dtype=np.float32)).permute(0, 3, 1, 2)  # (V, 3, H, W)
        size = tuple(self.spec.image_size)
        if self.release_checkpoint:  # the release server's preprocessing
            frames = resize_images(frames, size, antialias=False)
            h, w = size
            crop_h, crop_w = int(h * RELEASE_CROP), int(w * RELEASE_CROP)
            top, left = (h - crop_h) // 2, (w - crop_w) // 2
            frames = frames[:, :, top : top + crop_h, left : left + crop_w]
            frames = resize_images(frames, size, antialias=False)
        else:
            frames = resize_images(frames, size, antialias=True)
        pixels = to_uint8(frames)
        return {view: pixels[i] for i, view in enumerate(views)}

    @staticmethod
    def reply(actions: np.ndarray, states: np.ndarray) -> dict[str, np.ndarray]:
        proprios = np.zeros((RELEASE_STATES, RELEASE_STATE_DIM), np.float32)
        rows = states[:RELEASE_STATES]
        proprios[: len(rows), : states.shape[1]] = rows
        proprios[len(rows) :, : states.shape[1]] = rows[-1]
        return {"proprios": proprios, "actions": actions.astype(np.float32)}


# ------------------------------------------------------------------------------------ the worker
class ReleaseWorker:
    """A policy server on the release's broker back end: READY, WORK -> RESULT, until stopped."""

    def __init__(
        self,
        service: PolicyService,
        broker: str = f"tcp://127.0.0.1:{BACK_PORT}",
        max_message_bytes: int = 64 << 20,
        summary_every_s: float = 60.0,
        bye_timeout_s: float = 1.0,
    ) -> None:
        self.service = service
        self.adapter = ReleaseAdapter(service)
        self.broker = broker
        self.max_message_bytes = max_message_bytes
        self.summary_every_s = summary_every_s
        self.bye_timeout_s = bye_timeout_s
        self.stop_event = threading.Event()

    def run(self) -> int:
        """Serve until stop_event is set (SIGTERM in `xwam serve`): the request in flight is answered."""
        context: zmq.Context = zmq.Context.instance()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 2000)
        socket.connect(self.broker)
        summary = SummaryLogger(self.service.stats, self.summary_every_s).start()
        logger.info("serve: xwam-release worker on the broker back end %s", self.broker)
        try:
            socket.send_multipart([b"READY"])
            while not self.stop_event.is_set():
                if socket.poll(POLL_MS) and self._handle(socket, socket.recv_multipart()):
                    socket.send_multipart([b"READY"])
            # leaving: tell the broker, answer what it dispatched before it read that
            socket.send_multipart([b"BYE"])
            deadline = time.monotonic() + self.bye_timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not socket.poll(int(1000 * left) + 1):
                    break
                frames = socket.recv_multipart()
                if frames == [b"BYE"]:
                    break
                self._handle(socket, frames)
        finally:
            summary.stop()
            socket.close()
        return 0

    def _handle(self, socket: zmq.Socket, frames: list[bytes]) -> bool:
        """Answer one WORK message; False for anything else (logged, not answered: no client to name)."""
        if len(frames) < 2 or frames[0] != b"WORK":
            logger.warning("serve: ignored a broker message of %d frame(s) (expected WORK)", len(frames))
            return False
        client_id = frames[1]
        reply = self.answer(frames[2] if len(frames) == 3 else None)
        socket.send_multipart([b"RESULT", client_id, reply])
        return True

    def answer(self, payload: bytes | None) -> bytes:
        """The reply pickle to one request payload."""
        with self.service.timed() as timer:
            try:
                if payload is None:
                    raise MessageError("expected [WORK, client_id, payload]: 3 frames")
                if len(payload) > self.max_message_bytes:
                    raise MessageError(
                        f"request of {len(payload)} bytes is over the limit of {self.max_message_bytes} bytes"
                    )
                request = self.adapter.request(restricted_loads(payload))
                assert request.seed is not None
                actions, states = self.service.act_with_states(
                    request, self.service.new_generator(request.seed)
                )
                reply: dict[str, Any] = self.adapter.reply(actions, states)
                timer.ok = True
            except XWAMError as e:
                timer.note = f": {e}"
                reply = {"error": f"xwam serve: {e}"}
            except Exception as e:  # a bug: say so, keep serving
                logger.exception("serve: unexpected error")
                timer.note = f": unexpected {type(e).__name__}"
                reply = {"error": f"xwam serve: unexpected {type(e).__name__}: {e} (a bug in xwam)"}
        return dumps_reply(reply)


# ------------------------------------------------------------------------------------ the broker
class Broker:
    """The release's broker: clients on a ROUTER front end, workers on a ROUTER back end, each request to one
    idle worker in arrival order. `run()` until stop_event; ports 0 bind free ones (self.front_port/back_port)."""

    def __init__(
        self,
        front_port: int = FRONT_PORT,
        back_port: int = BACK_PORT,
        host: str = "127.0.0.1",
        max_message_bytes: int = 64 << 20,
        max_pending: int = 10000,
    ) -> None:
        self.host, self.front_port, self.back_port = host, front_port, back_port
        self.max_message_bytes, self.max_pending = max_message_bytes, max_pending
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.forwarded = 0

    def _bind(self, socket: zmq.Socket, port: int, option: str) -> int:
        try:
            if port == 0:
                return socket.bind_to_random_port(f"tcp://{self.host}")
            socket.bind(f"tcp://{self.host}:{port}")
        except zmq.ZMQError as e:  # the port is taken (another broker?), not an address of this machine, ...
            error = OSError(e.errno, e.strerror)
            raise XWAMError(f"broker: {network_error_line(self.host, port, error, option)}") from None
        return port

    def run(self) -> int:
        context: zmq.Context = zmq.Context.instance()
        front, back = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
        back.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker raises instead of eating the request
        for s in (front, back):
            s.setsockopt(zmq.LINGER, 1000)
        # past twice the limit ZeroMQ drops the peer unread; up to there a request gets an error reply
        front.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes)
        try:
            self.front_port = self._bind(front, self.front_port, "--front")
            self.back_port = self._bind(back, self.back_port, "--back")
        except XWAMError:
            front.close()
            back.close()
            raise
        logger.info(
            "broker: clients on %s:%d, workers on %s:%d",
            self.host,
            self.front_port,
            self.host,
            self.back_port,
        )
        idle: deque[bytes] = deque()
        pending: deque[tuple[bytes, bytes]] = deque()
        req_clients: set[bytes] = set()  # REQ sockets: their replies need the empty delimiter back
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        self.ready.set()
        try:
            while not self.stop_event.is_set():
                events = dict(poller.poll(POLL_MS))
                if back in events:
                    self._from_worker(back.recv_multipart(), front, back, idle, req_clients)
                if front in events:
                    self._from_client(front.recv_multipart(), front, pending, req_clients)
                while idle and pending:
                    worker = idle.popleft()
                    client, payload = pending[0]
                    try:
                        back.send_multipart([worker, b"WORK", client, payload])
                    except zmq.ZMQError:  # the worker is gone (EHOSTUNREACH): try the next idle one
                        logger.warning("broker: worker %s is gone", worker.hex()[:8])
                        continue
                    pending.popleft()
        finally:
            front.close()
            back.close()
        logger.info(
            "broker: stopped (%d replies forwarded, %d requests pending)", self.forwarded, len(pending)
        )
        return 0

    def _from_worker(
        self, frames: list[bytes], front: zmq.Socket, back: zmq.Socket, idle: deque[bytes], req: set[bytes]
    ) -> None:
        worker, kind = frames[0], frames[1] if len(frames) > 1 else b""
        if kind == b"READY" and len(frames) == 2:
            if worker not in idle:
                idle.append(worker)
        elif kind == b"RESULT" and len(frames) == 4:
            client = frames[2]
            envelope = [client, b""] if client in req else [client]
            with contextlib.suppress(zmq.ZMQError):  # ROUTER drops replies to vanished clients quietly
                front.send_multipart([*envelope, frames[3]])
                self.forwarded += 1
        elif kind == b"BYE" and len(frames) == 2:
            if worker in idle:
                idle.remove(worker)
            with contextlib.suppress(zmq.ZMQError):  # it left already
                back.send_multipart([worker, b"BYE"])
        else:
            logger.warning("broker: ignored a worker message %r of %d frame(s)", kind[:16], len(frames))

    def _from_client(
        self, frames: list[bytes], front: zmq.Socket, pending: deque[tuple[bytes, bytes]], req: set[bytes]
    ) -> None:
        client = frames[0]
        if len(frames) == 3 and frames[1] == b"":  # a REQ socket's envelope
            req.add(client)
            frames = [client, frames[2]]
        error = None
        if len(frames) != 2:
            error = f"expected one frame (the request pickle), got {len(frames) - 1}"
        elif len(frames[1]) > self.max_message_bytes:
            error = f"request of {len(frames[1])} bytes is over the limit of {self.max_message_bytes} bytes"
        elif len(pending) >= self.max_pending:
            error = f"the broker's queue is full ({self.max_pending} requests waiting); retry later"
        if error is None:
            pending.append((client, frames[1]))
            return
        envelope = [client, b""] if client in req else [client]
        front.send_multipart([*envelope, dumps_reply({"error": f"xwam broker: {error}"})])
