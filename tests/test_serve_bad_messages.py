"""A corpus of bad messages against both protocols: each gets a one-line error reply, none stops the
server, and a good request after each is answered correctly. Clients that vanish mid-request too."""

from __future__ import annotations

import builtins
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("websockets")
msgpack = pytest.importorskip("msgpack")
pytest.importorskip("zmq")
msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")

from tests.run_fixtures import tiny_checkpoint  # noqa: E402
from tests.serve_fixtures import (  # noqa: E402
    ReleaseClient,
    in_process_chunks,
    observation,
    openpi_server,
    release_request,
    release_stack,
)
from xwam_core.policy import Policy  # noqa: E402
from xwam_core.serve.release import release_seed  # noqa: E402

MIB = 1 << 20


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def policy(ckpt):
    return Policy.from_checkpoint(ckpt)


def _array_map(data: bytes, dtype: str, shape: list[int]) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def _with_image(obs: dict, image: object) -> dict:
    return {**obs, "images": {**obs["images"], "a": image}}


def openpi_corpus(obs: dict) -> dict[str, tuple[bytes | str, str]]:
    """kind -> (the message, a phrase its error reply must hold)."""
    pack = msgpack_numpy.packb
    # raw msgpack: an observation whose image `a` is a hand-made array map
    raw = {
        "images": {"a": None, "b": _array_map(obs["images"]["b"].tobytes(), "|u1", [32, 32, 3])},
        "state": _array_map(obs["state"].tobytes(), "<f4", [8]),
        "task": obs["task"],
    }

    def raw_image(array_map: dict) -> bytes:
        return msgpack.packb({**raw, "images": {**raw["images"], "a": array_map}}, use_bin_type=True)

    image = obs["images"]["a"].tobytes()
    return {
        "not msgpack": (b"\xc1\xc1 not msgpack", "not a msgpack message"),
        "msgpack, not a map": (pack([1, 2, 3]), "expected a map"),
        "missing key": (pack({k: v for k, v in obs.items() if k != "state"}), "lacks 'state'"),
        "unknown extra key": (pack({**obs, "bogus": 1}), "unknown observation key 'bogus'"),
        "image float32": (pack(_with_image(obs, obs["images"]["a"].astype(np.float32))), "expected uint8"),
        "image 2-D": (pack(_with_image(obs, obs["images"]["a"][..., 0])), "expected (H, W, 3)"),
        "one view missing": (
            pack({**obs, "images": {"a": obs["images"]["a"]}}),
            "the checkpoint expects a, b",
        ),
        "a third view": (pack({**obs, "images": {**obs["images"], "c": obs["images"]["a"]}}), "expects a, b"),
        "NaN state": (pack({**obs, "state": np.full(8, np.nan, np.float32)}), "NaN"),
        "state wrong shape": (pack({**obs, "state": np.zeros(7, np.float32)}), "shape (7,)"),
        "state a string": (pack({**obs, "state": "zeros"}), "expected a numeric array"),
        "truncated ndarray": (raw_image(_array_map(image[:-5], "|u1", [32, 32, 3])), "truncated"),
        "bad dtype string": (raw_image(_array_map(image, "<q9", [32, 32, 3])), "not a numpy dtype"),
        "negative shape": (raw_image(_array_map(image, "|u1", [-32, -32, 3])), "none negative"),
        "huge shape": (raw_image(_array_map(image, "|u1", [100000, 100000, 3])), "bytes expected"),
        "object dtype": (raw_image(_array_map(image, "|O", [32, 32, 3])), "refused"),
        "complex dtype": (raw_image(_array_map(image, "<c8", [32, 32, 3])), "refused"),
        "non-string task": (pack({**obs, "task": 3}), "expected a string"),
        "unknown task": (pack({**obs, "task": "fly to the moon"}), "not one of the checkpoint's tasks"),
        "images not a map": (pack({**obs, "images": [1, 2]}), "map of view name"),
        "non-string key": (msgpack.packb({1: 2}), "is not a string"),
        "negative seed": (pack({**obs, "seed": -1}), "seed -1"),
        "msgpack extension": (msgpack.packb({"x": msgpack.ExtType(5, b"x")}), "extension type 5"),
        "text frame": ("hello", "text frame"),
    }


