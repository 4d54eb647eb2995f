"""The buffer server: one Table behind a ZeroMQ ROUTER socket.

Requests and replies are wire messages (common/wire.py) whose header is a map with `op` and
`rid` (the client's request id, echoed back). Ops:
  insert      {groups}           -> {stored: one bool per group, size, learner_version}
  sample      {n, timeout_s}     -> {groups, staleness, learner_version}; waits for n groups
  set_version {version}          -> {learner_version, dropped}
  stats       {}                 -> the table's summary
Every reply has `ok`; a failed request gets ok=false and `error` naming the problem, and the
server keeps serving. A sample that cannot be met before its deadline gets an error reply.
The loop is single-threaded: the socket and the table are touched only by it.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import zmq

from buffer.table import Table, TableConfig
from common.config import check
from common.rollout import RolloutGroup, SchemaError
from common.wire import WireError, decode, encode

log = logging.getLogger(__name__)


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
    table: TableConfig = field(default_factory=TableConfig)

    def validate(self):
        check(0 <= self.port < 65536, "port", f"must lie in [0, 65535], got {self.port}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
        check(self.max_message_mb > 0, "max_message_mb", "must be > 0")


class RequestError(ValueError):
    pass


@dataclass
class _PendingSample:
    identity: bytes
    rid: int
    n: int
    deadline: float


class BufferServer:
    def __init__(self, config: BufferConfig, seed: int = 0):
        self.config = config
        self.table = Table(config.table, seed=seed)
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 0)
        host = config.host or "127.0.0.1"
        if config.port:
            self._socket.bind(f"tcp://{host}:{config.port}")
            self.port = config.port
        else:
            self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{self.port}"
        self._pending: list[_PendingSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "BufferServer":
        self._thread = threading.Thread(target=self.serve, name="buffer-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"buffer server at {self.address} did not stop within {timeout_s}s")
        self._socket.close(linger=0)

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            wait_ms = 100
            if self._pending:
                soonest = min(p.deadline for p in self._pending)
                wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
            if poller.poll(wait_ms):
                # Drain what has arrived before serving samples, so inserts are seen first.
                while self._socket.poll(0):
                    self._handle(self._socket.recv_multipart(copy=False))
            self._serve_pending()

    # -- requests --------------------------------------------------------------------------
    def _handle(self, frames) -> None:
        identity, body = frames[0].bytes, frames[1:]
        rid = None
        try:
            size = sum(len(f) for f in body)
            if size > self.config.max_message_mb * 1e6:
                raise RequestError(f"message of {size / 1e6:.1f} MB exceeds "
                                   f"max_message_mb={self.config.max_message_mb}")
            request = decode(body)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise RequestError("request must be a map with a string 'op'")
            rid = request.get("rid")
            handler = getattr(self, f"_op_{request['op']}", None)
            if handler is None:
                raise RequestError(f"unknown op {request['op']!r}")
            reply = handler(identity, request)
        except (WireError, SchemaError, RequestError, KeyError, TypeError, ValueError) as e:
            self.errors += 1
            log.warning("buffer: rejected a request: %s", e)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        if reply is not None:
            self._reply(identity, rid, reply)

    def _reply(self, identity: bytes, rid, reply: dict) -> None:
        reply.setdefault("ok", True)
        reply["rid"] = rid
        self._socket.send_multipart([identity, *encode(reply)], copy=False)

    def _op_insert(self, identity, request):
        if not isinstance(request["groups"], list):
            raise RequestError("insert needs 'groups', a list of rollout groups")
        groups = []
        for i, data in enumerate(request["groups"]):  # all valid, or none stored
            try:
                groups.append(RolloutGroup.from_wire(data))
            except SchemaError as e:
                raise SchemaError(f"group {i}: {e}") from None
        stored = [self.table.insert(g) for g in groups]
        return {"stored": stored, "size": len(self.table), "learner_version": self.table.learner_version}

    def _op_sample(self, identity, request):
        n, timeout_s = int(request["n"]), float(request.get("timeout_s", self.config.timeout_s))
        if not 1 <= n <= self.table.config.max_size:
            raise RequestError(f"sample of n={n} can never be met by a table of max_size "
                               f"{self.table.config.max_size}")
        self._pending.append(_PendingSample(identity, request.get("rid"), n, time.monotonic() + timeout_s))
        return None  # answered by _serve_pending

    def _op_set_version(self, identity, request):
        before = self.table.stats.dropped_stale
        self.table.set_learner_version(int(request["version"]))
        return {"learner_version": self.table.learner_version,
                "dropped": self.table.stats.dropped_stale - before}

    def _op_stats(self, identity, request):
        return self.table.summary()

    def _serve_pending(self) -> None:
        now, still = time.monotonic(), []
        for p in self._pending:  # first come, first served
            groups = self.table.sample(p.n)
            if groups is not None:
                self._reply(p.identity, p.rid, {
                    "groups": [g.to_wire() for g in groups],
                    "staleness": [self.table.staleness(g) for g in groups],
                    "learner_version": self.table.learner_version})
            elif now >= p.deadline:
                self._reply(p.identity, p.rid, {
                    "ok": False, "error": f"timeout: fewer than {p.n} fresh groups arrived in time "
                    f"(size {len(self.table)}, dropped_stale {self.table.stats.dropped_stale})"})
            else:
                still.append(p)
        self._pending = still
