"""`xwam serve --ckpt CKPT` (a policy server) and `xwam broker` (the release protocol's broker)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
from typing import Annotated, Any

import typer

from xwam_cli.common import err_console, user_errors
from xwam_core.errors import XWAMError, network_error_line

PROTOCOLS = ("openpi", "xwam-release")
API_KEY_ENV = "XWAM_SERVE_API_KEY"

EXAMPLES = """
[bold]Examples[/]

  xwam serve --ckpt out/demo/run                                # openpi protocol on ws://127.0.0.1:8000
  xwam serve --ckpt CKPT --port 8001 --api-key SECRET --seed 7
  xwam serve --ckpt CKPT --map observation/image=view:corner2,observation/wrist_image=view:gripperPOV,observation/state=state,prompt=task
  xwam broker &                                                 # the release's evaluation clients: 10086
  xwam serve --ckpt CKPT --protocol xwam-release --port 10087   # a worker on the broker's back end
"""

BROKER_EXAMPLES = """
[bold]Examples[/]

  xwam broker                          # clients on 127.0.0.1:10086, workers on 127.0.0.1:10087
  xwam broker --front 20086 --back 20087
"""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _warn_if_exposed(host: str, what: str) -> None:
    if not _loopback(host):
        err_console.print(
            f"[bold yellow]warning:[/] {what} {host}, not loopback: anyone who reaches this address can "
            "use the policy (see docs/serve.md, security)",
            highlight=False,
        )


def _logging(level: str) -> None:
    if level not in ("debug", "info", "warning"):
        raise XWAMError(f"--log-level {level!r}: expected debug, info or warning")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("xwam.serve").setLevel(level.upper())


def _max_bytes(mb: float) -> int:
    if not mb > 0:
        raise XWAMError(f"--max-message-mb {mb}: expected a size in MiB > 0")
    return int(mb * (1 << 20))


def _port(port: int, option: str, lowest: int = 0, meaning: str = "0: a free one") -> int:
    if not lowest <= port <= 65535:
        raise XWAMError(f"{option} {port}: expected a port from {lowest} to 65535 ({meaning})")
    return port


def _resolve(host: str, port: int, port_option: str = "--port") -> None:
    """Refuse a --host that does not resolve before the checkpoint loads (ZeroMQ's connect would retry it
    silently forever; its bind would say only 'No such device')."""
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as e:  # socket.gaierror; UnicodeError (a label too long), a NUL character
        raise XWAMError(network_error_line(host, port, e, port_option)) from None


def _device(text: str) -> str:
    """--device, checked before the checkpoint loads: a torch device string this machine has."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise XWAMError(f"--device {text!r}: not a torch device; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise XWAMError(
                f"--device {text}: CUDA is not available on this machine (no GPU, no driver, or a CPU-only "
                "torch); expected --device cpu"
            )
        if device.index is not None and device.index >= count:
            raise XWAMError(
                f"--device {text}: this machine has {count} CUDA device(s); expected cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise XWAMError(
                f"--device {text}: MPS (Apple's GPU) is not available on this machine; expected --device cpu"
            )
    elif device.type != "cpu":
        raise XWAMError(
            f"--device {text}: a {device.type} device cannot serve; expected cpu, cuda, cuda:N or mps"
        )
    return text