def test_openpi_bad_message_corpus(ckpt, policy):
    import websockets.sync.client
    from websockets.exceptions import ConnectionClosed

    obs = observation(policy, 0)
    good = msgpack_numpy.packb({**obs, "seed": 7})
    want = in_process_chunks(ckpt, [obs], 7)[0]
    corpus = openpi_corpus(obs)
    assert len(corpus) >= 15
    with openpi_server(policy, max_message_bytes=MIB) as server:
        url = f"ws://127.0.0.1:{server.port}"

        def answered_correctly(ws) -> None:
            ws.send(good)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, bytes)
            np.testing.assert_allclose(msgpack_numpy.unpackb(reply)["actions"], want, atol=1e-6)

        ws = websockets.sync.client.connect(url, max_size=None)
        ws.recv()  # metadata
        for kind, (message, phrase) in corpus.items():
            ws.send(message)
            reply = ws.recv(timeout=30)
            assert isinstance(reply, str), kind
            assert reply.startswith("xwam serve: ") and phrase in reply, (kind, reply)
            assert "\n" not in reply, kind
            answered_correctly(ws)
        # over --max-message-mb: websockets closes with 1009 (it does not read the frame); others go on
        ws.send(b"\x00" * (2 * MIB))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        ws = websockets.sync.client.connect(url, max_size=None)
        ws.recv()
        answered_correctly(ws)
        # a client that disconnects mid-request: the server answers into the void and keeps serving
        gone = websockets.sync.client.connect(url, max_size=None)
        gone.recv()
        gone.send(good)
        gone.close()
        answered_correctly(ws)
        assert server.service.stats.errors == len(corpus)
        ws.close()


class _Calls:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def release_corpus(request: dict, marker: str) -> dict[str, tuple[list[bytes], str]]:
    """kind -> (the client's frames, a phrase its error reply must hold)."""

    def with_(**changes: object) -> list[bytes]:
        return [pickle.dumps({**request, **changes})]

    core = __import__("numpy._core.multiarray", fromlist=["_reconstruct"])
    video = request["video"]
    return {
        "not a pickle": ([b"not a pickle at all"], "pickle"),
        "pickle, not a dict": ([pickle.dumps([1, 2, 3])], "expected a dict"),
        "missing key": (
            [pickle.dumps({k: v for k, v in request.items() if k != "proprios"})],
            "lacks 'proprios'",
        ),
        "unknown extra key": (with_(bogus=1), "unknown request key 'bogus'"),
        "video uint8": (with_(video=((video + 1) * 127.5).astype(np.uint8)), "dtype uint8"),
        "video 3-D": (with_(video=video[0]), "expected (2, H, W, 3)"),
        "three views": (with_(video=np.concatenate([video, video[:1]])), "3 views"),
        "video outside [-1, 1]": (with_(video=(video + 1) * 127.5), "outside [-1, 1]"),
        "NaN proprios": (with_(proprios=np.full(16, np.nan)), "NaN"),
        "proprios wrong shape": (with_(proprios=np.zeros(8)), "shape (8,)"),
        "object array": (with_(proprios=np.array([None] * 16, dtype=object)), "refused"),
        "non-string prompt": (with_(prompt=[3]), "expected a string"),
        "cfg not the checkpoint's": (with_(cfg=2.0), "cfg 2.0"),
        "step_id a string": (with_(step_id="3"), "step_id '3'"),
        "truncated pickle": ([pickle.dumps(request)[:-40]], "pickle"),
        "forbidden global": ([pickle.dumps(_Calls(os.system, f"touch {marker}"))], "forbidden global"),
        "builtins.eval": ([pickle.dumps(_Calls(builtins.eval, f"open({marker!r}, 'w')"))], "builtins.eval"),
        "huge array reconstruction": (
            [pickle.dumps(_Calls(core._reconstruct, np.ndarray, (10**12,), b"b"))],
            "shape",
        ),
        "over the worker's limit": (
            with_(video=np.zeros((2, 256, 256, 3), np.float32)),
            "xwam serve: request",
        ),
        "over the broker's limit": (
            with_(video=np.zeros((2, 400, 400, 3), np.float32)),
            "xwam broker: request",
        ),
        "two frames": ([b"one", b"two"], "expected one frame"),
    }


def test_release_bad_message_corpus(ckpt, policy, tmp_path):
    request, obs = release_request(policy, seed=3)
    want = in_process_chunks(ckpt, [obs], release_seed(0, 3, 0))[0]
    marker = tmp_path / "pwned"
    corpus = release_corpus(request, str(marker))
    assert len(corpus) >= 15
    # the worker refuses over 1 MiB; the broker over 2 MiB (3.7 MiB: under its hard drop at 4 MiB)
    with release_stack(policy, max_message_bytes=MIB, broker_max_bytes=2 * MIB) as broker:
        client = ReleaseClient(broker.front_port)
        for kind, (frames, phrase) in corpus.items():
            reply = client.send_raw(*frames)
            assert set(reply) == {"error"}, (kind, reply)
            assert phrase in reply["error"] and "\n" not in reply["error"], (kind, reply)
            np.testing.assert_allclose(client.infer(request)["actions"], want, atol=1e-6)
        assert not marker.exists()
        # a client that vanishes mid-request: its reply is dropped, the next client is answered
        gone = ReleaseClient(broker.front_port)
        gone.socket.send(pickle.dumps(request))
        gone.close()
        np.testing.assert_allclose(client.infer(request)["actions"], want, atol=1e-6)
        client.close()
