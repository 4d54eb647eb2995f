"""The buffer server: named tables behind one ZeroMQ ROUTER socket.

The table "rollouts" (buffer.table) is the one the actors insert into and the learner samples
from; buffer.tables adds more, each with its own selector, bounds and rate limiter. Every op
but set_version, stats, info and checkpoint names its table (`table`; default "rollouts"); the
learner's version is one for all tables.

Two sockets: inserts come on the main one (buffer.port); the other ops, the learner's, on the
control socket (buffer.control_port), which the loop reads first and between two inserts, so
a sample or a version never waits behind the actors' queued inserts (ZeroMQ reads one
socket's peers in turn: behind eight writers' windows, a learner's request waited for eight
inserts). Every reply names the control port; the client sends its other ops there once it
knows it. An insert sent to the control socket is refused.

A request or reply is [rid, header, *array frames] (common/wire.py): the rid frame (the client's
request id) leads, and every reply echoes it, even to a request that is oversize or cannot be
decoded (a request without a valid rid frame gets rid 0, which no client uses). The header is
a map with `op`. Ops:
  insert      {batch | groups, priorities?, timeout_s?, table?, parts?}   (the groups as one
                                 batch of columns, or one by one: RolloutGroup.wire_field)
                                 -> {stored: one bool per group, size, learner_version, seq,
                                    refused};
                                    waits while the rate limiter holds it, storing the groups
                                    as it lets them in; at timeout_s an error with held=true
                                    and `stored` (the prefix stored) and `seq`. All groups are
                                    stored or, if one is malformed, none; with `parts` (sizes
                                    of consecutive runs of groups: a client's pipelined puts),
                                    each run is, and `refused` lists [part, reason] of the
                                    runs refused (`stored`: one bool per group of the others)
                                    The reply's `room`: how many more groups the table's rate
                                    limiter would take now without holding them (null: it never
                                    holds an insert); `published_version`: see set_version
  room        {timeout_s?, table?} -> as insert's reply, with no groups: answered once the
                                    rate limiter would take one more group (after the inserts it
                                    holds; it holds none behind it); at timeout_s an error with
                                    held=true. An actor that has used up `room` waits on this
                                    before starting more groups
  update_priorities {ids, priorities, table?} -> {updated: how many of the ids are held}
  sample      {n, timeout_s, table?} -> {batch | groups, staleness, learner_version}; waits for n groups
  set_version {version, published?, token} -> {learner_version, dropped}; `published`: the newest
                                    weights version sent to the actors (default version; less
                                    with trainer.publish_lag), which insert and room replies
                                    carry as `published_version`; with a version token set, only
                                    a request carrying it (the learner's) may move the version
  stats       {table?}           -> that table's summary (rollouts by default), and `tables`:
                                    every table's, by name
  info        {}                 -> {tables: {name: {config, size}}, learner_version}
  ping        {}                 -> {} (every reply says which incarnation answered)
  checkpoint  {}                 -> {path}: answered once a checkpoint in checkpoint_dir holds
                                    every table as it was at the request (written by a forked
                                    child where the server owns its process: buffer.checkpoint_in_child)
Every reply also carries the server's `incarnation` (new at each start) and `checkpoint_seq`
(the tables' insert count, all together, that its newest checkpoint holds; an insert reply's
`seq` is covered once checkpoint_seq reaches it): clients keep acknowledged groups until a checkpoint covers
them and re-send them to a restarted server (buffer/client.py).
Every reply has `ok`; a failed request gets ok=false and `error` naming the problem, and the
server keeps serving. A sample that cannot be met before its deadline gets an error reply; a
sample takes its groups only when its reply goes to a connected client, so a sample past its
deadline, or whose client is gone (closed, killed, or gave up and reconnected), takes nothing.
The loop is single-threaded: the socket and the table are touched only by it. If the loop dies
anyway, check() and stop() raise the cause.
"""
from __future__ import annotations

import collections
import dataclasses
import gc
import hmac
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zmq

from buffer import checkpoint, curve
from buffer.client import PROTOCOL, ROLLOUTS, BufferError
from buffer.table import Table, TableConfig
from common.config import ConfigError, check
from common.rollout import RolloutGroup, SchemaError, chunks
from common.wire import WireError, decode, encode, recv_frames, send_frames, split_rid, with_rid

log = logging.getLogger(__name__)
_POLLIN = int(zmq.POLLIN)   # a plain int: pyzmq's enum flags are slow to combine
SAMPLE_TIMES = 1024  # answered samples per table whose times stats() reports (p50, p99)
MAX_VERSION = 2**53  # a policy version past this is not one a learner publishes
DRAIN_MAX = 16  # insert requests taken between two passes over the waiting inserts,
DRAIN_BYTES = 1 << 16  # or fewer once they hold this much (a client's pipelined puts go several a request)
CHECK_TOGETHER = 32  # groups of one insert validated together (cheaper a group) between two reads of the
CHECK_BYTES = 1 << 19  # control port, or fewer once their arrays hold this much: a learner's request waits
                       # for one such chunk at most (8 groups a chunk, before puts went up to 128 a request:
                       # 4 KiB inserts 17-19k groups/s; 32: 23k, the server's part of a sample unchanged)


