"""The buffer server: one Table behind a ZeroMQ ROUTER socket.

A request or reply is [rid, header, *array frames] (common/wire.py): the rid frame (the client's
request id) leads, and every reply echoes it, even to a request that is oversize or cannot be
decoded (a request without a valid rid frame gets rid 0, which no client uses). The header is
a map with `op`. Ops:
  insert      {groups, priorities?, timeout_s?}
                                 -> {stored: one bool per group, size, learner_version, seq};
                                    waits while the rate limiter holds it (error at timeout_s)
  update_priorities {ids, priorities} -> {updated: how many of the ids are held}
  sample      {n, timeout_s}     -> {groups, staleness, learner_version}; waits for n groups
  set_version {version, token}   -> {learner_version, dropped}; with a version token set, only
                                    a request carrying it (the learner's) may move the version
  stats       {}                 -> the table's summary
  checkpoint  {}                 -> {path}: the table written to checkpoint_dir now
Every reply also carries the server's `incarnation` (new at each start) and `checkpoint_seq`
(the table's insert count its newest checkpoint holds; an insert reply's `seq` is covered
once checkpoint_seq reaches it): clients keep acknowledged groups until a checkpoint covers
them and re-send them to a restarted server (buffer/client.py).
Every reply has `ok`; a failed request gets ok=false and `error` naming the problem, and the
server keeps serving. A sample that cannot be met before its deadline gets an error reply; a
sample takes its groups only when its reply goes to a connected client, so a sample past its
deadline, or whose client is gone (closed, killed, or gave up and reconnected), takes nothing.
The loop is single-threaded: the socket and the table are touched only by it. If the loop dies
anyway, check() and stop() raise the cause.
"""
from __future__ import annotations

import hmac
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from buffer import checkpoint
from buffer.client import BufferError
from buffer.table import Table, TableConfig
from common.config import ConfigError, check
from common.rollout import RolloutGroup, SchemaError
from common.wire import WireError, decode, encode, split_rid, with_rid

log = logging.getLogger(__name__)
MAX_VERSION = 2**53  # a policy version past this is not one a learner publishes
DRAIN_MAX = 16  # requests taken from the socket between two passes over the waiting samples


