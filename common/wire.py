"""Wire format: msgpack for structure, numpy arrays as separate raw frames (zero-copy).

A message is a list of frames: frame 0 is the msgpack header, frames 1..n are array buffers.
Arrays anywhere in the payload are replaced in the header by {"__nd__": [frame, dtype, shape]}.
A `Frames` (a run of arrays whose dtypes and shapes the reader knows from a schema: a rollout
group's six) is replaced by one msgpack ext reference and decodes as a Frames of memoryviews:
a group costs one reference, not a map per array, and its reader checks sizes against the
schema (common/rollout.py). A run of COPY_BELOW bytes or more goes as frames of their own,
zero-copy, referenced as (first frame, count). Smaller runs are copied, each array at an
8-byte boundary, into one shared frame of the message, referenced as (that frame, offset,
count, each array's length): every frame of a message costs a send and a receive call
(about 9 µs a frame here), so a sample of 16 small groups is 2 frames, not 97. Decoding
checks every reference, dtype and size, so a malformed message raises WireError instead of
producing garbage.

Between a buffer client and server, every request and reply leads with one more frame: the
request id, RID_BYTES bytes, big-endian unsigned (`with_rid`, `split_rid`). It is readable
without decoding the rest, so a server can echo it in its reply to a message it cannot decode
or will not read (oversize), and a client can skip a reply to an attempt it abandoned.

`send_frames` and `recv_frames` move a message over a ZeroMQ socket for a fraction of what
pyzmq's send_multipart and recv_multipart cost a small message (about 6 against 20 µs to send
three frames, 10 against 34 µs to receive eight, on the buffer's two-core machine): those
combine enum flags frame by frame and track zero-copy sends of frames too small to gain from it.
"""
from __future__ import annotations

from typing import Any, Sequence

import struct

import msgpack
import numpy as np
import zmq

RID_BYTES = 8
_RUN = 1                             # msgpack ext code of a Frames reference to frames of their own
_RUN_REF = struct.Struct("<II")      # (first frame, count)
_PACKED = 2                          # msgpack ext code of a Frames reference into the shared frame
_PACKED_REF = struct.Struct("<III")  # (shared frame, offset, count), then count lengths (<I each)
_ALIGN = 8
COPY_BELOW = 1 << 16   # bytes: a smaller frame is copied into its message; zero-copy bookkeeping costs more
_MORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)   # plain ints: pyzmq's enum flags are slow to combine
ALLOWED_DTYPES = {"|u1", "|i1", "|b1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"}
_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}


class WireError(ValueError):
    """A message could not be decoded; the text says which part is wrong."""


class Frames:
    """A run of raw frames under one reference: `items`, arrays when encoding (their bytes go
    as they are; the reader knows their dtypes and shapes), memoryviews once decoded. (Not a
    tuple: msgpack would pack one as a list.)"""
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items


def encode(payload: Any) -> list:
    """Encode payload into [header, *array_frames]. Array frames share memory with the arrays."""
    frames: list = [b""]
    packed_at = None   # the index in frames of the one frame (a bytearray) small runs are packed into

    def default(obj):
        nonlocal packed_at
        if type(obj) is Frames:
            views = []
            for array in obj.items:
                if type(array) is not np.ndarray or not array.flags.c_contiguous:
                    array = np.ascontiguousarray(array)
                if array.dtype.hasobject:
                    raise WireError(f"arrays of dtype {array.dtype} cannot be sent")
                views.append(memoryview(array).cast("B") if array.size else b"")
            if sum(len(v) for v in views) >= COPY_BELOW:
                frames.extend(views)
                return msgpack.ExtType(_RUN, _RUN_REF.pack(len(frames) - len(views), len(views)))
            if packed_at is None:
                frames.append(bytearray())
                packed_at = len(frames) - 1
            packed = frames[packed_at]
            start = len(packed)
            for view in views:
                packed += view
                packed += bytes(-len(packed) % _ALIGN)
            return msgpack.ExtType(_PACKED, _PACKED_REF.pack(packed_at, start, len(views)) +
                                   struct.pack(f"<{len(views)}I", *map(len, views)))
        if isinstance(obj, np.ndarray):
            array = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
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


def send_frames(socket: zmq.Socket, frames: Sequence, block: bool = True) -> None:
    """Send frames (bytes, zmq.Frames or byte memoryviews, as encode makes) as one message;
    zmq.Again when not `block`ing and the socket cannot take it now."""
    flags, last = 0 if block else _NOBLOCK, len(frames) - 1
    for i, frame in enumerate(frames):
        socket.send(frame, flags | _MORE if i < last else flags, copy=len(frame) < COPY_BELOW)


