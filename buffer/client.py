"""The buffer client: a thin layer over the wire with deadlines and idempotent retries.

Each call has a deadline. A call that gets no reply in time closes its socket (dropping
anything queued), reconnects and, if the call is idempotent (insert: ids are unique, so a
re-sent insert is stored once; set_version; stats), sends again, up to `retries` times.
A sample is never re-sent to the same server: it could take groups twice; and since its
socket is closed, the server sees the client gone and the abandoned sample takes nothing.
While a call waits, the client pings every PING_S; if a new server incarnation answers, the
old one died with the request, and the request is put to the new one. An error reply (the
server's reason, for any request, even one it could not decode) raises at once. Failures
raise BufferError naming the server's address and the cause.

Inserts go to the server's main port; every other op goes to its control port (which every
reply names), read by the server before inserts: a learner's sample never queues behind the
actors' inserts. A client's first call, before any reply named it, goes to the main port, and
so does every call made while puts of its own are unacknowledged (they would be overtaken).

Inserts may also be pipelined (`put`, then `flush`): up to `window` requests in flight, each
acknowledged as it lands, with the same deadlines, retries and re-sends (ids are unique, so a
re-sent put is stored once). While the window is full, puts wait and then go together, up to
`coalesce` of them (or COALESCE_BYTES) in one request: the server's cost is as much per
request as per small group, so a writer that outruns it sends fewer, larger requests.
Replies are matched to requests by rid, so a blocking call made while puts are in flight
hands their acknowledgements on instead of dropping them.

Nothing acknowledged is lost to a server restart: inserted groups are kept until a
checkpoint of the server holds them (every reply says what its newest checkpoint holds, and
which server incarnation answered) and re-sent when a new incarnation answers (those its rate
limiter holds, again at each later reply until stored).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import zmq

from buffer.curve import CurveKeys, secure_client
from common.rollout import ARRAY_FIELDS, RolloutGroup
from common.wire import WireError, decode, encode, recv_frames, send_frames, split_rid, with_rid


log = logging.getLogger(__name__)
RESEND_BATCH = 64  # groups per re-sent insert
RESEND_HOLD_S = 1.0  # a re-sent insert the rate limiter holds is tried again at the next reply after this
COALESCE_BYTES = 1 << 20   # puts wait to go together only while smaller: one request is served
                           # whole before the server reads the next (a learner's sample among them)
WINDOW = 4        # pipelined insert requests in flight (put)
COALESCE = 128    # puts in one request at most: the put that makes this many wait waits for room
# With 8 writers of 4 KiB groups on two cores, puts went ~3 to a request with a window of 16
# (each put sent alone while the window had room), and the server, paying ~45 µs a request,
# took 8.9k groups/s; waiting puts going up to 128 together took 16-20k (docs/benchmarks.md).
PING_S = 2.0       # a long wait for a reply checks this often that the same server still lives
# The requests and replies' form, counted up at each change an older peer would misread (2:
# groups travel as one batch of columns, RolloutGroup.batch_to_wire). Every request and reply
# says its own; a server refuses a request of another, a client a reply of another, naming both.
PROTOCOL = 2
PING = encode({"op": "ping", "protocol": PROTOCOL})
ROLLOUTS = "rollouts"  # the table the actors insert into and the learner samples (buffer/server.py)


def _grace(timeout_s: float) -> float:
    """Time past a server-side deadline for its error reply to arrive."""
    return min(10.0, 1.0 + timeout_s)


class BufferError(RuntimeError):
    """The buffer server refused a request, did not answer in time, or stopped serving."""


class BufferTimeout(BufferError):
    pass


class BufferHeld(BufferError):
    """The table's rate limiter held an insert past its deadline. `stored`: one bool per group
    of the request stored before the deadline (a prefix; the rest were not)."""

    def __init__(self, message: str, reply: dict):
        super().__init__(message)
        self.reply, self.stored = reply, list(reply.get("stored", []))


class BufferRefused(BufferError):
    """Pipelined inserts that the server refused (malformed, unknown table) or held past their
    deadline, since the last flush; the other puts were acknowledged. `refused`: [(index of
    the put since the last flush, its group ids, the server's reason)]."""

    def __init__(self, message: str, refused: list):
        super().__init__(message)
        self.refused = refused


@dataclass(eq=False)
class _Put:
    """One put: stored whole or refused alone, even when it travels with others."""
    index: int          # its number among the puts since the last flush
    groups: tuple
    wire: list          # the groups' wire forms (to_wire, at the put: they refer to the groups' arrays and lists)
    priorities: list | None


@dataclass(eq=False)
class _Request:
    """Puts sent together as one insert request, until its reply lands."""
    message: list       # the encoded request, re-sent as it is
    puts: list
    table: str
    attempts: int = 0   # sends after a reconnect count; re-sends to a restarted server do not
    deadline: float = 0.0
    asked: str | None = None   # the incarnation it was last sent to
    rids: list = field(default_factory=list)   # of every send; the first reply to land wins


class BufferClient:
    def __init__(self, address: str, timeout_s: float = 120.0, retries: int = 3, version_token: str = "",
                 curve_keys: CurveKeys | None = None, window: int = WINDOW, coalesce: int = COALESCE):
        """`curve_keys`: the job's CurveZMQ client keys, for a server with buffer.curve=true;
        None takes them from ASYNCRL_BUFFER_CURVE when it is set (buffer/curve.py). `window`:
        pipelined insert requests (put) in flight at most; `coalesce`: puts that wait for room
        in it, at most, to go together as one request."""
        self.address = address
        self.curve_keys = curve_keys if curve_keys is not None else CurveKeys.from_env()
        self.version_token = version_token  # what set_learner_version shows the server
        self.timeout_s = timeout_s
        self.retries = retries
        self._context = zmq.Context.instance()
        self._socket = None
        self._control = None       # connected once a reply names the server's control port
        self._control_port = None
        self._poller = None
        self._rids = itertools.count(1)
        self._incarnation = None   # of the server that answered last
        self._unsaved: list = []   # [incarnation, seq, table, group]: acknowledged, no checkpoint holds it yet
        self.resent_groups = 0
        if window < 1 or coalesce < 1:
            raise ValueError(f"buffer client: window and coalesce must be >= 1, got {window} and {coalesce}")
        self.window, self.coalesce = window, coalesce
        self._flying: dict[int, _Request] = {}   # rid -> unacknowledged request (a re-sent one has several)
        self.in_flight = 0                       # unacknowledged requests of puts
        self.pending_puts = 0                    # puts not acknowledged yet: waiting here or in flight
        self._queued: list = []                  # (put, table): waiting for room in the window
        self._queued_bytes = 0                   # their arrays
        self._flushed = {"puts": 0, "stored": 0, "duplicates": 0}   # since the last flush
        self._refused: list = []             # BufferRefused.refused, since the last flush
        self._ping_rid = None
        self._connect()

    def _connect(self) -> None:
        """(Re)connect to the main port and, once known, the control port; what was queued on
        the old connections is dropped."""
        self.close()
        self._socket = self._open(self.address)
        self._poller = zmq.Poller()   # the ports a reply may come on
        self._poller.register(self._socket, zmq.POLLIN)
        if self._control_port is not None:
            self._connect_control()

    def _open(self, address: str):
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self.curve_keys is not None:
            secure_client(socket, self.curve_keys)
        socket.connect(address)
        return socket

    def close(self) -> None:
        """Close the connection; puts not yet acknowledged are given up (flush() first)."""
        for socket in (self._socket, self._control):
            if socket is not None:
                socket.close(linger=0)
        self._socket = self._control = None

    def _call(self, op: str, deadline_s: float | None = None, idempotent: bool = True, **fields) -> dict:
        timeout_s = self.timeout_s if deadline_s is None else deadline_s
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"buffer {op}: timeout_s must be a finite number of seconds > 0, got {timeout_s}")
        message = encode({"op": op, "protocol": PROTOCOL, **fields})
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            rid = next(self._rids)
            deadline = time.monotonic() + timeout_s
            if not self._send(with_rid(rid, message), deadline, self._socket_for(op)):
                self._reconnect()
                continue
            # A request may wait long (a sample, an insert the rate limiter holds); a server that
            # died and restarted meanwhile forgot it. Pings every PING_S find that out (a new
            # incarnation answers), and the request is put to the new server for the time left.
            asked, next_ping = self._incarnation, time.monotonic() + PING_S
            while (left := deadline - time.monotonic()) > 0:
                got = self._receive(max(0.0, min(left, next_ping - time.monotonic())))
                if got is None:
                    if time.monotonic() >= next_ping:
                        next_ping = time.monotonic() + PING_S
                        self._ping()
                    continue
                reply_rid, reply = got
                if reply_rid == self._ping_rid and isinstance(reply, dict):
                    incarnation = reply.get("incarnation")
                    self._pong(incarnation)
                    if asked is None:   # a first call: the server that answers now
                        asked = incarnation
                    elif incarnation != asked:
                        asked, rid = incarnation, next(self._rids)   # ask the new server
                        self._send(with_rid(rid, message), deadline, self._socket_for(op))
                    continue
                if reply_rid != rid:
                    self._dispatch(reply_rid, reply)   # a put's acknowledgement, or a late reply
                    continue
                if not isinstance(reply, dict) or not reply.get("ok"):
                    error = reply.get("error") if isinstance(reply, dict) else reply
                    if isinstance(reply, dict) and reply.get("held"):
                        self._observe(reply)
                        raise BufferHeld(f"buffer at {self.address} held {op}: {error}", reply)
                    raise BufferError(f"buffer at {self.address} refused {op}: {error}")
                self._observe(reply)
                return reply
            self._reconnect()  # drop whatever is queued on the dead connection
        raise BufferTimeout(f"buffer at {self.address} did not answer {op} within {timeout_s:.1f}s "
                            f"({attempts} attempt(s)); {self._hint()}")

    def _socket_for(self, op: str):
        """Inserts (and the actors' room requests) go to the main port, the other ops to the
        control port once it is known,
        unless puts of this client are unacknowledged: the server reads the control port
        first, and a client's own requests are served in the order it sent them."""
        if op in ("insert", "room") or self._control is None or self._flying or self._queued:
            return self._socket
        return self._control

    def _receive(self, wait_s: float):
        """The next reply, from either port, as (rid, decoded header), or None if none comes
        within wait_s."""
        timeout_ms = int(wait_s * 1000) + 1 if wait_s > 0 else 0
        ready = dict(self._poller.poll(timeout_ms))
        socket = self._control if self._control in ready else self._socket if self._socket in ready else None
        if socket is None:
            return None
        try:
            rid, body = split_rid(recv_frames(socket))
            reply = decode(body)
        except WireError as e:
            raise BufferError(f"buffer at {self.address} sent a malformed reply: {e}") from None
        if not (isinstance(reply, dict) and reply.get("protocol") == PROTOCOL):
            theirs = reply.get("protocol", "1 (none named)") if isinstance(reply, dict) else "unknown"
            raise BufferError(f"buffer at {self.address} answers in protocol {theirs}, this client speaks "
                              f"{PROTOCOL}: run the buffer and its clients from the same asyncrl version")
        if isinstance(reply, dict) and reply.get("control_port") != self._control_port:
            port = reply.get("control_port")
            if type(port) is int and 0 < port < 65536:   # a new server's: connect to it
                self._control_port = port
                self._connect_control()
        return rid, reply

    def _connect_control(self) -> None:
        """(Re)connect the control port alone: the main connection keeps its puts in flight."""
        if self._control is not None:
            self._poller.unregister(self._control)
            self._control.close(linger=0)
        self._control = self._open(f"{self.address.rsplit(':', 1)[0]}:{self._control_port}")
        self._poller.register(self._control, zmq.POLLIN)

    def _ping(self) -> None:
        self._ping_rid = next(self._rids)
        try:   # never block here: with no server connected, a ping is skipped
            send_frames(self._socket, with_rid(self._ping_rid, PING), block=False)
        except zmq.Again:
            pass

    def _reconnect(self) -> None:
        """A new connection (the old one's queue is dropped); the puts in flight go again."""
        self._connect()
        for request in self._unacknowledged():
            self._send_request(request, block=False)

    def _send(self, parts: list, deadline: float, socket=None) -> bool:
        """Send by the deadline, on the main connection unless `socket` is given; False when no
        connection takes the message in time (no server up, or one whose CurveZMQ handshake
        refuses this client): a blocking send would wait for a connection for ever."""
        socket = self._socket if socket is None else socket
        left = deadline - time.monotonic()   # <= 0: only if the connection takes it at once
        if not socket.poll(int(left * 1000) + 1 if left > 0 else 0, zmq.POLLOUT):
            return False
        try:
            send_frames(socket, parts, block=False)
            return True
        except zmq.Again:
            return False

    def _hint(self) -> str:
        if self.curve_keys is not None:
            return "is the server running, with buffer.curve=true and this job's CurveZMQ keys?"
        return "is the server running (and without buffer.curve, which answers only clients with its keys)?"

    def _observe(self, reply: dict) -> None:
        """Forget the acknowledged groups the server's newest checkpoint holds; re-send those a
        restarted server (a new incarnation) may have lost: once, or, those its rate limiter
        held, again at each later reply until stored."""
        incarnation, covered = reply.get("incarnation"), reply.get("checkpoint_seq", 0)
        first, restarted = self._incarnation is None, self._incarnation not in (None, incarnation)
        self._incarnation = incarnation
        if self._flying and (first or restarted):
            self._pong(incarnation)
        if not self._unsaved:
            return
        # kept: this server's groups no checkpoint covers yet; lost: those acknowledged by an
        # earlier incarnation (a restart, or a re-send that was held and is owed still)
        kept, lost = [], []
        for u in self._unsaved:
            if u[0] != incarnation:
                lost.append(u)
            elif u[1] > covered:
                kept.append(u)
        self._unsaved = kept
        tables = list(dict.fromkeys(u[2] for u in lost))
        lost.sort(key=lambda u: tables.index(u[2]))   # stable: each table's groups in their order
        sent = 0
        while sent < len(lost):
            table = lost[sent][2]
            batch = [u for u in lost[sent:sent + RESEND_BATCH] if u[2] == table]
            try:   # ids are unique: what the server still holds is refused once
                self.insert(*[u[3] for u in batch], table=table, hold_s=RESEND_HOLD_S)
            except (BufferHeld, BufferTimeout) as e:
                # What was not stored stays owed, under its old incarnation, and the next reply
                # re-sends it (a restored queue may be full until the learner samples); the
                # call whose reply this is goes on.
                stored = len(e.stored) if isinstance(e, BufferHeld) else 0
                self._unsaved += lost[sent + stored:]
                self.resent_groups += stored
                log.info("buffer at %s: %d group(s) still to re-send: %s", self.address, len(lost) - sent - stored, e)
                return
            except BufferError as e:   # refused (the restarted server lacks its table?): never storable
                log.error("buffer at %s refused %d re-sent group(s) of table %r, given up: %s",
                          self.address, len(batch), table, e)
                sent += len(batch)
                continue
            sent += len(batch)
            self.resent_groups += len(batch)

    def insert(self, *groups: RolloutGroup, priorities: list | None = None, timeout_s: float | None = None,
               table: str = ROLLOUTS, hold_s: float | None = None) -> dict:
        """Store groups in one request into `table`: all or, if any is malformed, none. Returns
        {stored: [bool per group; False for an id stored before], size, learner_version}.
        An insert the table's rate limiter holds waits up to `hold_s` (default timeout_s), then
        raises BufferHeld saying how many went in. Each attempt waits up to timeout_s for the
        reply. Until a checkpoint of the server holds them, the groups are kept here, and
        re-sent to a server that restarted (from its newest checkpoint) in the meantime."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        hold_s = timeout_s if hold_s is None else hold_s
        fields = {**RolloutGroup.wire_field([g.to_wire() for g in groups]), "timeout_s": hold_s, "table": table}
        if priorities is not None:
            fields["priorities"] = [float(p) for p in priorities]
        # the server answers an insert its rate limiter holds past hold_s; give the reply time
        try:
            reply = self._call("insert", deadline_s=max(timeout_s, hold_s + _grace(hold_s)), **fields)
        except BufferHeld as e:   # what it stored before the deadline is acknowledged all the same
            self._keep(e.reply, groups[:len(e.stored)], table)
            raise
        self._keep(reply, groups, table)
        return reply

    def room(self, hold_s: float | None = None, table: str = ROLLOUTS) -> dict:
        """Wait until `table`'s rate limiter would take one more group without holding it (after
        the inserts it holds). Returns {room: how many it would take now (None: it never holds
        an insert), published_version, size, learner_version}, as an insert's reply carries
        them. Past hold_s (default timeout_s) raises BufferHeld."""
        hold_s = self.timeout_s if hold_s is None else hold_s
        return self._call("room", deadline_s=max(self.timeout_s, hold_s + _grace(hold_s)), timeout_s=hold_s,
                          table=table)

    def _keep(self, reply: dict, groups, table: str) -> None:
        """Keep acknowledged groups until a checkpoint of a checkpointing server holds them."""
        if reply.get("checkpoints"):
            self._unsaved += [[reply["incarnation"], reply["seq"], table, g] for g in groups]

    # -- pipelined inserts ------------------------------------------------------------------
    def put(self, *groups: RolloutGroup, priorities: list | None = None, table: str = ROLLOUTS) -> None:
        """Insert `groups` into `table` without waiting for the reply: sent at once while fewer
        than `window` requests are unacknowledged; while `window` are, the puts made meanwhile
        wait here (until `coalesce` of them or COALESCE_BYTES wait: then put waits until half
        the window has landed) and go together, as one request, with the next put that finds
        room, or at flush(): a writer that stops putting flushes. Each put is stored
        whole or, if malformed, refused alone; a refusal, or a hold by the rate limiter past
        timeout_s, is raised by flush(). Acknowledged groups are kept until a checkpoint holds
        them, as insert()'s are."""
        if priorities is not None and len(priorities) != len(groups):
            raise ValueError(f"buffer put: {len(priorities)} priorities for {len(groups)} groups")
        self._take_replies()
        if self._queued and self._queued[0][1] != table:   # a request names one table
            self._send_queued()
        put = _Put(self._flushed["puts"], groups, [g.to_wire() for g in groups],
                   None if priorities is None else [float(p) for p in priorities])
        self._flushed["puts"] += 1
        self.pending_puts += 1
        self._queued.append((put, table))
        self._queued_bytes += sum(getattr(g, name).nbytes for g in groups for name in ARRAY_FIELDS)
        if self.in_flight < self.window or len(self._queued) >= self.coalesce or self._queued_bytes >= COALESCE_BYTES:
            self._send_queued()

    def flush(self) -> dict:
        """Send what waits and wait until every put is acknowledged. Returns, since the last
        flush, {puts, stored: groups stored, duplicates: groups whose id was stored before};
        raises BufferRefused naming the puts the server refused or held (the others are stored
        all the same), and BufferTimeout if a request stays unacknowledged through every retry
        (the puts still unacknowledged are then given up)."""
        if self._queued:
            self._send_queued()
        self._await(lambda: self.in_flight == 0)
        done, refused = self._flushed, self._refused
        self._flushed, self._refused = {"puts": 0, "stored": 0, "duplicates": 0}, []
        if refused:
            index, ids, error = refused[0]
            raise BufferRefused(f"buffer at {self.address} refused {len(refused)} of {done['puts']} pipelined "
                                f"inserts; the first, put {index} (groups {ids}): {error}", refused)
        return done

    def _send_queued(self) -> None:
        """The waiting puts as one request, once the window has room: when it is full, after
        half of it has landed, so that replies are taken and requests sent in bursts (one
        wake-up for several, not one each)."""
        if self.in_flight >= self.window:
            self._await(lambda: self.in_flight <= self.window // 2)
        puts, table = [p for p, _ in self._queued], self._queued[0][1]
        fields = {**RolloutGroup.wire_field([w for p in puts for w in p.wire]), "parts": [len(p.groups) for p in puts],
                  "timeout_s": self.timeout_s, "table": table}
        if any(p.priorities is not None for p in puts):
            fields["priorities"] = [x for p in puts for x in (p.priorities or [1.0] * len(p.groups))]
        self._queued, self._queued_bytes = [], 0   # once the request is made: a failure above loses no put
        self.in_flight += 1
        self._send_request(_Request(encode({"op": "insert", "protocol": PROTOCOL, **fields}), puts, table), block=True)

    def _take_replies(self) -> None:
        while (got := self._receive(0)) is not None:   # the acknowledgements that are here already
            self._dispatch(*got)

    def _await(self, done) -> None:
        """Take replies until done(); re-send the requests past their deadline on a new
        connection (BufferTimeout once one has used its retries) and, as pings or replies find
        a restarted server, those the old one took with it."""
        next_ping = time.monotonic() + PING_S
        while not done():
            now = time.monotonic()
            due = min(r.deadline for r in self._flying.values())
            if now >= due:
                self._retry()
                continue
            got = self._receive(min(due, next_ping) - now)
            if got is not None:
                self._dispatch(*got)
            elif time.monotonic() >= next_ping:
                next_ping = time.monotonic() + PING_S
                self._ping()

    def _retry(self) -> None:
        requests = self._unacknowledged()
        if any(r.attempts > self.retries for r in requests):
            lost = sum(len(r.puts) for r in requests) + len(self._queued)
            self._flying, self._queued, self._queued_bytes, self.in_flight, self.pending_puts = {}, [], 0, 0, 0
            self._flushed, self._refused = {"puts": 0, "stored": 0, "duplicates": 0}, []
            self._connect()
            raise BufferTimeout(f"buffer at {self.address} did not acknowledge {lost} pipelined insert(s) "
                                f"within {self.timeout_s:.1f}s ({1 + self.retries} attempt(s)); {self._hint()}")
        for r in requests:
            r.attempts += 1
        self._reconnect()

    def _send_request(self, request: _Request, block: bool) -> None:
        """Send a request on the current connection, due back by timeout_s (and the time the
        server may hold it). Unsent (no connection took it): past due at once, so _await retries it."""
        if not request.rids:
            request.attempts = 1
        rid = next(self._rids)
        request.rids.append(rid)
        request.asked, self._flying[rid] = self._incarnation, request
        request.deadline = time.monotonic() + self.timeout_s + _grace(self.timeout_s)
        if not self._send(with_rid(rid, request.message), request.deadline if block else time.monotonic()):
            request.deadline = time.monotonic()

    def _unacknowledged(self) -> list:
        return list(dict.fromkeys(self._flying.values()))   # each request once, in the order sent

    def _dispatch(self, rid: int, reply) -> None:
        """A reply no blocking call waits for: a request's of puts, a ping's, or a late reply
        to an abandoned attempt (dropped)."""
        request = self._flying.get(rid)
        if request is None:
            if rid == self._ping_rid and isinstance(reply, dict):
                self._pong(reply.get("incarnation"))
            return
        for r in request.rids:
            self._flying.pop(r, None)
        self.in_flight -= 1
        self.pending_puts -= len(request.puts)
        if not isinstance(reply, dict):
            reply = {"ok": False, "error": f"a reply that is not a map: {reply!r:.80}"}
        if reply.get("ok") or reply.get("held"):
            self._observe(reply)
        if not reply.get("ok") and not reply.get("held"):   # the whole request was refused
            self._refused += [(p.index, [g.id for g in p.groups], reply.get("error")) for p in request.puts]
            return
        refused = {k: reason for k, reason in reply.get("refused", [])}
        stored, at = reply.get("stored", []), 0   # one bool per group of the puts not refused, a prefix if held
        for k, put in enumerate(request.puts):
            if k in refused:
                self._refused.append((put.index, [g.id for g in put.groups], refused[k]))
                continue
            landed = stored[at:at + len(put.groups)]
            at += len(put.groups)
            self._keep(reply, put.groups[:len(landed)], request.table)
            self._flushed["stored"] += sum(map(bool, landed))
            self._flushed["duplicates"] += len(landed) - sum(map(bool, landed))
            if len(landed) < len(put.groups):   # held past its deadline: the rest never went in
                self._refused.append((put.index, [g.id for g in put.groups], reply.get("error")))

    def _pong(self, incarnation) -> None:
        """Re-send the requests sent to an older server than the one answering now: it died
        with them (or they wait, queued, for the new one, which then refuses the second copy)."""
        for request in self._unacknowledged():
            if request.asked is None:
                request.asked = incarnation
            elif request.asked != incarnation:
                self._send_request(request, block=False)

    def update_priorities(self, priorities: dict, table: str = ROLLOUTS) -> dict:
        """Set the priorities of groups by id ({id: priority}); {updated: how many are held}."""
        return self._call("update_priorities", ids=list(priorities), priorities=[float(p) for p in priorities.values()],
                          table=table)

    @property
    def unsaved(self) -> int:
        """Acknowledged groups no checkpoint holds yet (kept for a restarted server)."""
        return len(self._unsaved)

    def checkpoint(self, timeout_s: float | None = None) -> dict:
        """Ask the server to write a checkpoint now: {path}."""
        return self._call("checkpoint", deadline_s=timeout_s)

    def sample(self, n: int, timeout_s: float | None = None,
               table: str = ROLLOUTS) -> tuple[list[RolloutGroup], list[int], int]:
        """Wait up to timeout_s for n fresh groups of `table` (as its selector and rate limiter
        allow); returns (groups, staleness, learner_version)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        # The server answers a sample it cannot meet at its own deadline; give the reply time to come.
        reply = self._call("sample", deadline_s=timeout_s + 10.0, idempotent=False, n=n, timeout_s=timeout_s,
                           table=table)
        groups = RolloutGroup.from_field(reply)
        return groups, list(reply["staleness"]), int(reply["learner_version"])

    def set_learner_version(self, version: int, published: int | None = None) -> dict:
        """Move the learner version; `published`: the newest weights version sent to the
        actors, if not this one (trainer.publish_lag)."""
        fields = {} if published is None else {"published": int(published)}
        return self._call("set_version", version=int(version), token=self.version_token, **fields)

    def stats(self, table: str = ROLLOUTS, timeout_s: float | None = None) -> dict:
        """`table`'s counters (buffer/table.py summary) and `tables`: every table's, by name."""
        return self._call("stats", deadline_s=timeout_s, table=table)

    def info(self) -> dict:
        """{tables: {name: {config, size}}, learner_version}."""
        return self._call("info")