@user_errors
def serve(
    ckpt: Annotated[str, typer.Option(help="Checkpoint folder (or a run folder: its newest checkpoint).")],
    protocol: Annotated[
        str,
        typer.Option(
            help="openpi: websocket + msgpack (openpi-client). xwam-release: the release's ZeroMQ worker."
        ),
    ] = "openpi",
    host: Annotated[
        str, typer.Option(help="openpi: the address to bind. xwam-release: the broker's host.")
    ] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(
            help="openpi: the port to bind (default 8000; 0 = a free one). xwam-release: the broker's back end (10087)."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_ENV,
            help=f"openpi: refuse connections without the header 'Authorization: Api-Key KEY' (or set {API_KEY_ENV}).",
        ),
    ] = None,
    max_message_mb: Annotated[float, typer.Option(help="Refuse messages larger than this (MiB).")] = 64.0,
    mapping: Annotated[
        str | None,
        typer.Option(
            "--map",
            help="openpi: observation keys -> inputs, obs_key=view:NAME,obs_key=state,obs_key=task,obs_key=ignore "
            "(default: the Policy's own images/state/task).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Each connection's noise seed (an observation's `seed` key reseeds).")
    ] = 0,
    device: Annotated[str, typer.Option(help="torch device for the model.")] = "cpu",
    num_steps_action: Annotated[
        int | None, typer.Option(help="Action denoising steps (default: the checkpoint's).")
    ] = None,
    num_steps_video: Annotated[
        int | None,
        typer.Option(help="Video denoising steps, at least the action steps (default: the checkpoint's)."),
    ] = None,
    action_noise_scale: Annotated[
        float | None,
        typer.Option(
            help="Scale of the noise the actions start from: 1 samples, 0 starts from its mean "
            "(default: the checkpoint's inference.action_noise_scale)."
        ),
    ] = None,
    summary_every: Annotated[
        float, typer.Option(help="Seconds between the info-level summary lines.")
    ] = 60.0,
    log_level: Annotated[str, typer.Option(help="debug (one line per request), info or warning.")] = "info",
) -> None:
    """Serve a checkpoint as a policy: observations in, action chunks out (policy mode: no video, no depth).

    The checkpoint is loaded once. SIGTERM (or Ctrl-C) answers the request in flight, then exits 0.
    """
    from xwam_core.policy import Policy
    from xwam_core.serve.service import ObservationMap, PolicyService

    if protocol not in PROTOCOLS:
        raise XWAMError(f"--protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if protocol == "xwam-release" and api_key is not None:
        raise XWAMError(
            "--api-key: the release protocol (ZeroMQ) carries no headers; keep its broker on loopback"
        )
    if protocol == "xwam-release" and mapping is not None:
        raise XWAMError("--map: the release protocol's keys are fixed (video, proprios, prompt, ...)")
    if not 0 <= seed < 2**63:
        raise XWAMError(f"--seed {seed}: expected an integer from 0 to 2**63 - 1")
    max_bytes = _max_bytes(max_message_mb)
    _logging(log_level)
    if protocol == "openpi":
        port = _port(8000 if port is None else port, "--port")
    else:
        from xwam_core.serve.release import BACK_PORT

        port = _port(BACK_PORT if port is None else port, "--port", 1, "the broker's back end")
    if host or protocol != "openpi":  # openpi's "" binds every interface, as asyncio does
        _resolve(host, port)
    device = _device(device)
    policy = Policy.from_checkpoint(
        ckpt,
        device=device,
        num_steps_video=num_steps_video,
        num_steps_action=num_steps_action,
        action_noise_scale=action_noise_scale,
    )
    service = PolicyService(policy, ObservationMap.parse(mapping, list(policy.spec.views)), seed=seed)
    if protocol == "openpi":
        from xwam_core.serve.openpi import OpenpiServer

        _warn_if_exposed(host, "binding")
        server = OpenpiServer(service, host, port, api_key, max_bytes, summary_every)
        server.serve_forever(handle_signals=True)
        return
    from xwam_core.serve.release import ReleaseWorker

    _warn_if_exposed(host, "connecting to a broker at")
    worker = ReleaseWorker(service, f"tcp://{host}:{port}", max_bytes, summary_every)
    _stop_on_signals(worker.stop_event)
    worker.run()


def _stop_on_signals(event: Any) -> None:
    def stop(signum: int, frame: Any) -> None:
        logging.getLogger("xwam.serve").info(
            "serve: %s: finishing the request in flight", signal.Signals(signum).name
        )
        event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


@user_errors
def broker(
    front: Annotated[
        int, typer.Option(help="Port for the clients (the release's evaluation clients use 10086).")
    ] = 10086,
    back: Annotated[
        int, typer.Option(help="Port for the workers (xwam serve --protocol xwam-release).")
    ] = 10087,
    host: Annotated[str, typer.Option(help="Address to bind both ports on.")] = "127.0.0.1",
    max_message_mb: Annotated[float, typer.Option(help="Refuse requests larger than this (MiB).")] = 64.0,
    log_level: Annotated[str, typer.Option(help="debug, info or warning.")] = "info",
) -> None:
    """The release protocol's broker: each client request goes to one idle worker, in arrival order.

    Workers connect to the back end (xwam serve --protocol xwam-release, or the release's own servers);
    clients (the release's RoboCasa / RoboTwin evaluation) to the front end. SIGTERM exits 0.
    """
    from xwam_core.serve.release import Broker

    _port(front, "--front")
    _port(back, "--back")
    if front == back != 0:
        raise XWAMError(f"--front {front} and --back {back}: expected two different ports")
    max_bytes = _max_bytes(max_message_mb)
    _logging(log_level)
    _resolve(host, front, "--front")
    _warn_if_exposed(host, "binding")
    b = Broker(front, back, host, max_bytes)
    _stop_on_signals(b.stop_event)
    b.run()
