"""Buffer checkpoints: the tables' state in one file, written atomically; whole, or a delta on
a whole one.

A checkpoint is `<dir>/buffer-<n>.ckpt` (n counts up; a delta's name also says its base,
below): a magic line, then the frames of one wire message (common/wire.py: a msgpack header
and the groups' arrays as raw frames), each led by its length. It is written to a temporary
name, fsynced, renamed, and the folder fsynced, so a server killed while saving leaves the
previous checkpoint as the newest; the newest `keep` are kept, and the whole checkpoints they
build on. Reading checks the magic, every length and the wire format.

A checkpoint is whole, or a delta on a whole one: `buffer-<n>.on-<m>.ckpt` holds the arrays of
only the groups stored since checkpoint m was taken, and every other group by its id (with
its place and counts), so that a large table that changes slowly is not written whole every
period (buffer.checkpoint_full_every). Reading a delta reads its base too (read_with_base).

A server that owns its process writes its periodic checkpoints from a forked child
(ForkedWrite), as Redis's BGSAVE does: the child sees the tables as they were at the fork
(copy-on-write) and turns them into the file, while the serving loop goes on. A full table
of 133k 4 KiB groups held the loop 4 s when it wrote its own checkpoint (docs/benchmarks.md).
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Callable

from common.wire import WireError, decode, encode

MAGIC = b"asyncrl buffer checkpoint 1\n"
PREFIX, SUFFIX = "buffer-", ".ckpt"
_NAME = re.compile(r"buffer-(\d+)(?:\.on-(\d+))?\.ckpt")   # a whole one, or a delta on checkpoint m


class CheckpointError(RuntimeError):
    pass


def checkpoints(folder) -> list:
    """Complete checkpoints in `folder`, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if (named := _NAME.fullmatch(p.name)) is not None:
            found.append((int(named[1]), p))
    return [p for _, p in sorted(found)]


def base_of(path) -> Path | None:
    """The whole checkpoint a delta checkpoint builds on (it may be missing); None for a whole one."""
    path = Path(path)
    named = _NAME.fullmatch(path.name)
    return path.with_name(f"{PREFIX}{int(named[2]):08d}{SUFFIX}") if named and named[2] else None


def latest(folder) -> Path | None:
    found = checkpoints(folder)
    return found[-1] if found else None


