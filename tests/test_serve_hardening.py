"""Bad options and bad values the server must refuse with one line naming the option or key, never a
bug line: --device, --port / --front / --back ranges, network errors (an unresolvable --host, a busy
port), the release's cfg and ids beyond any sensible range, a bool proprios, malformed msgpack arrays and
scalars, and a state beyond float32's range (refused without a RuntimeWarning in the server's log)."""

from __future__ import annotations

import errno
import logging
import socket
import warnings

import numpy as np
import pytest

pytest.importorskip("websockets")
msgpack = pytest.importorskip("msgpack")
pytest.importorskip("zmq")

from tests.run_fixtures import app, one_line_error, runner, tiny_checkpoint  # noqa: E402
from tests.serve_fixtures import (  # noqa: E402
    ReleaseClient,
    in_process_chunks,
    observation,
    openpi_server,
    release_request,
    release_stack,
)
from xwam_core.errors import XWAMError, network_error_line  # noqa: E402
from xwam_core.policy import Policy  # noqa: E402
from xwam_core.serve.release import Broker, release_seed  # noqa: E402
from xwam_core.serve.service import PolicyService, shown  # noqa: E402
from xwam_core.serve.wire import MessageError, packb, unpackb  # noqa: E402

BUG = "this is a bug in xwam"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def policy(ckpt):
    return Policy.from_checkpoint(ckpt)


