"""Wire format: msgpack for structure, numpy arrays as separate raw frames (zero-copy).

A message is a list of frames: frame 0 is the msgpack header, frames 1..n are array buffers.
Arrays anywhere in the payload are replaced in the header by {"__nd__": [frame, dtype, shape]}.
Decoding checks every reference, dtype and size, so a malformed message raises WireError
instead of producing garbage.

Between a buffer client and server, every request and reply leads with one more frame: the
request id, RID_BYTES bytes, big-endian unsigned (`with_rid`, `split_rid`). It is readable
without decoding the rest, so a server can echo it in its reply to a message it cannot decode
or will not read (oversize), and a client can skip a reply to an attempt it abandoned.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import msgpack
import numpy as np

RID_BYTES = 8
ALLOWED_DTYPES = {"|u1", "|i1", "|b1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"}


class WireError(ValueError):
    """A message could not be decoded; the text says which part is wrong."""


def encode(payload: Any) -> list:
    """Encode payload into [header, *array_frames]. Array frames share memory with the arrays."""
    frames: list = [b""]

    def default(obj):
        if isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj)
            if array.dtype.str not in ALLOWED_DTYPES:
                raise WireError(f"arrays of dtype {array.dtype} cannot be sent")
            frames.append(memoryview(array).cast("B") if array.size else b"")
            return {"__nd__": [len(frames) - 1, array.dtype.str, list(array.shape)]}
        if isinstance(obj, np.generic):
            return obj.item()
        raise WireError(f"objects of type {type(obj).__name__} cannot be sent")

    frames[0] = msgpack.packb(payload, default=default, use_bin_type=True)
    return frames


def with_rid(rid: int, frames: list) -> list:
    """[rid, *frames]: a message led by its request id."""
    return [rid.to_bytes(RID_BYTES, "big"), *frames]


def split_rid(frames: Sequence) -> tuple[int, list]:
    """(rid, the other frames) of a message led by its request id; WireError if it is not."""
    if not frames or _view(frames[0]).nbytes != RID_BYTES:
        raise WireError(f"a message must lead with its request id, a frame of {RID_BYTES} bytes")
    return int.from_bytes(_view(frames[0]), "big"), list(frames[1:])


def _view(frame) -> memoryview:
    return memoryview(frame.buffer if hasattr(frame, "buffer") else frame)


def decode(frames: Sequence) -> Any:
    """Decode [header, *array_frames]. Arrays are read-only views of the frames."""
    if not frames:
        raise WireError("empty message")
    buffers = [_view(f) for f in frames]
    used = set()

    def hook(obj):
        if "__nd__" not in obj:
            return obj
        spec = obj["__nd__"]
        if not (isinstance(spec, list) and len(spec) == 3):
            raise WireError(f"bad array reference {spec!r}")
        index, dtype, shape = spec
        if not isinstance(index, int) or not 1 <= index < len(buffers) or index in used:
            raise WireError(f"array reference to frame {index!r} of {len(buffers) - 1} frames")
        if dtype not in ALLOWED_DTYPES:
            raise WireError(f"array dtype {dtype!r} is not allowed")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise WireError(f"bad array shape {shape!r}")
        used.add(index)
        dt = np.dtype(dtype)
        expected = math.prod(shape) * dt.itemsize
        if buffers[index].nbytes != expected:
            raise WireError(f"frame {index} holds {buffers[index].nbytes} bytes, "
                            f"array {dtype}{shape} needs {expected}")
        return np.frombuffer(buffers[index], dtype=dt).reshape(shape)

    try:
        payload = msgpack.unpackb(buffers[0], object_hook=hook, raw=False, strict_map_key=True)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types for corrupt input
        raise WireError(f"header is not valid msgpack: {e}") from None
    if len(used) != len(buffers) - 1:
        raise WireError(f"{len(buffers) - 1 - len(used)} frame(s) not referenced by the header")
    return payload