@dataclass
class BufferConfig:
    host: str = ""
    """Address the server binds and clients connect to; empty: 127.0.0.1 with a local Ray,
    this node's address when joining a Ray cluster."""
    port: int = 0
    """TCP port; 0 picks a free one."""
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
    keep_checkpoints: int = 2
    restore: bool = True
    """Start from the newest checkpoint in checkpoint_dir, if there is one."""
    max_restarts: int = 3
    """How often the launcher restarts a buffer process that died (from its newest checkpoint;
    clients re-send what that checkpoint lacks) before the run fails."""
    table: TableConfig = field(default_factory=TableConfig)

    def validate(self):
        check(0 <= self.port < 65536, "port", f"must lie in [0, 65535], got {self.port}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.max_message_mb > 0, "max_message_mb", "must be > 0")
        check(self.checkpoint_every_s >= 0, "checkpoint_every_s", f"must be >= 0, got {self.checkpoint_every_s}")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        check(self.max_restarts >= 0, "max_restarts", f"must be >= 0, got {self.max_restarts}")


class RequestError(ValueError):
    pass


def _priority(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RequestError(f"a priority must be a finite number >= 0, got {value!r}")
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
    identity: bytes
    rid: int
    n: int
    deadline: float


@dataclass
class _PendingInsert:
    identity: bytes
    rid: int
    groups: list
    priorities: list
    deadline: float


class BufferServer:
    def __init__(self, config: BufferConfig, seed: int = 0, version_token: str = ""):
        """`version_token`: when set, only requests carrying it may move the learner version
        (the launcher gives it to the learner alone)."""
        self.config = config
        self._version_token = version_token
        self.table = Table(config.table, seed=seed)
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a gone client fails instead of vanishing
        host = config.host or "127.0.0.1"
        address = f"tcp://{host}:{config.port or '*'}"
        try:
            if config.port:
                self._socket.bind(address)
                self.port = config.port
            else:
                self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            self._socket.close(linger=0)
            key = "buffer.port" if e.errno == zmq.EADDRINUSE else "buffer.host"
            raise ConfigError(key, f"cannot bind {address}: {zmq.strerror(e.errno)}") from None
        self.address = f"tcp://{host}:{self.port}"
        self.incarnation = uuid.uuid4().hex  # new at every start: clients see a restart by it
        self.checkpoint_seq = 0              # table inserts the newest checkpoint holds
        self.restored_from: Path | None = None
        if config.checkpoint_dir and config.restore:
            newest = checkpoint.latest(config.checkpoint_dir)
            if newest is not None:
                self.table.restore(checkpoint.read(newest))
                self.checkpoint_seq, self.restored_from = self.table.stats.inserts, newest
                log.info("buffer: restored %d groups from %s", len(self.table), newest)
        self._next_checkpoint = time.monotonic() + (config.checkpoint_every_s or math.inf)
        self._pending: list[_PendingSample] = []
        self._pending_inserts: list[_PendingInsert] = []  # held by the rate limiter, in arrival order
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self.errors = 0

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
        self._socket.close(linger=0)
        self.check()

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

    def checkpoint(self) -> Path | None:
        """Write the table to checkpoint_dir now (from the serving loop, or while it is not
        running); its path, or None without a checkpoint_dir."""
        if not self.config.checkpoint_dir:
            return None
        path = checkpoint.write(self.config.checkpoint_dir, self.table.state(), keep=self.config.keep_checkpoints)
        self.checkpoint_seq = self.table.stats.inserts
        self._next_checkpoint = time.monotonic() + (self.config.checkpoint_every_s or math.inf)
        return path

    def _serve(self) -> None:
        try:
            self._serve_requests()
        finally:  # stopping, or failing: what is held is saved either way
            if self.config.checkpoint_dir:
                self.checkpoint()

    def _serve_requests(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if time.monotonic() >= self._next_checkpoint:
                self.checkpoint()
            wait_ms = 100
            if self._pending or self._pending_inserts:
                soonest = min(p.deadline for p in self._pending + self._pending_inserts)
                wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
            if poller.poll(wait_ms):
                # Take what has arrived (inserts are seen before the samples waiting behind
                # them), but at most DRAIN_MAX requests: under a steady stream of inserts a
                # drain would never end and the samples would starve.
                for _ in range(DRAIN_MAX):
                    self._handle(self._socket.recv_multipart(copy=False))
                    if not self._socket.poll(0):
                        break
            self._serve_pending()

    # -- requests --------------------------------------------------------------------------
    def _handle(self, frames) -> None:
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
            handler = getattr(self, f"_op_{request['op']}", None)
            if handler is None:
                raise RequestError(f"unknown op {request['op']!r}")
            reply = handler(identity, rid, request)
        except (WireError, SchemaError, RequestError, KeyError, TypeError, ValueError) as e:
            self.errors += 1
            log.warning("buffer: rejected request %d: %s", rid, e)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        except Exception as e:  # a bug met by one request fails that request, not the server
            self.errors += 1
            log.error("buffer: request %d failed", rid, exc_info=True)
            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        if reply is not None:
            self._reply(identity, rid, reply)

    def _reply(self, identity: bytes, rid: int, reply: dict) -> bool:
        """Send a reply; False if its client is gone or not reading, so it was not delivered."""
        reply.setdefault("ok", True)
        # every reply says which server answered and what its newest checkpoint holds, so a
        # client knows which acknowledged groups are safe and when the server restarted
        reply["incarnation"], reply["checkpoint_seq"] = self.incarnation, self.checkpoint_seq
        reply["checkpoints"] = bool(self.config.checkpoint_dir)
        try:
            self._socket.send_multipart([identity, *with_rid(rid, encode(reply))], copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            log.info("buffer: reply to request %d not delivered: %s", rid, e.strerror)
            return False

    def _op_insert(self, identity, rid, request):
        if not isinstance(request["groups"], list):
            raise RequestError("insert needs 'groups', a list of rollout groups")
        groups = []
        for i, data in enumerate(request["groups"]):  # all valid, or none stored
            try:
                groups.append(RolloutGroup.from_wire(data))
            except SchemaError as e:
                raise SchemaError(f"group {i}: {e}") from None
        first = {}
        for i, g in enumerate(groups):
            if first.setdefault(g.id, i) != i:
                raise RequestError(f"group {i}: id {g.id!r} repeats group {first[g.id]}'s")
        priorities = request.get("priorities")
        if priorities is None:
            priorities = [1.0] * len(groups)
        if not isinstance(priorities, list) or len(priorities) != len(groups):
            raise RequestError(f"'priorities' must be a list of one number per group ({len(groups)})")
        priorities = [_priority(p) for p in priorities]
        timeout_s = _number(request, "timeout_s", default=self.config.timeout_s)
        if self._pending_inserts or not self.table.can_insert(len(groups)):  # the rate limiter holds it
            self._pending_inserts.append(_PendingInsert(identity, rid, groups, priorities,
                                                        time.monotonic() + timeout_s))
            return None
        return self._store(groups, priorities)

    def _store(self, groups: list, priorities: list) -> dict:
        stored = [self.table.insert(g, p) for g, p in zip(groups, priorities)]
        return {"stored": stored, "size": len(self.table), "learner_version": self.table.learner_version,
                "seq": self.table.stats.inserts}  # covered once checkpoint_seq reaches it

    def _op_update_priorities(self, identity, rid, request):
        ids, priorities = request.get("ids"), request.get("priorities")
        if not (isinstance(ids, list) and isinstance(priorities, list) and len(ids) == len(priorities)):
            raise RequestError("update_priorities needs 'ids' and 'priorities', lists of one length")
        values = {str(i): _priority(p) for i, p in zip(ids, priorities)}
        return {"updated": self.table.update_priorities(values)}

    def _op_sample(self, identity, rid, request):
        n = _number(request, "n", int)
        timeout_s = _number(request, "timeout_s", default=self.config.timeout_s)
        if not 1 <= n <= self.table.config.max_size:
            raise RequestError(f"sample of n={n} can never be met by a table of max_size "
                               f"{self.table.config.max_size}")
        self._pending.append(_PendingSample(identity, rid, n, time.monotonic() + timeout_s))
        return None  # answered by _serve_pending

    def _op_set_version(self, identity, rid, request):
        if self._version_token and not hmac.compare_digest(str(request.get("token", "")), self._version_token):
            raise RequestError("set_version refused: only the learner may move the version (wrong or missing token)")
        version = _number(request, "version", int)
        if not 0 <= version <= MAX_VERSION:
            raise RequestError(f"set_version refused: version {version} lies outside [0, {MAX_VERSION}]")
        before = self.table.stats.dropped_stale
        self.table.set_learner_version(version)
        return {"learner_version": self.table.learner_version,
                "dropped": self.table.stats.dropped_stale - before}

    def _op_stats(self, identity, rid, request):
        return {**self.table.summary(), "held_inserts": len(self._pending_inserts),
                "waiting_samples": len(self._pending)}

    def _op_checkpoint(self, identity, rid, request):
        if not self.config.checkpoint_dir:
            raise RequestError("this server has no checkpoint_dir")
        return {"path": str(self.checkpoint())}

    def _serve_pending(self) -> None:
        """Answer, first come first served, the samples that can be met and those past their
        deadline. Groups are marked sampled only once their reply is on its way to a connected
        client; a sample whose client is gone takes nothing and is forgotten. (ZeroMQ learns of
        a disconnect within milliseconds on loopback; a client lost in that window, or after
        its reply was sent, loses the groups: there is no delivery receipt.)"""
        now, waiting = time.monotonic(), []
        for p in self._pending_inserts:  # in arrival order: one held insert holds those behind it
            if now >= p.deadline:
                self._reply(p.identity, p.rid, {
                    "ok": False, "error": f"timeout: the rate limiter ({self.table.config.rate_limiter}) held this "
                    f"insert of {len(p.groups)} group(s) past its deadline: the learner is not sampling "
                    f"(size {len(self.table)}, samples {self.table.stats.samples}, inserts {self.table.stats.inserts})"})
            elif not waiting and self.table.can_insert(len(p.groups)):
                self._reply(p.identity, p.rid, self._store(p.groups, p.priorities))
            else:
                waiting.append(p)
        self._pending_inserts = waiting
        still = []
        for p in self._pending:
            if now >= p.deadline:
                self._reply(p.identity, p.rid, {
                    "ok": False, "error": f"timeout: fewer than {p.n} fresh groups arrived in time "
                    f"(size {len(self.table)}, dropped_stale {self.table.stats.dropped_stale})"})
            elif (groups := self.table.select(p.n)) is None:
                still.append(p)
            elif self._reply(p.identity, p.rid, {
                    "groups": [g.to_wire() for g in groups],
                    "staleness": [self.table.staleness(g) for g in groups],
                    "learner_version": self.table.learner_version}):
                self.table.mark_sampled(groups)
        self._pending = still
        if self._pending_inserts and self._pending_inserts[0].deadline > now and \
                self.table.can_insert(len(self._pending_inserts[0].groups)):
            self._serve_pending()  # the samples made room for a held insert
