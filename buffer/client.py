"""The buffer client: a thin layer over the wire with deadlines and idempotent retries.

Each call has a deadline. A call that gets no reply in time closes its socket (dropping
anything queued), reconnects and, if the call is idempotent (insert: ids are unique, so a
re-sent insert is stored once; set_version; stats), sends again, up to `retries` times.
A sample is never re-sent: it could take groups twice; and since its socket is closed, the
server sees the client gone and the abandoned sample takes nothing. An error reply (the
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

from common.rollout import RolloutGroup
from common.wire import WireError, decode, encode, split_rid, with_rid


RESEND_BATCH = 64  # groups per re-sent insert


def _grace(timeout_s: float) -> float:
    """Time past a server-side deadline for its error reply to arrive."""
    return min(10.0, 1.0 + timeout_s)


class BufferError(RuntimeError):
    """The buffer server refused a request, did not answer in time, or stopped serving."""


class BufferTimeout(BufferError):
    pass


class BufferClient:
    def __init__(self, address: str, timeout_s: float = 120.0, retries: int = 3, version_token: str = ""):
        self.address = address
        self.version_token = version_token  # what set_learner_version shows the server
        self.timeout_s = timeout_s
        self.retries = retries
        self._context = zmq.Context.instance()
        self._socket = None
        self._rids = itertools.count(1)
        self._incarnation = None   # of the server that answered last
        self._unsaved: list = []   # [incarnation, seq, group]: acknowledged, no checkpoint holds it yet
        self.resent_groups = 0
        self._connect()

    def _connect(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
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
            self._socket.send_multipart(with_rid(rid, message), copy=False)
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                if not self._socket.poll(int(left * 1000) + 1):
                    continue
                try:
                    reply_rid, body = split_rid(self._socket.recv_multipart(copy=False))
                    if reply_rid != rid:
                        continue  # a late reply to an abandoned attempt
                    reply = decode(body)
                except WireError as e:
                    raise BufferError(f"buffer at {self.address} sent a malformed reply to {op}: {e}") from None
                if not isinstance(reply, dict) or not reply.get("ok"):
                    error = reply.get("error") if isinstance(reply, dict) else reply
                    raise BufferError(f"buffer at {self.address} refused {op}: {error}")
                self._observe(reply)
                return reply
            self._connect()  # drop whatever is queued on the dead connection
        raise BufferTimeout(f"buffer at {self.address} did not answer {op} within {timeout_s:.1f}s "
                            f"({attempts} attempt(s)); is the server running?")

    def _observe(self, reply: dict) -> None:
        """Forget the acknowledged groups the server's newest checkpoint holds; re-send, once,
        those a restarted server (a new incarnation) may have lost."""
        incarnation, covered = reply.get("incarnation"), reply.get("checkpoint_seq", 0)
        restarted = self._incarnation is not None and incarnation != self._incarnation
        self._incarnation = incarnation
        self._unsaved = [u for u in self._unsaved if u[0] != incarnation or u[1] > covered]
        if restarted:
            lost = [u[2] for u in self._unsaved if u[0] != incarnation]
            self._unsaved = [u for u in self._unsaved if u[0] == incarnation]
            for i in range(0, len(lost), RESEND_BATCH):  # ids are unique: what it still holds is refused once
                self.insert(*lost[i:i + RESEND_BATCH])
            self.resent_groups += len(lost)

    def insert(self, *groups: RolloutGroup, priorities: list | None = None, timeout_s: float | None = None) -> dict:
        """Store groups in one request: all or, if any is malformed, none. Returns
        {stored: [bool per group; False for an id stored before], size, learner_version}.
        Until a checkpoint of the server holds them, the groups are kept here, and re-sent to
        a server that restarted (from its newest checkpoint) in the meantime."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        fields = {"groups": [g.to_wire() for g in groups], "timeout_s": timeout_s}
        if priorities is not None:
            fields["priorities"] = [float(p) for p in priorities]
        # the server answers an insert its rate limiter holds past timeout_s; give the reply time
        reply = self._call("insert", deadline_s=timeout_s + _grace(timeout_s), **fields)
        self._keep(reply, groups)
        return reply

    def _keep(self, reply: dict, groups) -> None:
        """Keep acknowledged groups until a checkpoint of a checkpointing server holds them."""
        if reply.get("checkpoints"):
            self._unsaved += [[reply["incarnation"], reply["seq"], g] for g in groups]

    def insert_many(self, batches: list, window: int = 16, timeout_s: float | None = None) -> list:
        """insert() for many requests (each a list of groups) with up to `window` of them in
        flight, acknowledged as they land; the replies in order. An attempt that gets no reply
        by its deadline reconnects and re-sends what is unacknowledged (ids are unique, so a
        request the server had stored is refused, not stored twice)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        messages = [encode({"op": "insert", "groups": [g.to_wire() for g in groups], "timeout_s": timeout_s})
                    for groups in batches]
        replies: list = [None] * len(messages)
        for attempt in range(1 + self.retries):
            todo = [i for i, r in enumerate(replies) if r is None]
            flying: dict = {}  # rid -> index
            deadline = time.monotonic() + timeout_s + _grace(timeout_s)
            while todo or flying:
                while todo and len(flying) < window:
                    i = todo.pop(0)
                    rid = next(self._rids)
                    self._socket.send_multipart(with_rid(rid, messages[i]), copy=False)
                    flying[rid] = i
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
                self._keep(reply, batches[i])
                replies[i] = reply
                deadline = time.monotonic() + timeout_s + _grace(timeout_s)  # each landing restarts the clock
            if all(r is not None for r in replies):
                return replies
            self._connect()
        missing = sum(r is None for r in replies)
        raise BufferTimeout(f"buffer at {self.address} did not acknowledge {missing} of {len(replies)} inserts "
                            f"within {timeout_s:.1f}s ({1 + self.retries} attempt(s)); is the server running?")

    def update_priorities(self, priorities: dict) -> dict:
        """Set the priorities of groups by id ({id: priority}); {updated: how many are held}."""
        return self._call("update_priorities", ids=list(priorities), priorities=[float(p) for p in priorities.values()])

    @property
    def unsaved(self) -> int:
        """Acknowledged groups no checkpoint holds yet (kept for a restarted server)."""
        return len(self._unsaved)

    def checkpoint(self) -> dict:
        """Ask the server to write a checkpoint now: {path}."""
        return self._call("checkpoint")

    def sample(self, n: int, timeout_s: float | None = None) -> tuple[list[RolloutGroup], list[int], int]:
        """Wait up to timeout_s for n fresh groups; returns (groups, staleness, learner_version)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        # The server answers a sample it cannot meet at its own deadline; give the reply time to come.
        reply = self._call("sample", deadline_s=timeout_s + 10.0, idempotent=False, n=n, timeout_s=timeout_s)
        groups = [RolloutGroup.from_wire(g) for g in reply["groups"]]
        return groups, list(reply["staleness"]), int(reply["learner_version"])

    def set_learner_version(self, version: int) -> dict:
        return self._call("set_version", version=int(version), token=self.version_token)

    def stats(self) -> dict:
        return self._call("stats")
