"""RemotePolicy: the Policy's acting interface over `xwam serve` (openpi protocol), for closed loops.

    with RemotePolicy("ws://127.0.0.1:8000") as policy:     # api_key="..." when the server has one
        policy.reset(seed=0)
        chunk = policy.predict_chunk(obs)                     # (K, D_action), dataset units
        action = policy.select_action(obs)                    # queues actions_per_query of a chunk

It behaves as the in-process Policy on the same checkpoint: reset(seed) sends `seed` with the next
observation (the server reseeds this connection's noise), later queries continue that noise stream,
so an episode gives the in-process Policy's chunks. `spec` and `normalizer` carry what the server's
metadata says (views, image size, window, tasks; state/action names and dims; no statistics).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from xwam_core.errors import XWAMError
from xwam_core.serve.wire import packb, unpackb


@dataclass
class RemoteLayout:
    """The names and sizes of a served checkpoint's state and actions (what its normalizer names)."""

    state_names: list[str]
    action_names: list[str]

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def action_dim(self) -> int:
        return len(self.action_names)


class RemotePolicy:
    """reset / predict_chunk / select_action of a Policy served by `xwam serve --protocol openpi`."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        actions_per_query: int | None = None,
        open_timeout_s: float = 30.0,
    ) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        from xwam_core.checkpoint import DataSpec
        from xwam_core.data.windows import WindowLayout

        self.url = url if url.startswith(("ws://", "wss://")) else f"ws://{url}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        try:
            self._ws = connect(
                self.url,
                additional_headers=headers,
                compression=None,
                max_size=None,
                open_timeout=open_timeout_s,
            )
            first = self._ws.recv()
            self.metadata: dict[str, Any] = unpackb(first if isinstance(first, bytes) else first.encode())
        except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as e:
            raise XWAMError(f"{self.url}: cannot reach the policy server ({e})") from None
        except Exception as e:  # the server closed at once (a wrong API key says why)
            raise XWAMError(f"{self.url}: the policy server refused the connection ({e})") from None
        m = self.metadata
        if not isinstance(m, dict) or m.get("server") != "xwam":
            raise XWAMError(f"{self.url}: not an xwam policy server (its metadata: {str(m)[:200]})")
        self.spec = DataSpec(
            views=list(m["views"]),
            image_size=(int(m["image_size"][0]), int(m["image_size"][1])),
            window=WindowLayout(int(m["future_frames"]), int(m["frame_stride"])),
            tasks=list(m["tasks"]),
            fps=m.get("fps"),
            val_episodes=int(m.get("val_episodes", 0)),
        )
        self.normalizer = RemoteLayout(list(m["state_names"]), list(m["action_names"]))
        k = int(m["action_horizon"])
        self.actions_per_query = int(actions_per_query or m.get("actions_per_query") or k)
        if not 1 <= self.actions_per_query <= k:
            raise XWAMError(f"actions per query {self.actions_per_query}: expected 1 to the chunk's {k}")
        self._queue: deque[np.ndarray] = deque()
        self._seed: int | None = None
        self.query_latencies_s: list[float] = []  # the server's inference time per query since reset()

    # -------------------------------------------------------------------- the Policy's interface
    def reset(self, seed: int | None = None) -> None:
        """Forget queued actions; with `seed`, the next query reseeds the server's noise for this connection."""
        self._queue.clear()
        self.query_latencies_s = []
        if seed is not None:
            self._seed = seed

    @property
    def wants_observation(self) -> bool:
        return not self._queue

    def select_action(self, obs: dict[str, Any]) -> np.ndarray:
        if not self._queue:
            self._queue.extend(self.predict_chunk(obs)[: self.actions_per_query])
        return self._queue.popleft()

    def predict_chunk(self, obs: dict[str, Any], **kwargs: Any) -> np.ndarray:
        """The chunk (K, D_action) in dataset units; keywords (prev_chunk, inference_delay) travel along."""
        message = {**obs, **{k: v for k, v in kwargs.items() if v is not None}}
        if self._seed is not None:
            message["seed"] = self._seed
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.send(packb(message))
            reply = self._ws.recv()
        except ConnectionClosed as e:
            raise XWAMError(f"{self.url}: the policy server closed the connection ({e})") from None
        if isinstance(reply, str):
            raise XWAMError(reply)
        self._seed = None
        answer = unpackb(reply)
        timing = answer.get("server_timing", {})
        if "infer_ms" in timing:
            self.query_latencies_s.append(float(timing["infer_ms"]) / 1e3)
        return np.asarray(answer["actions"])

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