def recv_frames(socket: zmq.Socket, block: bool = True) -> list:
    """Receive one message as zmq.Frames, which share memory with ZeroMQ's buffers; zmq.Again
    when not `block`ing and none has arrived (a message arrives whole, all frames at once)."""
    frames = [socket.recv(0 if block else _NOBLOCK, copy=False)]
    while frames[-1].more:
        frames.append(socket.recv(copy=False))
    return frames


def split_rid(frames: Sequence) -> tuple[int, list]:
    """(rid, the other frames) of a message led by its request id; WireError if it is not."""
    rid = memoryview(frames[0]) if frames else None   # a zmq.Frame's own buffer (frame.buffer costs 3x)
    if rid is None or rid.nbytes != RID_BYTES:
        raise WireError(f"a message must lead with its request id, a frame of {RID_BYTES} bytes")
    return int.from_bytes(rid, "big"), list(frames[1:])


def decode(frames: Sequence) -> Any:
    """Decode [header, *array_frames]. Arrays are views of the frames, not copies: treat them
    as read-only."""
    if not frames:
        raise WireError("empty message")
    buffers = [memoryview(f).cast("B") for f in frames]
    used, shared = set(), set()   # frames referenced whole; frames that small runs are packed in
    spans = []                    # (shared frame, first byte, end) of each packed run: none may overlap

    # Called for every map of the header (a small group has nine), so it is written for speed:
    # exact type checks, the dtypes looked up, no generator.
    def hook(obj):
        if "__nd__" not in obj:
            return obj
        spec = obj["__nd__"]
        if type(spec) is not list or len(spec) != 3:
            raise WireError(f"bad array reference {spec!r}")
        index, dtype, shape = spec
        if type(index) is not int or not 0 < index < len(buffers) or index in used or index in shared:
            raise WireError(f"array reference to frame {index!r} of {len(buffers) - 1} frames")
        dt = _DTYPES.get(dtype) if type(dtype) is str else None
        if dt is None:
            raise WireError(f"array dtype {dtype!r} is not allowed")
        if type(shape) is not list:
            raise WireError(f"bad array shape {shape!r}")
        expected = dt.itemsize
        for n in shape:
            if type(n) is not int or n < 0:
                raise WireError(f"bad array shape {shape!r}")
            expected *= n
        if buffers[index].nbytes != expected:
            raise WireError(f"frame {index} holds {buffers[index].nbytes} bytes, "
                            f"array {dtype}{shape} needs {expected}")
        used.add(index)
        return np.ndarray(shape, dt, buffers[index])

    def run(code, data):
        if code == _PACKED and len(data) >= _PACKED_REF.size:
            return packed(data)
        if code != _RUN or len(data) != _RUN_REF.size:
            raise WireError(f"unknown msgpack extension {code} of {len(data)} bytes")
        first, count = _RUN_REF.unpack(data)
        taken = range(first, first + count)
        if not 0 < first <= first + count <= len(buffers) or not used.isdisjoint(taken) \
                or not shared.isdisjoint(taken):
            raise WireError(f"frame run {first}..{first + count - 1} of {len(buffers) - 1} frames")
        used.update(taken)
        return Frames(buffers[first:first + count])

    def packed(data):
        index, offset, count = _PACKED_REF.unpack_from(data)
        if len(data) != _PACKED_REF.size + 4 * count:
            raise WireError(f"packed run of {count} arrays with a reference of {len(data)} bytes")
        if not 0 < index < len(buffers) or index in used:
            raise WireError(f"packed run in frame {index} of {len(buffers) - 1} frames")
        shared.add(index)
        frame, items, first = buffers[index], [], offset
        for length in struct.unpack_from(f"<{count}I", data, _PACKED_REF.size):
            if offset + length > frame.nbytes:
                raise WireError(f"packed run reaches byte {offset + length} of frame {index}, "
                                f"which holds {frame.nbytes}")
            items.append(frame[offset:offset + length])
            offset += length + (-length % _ALIGN)
        spans.append((index, first, offset))
        return Frames(items)

    try:
        payload = msgpack.unpackb(buffers[0], object_hook=hook, ext_hook=run, raw=False, strict_map_key=True)
    except WireError:
        raise
    except Exception as e:  # msgpack raises several types for corrupt input
        raise WireError(f"header is not valid msgpack: {e}") from None
    if len(used) + len(shared) != len(buffers) - 1:
        raise WireError(f"{len(buffers) - 1 - len(used) - len(shared)} frame(s) not referenced by the header")
    spans.sort()
    for (index, _, end), (other, start, _) in zip(spans, spans[1:]):
        if other == index and start < end:   # two groups would share (and alias) bytes
            raise WireError(f"packed runs overlap in frame {index} at byte {start}")
    return payload
