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

Nothing acknowledged is lost to a server restart: inserted groups are kept until a
checkpoint of the server holds them (every reply says what its newest checkpoint holds, and
which server incarnation answered) and re-sent, once, when a new incarnation answers.
"""
from __future__ import annotations

import itertools
import math
import time

import zmq

from buffer.curve import CurveKeys, secure_client
from common.rollout import RolloutGroup
from common.wire import WireError, decode, encode, split_rid, with_rid


RESEND_BATCH = 64  # groups per re-sent insert
PING_S = 2.0       # a long wait for a reply checks this often that the same server still lives
PING = encode({"op": "ping"})
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


class BufferClient:
    def __init__(self, address: str, timeout_s: float = 120.0, retries: int = 3, version_token: str = "",
                 curve_keys: CurveKeys | None = None):
        """`curve_keys`: the job's CurveZMQ client keys, for a server with buffer.curve=true;
        None takes them from ASYNCRL_BUFFER_CURVE when it is set (buffer/curve.py)."""
        self.address = address
        self.curve_keys = curve_keys if curve_keys is not None else CurveKeys.from_env()
        self.version_token = version_token  # what set_learner_version shows the server
        self.timeout_s = timeout_s
        self.retries = retries
        self._context = zmq.Context.instance()
        self._socket = None
        self._rids = itertools.count(1)
        self._incarnation = None   # of the server that answered last
        self._unsaved: list = []   # [incarnation, seq, table, group]: acknowledged, no checkpoint holds it yet
        self.resent_groups = 0
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if self.curve_keys is not None:
            secure_client(self._socket, self.curve_keys)
        self._socket.connect(self.address)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _call(self, op: str, deadline_s: float | None = None, idempotent: bool = True, **fields) -> dict:
        timeout_s = self.timeout_s if deadline_s is None else deadline_s
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"buffer {op}: timeout_s must be a finite number of seconds > 0, got {timeout_s}")
        message = encode({"op": op, **fields})
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            rid = next(self._rids)
            deadline = time.monotonic() + timeout_s
            if not self._send(with_rid(rid, message), deadline):
                self._connect()
                continue
            # A request may wait long (a sample, an insert the rate limiter holds); a server that
            # died and restarted meanwhile forgot it. Pings every PING_S find that out (a new
            # incarnation answers), and the request is put to the new server for the time left.
            asked, ping_rid, next_ping = self._incarnation, None, time.monotonic() + PING_S
            while (left := deadline - time.monotonic()) > 0:
                wait = max(0.0, min(left, next_ping - time.monotonic()))
                if not self._socket.poll(int(wait * 1000) + 1):
                    if time.monotonic() >= next_ping:
                        ping_rid, next_ping = next(self._rids), time.monotonic() + PING_S
                        try:   # never block here: with no server connected, a ping is skipped
                            self._socket.send_multipart(with_rid(ping_rid, PING), copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            pass
                    continue
                try:
                    reply_rid, body = split_rid(self._socket.recv_multipart(copy=False))
                    if reply_rid == ping_rid and ping_rid is not None:
                        pong = decode(body)
                        if asked is None and isinstance(pong, dict):   # a first call: the server that answers now
                            asked = pong.get("incarnation")
                        elif isinstance(pong, dict) and pong.get("incarnation") != asked:
                            asked, rid = pong.get("incarnation"), next(self._rids)   # ask the new server
                            self._send(with_rid(rid, message), deadline)
                        continue
                    if reply_rid != rid:
                        continue  # a late reply to an abandoned attempt
                    reply = decode(body)
                except WireError as e:
                    raise BufferError(f"buffer at {self.address} sent a malformed reply to {op}: {e}") from None
                if not isinstance(reply, dict) or not reply.get("ok"):
                    error = reply.get("error") if isinstance(reply, dict) else reply
                    if isinstance(reply, dict) and reply.get("held"):
                        self._observe(reply)
                        raise BufferHeld(f"buffer at {self.address} held {op}: {error}", reply)
                    raise BufferError(f"buffer at {self.address} refused {op}: {error}")
                self._observe(reply)
                return reply
            self._connect()  # drop whatever is queued on the dead connection
        raise BufferTimeout(f"buffer at {self.address} did not answer {op} within {timeout_s:.1f}s "
                            f"({attempts} attempt(s)); {self._hint()}")

    def _send(self, parts: list, deadline: float) -> bool:
        """Send by the deadline; False when no connection takes the message in time (no server
        up, or one whose CurveZMQ handshake refuses this client): a blocking send would wait
        for a connection for ever."""
        left = deadline - time.monotonic()
        if left <= 0 or not self._socket.poll(int(left * 1000) + 1, zmq.POLLOUT):
            return False
        try:
            self._socket.send_multipart(parts, copy=False, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _hint(self) -> str:
        if self.curve_keys is not None:
            return "is the server running, with buffer.curve=true and this job's CurveZMQ keys?"
        return "is the server running (and without buffer.curve, which answers only clients with its keys)?"

    def _observe(self, reply: dict) -> None:
        """Forget the acknowledged groups the server's newest checkpoint holds; re-send, once,
        those a restarted server (a new incarnation) may have lost."""
        incarnation, covered = reply.get("incarnation"), reply.get("checkpoint_seq", 0)
        restarted = self._incarnation is not None and incarnation != self._incarnation
        self._incarnation = incarnation
        self._unsaved = [u for u in self._unsaved if u[0] != incarnation or u[1] > covered]
        if restarted:
            lost = [u for u in self._unsaved if u[0] != incarnation]
            self._unsaved = [u for u in self._unsaved if u[0] == incarnation]
            for table in dict.fromkeys(u[2] for u in lost):
                groups = [u[3] for u in lost if u[2] == table]
                for i in range(0, len(groups), RESEND_BATCH):  # ids are unique: what it still holds is refused once
                    self.insert(*groups[i:i + RESEND_BATCH], table=table)
            self.resent_groups += len(lost)

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
        fields = {"groups": [g.to_wire() for g in groups], "timeout_s": hold_s, "table": table}
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

    def _keep(self, reply: dict, groups, table: str) -> None:
        """Keep acknowledged groups until a checkpoint of a checkpointing server holds them."""
        if reply.get("checkpoints"):
            self._unsaved += [[reply["incarnation"], reply["seq"], table, g] for g in groups]

    def insert_many(self, batches: list, window: int = 16, timeout_s: float | None = None,
                    table: str = ROLLOUTS) -> list:
        """insert() for many requests (each a list of groups) with up to `window` of them in
        flight, acknowledged as they land; the replies in order. An attempt that gets no reply
        by its deadline reconnects and re-sends what is unacknowledged (ids are unique, so a
        request the server had stored is refused, not stored twice)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        messages = [encode({"op": "insert", "groups": [g.to_wire() for g in groups], "timeout_s": timeout_s,
                            "table": table}) for groups in batches]
        replies: list = [None] * len(messages)
        for attempt in range(1 + self.retries):
            todo = [i for i, r in enumerate(replies) if r is None]
            flying: dict = {}  # rid -> index
            deadline = time.monotonic() + timeout_s + _grace(timeout_s)
            while todo or flying:
                while todo and len(flying) < window:
                    i = todo.pop(0)
                    rid = next(self._rids)
                    if not self._send(with_rid(rid, messages[i]), deadline):
                        todo.insert(0, i)
                        break
                    flying[rid] = i
                if todo and not flying:
                    break   # nothing could be sent before the deadline: a new connection, next attempt
                left = deadline - time.monotonic()
                if left <= 0 or not self._socket.poll(int(left * 1000) + 1):
                    break
                try:
                    rid, body = split_rid(self._socket.recv_multipart(copy=False))
                    reply = decode(body)
                except WireError as e:
                    raise BufferError(f"buffer at {self.address} sent a malformed reply to insert: {e}") from None
                i = flying.pop(rid, None)
                if i is None:
                    continue  # a late reply to an abandoned attempt
                if not isinstance(reply, dict) or not reply.get("ok"):
                    error = reply.get("error") if isinstance(reply, dict) else reply
                    raise BufferError(f"buffer at {self.address} refused insert: {error}")
                self._observe(reply)
                self._keep(reply, batches[i], table)
                replies[i] = reply
                deadline = time.monotonic() + timeout_s + _grace(timeout_s)  # each landing restarts the clock
            if all(r is not None for r in replies):
                return replies
            self._connect()
        missing = sum(r is None for r in replies)
        raise BufferTimeout(f"buffer at {self.address} did not acknowledge {missing} of {len(replies)} inserts "
                            f"within {timeout_s:.1f}s ({1 + self.retries} attempt(s)); {self._hint()}")

    def update_priorities(self, priorities: dict, table: str = ROLLOUTS) -> dict:
        """Set the priorities of groups by id ({id: priority}); {updated: how many are held}."""
        return self._call("update_priorities", ids=list(priorities), priorities=[float(p) for p in priorities.values()],
                          table=table)

    @property
    def unsaved(self) -> int:
        """Acknowledged groups no checkpoint holds yet (kept for a restarted server)."""
        return len(self._unsaved)

    def checkpoint(self) -> dict:
        """Ask the server to write a checkpoint now: {path}."""
        return self._call("checkpoint")

    def sample(self, n: int, timeout_s: float | None = None,
               table: str = ROLLOUTS) -> tuple[list[RolloutGroup], list[int], int]:
        """Wait up to timeout_s for n fresh groups of `table` (as its selector and rate limiter
        allow); returns (groups, staleness, learner_version)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        # The server answers a sample it cannot meet at its own deadline; give the reply time to come.
        reply = self._call("sample", deadline_s=timeout_s + 10.0, idempotent=False, n=n, timeout_s=timeout_s,
                           table=table)
        groups = [RolloutGroup.from_wire(g) for g in reply["groups"]]
        return groups, list(reply["staleness"]), int(reply["learner_version"])

    def set_learner_version(self, version: int) -> dict:
        return self._call("set_version", version=int(version), token=self.version_token)

    def stats(self, table: str = ROLLOUTS) -> dict:
        """`table`'s counters (buffer/table.py summary) and `tables`: every table's, by name."""
        return self._call("stats", table=table)

    def info(self) -> dict:
        """{tables: {name: {config, size}}, learner_version}."""
        return self._call("info")