@dataclass
class BufferConfig:
    host: str = ""
    """Address the server binds and clients connect to; empty: 127.0.0.1 with a local Ray,
    this node's address when joining a Ray cluster."""
    port: int = 0
    """TCP port of inserts; 0 picks a free one."""
    control_port: int = 0
    """TCP port of every other op (sample, set_version, stats, ...: the learner's), read before
    inserts so that the learner never waits behind the actors; 0 picks a free one. Clients
    learn it from the server's replies."""
    timeout_s: float = 120.0
    """Deadline of each client call; a sample waits at most this long for enough groups."""
    max_message_mb: float = 512.0
    """Requests larger than this get an error reply."""
    checkpoint_dir: str = ""
    """Folder of the table's checkpoints (buffer/checkpoint.py); empty: none. The launcher
    uses <run.dir>/buffer."""
    checkpoint_every_s: float = 60.0
    """Write a checkpoint this often (and when the server stops); 0: only when stopping or
    asked (op checkpoint)."""
    checkpoint_timeout_s: float = 600.0
    """A checkpoint written by a forked child (checkpoint_in_child) that is still running after
    this long is killed and counted failed; the next is tried at the next period."""
    checkpoint_in_child: bool = True
    """A server that owns its process (python -m buffer, as the launcher starts it) on Linux
    writes its checkpoints from a forked child, serving on meanwhile (buffer/checkpoint.py,
    ForkedWrite); false, or a server on a thread of another program: the serving loop writes
    them itself and serves nothing meanwhile (4 s for a table of 537 MB). The last one, when
    the server stops, is always the loop's own."""
    keep_checkpoints: int = 2
    """The newest checkpoints kept (and the whole ones they build on)."""
    checkpoint_full_every: int = 8
    """Every this many checkpoints one is whole; the others are deltas on the last whole one
    (buffer/checkpoint.py): the arrays of only the groups stored since, every other group by
    its id. 1: each whole. A server's first checkpoint after a start, and one when the groups
    stored since the last whole one reach half the table's size, are whole too."""
    restore: bool = True
    """Start from the newest checkpoint in checkpoint_dir, if there is one."""
    max_restarts: int = 3
    """How often the launcher restarts a buffer process that died (from its newest checkpoint;
    clients re-send what that checkpoint lacks) before the run fails."""
    curve: bool = False
    """Encrypt and authenticate every connection with CurveZMQ (buffer/curve.py): for a buffer
    that other hosts can reach. The server answers only clients holding the job's keys, which
    the launcher makes per job and hands over in the environment (ASYNCRL_BUFFER_CURVE)."""
    table: TableConfig = field(default_factory=TableConfig)
    """The table named "rollouts": the actors insert into it, the learner samples from it."""
    tables: dict[str, TableConfig] = field(default_factory=dict)
    """More named tables (name -> the keys of buffer.table), for data of your own: say
    `buffer.tables.solved.selector=max_heap`. Clients name the table of each op."""

    def validate(self):
        check(0 <= self.port < 65536, "port", f"must lie in [0, 65535], got {self.port}")
        check(0 <= self.control_port < 65536, "control_port", f"must lie in [0, 65535], got {self.control_port}")
        check(not self.port or self.control_port != self.port, "control_port",
              f"must differ from buffer.port ({self.port}): the two are separate sockets")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.max_message_mb > 0, "max_message_mb", "must be > 0")
        check(self.checkpoint_every_s >= 0, "checkpoint_every_s", f"must be >= 0, got {self.checkpoint_every_s}")
        check(self.checkpoint_timeout_s > 0, "checkpoint_timeout_s", f"must be > 0, got {self.checkpoint_timeout_s}")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        check(self.checkpoint_full_every >= 1, "checkpoint_full_every",
              f"must be >= 1, got {self.checkpoint_full_every}")
        check(self.max_restarts >= 0, "max_restarts", f"must be >= 0, got {self.max_restarts}")
        for name in self.tables:
            check(name != ROLLOUTS, f"tables.{name}", f"{ROLLOUTS!r} is buffer.table; name the others otherwise")
            check(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) is not None, f"tables.{name}",
                  "a table's name is 1 to 64 letters, digits, '_' or '-'")   # its keys: checked as buffer.table's

    def table_configs(self) -> dict:
        """Every table's config, by name, "rollouts" first."""
        return {ROLLOUTS: self.table, **self.tables}


class RequestError(ValueError):
    pass


class StoredOutOfCollector:
    """Python's cyclic garbage collector, in a process the server owns (`python -m buffer`).
    What a server stores lives long and holds no reference cycles, yet the collector's passes
    walk it again and again: they cost a 4 KiB insert about 20 of its 53 µs (cpu2), and one
    full collection over 131k such groups took 0.6 s. So after each pass of the serving loop
    that stored groups, everything alive is frozen (gc.freeze: left out of every later
    collection, still freed by reference counting once dropped), and a full collection, to
    free any cycle frozen with it, runs only in a pass that served nothing, at most every
    `full_every_s`. Not for a server on a thread of another program: freezing is process-wide."""

    def __init__(self, full_every_s: float = 600.0):
        self.full_every_s = full_every_s
        self.frozen_at = -1                      # the server's inserts when it last froze
        self.next_full = time.monotonic() + full_every_s
        self.full_collections = 0

    def after_pass(self, inserts: int, idle: bool) -> None:
        if idle and time.monotonic() >= self.next_full:
            gc.unfreeze()
            gc.collect()
            self.full_collections += 1
            self.next_full = time.monotonic() + self.full_every_s
            self.frozen_at = -1
        if inserts != self.frozen_at:
            gc.freeze()
            self.frozen_at = inserts


