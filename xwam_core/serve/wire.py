"""What travels on the wire: msgpack with numpy arrays (openpi's encoding) and restricted pickles (the release's).

msgpack: an array is the map {b"__ndarray__": True, b"data": raw bytes, b"dtype": numpy's dtype string,
b"shape": [dims]} and a numpy scalar {b"__npgeneric__": True, b"data": value, b"dtype": ...}, as
openpi-client's msgpack_numpy writes them. Decoding checks every array before numpy sees it: a numeric
dtype (bool, int, uint, float), non-negative dimensions, a size numpy can index (even with a zero
dimension), and exactly shape x itemsize bytes of data; and every scalar's value against its dtype (true
or false, a whole number in the integer's range, a float within the float's). A failure is a one-line
MessageError naming the array or scalar, never "not a msgpack message".

pickle: the release's clients send pickled dicts. They are read only by `restricted_loads`, whose
unpickler resolves an allow-list of globals (numpy's array and scalar reconstruction, numpy.dtype, a few
plain containers); any other global (os.system, builtins.eval, ...) is refused before it is called.
Replies are written by `dumps_reply` with numpy's pre-2.0 module names (numpy.core.multiarray), which
every numpy reads: the release's clients run numpy 1.23, which has no numpy._core.
"""

from __future__ import annotations

import importlib
import io
import math
import pickle
from collections import OrderedDict
from typing import Any, ClassVar

import msgpack
import numpy as np

from xwam_core.errors import XWAMError, first_line

# numpy dtype kinds a message may carry: bool, signed and unsigned integers, floats
ARRAY_KINDS = "biuf"
MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)  # numpy's maximum array size, in bytes
REPLY_PICKLE_PROTOCOL = 4  # Python 3.4+; what the release's clients (Python 3.10) read by default


try:  # numpy >= 2 keeps its internals in numpy._core (numpy.core remains, a deprecated alias)
    _multiarray: Any = importlib.import_module("numpy._core.multiarray")
except ImportError:  # numpy 1.x
    _multiarray = importlib.import_module("numpy.core.multiarray")


class MessageError(XWAMError):
    """A message the server refuses; its text is the one-line error reply."""


# ------------------------------------------------------------------------------------ msgpack
def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind not in ARRAY_KINDS:
        raise MessageError(f"cannot send a numpy {obj.dtype} value; expected bool, int, uint or float")
    if isinstance(obj, np.ndarray):
        data = np.ascontiguousarray(obj)
        return {b"__ndarray__": True, b"data": data.tobytes(), b"dtype": data.dtype.str, b"shape": data.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise MessageError(f"cannot send a {type(obj).__name__}; expected dicts, lists, str, numbers and arrays")


def packb(obj: Any) -> bytes:
    """msgpack bytes of `obj` (numpy arrays and scalars in openpi's encoding)."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def _dtype(value: Any, what: str) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str) or len(value) > 16:
        raise MessageError(f"{what}: dtype {value!r} is not a numpy dtype string such as '<f4'")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise MessageError(f"{what}: dtype {value!r} is not a numpy dtype string such as '<f4'") from None
    if dtype.kind not in ARRAY_KINDS or dtype.hasobject or dtype.fields is not None or dtype.subdtype:
        raise MessageError(f"{what}: dtype {value!r} refused; expected bool, int, uint or float")
    return dtype


def _decode_array(obj: dict) -> np.ndarray:
    data, shape = obj.get(b"data"), obj.get(b"shape")
    dtype = _dtype(obj.get(b"dtype"), "array")
    if not isinstance(data, bytes):
        raise MessageError(f"array: data is {type(data).__name__}, expected bytes")
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise MessageError(f"array: shape {shape!r} is not a list of integers")
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise MessageError(
            f"array: shape {list(shape)} refused; expected at most 8 dimensions, none negative"
        )
    # numpy refuses a shape whose non-zero dimensions (times the item size) overflow its index type, even
    # with a zero among them and no data at all
    if math.prod(d for d in shape if d) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise MessageError(
            f"malformed numpy array: shape {list(shape)} {dtype.str} is beyond numpy's maximum array size "
            f"(its non-zero dimensions times the item size must stay under 2**{MAX_ARRAY_BYTES.bit_length()})"
        )
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise MessageError(
            f"array: {len(data)} bytes of data for shape {list(shape)} {dtype.str} ({expected} bytes expected; "
            "truncated or padded)"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError as e:  # nothing known reaches here: the checks above are numpy's
        raise MessageError(
            f"malformed numpy array: shape {list(shape)} {dtype.str} ({first_line(e)})"
        ) from None


def _decode_scalar(obj: dict) -> np.generic:
    value = obj.get(b"data")
    if not isinstance(value, bool | int | float):
        raise MessageError(f"numpy scalar: data {value!r} is not a number")
    dtype = _dtype(obj.get(b"dtype"), "numpy scalar")
    if dtype.kind == "b" and value not in (0, 1):
        raise MessageError(
            f"malformed numpy scalar: data {value!r} for the dtype {dtype.str}; expected true or false"
        )
    if dtype.kind in "iu" and isinstance(value, float) and not value.is_integer():  # NaN, infinity, 1.5
        raise MessageError(
            f"malformed numpy scalar: data {value!r} for the integer dtype {dtype.str}; expected a whole number"
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise MessageError(
                f"malformed numpy scalar: data {value!r} is out of the range of {dtype.str} "
                f"({info.min} to {info.max})"
            )
        return dtype.type(int(value))
    largest = float(np.finfo(dtype).max) if dtype.kind == "f" else math.inf  # inf for a long double
    if math.isfinite(value) and abs(value) > largest:
        raise MessageError(
            f"malformed numpy scalar: data {value!r} is out of the range of {dtype.str} (|x| <= {largest:.4g})"
        )
    try:
        return dtype.type(value)
    except (OverflowError, ValueError) as e:  # nothing known reaches here: the checks above are numpy's
        raise MessageError(
            f"malformed numpy scalar: data {value!r}, dtype {dtype.str} ({first_line(e)})"
        ) from None


def _object_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return _decode_array(obj)
    if b"__npgeneric__" in obj:
        return _decode_scalar(obj)
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MessageError(f"msgpack extension type {code} refused; expected plain msgpack with arrays as maps")


def unpackb(data: bytes) -> Any:
    """Decode a msgpack message (arrays checked as the module says); a bad one is a MessageError."""
    try:
        return msgpack.unpackb(
            data, object_hook=_object_hook, ext_hook=_refuse_ext, raw=False, strict_map_key=False
        )
    except MessageError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise MessageError(f"not a msgpack message ({first_line(e)})") from None


# ------------------------------------------------------------------------------------ pickle
class _ArrayClass:
    """What the unpickler gives for the global numpy.ndarray: only `_reconstruct` accepts it (calling it,
    e.g. numpy.ndarray((10**12,)), which would allocate, is not possible)."""

    def __repr__(self) -> str:
        return "numpy.ndarray (restricted)"


_ARRAY_CLASS = _ArrayClass()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's pickled-array constructor, admitted only for plain ndarrays of the empty shape numpy writes
    (the data arrives afterwards through ndarray.__setstate__, which checks its length)."""
    if subtype is not _ARRAY_CLASS:
        raise pickle.UnpicklingError("array reconstruction of something other than numpy.ndarray")
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and 0 <= d <= 1 for d in shape)):
        raise pickle.UnpicklingError(f"array reconstruction with shape {shape!r} (numpy writes (0,))")
    return _multiarray._reconstruct(np.ndarray, shape, dtype)


