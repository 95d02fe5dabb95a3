"""openpi's websocket protocol (the `openpi-client` package's WebsocketClientPolicy talks to it).

On connect the server sends one binary frame: the metadata (PolicyService.metadata). Then each client
binary frame is an observation (msgpack, arrays as openpi's msgpack_numpy encodes them) and each reply
a binary frame {"actions": (K, D_action) float32, "server_timing": {"infer_ms": ...}}.
A refused observation is answered with a text frame (openpi's clients raise it as an error) and the
connection stays open for the next one. A message over --max-message-mb closes the connection with
code 1009 (websockets cannot answer a frame it refused to read); the server keeps serving.

With an API key, a connection without the header `Authorization: Api-Key <key>` is closed at once
with code 1008 and a reason saying so. GET /healthz answers 200 (for load balancers and scripts).
"""

from __future__ import annotations

import asyncio
import hmac
import http
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from xwam_core.errors import XWAMError, network_error_line
from xwam_core.serve.service import PolicyService, SummaryLogger
from xwam_core.serve.wire import MessageError, packb, unpackb

logger = logging.getLogger("xwam.serve")
PROTOCOL = "openpi"
UNAUTHORIZED = "unauthorized: send the header 'Authorization: Api-Key <key>' with the server's key"


@dataclass
class _Stream:
    """One connection's noise: seeded with the server's --seed, reseeded by an observation's `seed`."""

    generator: torch.Generator
    seed: int


class OpenpiServer:
    """The websocket server; `serve_forever()` in the main thread, or `start()` / `stop()` in a thread."""

    def __init__(
        self,
        service: PolicyService,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_message_bytes: int = 64 << 20,
        summary_every_s: float = 60.0,
    ) -> None:
        self.service, self.host, self.port = service, host, port
        self.api_key = api_key
        self.max_message_bytes = max_message_bytes
        self.summary_every_s = summary_every_s
        self.metadata = packb(service.metadata(PROTOCOL, max_message_bytes))
        self.ready = threading.Event()
        self._in_flight = 0
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # decoding, checking and the Policy run here, so the event loop keeps answering pings
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="xwam-serve")

    # -------------------------------------------------------------------- running
    def serve_forever(self, handle_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or stop()): the request in flight is answered, then it returns."""
        try:
            asyncio.run(self._main(handle_signals))
        finally:
            self._executor.shutdown(wait=True)

    def start(self, timeout_s: float = 30.0) -> OpenpiServer:
        """Serve from a thread (tests, benchmarks); returns once listening (self.port is the bound port)."""

        def run() -> None:
            try:
                self.serve_forever(handle_signals=False)
            except BaseException as e:  # surfaced by start() when it happens before listening
                self._error = e
                self.ready.set()

        self._thread = threading.Thread(target=run, name="xwam-serve-openpi", daemon=True)
        self._thread.start()
        if not self.ready.wait(timeout_s) or self._error is not None:
            if isinstance(self._error, XWAMError):  # already one line naming the address
                raise self._error
            raise XWAMError(f"the openpi server did not start on {self.host}:{self.port} ({self._error})")
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop as SIGTERM does (finish what is in flight) and wait for the server thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def _main(self, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        if not 0 <= self.port <= 65535:
            raise XWAMError(f"--port {self.port}: expected a port from 0 to 65535 (0: a free one)")
        try:
            listening = await serve(
                self._handler,
                self.host,
                self.port,
                max_size=self.max_message_bytes,
                compression=None,
                process_request=self._health,
            )
        except (OSError, ValueError) as e:  # the host does not resolve, the port is taken, ...
            raise XWAMError(network_error_line(self.host, self.port, e)) from None
        summary = SummaryLogger(self.service.stats, self.summary_every_s).start()
        async with listening as server:
            self.port = int(server.sockets[0].getsockname()[1])
            logger.info("serve: openpi protocol on ws://%s:%d", self.host, self.port)
            self.ready.set()
            await self._stop.wait()
            await self._drain(server)
        summary.stop()

    async def _drain(self, server: Server) -> None:
        """Stop accepting, answer the requests in flight, then close every connection (1001)."""
        logger.info("serve: stopping; answering %d request(s) in flight", self._in_flight)
        self._stopping = True
        server.close(close_connections=False)
        while self._in_flight:
            await asyncio.sleep(0.01)
        for connection in list(server.connections):
            await connection.close(1001, "server shutting down")
        await server.wait_closed()

    # -------------------------------------------------------------------- connections
    def _health(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None

    def _authorized(self, connection: ServerConnection) -> bool:
        if self.api_key is None:
            return True
        assert connection.request is not None
        given = connection.request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Api-Key {self.api_key}".encode())

    async def _handler(self, connection: ServerConnection) -> None:
        peer = connection.remote_address
        if not self._authorized(connection):
            logger.warning("serve: refused %s: no or wrong API key", peer)
            await connection.close(1008, UNAUTHORIZED)
            return
        logger.debug("serve: connection from %s", peer)
        stream = _Stream(self.service.new_generator(), self.service.seed)
        loop = asyncio.get_running_loop()
        try:
            await connection.send(self.metadata)
            while True:
                message = await connection.recv()
                if self._stopping:
                    await connection.close(1001, "server shutting down")
                    return
                self._in_flight += 1
                try:
                    reply = await loop.run_in_executor(self._executor, self.answer, message, stream)
                finally:
                    self._in_flight -= 1
                await connection.send(reply)
        except ConnectionClosed as e:
            logger.debug("serve: connection from %s closed (%s)", peer, e)

    def answer(self, message: bytes | str, stream: _Stream) -> bytes | str:
        """The reply to one message: msgpack actions, or a one-line text error."""
        with self.service.timed() as timer:
            try:
                if isinstance(message, str):
                    raise MessageError(
                        "a text frame; expected binary msgpack frames (openpi's msgpack_numpy)"
                    )
                request = self.service.request(unpackb(message))
                if request.seed is not None:
                    stream.generator, stream.seed = self.service.new_generator(request.seed), request.seed
                start = time.perf_counter()
                actions = self.service.act(request, stream.generator)
                infer_ms = 1e3 * (time.perf_counter() - start)
                timer.ok = True
                return packb({"actions": actions, "server_timing": {"infer_ms": infer_ms}})
            except XWAMError as e:  # MessageError, or the Policy refusing an input
                timer.note = f": {e}"
                return f"xwam serve: {e}"
            except Exception as e:  # a bug: say so, keep serving
                logger.exception("serve: unexpected error")
                timer.note = f": unexpected {type(e).__name__}"
                return f"xwam serve: unexpected {type(e).__name__}: {e} (a bug in xwam; see the server's log)"