def write(folder, state: dict, keep: int = 2, before_rename: Callable[[], None] | None = None,
          base: Path | None = None) -> Path:
    """`before_rename`: called once the file is on disk, before it becomes the newest; it may
    raise to leave it unpublished (a forked writer whose server is gone). `base`: the whole
    checkpoint that `state`, a delta, builds on (its name says so)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    newest = latest(folder)
    number = int(_NAME.fullmatch(newest.name)[1]) + 1 if newest else 1
    on = f".on-{int(_NAME.fullmatch(Path(base).name)[1]):08d}" if base is not None else ""
    final = folder / f"{PREFIX}{number:08d}{on}{SUFFIX}"
    partial = final.with_name(f"{final.name}.{os.getpid()}.partial")   # a writer's own: none clobbers another's
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
    if before_rename is not None:
        try:
            before_rename()
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, final)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    kept = checkpoints(folder)[-keep:]
    needed = set(kept) | {base_of(p) for p in kept}
    for old in checkpoints(folder):
        if old not in needed:
            old.unlink()
    return final


def remove_partials(folder) -> int:
    """Delete what writers killed while saving left behind (call it only where no writer is
    running: at a server's start); how many."""
    folder = Path(folder)
    gone = 0
    for p in folder.glob(f"{PREFIX}*{SUFFIX}*.partial") if folder.is_dir() else []:
        p.unlink(missing_ok=True)
        gone += 1
    return gone


def can_fork() -> bool:
    """Whether ForkedWrite works here: Linux (fork, and a child that dies with its parent)."""
    return _prctl is not None and hasattr(os, "fork")


PR_SET_PDEATHSIG = 1
try:   # looked up here, not in the child: dlopen in a child forked from threads can deadlock on the loader's lock
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


class ForkedWrite:
    """One checkpoint written by a child forked from the calling process: `state()` runs in the
    child, on the memory as it was at the fork, and the caller goes on at once (the fork
    itself copies page tables: milliseconds). `seq` and `waiters` are the caller's to keep
    with it (what the checkpoint covers, who asked for it). OSError if it cannot fork.

    The child first closes every descriptor it inherited but its pipe (the server's bound
    ports above all: a restarted server must be able to bind them while a killed one's child
    is still in an fsync), then touches nothing but the state and the folder: no sockets, no
    logging (a lock another thread held at the fork stays held in the child). It dies with
    its parent (PR_SET_PDEATHSIG) and publishes its file only while the parent lives, so a
    server killed mid-save cannot have an old snapshot renamed over what a restarted one
    wrote. Its memory: the pages it writes are copied (the reference counts of the groups it
    encodes), and encoding copies small arrays into new buffers (common/wire.py), so a
    child may need about the table's size again."""

    def __init__(self, folder, state: Callable[[], dict], keep: int, seq: int = 0, waiters: list = (),
                 base: Path | None = None):
        self.folder, self.seq, self.waiters = Path(folder), seq, list(waiters)
        self.started = time.monotonic()
        self.result: Path | CheckpointError | None = None
        parent = os.getpid()
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:   # the child: never returns
            _write_and_exit(self.folder, state, keep, write_end, parent, base)
        os.close(write_end)
        self.pid, self._pipe = pid, read_end
        self.fork_s = time.monotonic() - self.started   # what the caller was held

    def poll(self) -> Path | CheckpointError | None:
        """The written checkpoint's path, the CheckpointError that ended it, or None while
        the child still writes."""
        if self.result is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:   # reaped by the system already (SIGCHLD ignored): its word says how it went
                pid, status = self.pid, None
            if pid:
                self._finish(status)
        return self.result

    def kill(self, why: str) -> CheckpointError:
        """Stop the child now (a no-op if it ended); the result is then a CheckpointError
        saying `why`, unless it had finished."""
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(self._pipe)
            self.result = CheckpointError(f"the checkpoint writer (pid {self.pid}) into {self.folder} {why}; killed")
        return self.result

    def wait(self, timeout_s: float) -> Path | CheckpointError:
        """Block until the child ends, at most `timeout_s`; past it the child is killed and
        the result is a CheckpointError saying so."""
        deadline = time.monotonic() + timeout_s
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return self.kill(f"did not finish within {timeout_s:.0f}s")
            time.sleep(0.01)
        return self.result

    def _finish(self, status: int | None) -> None:
        chunks = []
        while chunk := os.read(self._pipe, 65536):
            chunks.append(chunk)
        os.close(self._pipe)
        said = b"".join(chunks).decode(errors="replace")
        code = os.waitstatus_to_exitcode(status) if status is not None else (0 if said.startswith("ok ") else 1)
        if code == 0 and said.startswith("ok "):
            self.result = Path(said[3:])
        elif said.startswith("error "):
            self.result = CheckpointError(f"the checkpoint writer (pid {self.pid}) into {self.folder} failed: {said[6:]}")
        else:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
            self.result = CheckpointError(f"the checkpoint writer (pid {self.pid}) into {self.folder} {how} "
                                          "before it finished")


def _write_and_exit(folder: Path, state: Callable[[], dict], keep: int, pipe: int, parent: int,
                    base: Path | None) -> None:
    code, said = 1, "error the writer ended without a word"
    try:
        os.closerange(3, pipe)   # every inherited descriptor but stdio and the pipe (the class says why)
        os.closerange(pipe + 1, os.sysconf("SC_OPEN_MAX"))
        for sig in (signal.SIGTERM, signal.SIGINT):   # the server's handlers only set its stop flag
            signal.signal(sig, signal.SIG_DFL)
        gc.disable()   # the snapshot makes no garbage worth a pass over every group
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:
            raise CheckpointError("the server died before the writer started")

        def parent_alive() -> None:
            if os.getppid() != parent:
                raise CheckpointError("the server died while the checkpoint was written; left unpublished")
        path = write(folder, state(), keep, before_rename=parent_alive, base=base)
        code, said = 0, f"ok {path}"
    except BaseException as e:
        said = f"error {type(e).__name__}: {e}"
    finally:
        try:
            os.write(pipe, said.encode()[:60000])
        finally:
            os._exit(code)


def read_with_base(path) -> tuple[dict, dict | None]:
    """(the checkpoint's state, its base's state): None for a whole checkpoint. CheckpointError
    naming the file if a delta's base is missing or unreadable."""
    base = base_of(path)
    state = read(path)
    if base is None:
        return state, None
    if not base.is_file():
        raise CheckpointError(f"{path} is a delta on {base.name}, which is missing")
    if state.get("base") != base.name:
        raise CheckpointError(f"{path} is named a delta on {base.name} but says it builds on {state.get('base')!r}")
    return state, read(base)


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