@pytest.fixture
def busy_port():
    """A loopback port something already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _refused(args: list[str], *needles: str) -> str:
    result = runner.invoke(app(), args)
    one_line_error(result, *needles)
    assert "unexpected" not in result.output and BUG not in result.output, result.output
    return result.output


# ------------------------------------------------------------------------------------ options
def test_device_option_is_checked_before_the_checkpoint_loads():
    import torch

    serve = ["serve", "--ckpt", "nowhere"]
    _refused(
        [*serve, "--device", "foo"], "--device 'foo': not a torch device; expected cpu, cuda, cuda:N or mps"
    )
    _refused([*serve, "--device", ""], "--device '': not a torch device")
    _refused([*serve, "--device", "meta"], "--device meta: a meta device cannot serve")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        _refused(
            [*serve, "--device", "cuda:99"], f"--device cuda:99: this machine has {count} CUDA device(s)"
        )
    else:
        for device in ("cuda", "cuda:99"):
            _refused(
                [*serve, "--device", device], f"--device {device}: CUDA is not available on this machine"
            )
    if not torch.backends.mps.is_available():
        _refused(
            [*serve, "--device", "mps"], "--device mps: MPS (Apple's GPU) is not available on this machine"
        )
    # a good device passes on to the checkpoint, which is the next thing refused
    output = _refused([*serve, "--device", "cpu"], "nowhere")
    assert "--device" not in output


def test_ports_are_range_checked():
    serve = ["serve", "--ckpt", "nowhere"]
    _refused([*serve, "--port", "99999"], "--port 99999: expected a port from 0 to 65535 (0: a free one)")
    _refused([*serve, "--port", "-1"], "--port -1: expected a port from 0 to 65535")
    _refused(
        [*serve, "--protocol", "xwam-release", "--port", "0"],
        "--port 0: expected a port from 1 to 65535 (the broker's back end)",
    )
    _refused(["broker", "--front", "99999"], "--front 99999: expected a port from 0 to 65535")
    _refused(["broker", "--back", "-1"], "--back -1: expected a port from 0 to 65535")
    _refused(
        ["broker", "--front", "5555", "--back", "5555"],
        "--front 5555 and --back 5555: expected two different ports",
    )


# ------------------------------------------------------------------------------------ network errors
def test_an_unresolvable_host_is_named_not_called_a_file_operation():
    line = "--host 256.1.1.1: cannot resolve this host name"
    for args in (
        ["serve", "--ckpt", "nowhere", "--host", "256.1.1.1"],
        ["serve", "--ckpt", "nowhere", "--protocol", "xwam-release", "--host", "256.1.1.1"],
        ["broker", "--host", "256.1.1.1"],
    ):
        output = _refused(args, line, "expected an IP address or a known host name")
        assert "file operation" not in output
    _refused(["serve", "--ckpt", "nowhere", "--host", "a" * 70], "not a valid host name", "label too long")


def test_network_error_lines():
    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert network_error_line("256.1.1.1", 8000, gai) == (
        "--host 256.1.1.1: cannot resolve this host name (Name or service not known); expected an IP address "
        "or a known host name"
    )
    busy = OSError(errno.EADDRINUSE, "error while attempting to bind: address already in use")
    assert network_error_line("127.0.0.1", 43179, busy, "--front") == (
        "127.0.0.1:43179: address already in use; choose another --front (or stop what listens there) "
        "[EADDRINUSE]"
    )
    assert network_error_line("::1", 80, OSError(errno.EADDRNOTAVAIL, "x")).startswith(
        "[::1]:80: not an address of this machine"
    )
    assert "ports below 1024 need privileges" in network_error_line("0.0.0.0", 80, OSError(errno.EACCES, "x"))
    assert (
        network_error_line("0.0.0.0", 8080, OSError(errno.EACCES, "x"))
        == "0.0.0.0:8080: permission denied [EACCES]"
    )
    assert network_error_line("", 1, ValueError("embedded null")).startswith(
        "--host '': not a valid host name"
    )


def test_a_busy_port_is_one_line_naming_the_address(ckpt, busy_port):
    from xwam_core.serve.openpi import OpenpiServer

    want = f"127.0.0.1:{busy_port}: address already in use; choose another --port"
    output = _refused(["serve", "--ckpt", str(ckpt), "--port", str(busy_port)], want, "[EADDRINUSE]")
    assert "file operation" not in output
    # the server class says the same when started from a thread (tests, benchmarks)
    service = PolicyService(Policy.from_checkpoint(ckpt))
    with pytest.raises(XWAMError) as raised:
        OpenpiServer(service, "127.0.0.1", busy_port).start()
    assert str(raised.value).startswith(want)
    # the broker names the option that holds the busy port
    with pytest.raises(XWAMError) as raised:
        Broker(busy_port, 0).run()
    assert str(raised.value) == (
        f"broker: 127.0.0.1:{busy_port}: address already in use; choose another --front (or stop what "
        "listens there) [EADDRINUSE]"
    )
    with pytest.raises(
        XWAMError, match=f"127.0.0.1:{busy_port}: address already in use; choose another --back"
    ):
        Broker(0, busy_port).run()


# ------------------------------------------------------------------------------------ the release protocol
def test_release_values_beyond_range_are_one_line_errors(ckpt, policy, caplog):
    request, obs = release_request(policy, seed=3)
    want = in_process_chunks(ckpt, [obs], release_seed(0, 3, 0))[0]
    expected_cfg = "expected a finite number (this server's guidance, cfg 0.0)"
    ids = "expected an integer from -2**63 to 2**63 - 1"
    corpus = {
        "cfg 10**400": ({"cfg": 10**400}, f"cfg <an integer of about 401 digits>: {expected_cfg}"),
        "cfg inf": ({"cfg": float("inf")}, f"cfg inf: {expected_cfg}"),
        "cfg nan": ({"cfg": np.float64("nan")}, f"cfg nan: {expected_cfg}"),
        "cfg a bool": ({"cfg": True}, f"cfg True: {expected_cfg}"),
        "env_rank 10**5000": ({"env_rank": 10**5000}, f"env_rank <an integer of about 5001 digits>: {ids}"),
        "rollout_id -2**63 - 1": ({"rollout_id": -(2**63) - 1}, f"rollout_id -9223372036854775809: {ids}"),
        "step_id 2**63": ({"step_id": 2**63}, f"step_id 9223372036854775808: {ids}"),
        "step_id a long string": ({"step_id": "7" * 500}, "step_id '77777777777777777777777"),
        "proprios bool": (
            {"proprios": np.zeros(16, bool)},
            "proprios: dtype bool, expected a float array (16,)",
        ),
        "proprios beyond float32": (
            {"proprios": np.full(16, 1e300)},
            "proprios: a value of magnitude 1e+300 is out of float32's range (|x| <= 3.403e+38); expected "
            "finite numbers within it",
        ),
        "proprios NaN": ({"proprios": np.full(16, np.nan)}, "proprios: holds NaN or infinity"),
    }
    caplog.set_level(logging.DEBUG, logger="xwam.serve")
    with warnings.catch_warnings(record=True) as caught, release_stack(policy) as broker:
        warnings.simplefilter("always")
        client = ReleaseClient(broker.front_port)
        for kind, (changes, line) in corpus.items():
            reply = client.infer({**request, **changes})
            assert set(reply) == {"error"}, (kind, reply)
            error = reply["error"]
            assert error.startswith(f"xwam serve: {line}"), (kind, error)
            assert "\n" not in error and "unexpected" not in error and len(error) < 300, (kind, error)
            np.testing.assert_allclose(client.infer(request)["actions"], want, atol=1e-6)
        # the extremes of the range are still answered
        edges = {**request, "env_rank": 2**63 - 1, "rollout_id": -(2**63), "step_id": np.int64(5)}
        reply = client.infer(edges)
        assert set(reply) == {"actions", "proprios"}, reply
        client.close()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    # no traceback, no "unexpected" line in the worker's log
    assert not [r for r in caplog.records if r.exc_info or "unexpected" in r.getMessage()]


# ------------------------------------------------------------------------------------ openpi
def _array_map(data: bytes, dtype: str, shape: list[int]) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _scalar_map(data: object, dtype: str) -> dict:
    return {b"__npgeneric__": True, b"data": data, b"dtype": dtype}


def test_malformed_numpy_arrays_and_scalars_are_named():
    def refused(obj: object) -> str:
        with pytest.raises(MessageError) as raised:
            unpackb(msgpack.packb(obj, use_bin_type=True))
        text = str(raised.value)
        assert "not a msgpack message" not in text, text
        return text

    assert refused(_scalar_map(float("nan"), "<i8")) == (
        "malformed numpy scalar: data nan for the integer dtype <i8; expected a whole number"
    )
    assert "data inf for the integer dtype |u1" in refused(_scalar_map(float("inf"), "|u1"))
    assert "data 1.5 for the integer dtype <i4" in refused(_scalar_map(1.5, "<i4"))
    assert (
        refused(_scalar_map(-1, "|u1"))
        == "malformed numpy scalar: data -1 is out of the range of |u1 (0 to 255)"
    )
    assert "data 9223372036854775808 is out of the range of <i8" in refused(_scalar_map(2**63, "<i8"))
    assert "data 2 for the dtype |b1; expected true or false" in refused(_scalar_map(2, "|b1"))
    assert refused(_scalar_map(1e300, "<f4")) == (
        "malformed numpy scalar: data 1e+300 is out of the range of <f4 (|x| <= 3.403e+38)"
    )
    assert refused(_array_map(b"", "<f4", [2**62, 2**62, 0])) == (
        "malformed numpy array: shape [4611686018427387904, 4611686018427387904, 0] <f4 is beyond numpy's "
        "maximum array size (its non-zero dimensions times the item size must stay under 2**63)"
    )
    # what openpi-client's msgpack_numpy sends (packb: the same encoding) is still read, scalars and empty
    # arrays included
    good = {
        "n": np.int64(-3),
        "u": np.uint64(2**64 - 1),
        "b": np.bool_(True),
        "f": np.float32(0.5),
        "nan": np.float32("nan"),
        "empty": np.zeros((2**20, 0), np.uint8),
    }
    decoded = unpackb(packb(good))
    assert decoded["n"] == -3 and decoded["u"] == 2**64 - 1 and decoded["b"] and decoded["f"] == 0.5
    assert np.isnan(decoded["nan"]) and decoded["empty"].shape == (2**20, 0)
    whole = unpackb(msgpack.packb({"w": _scalar_map(3.0, "<i4")}))["w"]  # a whole float for an int: read
    assert whole == 3 and whole.dtype == np.int32


def test_state_beyond_float32_is_refused_without_a_warning(policy):
    service = PolicyService(policy)
    d = policy.normalizer.state_dim
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (overflow in cast) would fail here
        with pytest.raises(MessageError) as raised:
            service.state(np.full(d, -1e300))
        assert str(raised.value) == (
            "state: a value of magnitude 1e+300 is out of float32's range (|x| <= 3.403e+38); expected finite "
            "numbers within it"
        )
        with pytest.raises(MessageError, match=r"state: a value of magnitude 3\.5e\+38"):
            service.state([3.5e38] + [0.0] * (d - 1))
        big = np.full(d, np.finfo(np.float32).max, np.float64)  # the largest float32 still fits
        assert np.isfinite(service.state(big)).all()
        assert service.state(np.arange(d, dtype=np.int64)).dtype == np.float32


def test_openpi_malformed_values_are_answered_and_the_server_goes_on(ckpt, policy, caplog):
    import websockets.sync.client

    obs = observation(policy, 0)
    want = in_process_chunks(ckpt, [obs], 7)[0]
    good = packb({**obs, "seed": 7})
    raw_obs = {
        "images": {v: _array_map(obs["images"][v].tobytes(), "|u1", [32, 32, 3]) for v in obs["images"]},
        "state": _array_map(obs["state"].tobytes(), "<f4", [8]),
        "task": obs["task"],
    }

    def raw(**changes: object) -> bytes:
        return msgpack.packb({**raw_obs, **changes}, use_bin_type=True)

    corpus = {
        "NaN int scalar seed": (
            raw(seed=_scalar_map(float("nan"), "<i8")),
            "xwam serve: malformed numpy scalar: data nan for the integer dtype <i8; expected a whole number",
        ),
        "shape 2**62 x 2**62 x 0": (
            raw(state=_array_map(b"", "<f4", [2**62, 2**62, 0])),
            "xwam serve: malformed numpy array: shape [4611686018427387904, 4611686018427387904, 0] <f4 is "
            "beyond numpy's maximum array size",
        ),
        "state 1e300": (
            packb({**obs, "state": np.full(8, 1e300)}),
            "xwam serve: state: a value of magnitude 1e+300 is out of float32's range",
        ),
    }
    caplog.set_level(logging.DEBUG, logger="xwam.serve")
    with warnings.catch_warnings(record=True) as caught, openpi_server(policy) as server:
        warnings.simplefilter("always")
        ws = websockets.sync.client.connect(f"ws://127.0.0.1:{server.port}", max_size=None)
        ws.recv()  # metadata
        for kind, (message, line) in corpus.items():
            ws.send(message)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str) and reply.startswith(line), (kind, reply)
            assert "\n" not in reply and "not a msgpack message" not in reply, (kind, reply)
            ws.send(good)
            answer = ws.recv(timeout=30)
            assert isinstance(answer, bytes), (kind, answer)
            np.testing.assert_allclose(unpackb(answer)["actions"], want, atol=1e-6)
        ws.close()
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.exc_info or "unexpected" in r.getMessage()]


def test_shown_values_stay_short():
    assert shown(10**5000) == "<an integer of about 5001 digits>"
    assert shown(-(10**400)) == "<a negative integer of about 401 digits>"
    assert shown(-1) == "-1" and shown(2**63) == "9223372036854775808"
    assert len(shown("x" * 10000)) <= 62 and len(shown(list(range(10000)))) < 60