def _priority(value, table: Table) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RequestError(f"a priority must be a finite number >= 0, got {value!r}")
    try:
        table.weight_of(float(value))
    except ValueError as e:
        raise RequestError(str(e)) from None
    return float(value)


def _number(request: dict, key: str, kind: type = float, default=None):
    """request[key] as a finite int (kind=int) or number; RequestError naming the key if not."""
    value = request.get(key, default)
    wanted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, wanted) or not math.isfinite(value):
        raise RequestError(f"{key!r} must be a finite {kind.__name__}, got {value!r}")
    return kind(value)


@dataclass
class _PendingSample:
    socket: zmq.Socket   # the one it came on, where its reply goes
    identity: bytes
    rid: int
    table: str
    n: int
    deadline: float
    arrived: float   # when the server read it (monotonic)


@dataclass
class _Plan:
    """A checkpoint to write: `state` makes what it holds; `base`: the whole checkpoint a delta
    builds on, None for a whole one, which then holds `counted` inserts of each table."""
    state: Callable[[], dict]
    base: Path | None
    counted: dict | None = None


@dataclass
class _PendingInsert:
    socket: zmq.Socket
    identity: bytes
    rid: int
    table: str
    groups: list
    priorities: list
    deadline: float
    stored: list = field(default_factory=list)   # one bool per group stored so far, in order
    refused: list = field(default_factory=list)  # [part, reason] of the parts refused (request with parts)
    room_wait: bool = False   # a room request (no groups): answered once the rate limiter would take a group


def _what_waited(p: _PendingInsert) -> str:
    return "a wait for room for 1 group" if p.room_wait else f"this insert of {len(p.groups)} group(s)"


