"""Buffer checkpoints: a table's whole state in one file, written atomically.

A checkpoint is `<dir>/buffer-<n>.ckpt` (n counts up): a magic line, then the frames of one
wire message (common/wire.py: a msgpack header and the groups' arrays as raw frames), each
led by its length. It is written to a temporary name, fsynced, renamed, and the folder
fsynced, so a server killed while saving leaves the previous checkpoint as the newest; the
newest `keep` are kept. Reading checks the magic, every length and the wire format.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from common.wire import WireError, decode, encode

MAGIC = b"asyncrl buffer checkpoint 1\n"
PREFIX, SUFFIX = "buffer-", ".ckpt"


class CheckpointError(RuntimeError):
    pass


def checkpoints(folder) -> list:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        number = p.name[len(PREFIX):-len(SUFFIX)]
        if p.name.startswith(PREFIX) and p.name.endswith(SUFFIX) and number.isdigit():
            found.append((int(number), p))
    return [p for _, p in sorted(found)]


def latest(folder) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def write(folder, state: dict, keep: int = 2) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    newest = latest(folder)
    number = int(newest.name[len(PREFIX):-len(SUFFIX)]) + 1 if newest else 1
    final = folder / f"{PREFIX}{number:08d}{SUFFIX}"
    partial = final.with_name(final.name + ".partial")
    frames = encode(state)
    with open(partial, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(frames)))
        for frame in frames:
            view = memoryview(frame).cast("B")
            f.write(struct.pack("<Q", view.nbytes))
            f.write(view)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, final)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    for old in checkpoints(folder)[:-keep]:
        old.unlink()
    return final


def read(path) -> dict:
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{path} is not a buffer checkpoint (bad magic)")
    offset, frames = len(MAGIC), []
    try:
        (count,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", data, offset)
            offset += 8
            if offset + size > len(data):
                raise CheckpointError(f"{path} is truncated")
            frames.append(memoryview(data)[offset:offset + size])
            offset += size
        state = decode(frames)
    except (struct.error, WireError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from None
    if not isinstance(state, dict) or not ("items" in state or isinstance(state.get("tables"), dict)):
        raise CheckpointError(f"{path} holds no table state")
    return state