def _checked_dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject or dtype.kind not in ARRAY_KINDS:
        raise pickle.UnpicklingError(f"numpy dtype {dtype} refused (expected bool, int, uint or float)")
    return dtype


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy >= 2's protocol-5 array constructor: a copy of the in-band buffer, checked like the rest."""
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("array from buffer without a numpy dtype")
    _checked_dtype(dtype)
    if order not in ("C", "F") or not isinstance(shape, tuple):
        raise pickle.UnpicklingError("array from buffer with a bad shape or order")
    data = np.frombuffer(memoryview(buffer).tobytes(), dtype=dtype)
    return data.reshape(shape, order=order).copy()


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar without a numpy dtype and its bytes")
    _checked_dtype(dtype)
    return _multiarray.scalar(dtype, data)


def _latin1_bytes(text: Any, encoding: Any = "utf-8") -> bytes:
    """Protocol-2 pickles write bytes as _codecs.encode(text, "latin1"): admitted for that use only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode admitted only for protocol 2's latin1 bytes")
    return text.encode("latin1")


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(module, "_reconstruct"): _reconstruct for module in _NUMPY_MODULES},
    **{(module, "scalar"): _scalar for module in _NUMPY_MODULES},
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _ARRAY_CLASS,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _latin1_bytes,
    # protocol 2 names builtins as Python 2's __builtin__
    **{(module, "set"): set for module in ("builtins", "__builtin__")},
    **{(module, "frozenset"): frozenset for module in ("builtins", "__builtin__")},
    **{(module, "complex"): complex for module in ("builtins", "__builtin__")},
    ("collections", "OrderedDict"): OrderedDict,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy arrays, numpy scalars and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"forbidden global {module}.{name} (payloads may hold only numpy arrays, numpy scalars "
                "and plain containers)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids refused")


def restricted_loads(payload: bytes) -> Any:
    """Unpickle `payload` with RestrictedUnpickler; anything refused or unreadable is a MessageError."""
    try:
        value = RestrictedUnpickler(io.BytesIO(payload)).load()
    except pickle.UnpicklingError as e:
        raise MessageError(f"pickle refused: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise MessageError(f"unreadable pickle ({type(e).__name__}: {reason})") from None
    except RecursionError:
        raise MessageError("unreadable pickle (nested too deeply)") from None
    if isinstance(value, np.ndarray | np.generic) and value.dtype.hasobject:  # belt and braces
        raise MessageError("pickle refused: object arrays")
    return value


_PythonPickler: Any = pickle._Pickler  # type: ignore[attr-defined]  # unlike the C one, its save_global can be overridden


class _ReplyPickler(_PythonPickler):
    """Writes numpy's reconstruction functions under their pre-2.0 names, which numpy 1.x and 2.x both read."""

    _LEGACY: ClassVar[dict[int, bytes]] = {
        id(_multiarray._reconstruct): b"numpy.core.multiarray\n_reconstruct\n",
        id(_multiarray.scalar): b"numpy.core.multiarray\nscalar\n",
    }

    def save_global(self, obj: Any, name: str | None = None) -> None:
        legacy = self._LEGACY.get(id(obj))
        if legacy is None:
            super().save_global(obj, name)
            return
        self.write(pickle.GLOBAL + legacy)
        self.memoize(obj)


def dumps_reply(obj: Any) -> bytes:
    """A reply pickle (protocol 4) that numpy 1.x and 2.x clients both read."""
    buffer = io.BytesIO()
    _ReplyPickler(buffer, protocol=REPLY_PICKLE_PROTOCOL).dump(obj)
    return buffer.getvalue()