def _percentiles_ms(seconds) -> dict:
    """{p50, p99, count} in ms of a collection of durations in seconds; None for each without any."""
    if not seconds:
        return {"p50": None, "p99": None, "count": 0}
    ms = sorted(1e3 * s for s in seconds)
    return {"p50": round(ms[len(ms) // 2], 3), "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3), "count": len(ms)}


def _wire_bytes(wire) -> int:
    """The bytes of a group's arrays in its wire form (0 if it is malformed: checking it names it)."""
    try:
        return sum(view.nbytes for view in wire[2].items)
    except (TypeError, IndexError, AttributeError, KeyError):
        return 0


def _unique(groups: list, start: int) -> list:
    """groups, or RequestError naming a group (by its index in the request, from `start`)
    whose id repeats an earlier one's: a request stores each id once or not at all."""
    first = {}
    for i, group in enumerate(groups, start):
        if first.setdefault(group.id, i) != i:
            raise RequestError(f"group {i}: id {group.id!r} repeats group {first[group.id]}'s")
    return groups


def _bind_error(address: str, e: "zmq.ZMQError", port_key: str = "buffer.port") -> ConfigError:
    key = port_key if e.errno == zmq.EADDRINUSE else "buffer.host"
    return ConfigError(key, f"cannot bind {address}: {zmq.strerror(e.errno)}")


def check_bindable(config: "BufferConfig") -> None:
    """Fail at once, naming the key, if the configured address cannot be bound (a port in use,
    a host not this machine's): before a job starts anything else. The server binds for real
    later; this only spares the wait for the rest of the start-up."""
    for key, port in (("buffer.port", config.port), ("buffer.control_port", config.control_port)):
        if not port:
            continue
        address = f"tcp://{config.host or '127.0.0.1'}:{port}"
        probe = zmq.Context.instance().socket(zmq.ROUTER)
        probe.setsockopt(zmq.LINGER, 0)
        try:
            probe.bind(address)
        except zmq.ZMQError as e:
            raise _bind_error(address, e, key) from None
        finally:
            probe.close(0)


class BufferServer:
    def __init__(self, config: BufferConfig, seed: int = 0, version_token: str = "", owns_process: bool = False):
        """`version_token`: when set, only requests carrying it may move the learner version
        (the launcher gives it to the learner alone). `owns_process`: the server is its
        process's only tenant (`python -m buffer`), so it keeps what it stores out of the
        garbage collector's passes (StoredOutOfCollector)."""
        self.config = config
        self.collector = StoredOutOfCollector() if owns_process else None
        self._version_token = version_token
        self.tables = {name: Table(c, seed=seed + i) for i, (name, c) in enumerate(config.table_configs().items())}
        self._authenticator = None
        keys = None
        if config.curve:
            try:
                keys = curve.CurveKeys.from_env()
            except curve.CurveError as e:
                raise ConfigError("buffer.curve", str(e)) from None
            if keys is None:
                raise ConfigError("buffer.curve", f"is true but {curve.ENV} is not set; the launcher sets it, "
                                  "`python -m buffer keys` makes a set for a buffer run by hand")
        # A context of its own, with an I/O thread per socket: the learner's replies (16 MiB for
        # a sample of 1 MiB groups) are written by a thread of their own instead of taking turns
        # with the actors' stream of inserts. (With CurveZMQ, its authenticator is the context's.)
        self._context = zmq.Context(io_threads=2)
        self._socket, self._control = self._context.socket(zmq.ROUTER), self._context.socket(zmq.ROUTER)
        for thread, socket in enumerate((self._socket, self._control)):
            socket.setsockopt(zmq.AFFINITY, 1 << thread)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a gone client fails instead of vanishing
        if keys:
            try:
                self._authenticator = curve.secure_server(self._context, [self._socket, self._control], keys)
            except curve.CurveError as e:
                self.close()
                raise ConfigError("buffer.curve", str(e)) from None
        host = config.host or "127.0.0.1"
        self.port = self._bind(self._socket, host, config.port, "buffer.port")
        self.control_port = self._bind(self._control, host, config.control_port, "buffer.control_port")
        self.address = f"tcp://{host}:{self.port}"
        if not keys and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("buffer: %s is reachable from other hosts without CurveZMQ: anyone who reaches the "
                        "port can insert and sample; set buffer.curve=true", self.address)
        self.incarnation = uuid.uuid4().hex  # new at every start: clients see a restart by it
        self.checkpoint_seq = 0              # table inserts the newest checkpoint holds
        self.restored_from: Path | None = None
        # checkpoints written by a forked child (buffer/checkpoint.py), one at a time; a
        # checkpoint op that comes while one is written waits for the next, which holds its groups
        self._fork_checkpoints = owns_process and config.checkpoint_in_child and checkpoint.can_fork()
        self._writing: checkpoint.ForkedWrite | None = None
        self._writing_plan: _Plan | None = None   # what the forked write in progress is
        self._checkpoint_asked: list = []     # (socket, identity, rid) of checkpoint ops for the next one
        self.checkpoint_stats = {"written": 0, "whole": 0, "failed": 0, "last_s": None, "last_held_loop_ms": None}
        if config.checkpoint_dir:
            checkpoint.remove_partials(config.checkpoint_dir)   # left by writers killed while saving
        # the whole checkpoint that deltas build on: (its path, each table's insert count it
        # holds), and the deltas written on it; none yet, so this server's first is whole
        self._base: tuple[Path, dict] | None = None
        self._deltas_on_base = 0
        if config.checkpoint_dir and config.restore:
            newest = checkpoint.latest(config.checkpoint_dir)
            if newest is not None:
                state, base = checkpoint.read_with_base(newest)   # CheckpointError names the file
                try:
                    self._restore(state, base)
                except checkpoint.CheckpointError as e:
                    on = checkpoint.base_of(newest)
                    raise checkpoint.CheckpointError(f"{newest}{f' (a delta on {on.name})' if on else ''}: {e}") from None
                self.checkpoint_seq, self.restored_from = self.inserts, newest
                log.info("buffer: restored %d groups from %s", self.size, newest)
        self._schedule_checkpoint()
        self._pending: list[_PendingSample] = []
        # per table, of the last SAMPLE_TIMES samples answered: from reading the request to sending the reply
        self._sample_s = {name: collections.deque(maxlen=SAMPLE_TIMES) for name in self.tables}
        self._pending_inserts: list[_PendingInsert] = []  # held by the rate limiter, in arrival order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.errors = 0
        self.published_version = 0   # the newest weights the learner has sent the actors (set_version)

    def _bind(self, socket: zmq.Socket, host: str, port: int, key: str) -> int:
        """Bind socket to host:port (0: a free port); the port. ConfigError naming `key` if it cannot."""
        address = f"tcp://{host}:{port or '*'}"
        try:
            if port:
                socket.bind(address)
                return port
            return socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            self.close()
            raise _bind_error(address, e, key) from None

    @property
    def table(self) -> Table:
        """The rollouts table."""
        return self.tables[ROLLOUTS]

    @property
    def inserts(self) -> int:
        """Groups stored so far, all tables together: the sequence an insert's `seq` is on."""
        return sum(t.stats.inserts for t in self.tables.values())

    @property
    def size(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def _restore(self, state: dict, base: dict | None = None) -> None:
        """Every table of a checkpoint that this server has (a checkpoint of one table, from
        before named tables, is the rollouts table's); a table the config no longer names is
        left out, logged. `base`: the whole checkpoint's state that a delta's builds on."""
        states = state["tables"] if "tables" in state else {ROLLOUTS: state}
        for name, table_state in states.items():
            if name in self.tables:
                try:
                    self.tables[name].restore(table_state, base and base["tables"].get(name, {"items": []}))
                except ValueError as e:
                    raise checkpoint.CheckpointError(f"table {name!r}: {e}") from None
            else:
                log.warning("buffer: the checkpoint's table %r is not configured; its %d groups are left out",
                            name, len(table_state.get("items", [])))

    def _table(self, request: dict) -> tuple[str, Table]:
        name = request.get("table", ROLLOUTS)
        if not isinstance(name, str) or name not in self.tables:
            raise RequestError(f"unknown table {name!r}; this server has {sorted(self.tables)}")
        return name, self.tables[name]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "BufferServer":
        self._thread = threading.Thread(target=self.serve, name="buffer-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving; raise BufferError if the loop does not stop in time or had died."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise BufferError(f"buffer server at {self.address} did not stop within {timeout_s}s")
        self.close()
        self.check()

    def close(self) -> None:
        """Close the socket (and CurveZMQ's authenticator), once the loop is not running."""
        self._socket.close(linger=0)
        self._control.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        self._context.term()   # its I/O threads; every socket of it is closed, with no linger

    def check(self) -> None:
        """Raise BufferError, naming the cause, if the serving loop has died."""
        if self._failure is not None:
            raise BufferError(f"buffer server at {self.address} stopped serving: "
                              f"{type(self._failure).__name__}: {self._failure}") from self._failure

    def serve(self) -> None:
        """Serve until stop(). An exception that ends the loop is kept for check() and stop()."""
        try:
            self._serve()
        except BaseException as e:
            self._failure = e
            log.error("buffer server at %s stopped serving", self.address, exc_info=True)

    def _state(self) -> dict:
        return {"tables": {name: t.state() for name, t in self.tables.items()}}

    def _plan_checkpoint(self) -> "_Plan":
        """The next checkpoint: a delta on the last whole one, or whole (the config's turn,
        none written yet, or a table whose groups stored since then reach half its size)."""
        base = self._base
        if (base is not None and self._deltas_on_base + 1 < self.config.checkpoint_full_every and base[0].is_file()
                and all(2 * (t.stats.inserts - base[1][n]) < max(len(t), 1) for n, t in self.tables.items())):
            path, counted = base
            return _Plan(lambda: {"base": path.name, "tables": {n: t.state(new_after=counted[n])
                                                                for n, t in self.tables.items()}}, path)
        return _Plan(self._state, None, {n: t.stats.inserts for n, t in self.tables.items()})

    def _schedule_checkpoint(self) -> None:
        self._next_checkpoint = time.monotonic() + (self.config.checkpoint_every_s or math.inf)

    def checkpoint(self) -> Path | None:
        """Write every table to checkpoint_dir now, from this thread (the serving loop's, or
        any while it is not running): the last one, when stopping. A forked write in progress
        is stopped first (this one holds all it would) and those who asked for it, or for
        the next, are answered by this one. Its path, or None without a checkpoint_dir;
        raises what writing raised."""
        if not self.config.checkpoint_dir:
            return None
        asked, self._checkpoint_asked = self._checkpoint_asked, []
        if self._writing is not None:
            self._writing.kill("was overtaken by a checkpoint written in the serving loop")
            asked, self._writing = self._writing.waiters + asked, None
        seq, started, plan = self.inserts, time.monotonic(), self._plan_checkpoint()
        try:
            path = self._write_in_loop(plan)
        except Exception as e:
            self._checkpoint_done(self._write_failed(e), seq, started, asked, plan)
            raise
        self._checkpoint_done(path, seq, started, asked, plan)
        return path

    def _write_in_loop(self, plan: "_Plan") -> Path:
        started = time.monotonic()
        path = checkpoint.write(self.config.checkpoint_dir, plan.state(), keep=self.config.keep_checkpoints,
                                base=plan.base)
        self.checkpoint_stats["last_held_loop_ms"] = round((time.monotonic() - started) * 1000, 2)
        return path

    def _write_failed(self, e: Exception) -> checkpoint.CheckpointError:
        return checkpoint.CheckpointError(f"checkpoint into {self.config.checkpoint_dir} failed: {type(e).__name__}: {e}")

    def _start_checkpoint(self, asked: list) -> None:
        """A checkpoint of the tables as they are now, for `asked` (the checkpoint ops waiting
        for it): by a forked child where the server may fork (answered when it ends), else,
        or if the fork fails, written here and answered at once. A failure is counted, logged
        and answered; the server serves on and tries again at the next period."""
        self._schedule_checkpoint()
        seq, started, plan = self.inserts, time.monotonic(), self._plan_checkpoint()
        if self._fork_checkpoints:
            try:
                self._writing = checkpoint.ForkedWrite(self.config.checkpoint_dir, plan.state,
                                                       keep=self.config.keep_checkpoints, seq=seq, waiters=asked,
                                                       base=plan.base)
                self._writing_plan = plan
                self.checkpoint_stats["last_held_loop_ms"] = round(self._writing.fork_s * 1000, 2)
                return
            except OSError as e:   # no memory or process left for a child: this one is written here
                log.warning("buffer: could not fork a checkpoint writer (%s); writing it in the serving loop", e)
        try:
            result = self._write_in_loop(plan)
        except Exception as e:   # a full disk, say
            result = self._write_failed(e)
        self._checkpoint_done(result, seq, started, asked, plan)

    def _checkpoint_done(self, result, seq: int, started: float, asked: list, plan: "_Plan") -> None:
        """A checkpoint ended (result: its path, or the CheckpointError that ended it): what it
        holds (the first `seq` inserts) counts as saved, and those who asked for it are answered.
        A whole one is the base of the deltas that follow."""
        if isinstance(result, Path):
            if plan.base is None:
                self._base, self._deltas_on_base = (result, plan.counted), 0
                self.checkpoint_stats["whole"] += 1
            else:
                self._deltas_on_base += 1
            self.checkpoint_seq = max(self.checkpoint_seq, seq)
            self.checkpoint_stats.update(written=self.checkpoint_stats["written"] + 1,
                                         last_s=round(time.monotonic() - started, 4))
            reply = {"path": str(result)}
        else:
            self.checkpoint_stats["failed"] += 1
            log.error("buffer: %s; the next is due in %.0f s", result, max(0.0, self._next_checkpoint - time.monotonic()))
            reply = {"ok": False, "error": str(result)}
        for socket, identity, rid in asked:
            self._reply(socket, identity, rid, dict(reply))

    def _checkpoints_in_loop(self) -> None:
        writing = self._writing
        if writing is not None:
            result = writing.poll()
            if result is None and time.monotonic() - writing.started > self.config.checkpoint_timeout_s:
                result = writing.kill(f"did not finish within buffer.checkpoint_timeout_s "
                                      f"({self.config.checkpoint_timeout_s:g}s)")
            if result is not None:
                self._writing = None
                self._checkpoint_done(result, writing.seq, writing.started, writing.waiters, self._writing_plan)
        if self._writing is None and (self._checkpoint_asked or time.monotonic() >= self._next_checkpoint):
            asked, self._checkpoint_asked = self._checkpoint_asked, []
            self._start_checkpoint(asked)

    def _serve(self) -> None:
        try:
            self._serve_requests()
        finally:  # stopping, or failing: what is held is saved either way
            if self.config.checkpoint_dir:
                self.checkpoint()

    def _serve_requests(self) -> None:
        poller = zmq.Poller()
        poller.register(self._control, zmq.POLLIN)
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if self.config.checkpoint_dir:
                self._checkpoints_in_loop()
            wait_ms = 100 if self._writing is None else 10   # a forked write's end is looked for
            if self._pending or self._pending_inserts:
                soonest = min(p.deadline for p in self._pending + self._pending_inserts)
                wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
            served = bool(poller.poll(wait_ms))
            if served:
                # The learner's requests first, then the inserts that have arrived, at most
                # DRAIN_MAX requests or DRAIN_BYTES (under a steady stream of inserts a drain
                # would never end and held inserts would never be looked at again), with the
                # control socket read again before each.
                self._serve_control()
                taken = 0
                for _ in range(DRAIN_MAX):
                    try:
                        frames = recv_frames(self._socket, block=False)
                    except zmq.Again:
                        break
                    self._handle(self._socket, frames)
                    taken += sum(len(f) for f in frames)
                    if taken >= DRAIN_BYTES:
                        break
                    self._serve_control()
            self._serve_pending()
            if self.collector is not None:
                self.collector.after_pass(self.inserts, idle=not served)

    def _serve_control(self) -> None:
        """Every request waiting on the control socket, each sample answered at once if it can be."""
        while self._control.get(zmq.EVENTS) & _POLLIN:
            try:
                frames = recv_frames(self._control, block=False)
            except zmq.Again:
                return
            self._handle(self._control, frames)
            if self._pending:
                self._serve_pending()

    # -- requests --------------------------------------------------------------------------
    def _handle(self, socket: zmq.Socket, frames) -> None:
        identity, rid = frames[0].bytes, 0
        try:
            rid, body = split_rid(frames[1:])
            size = sum(len(f) for f in body)
            if size > self.config.max_message_mb * 1e6:
                raise RequestError(f"message of {size / 1e6:.1f} MB exceeds "
                                   f"max_message_mb={self.config.max_message_mb}")
            request = decode(body)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise RequestError("request must be a map with a string 'op'")
            if request.get("protocol") != PROTOCOL:
                raise RequestError(f"request in protocol {request.get('protocol', '1 (none named)')}, this server "
                                   f"speaks {PROTOCOL}: run the buffer and its clients from the same asyncrl version")
            handler = getattr(self, f"_op_{request['op']}", None)
            if handler is None:
                raise RequestError(f"unknown op {request['op']!r}")
            if request["op"] == "insert" and socket is self._control:
                raise RequestError(f"inserts go to the buffer's main port ({self.port}), not its control port")
            reply = handler(socket, identity, rid, request)
        except (WireError, SchemaError, RequestError, KeyError, TypeError, ValueError) as e:
            self.errors += 1
            log.warning("buffer: rejected request %d: %s", rid, e)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # a bug met by one request fails that request, not the server
            self.errors += 1
            log.error("buffer: request %d failed", rid, exc_info=True)
            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        if reply is not None:
            self._reply(socket, identity, rid, reply)

    def _reply(self, socket: zmq.Socket, identity: bytes, rid: int, reply: dict) -> bool:
        """Send a reply; False if its client is gone or not reading, so it was not delivered."""
        reply.setdefault("ok", True)
        # every reply says which server answered and what its newest checkpoint holds, so a
        # client knows which acknowledged groups are safe and when the server restarted
        reply["incarnation"], reply["checkpoint_seq"] = self.incarnation, self.checkpoint_seq
        reply["checkpoints"], reply["control_port"] = bool(self.config.checkpoint_dir), self.control_port
        reply["protocol"] = PROTOCOL
        try:
            send_frames(socket, [identity, *with_rid(rid, encode(reply))], block=False)
            return True
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            log.info("buffer: reply to request %d not delivered: %s", rid, e.strerror)
            return False

    def _op_insert(self, socket, identity, rid, request):
        # the groups: one batch (six columns for all, RolloutGroup.batch_to_wire, as clients send
        # them) or a list of groups one by one (to_wire each)
        batch, raw = request.get("batch"), request.get("groups")
        if batch is not None:
            if not (type(batch) is list and len(batch) == 4 and type(batch[3]) is list):
                raise RequestError("an insert's 'batch' must be [shapes, dtypes, columns, metas] "
                                   "(RolloutGroup.batch_to_wire)")
            count = len(batch[3])
        elif isinstance(raw, list):
            count = len(raw)
        else:
            raise RequestError("insert needs 'batch' (RolloutGroup.batch_to_wire) or 'groups', a list of rollout groups")
        # `parts` (a client's pipelined puts sent together): sizes of consecutive runs of groups,
        # each stored whole or refused alone; without it the request is one part, refused whole
        parts = request.get("parts")
        if parts is not None and not (isinstance(parts, list) and all(type(n) is int and n >= 1 for n in parts)
                                      and sum(parts) == count):
            raise RequestError(f"'parts' must be a list of sizes >= 1 adding up to the {count} groups")
        priorities = request.get("priorities")
        if priorities is None:
            priorities = [1.0] * count
        if not isinstance(priorities, list) or len(priorities) != count:
            raise RequestError(f"'priorities' must be a list of one number per group ({count})")
        timeout_s = _number(request, "timeout_s", default=self.config.timeout_s)
        name, table = self._table(request)
        try:   # the common case, every group valid: checked a chunk at a time
            if batch is not None:
                every = RolloutGroup.from_batch(batch, between=self._serve_control, most=CHECK_TOGETHER,
                                                most_bytes=CHECK_BYTES)
            else:
                every = []
                for start, end in chunks([_wire_bytes(w) for w in raw], CHECK_TOGETHER, CHECK_BYTES):
                    if start:
                        self._serve_control()   # safe: validating touches no table
                    every += RolloutGroup.from_wire_all(raw[start:end], first=start)
        except SchemaError:
            every = None   # each part alone, to refuse only those that are malformed
            if batch is not None:   # a batch malformed as a whole is refused whole (SchemaError)
                unchecked = RolloutGroup.batch_unchecked(batch)
                check = lambda i: RolloutGroup._named(i, unchecked[i].checked)   # noqa: E731
            else:
                check = lambda i: RolloutGroup.from_wire_all([raw[i]], first=i)[0]   # noqa: E731
        groups, kept, refused, start = [], [], [], 0
        for k, size in enumerate(parts or [count]):
            try:
                if every is None:
                    part = self._part(check, start, start + size, between=self._serve_control)
                else:
                    part = _unique(every[start:start + size], start)
                kept += [_priority(p, table) for p in priorities[start:start + size]]
                groups += part
            except (SchemaError, RequestError) as e:
                if parts is None:
                    raise
                self.errors += 1
                refused.append([k, f"{type(e).__name__}: {e}"])
            start += size
        insert = _PendingInsert(socket, identity, rid, name, groups, kept, time.monotonic() + timeout_s, refused=refused)
        return self._hold_or_answer(insert)

    def _hold_or_answer(self, insert: _PendingInsert):
        """The reply to an insert or room request the rate limiter lets through now, else None
        (it is held, behind the inserts its table holds already)."""
        held = any(p.table == insert.table and not p.room_wait for p in self._pending_inserts)
        if held or not self._admit(insert):
            self._pending_inserts.append(insert)
            return None
        return self._stored(insert)

    @staticmethod
    def _part(check, start: int, end: int, between=None) -> list:
        """The groups start..end-1 of a request, each checked alone (`check(i)`: group i, valid,
        or SchemaError naming it by its index in the request), or SchemaError/RequestError
        naming the first that is not valid. `between` is called before each group but the
        request's first: the learner's requests are served between the groups of one insert (a
        request of 17 coalesced puts took up to 4 ms to validate on two busy cores), which is
        safe because validating touches no table."""
        groups = []
        for i in range(start, end):
            if between is not None and i:
                between()
            groups.append(check(i))
        return _unique(groups, start)

    def _admit(self, insert: _PendingInsert) -> bool:
        """Store, in order, as many of the insert's groups as its table's rate limiter lets in
        now (a queue with room for one more takes one: a request of several never waits for
        room for all at once, which might never come); True once all are stored (a room
        request, with none: once the limiter would take one)."""
        table = self.tables[insert.table]
        while len(insert.stored) < len(insert.groups) and table.can_insert(1):
            i = len(insert.stored)
            insert.stored.append(table.insert(insert.groups[i], insert.priorities[i]))
        if len(insert.stored) < len(insert.groups):
            return False
        return not insert.room_wait or table.can_insert(1)   # a room request: once there is room

    def _stored(self, insert: _PendingInsert) -> dict:
        table = self.tables[insert.table]
        return {"stored": insert.stored, "size": len(table), "learner_version": table.learner_version,
                "seq": self.inserts, "refused": insert.refused,   # covered once checkpoint_seq reaches it
                "room": table.room(), "published_version": self.published_version}

    def _op_room(self, socket, identity, rid, request):
        timeout_s = _number(request, "timeout_s", default=self.config.timeout_s)
        name, _ = self._table(request)
        # waits like an insert of nothing, behind the inserts its table holds (and holds none)
        return self._hold_or_answer(_PendingInsert(socket, identity, rid, name, [], [], time.monotonic() + timeout_s,
                                                   room_wait=True))

    def _op_update_priorities(self, socket, identity, rid, request):
        ids, priorities = request.get("ids"), request.get("priorities")
        if not (isinstance(ids, list) and isinstance(priorities, list) and len(ids) == len(priorities)):
            raise RequestError("update_priorities needs 'ids' and 'priorities', lists of one length")
        table = self._table(request)[1]
        values = {str(i): _priority(p, table) for i, p in zip(ids, priorities)}
        return {"updated": table.update_priorities(values)}

    def _op_sample(self, socket, identity, rid, request):
        n = _number(request, "n", int)
        timeout_s = _number(request, "timeout_s", default=self.config.timeout_s)
        name, table = self._table(request)
        if not 1 <= n <= table.config.max_size:
            raise RequestError(f"sample of n={n} can never be met by the table {name!r} of max_size "
                               f"{table.config.max_size}")
        now = time.monotonic()
        self._pending.append(_PendingSample(socket, identity, rid, name, n, now + timeout_s, now))
        return None  # answered by _serve_pending

    def _op_set_version(self, socket, identity, rid, request):
        if self._version_token and not hmac.compare_digest(str(request.get("token", "")), self._version_token):
            raise RequestError("set_version refused: only the learner may move the version (wrong or missing token)")
        version = _number(request, "version", int)
        if not 0 <= version <= MAX_VERSION:
            raise RequestError(f"set_version refused: version {version} lies outside [0, {MAX_VERSION}]")
        published = _number(request, "published", int, default=version)
        if not 0 <= published <= version:
            raise RequestError(f"set_version refused: published version {published} lies outside [0, {version}]")
        self.published_version = published   # the learner's word (a resumed one may go back); not checkpointed:
                                             # 0 after a restart until the learner's next set_version
        before = sum(t.stats.dropped_stale for t in self.tables.values())
        for table in self.tables.values():
            table.set_learner_version(version)
        return {"learner_version": self.table.learner_version,
                "dropped": sum(t.stats.dropped_stale for t in self.tables.values()) - before}

    def _op_stats(self, socket, identity, rid, request):
        name, table = self._table(request)
        return {**table.summary(), "table": name, "sample_reply_ms": _percentiles_ms(self._sample_s[name]),
                "held_inserts": sum(p.table == name and not p.room_wait for p in self._pending_inserts),
                "room_waits": sum(p.table == name and p.room_wait for p in self._pending_inserts),
                "waiting_samples": sum(p.table == name for p in self._pending),
                "checkpoint_writes": {**self.checkpoint_stats, "writing": self._writing is not None,
                                "in_child": self._fork_checkpoints},
                "tables": {n: t.summary() for n, t in self.tables.items()}}

    def _op_ping(self, socket, identity, rid, request):
        return {}

    def _op_info(self, socket, identity, rid, request):
        return {"tables": {n: {"config": dataclasses.asdict(t.config), "size": len(t)} for n, t in self.tables.items()},
                "learner_version": self.table.learner_version}

    def _op_checkpoint(self, socket, identity, rid, request):
        """Answered once a checkpoint holding every group stored before this request is on
        disk (by the loop's next pass)."""
        if not self.config.checkpoint_dir:
            raise RequestError("this server has no checkpoint_dir")
        self._checkpoint_asked.append((socket, identity, rid))
        return None

    def _serve_pending(self) -> None:
        """Answer, first come first served, the samples that can be met and those past their
        deadline. Groups are marked sampled only once their reply is on its way to a connected
        client; a sample whose client is gone takes nothing and is forgotten. (ZeroMQ learns of
        a disconnect within milliseconds on loopback; a client lost in that window, or after
        its reply was sent, loses the groups: there is no delivery receipt.)"""
        now, waiting, holding = time.monotonic(), [], set()
        for p in self._pending_inserts:  # in arrival order: one held insert holds those behind it in its table
            table = self.tables[p.table]
            if now >= p.deadline:
                self._reply(p.socket, p.identity, p.rid, {
                    "ok": False, "held": True, "stored": p.stored, "seq": self.inserts, "refused": p.refused,
                    "error": f"timeout: the rate limiter ({table.config.rate_limiter}) of the table "
                    f"{p.table!r} held {_what_waited(p)} past its deadline, "
                    f"{len(p.stored)} group(s) stored: the learner is not sampling (size {len(table)}, "
                    f"samples {table.stats.samples}, inserts {table.stats.inserts})"})
            elif p.table not in holding and self._admit(p):
                self._reply(p.socket, p.identity, p.rid, self._stored(p))
            else:
                waiting.append(p)
                if not p.room_wait:   # a room request waits behind held inserts, but holds none behind it
                    holding.add(p.table)
        self._pending_inserts = waiting
        still = []
        for p in self._pending:
            table = self.tables[p.table]
            if now >= p.deadline:
                self._reply(p.socket, p.identity, p.rid, {
                    "ok": False, "error": f"timeout: fewer than {p.n} fresh groups arrived in the table {p.table!r} "
                    f"in time (size {len(table)}, dropped_stale {table.stats.dropped_stale})"})
            elif (groups := table.select(p.n)) is None:
                still.append(p)
            elif self._reply(p.socket, p.identity, p.rid, {
                    **RolloutGroup.wire_field([g.to_wire() for g in groups]),
                    "staleness": [table.staleness(g) for g in groups],
                    "learner_version": table.learner_version}):
                table.mark_sampled(groups)
                self._sample_s[p.table].append(time.monotonic() - p.arrived)
        self._pending = still
        if any(p.deadline > now and self.tables[p.table].can_insert(1) for p in self._next_to_go()):
            self._serve_pending()  # the samples made room for a held insert or a room request

    def _next_to_go(self) -> list:
        """The held requests the rate limiter looks at next: the first held insert of each table
        and the room requests before it (a room request holds nothing behind it)."""
        heads, held = [], set()
        for p in self._pending_inserts:
            if p.table not in held:
                heads.append(p)
                if not p.room_wait:
                    held.add(p.table)
        return heads
