"""The serve wire formats and options, without a model: msgpack arrays as openpi encodes them, the
restricted unpickler on every pickle protocol, reply pickles numpy 1.x reads, the --map option, and
the serve command's one-line refusals."""

from __future__ import annotations

import pickle
import pickletools

import numpy as np
import pytest

pytest.importorskip("msgpack")

from xwam_core.errors import XWAMError
from xwam_core.serve.service import ObservationMap
from xwam_core.serve.wire import MessageError, dumps_reply, packb, restricted_loads, unpackb


def test_msgpack_arrays_round_trip_with_openpi_clients_encoding():
    msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")
    message = {
        "images": {"a": np.arange(12, dtype=np.uint8).reshape(2, 2, 3)},
        "state": np.linspace(0, 1, 5, dtype=np.float64),
        "flag": np.bool_(True),
        "n": np.int32(7),
        "task": "reach",
    }
    for encoded in (packb(message), msgpack_numpy.packb(message)):  # ours and openpi-client's
        decoded = unpackb(encoded)
        np.testing.assert_array_equal(decoded["images"]["a"], message["images"]["a"])
        np.testing.assert_array_equal(decoded["state"], message["state"])
        assert decoded["n"] == 7 and decoded["n"].dtype == np.int32 and decoded["task"] == "reach"
    reply = msgpack_numpy.unpackb(packb({"actions": np.ones((3, 2), np.float32)}))  # openpi-client reads ours
    assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (3, 2)
    with pytest.raises(MessageError, match="cannot send"):
        packb({"x": np.array([object()], dtype=object)})


def test_restricted_unpickler_reads_every_protocol_and_refuses_globals():
    request = {
        "video": np.random.default_rng(0).uniform(-1, 1, (3, 4, 5, 3)).astype(np.float32),
        "proprios": np.arange(16.0),
        "prompt": ["open the drawer"],
        "cfg": np.float32(0.0),
        "ids": (np.int64(1), 2, b"bytes", {3, 4}, frozenset([5]), complex(1, 2)),
    }
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        got = restricted_loads(pickle.dumps(request, protocol=protocol))
        np.testing.assert_array_equal(got["video"], request["video"])
        assert got["ids"] == request["ids"] and got["prompt"] == request["prompt"]
    for forbidden in (print, np.save, pickle.loads):
        with pytest.raises(MessageError, match="forbidden global"):
            restricted_loads(pickle.dumps(forbidden))
    with pytest.raises(MessageError, match="persistent"):
        restricted_loads(b"\x80\x02X\x01\x00\x00\x00aQ.")  # BINUNICODE 'a', BINPERSID


def test_reply_pickles_name_numpy_1_modules():
    """The release's clients run numpy 1.23: no numpy._core. Replies name numpy.core.multiarray."""
    reply = dumps_reply({"actions": np.ones((2, 7), np.float32), "proprios": np.zeros((9, 16), np.float32)})
    globals_named = [arg for op, arg, _ in pickletools.genops(reply) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    assert "numpy.core.multiarray _reconstruct" in globals_named
    assert b"numpy._core" not in reply
    got = restricted_loads(reply)
    assert got["actions"].shape == (2, 7) and got["proprios"].shape == (9, 16)
    plain = pickle.loads(reply)  # a trusted reply, read as the release's clients read it
    np.testing.assert_array_equal(plain["actions"], got["actions"])


def test_map_option():
    views = ["front", "wrist"]
    m = ObservationMap.parse("img=view:front, wrist=view:wrist,s=state,prompt=task,junk=ignore", views)
    assert m.entries["img"] == "view:front" and m.entries["junk"] == "ignore"
    assert ObservationMap.parse(None, views).describe(views)["images/front"] == "view:front"
    for text, phrase in (
        ("img=view:side,wrist=view:wrist,s=state,p=task", "the checkpoint's views are front, wrist"),
        ("img=view:front,s=state,p=task", "no observation key for view:wrist"),
        ("img=view:front,w=view:wrist,s=state,t=state,p=task", "state for more than one"),
        ("img=pixels", "expected one of view:NAME"),
        ("seed=state", "control key"),
        ("noequals", "expected obs_key=TARGET"),
    ):
        with pytest.raises(XWAMError, match=phrase):
            ObservationMap.parse(text, views)


def test_serve_command_refusals_are_one_line():
    from tests.run_fixtures import app, one_line_error, runner

    for args, phrase in (
        (["--protocol", "grpc"], "--protocol 'grpc'"),
        (["--protocol", "xwam-release", "--api-key", "k"], "carries no headers"),
        (["--protocol", "xwam-release", "--map", "a=state"], "keys are fixed"),
        (["--max-message-mb", "0"], "--max-message-mb 0"),
        (["--log-level", "loud"], "--log-level 'loud'"),
    ):
        result = runner.invoke(app(), ["serve", "--ckpt", "nowhere", *args])
        assert result.exit_code != 0
        one_line_error(result, phrase)
    result = runner.invoke(app(), ["broker", "--max-message-mb", "-1"])
    one_line_error(result, "--max-message-mb -1")


def test_only_loopback_addresses_pass_without_a_warning():
    from xwam_cli.serve import _loopback

    assert all(_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "example.org", ""))
