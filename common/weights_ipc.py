"""A weight channel over CUDA IPC: a learner and actor groups that share one GPU.

The learner's tensors are never copied on its side: each receiver opens a CUDA IPC handle
of every tensor once (the first open costs seconds) and, per version, copies out of the
learner's memory straight into its own staging (StagedWeights). Control goes over ZeroMQ
(the learner binds a ROUTER, every receiver connects a DEALER):

  receiver -> sender  ("hello", name, gpu_uuid)         once, and again while idle (a sender
                                                        that restarted learns of it)
  sender -> receiver  ("bucket", version, i, count, sender_uuid, [(name, handle_id, args|None)])
                                                        count buckets per version; args (the
                                                        IPC handle) only the first time a
                                                        receiver sees that handle
  receiver -> sender  ("ack", version) after commit (its copies have landed), or
                      ("nack", version, error)

`IpcWeightSender.send` returns once every receiver acknowledged, so the learner may then
change its tensors; a receiver that does not answer by the deadline is named in the error and
dropped. A receiver whose sender stops between buckets raises WeightSyncError naming the
sender and aborts its staging, so the engine keeps serving the version it had.
Messages are pickled: both ends are processes of one job on one host (loopback by default).
The sender binds a port the OS picks; a channel made from an IpcChannelSpec publishes it at
the job's rendezvous store (common/rendezvous.py), where each receiver looks it up on first
use, so no port is picked free first and bound later, when another process may have taken it.
Importing this module touches no CUDA.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import socket
import time
import uuid
from dataclasses import dataclass

import torch

from common.rendezvous import Rendezvous
from common.weights import WeightReceiver, WeightSender, WeightSyncError

log = logging.getLogger(__name__)
BUCKET_TENSORS = 4096  # tensors per announcement message: one message carries a whole model


def _gpu_uuid(device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


class IpcWeightSender(WeightSender):
    device_tensors = True
    def __init__(self, bind_host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0):
        import zmq

        self._zmq = zmq
        self.timeout_s = timeout_s
        self._socket = zmq.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished receiver raises
        if port:
            self._socket.bind(f"tcp://{bind_host}:{port}")
        else:
            port = self._socket.bind_to_random_port(f"tcp://{bind_host}")
        self.address = f"tcp://{bind_host}:{port}"
        self.version = 0
        self._receivers: dict = {}        # zmq identity -> {"name", "known": {tensor name: handle id}}
        self._handles: dict = {}          # tensor name -> (storage key, handle id, args)
        self._ids = itertools.count(1)
        self._session = uuid.uuid4().hex[:8]

    @property
    def receivers(self) -> list:
        return [r["name"] for r in self._receivers.values()]

    def wait_for_receivers(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self._receivers) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WeightSyncError(f"weight sender {self.address}: {len(self._receivers)} of {n} receivers "
                                      f"said hello within {timeout_s}s ({self.receivers})")
            self._poll(left)

    def send(self, version: int, named_tensors) -> float:
        """Publish `version` (HF names -> CUDA tensors on this GPU) to every receiver known now;
        return once each has copied it out (seconds taken). The tensors must stay unchanged
        until then, and alive for as long as receivers may use their handles."""
        if version <= self.version:
            raise WeightSyncError(f"weight sender {self.address}: version {version} is not newer than {self.version}")
        t = time.monotonic()
        self._poll(0)
        tensors = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        if not tensors:
            raise WeightSyncError(f"weight sender {self.address}: version {version} has no tensors")
        device = tensors[0][1].device
        torch.cuda.synchronize(device)  # the version is complete before anyone reads it
        uuid_ = _gpu_uuid(device)
        handles = [(name, self._handle(name, tensor)) for name, tensor in tensors]
        count = -(-len(handles) // BUCKET_TENSORS)
        for identity, receiver in list(self._receivers.items()):
            known = receiver["known"]
            for i in range(count):
                entries = []
                for name, (hid, args) in handles[i * BUCKET_TENSORS:(i + 1) * BUCKET_TENSORS]:
                    entries.append((name, hid, None if known.get(name) == hid else args))
                    known[name] = hid
                try:
                    self._socket.send_multipart([identity, pickle.dumps(("bucket", version, i, count, uuid_, entries))],
                                                self._zmq.NOBLOCK)
                except self._zmq.ZMQError:  # gone (ROUTER_MANDATORY) or not reading: it never acks; named below
                    break
        waiting = dict(self._receivers)
        deadline = time.monotonic() + self.timeout_s
        self.version = version
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                names = [r["name"] for r in waiting.values()]
                for identity in waiting:
                    self._receivers.pop(identity, None)
                raise WeightSyncError(f"weight sender {self.address}: receiver(s) {names} did not acknowledge "
                                      f"version {version} within {self.timeout_s}s; dropped")
            for identity, msg in self._poll(left):
                if msg[0] == "ack" and msg[1] == version:
                    waiting.pop(identity, None)
                elif msg[0] == "nack" and msg[1] == version:
                    waiting.pop(identity, None)
                    receiver = self._receivers.get(identity, {"name": identity})
                    receiver["known"] = {}  # it may have kept none of this version's handles
                    name = receiver["name"]
                    raise WeightSyncError(f"weight receiver {name} failed to take version {version}: {msg[2]}")
        return time.monotonic() - t

    def _handle(self, name: str, tensor: torch.Tensor) -> tuple:
        """(handle id, IPC handle args) of a tensor, made again only when its memory moved."""
        from torch.multiprocessing.reductions import reduce_tensor

        if not tensor.is_cuda:
            raise WeightSyncError(f"weight sender {self.address}: {name!r} is on {tensor.device}, not a CUDA device")
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype)
        cached = self._handles.get(name)
        if cached is None or cached[0] != key:
            _, args = reduce_tensor(tensor.detach())
            cached = self._handles[name] = (key, f"{self._session}-{next(self._ids)}", args)
        return cached[1], cached[2]

    def _poll(self, timeout_s: float) -> list:
        """Messages from receivers within timeout_s (hellos are handled here), as (identity, msg)."""
        out = []
        if not self._socket.poll(max(0, int(timeout_s * 1000))):
            return out
        while True:
            try:
                identity, frame = self._socket.recv_multipart(self._zmq.NOBLOCK)
            except self._zmq.Again:
                return out
            msg = pickle.loads(frame)
            if msg[0] == "hello":
                self._receivers.setdefault(identity, {"name": msg[1], "known": {}})
            else:
                out.append((identity, msg))

    def close(self) -> None:
        self._socket.close(0)


@dataclass
class IpcChannelSpec:
    """Where receivers find the sender: its address, published at `meet` once it is bound;
    picklable. A receiver made here connects on first use, so it can be pickled to a vLLM
    worker and built there."""
    meet: Rendezvous
    timeout_s: float = 60.0

    def sender(self) -> "IpcWeightSender":
        """The learner's end, bound on its node's address and published at the rendezvous store."""
        sender = IpcWeightSender(bind_host=self.meet.own_address(), timeout_s=self.timeout_s)
        try:
            self.meet.publish("sender", sender.address, self.timeout_s, f"weight sender {sender.address}")
        except ConnectionError as e:
            sender.close()
            raise WeightSyncError(str(e)) from None
        return sender

    def receiver(self, index: int = 0) -> "IpcWeightReceiver":
        return IpcWeightReceiver(self.meet, self.timeout_s, f"{socket.gethostname()}:{os.getpid()}/receiver{index}")


class IpcWeightReceiver(WeightReceiver):
    """Opens each handle once; must be used from one thread (its CUDA device set)."""

    HELLO_EVERY_S = 5.0

    def __init__(self, meet: Rendezvous, timeout_s: float = 60.0, name: str | None = None):
        """`meet`: where the sender's address is looked up, on first use."""
        self.address, self.timeout_s, self.meet = None, timeout_s, meet
        self._meeting = None   # the client of `meet`: kept to follow a sender made again
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"  # as the sender's errors call it
        self.version = 0
        self._socket = None
        self._last_hello = 0.0
        self._opened: dict = {}  # tensor name -> (handle id, tensor)
        self.last_timing: dict = {}

    def _connect(self, wait_s: float = 0.0) -> bool:
        """Connect (once the sender's address is known) and greet it when due; False while the
        sender has not published its address (waiting up to wait_s for it)."""
        import zmq

        if self.address is None and not self._look_up(wait_s):
            return False
        hello_due = time.monotonic() - self._last_hello > self.HELLO_EVERY_S
        if hello_due and self._meeting is not None:
            self._follow()
        if self._socket is None:
            self._zmq = zmq
            self._socket = zmq.Context.instance().socket(zmq.DEALER)
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.connect(self.address)
        if hello_due:
            uuid_ = _gpu_uuid(torch.cuda.current_device()) if torch.cuda.is_available() else ""
            self._send(("hello", self.name, uuid_))
            self._last_hello = time.monotonic()
        return True

    def _look_up(self, wait_s: float) -> bool:
        """The sender's address from the rendezvous store (waiting up to wait_s for it); the
        store's client is kept, to follow a sender made again (_follow)."""
        try:
            if self._meeting is None:
                self._meeting = self.meet.connect(self.timeout_s, f"weight receiver {self.name}")
            self.address = self.meet.look_up(self._meeting, "sender", wait_s)
        except ConnectionError as e:
            self._meeting = None
            raise WeightSyncError(str(e)) from None
        return self.address is not None

    def _follow(self) -> None:
        """A sender made again (a learner restarted) publishes a new address: connect to it, and
        forget the old sender's handles. A rendezvous store that has gone is not the sender's
        failure: the receiver keeps the address it has and stops looking."""
        try:
            published = self.meet.look_up(self._meeting, "sender", 0)
        except ConnectionError as e:
            log.warning("weight receiver %s: stops following its sender's address: %s", self.name, e)
            self._meeting = None
            return
        if published is not None and published != self.address:
            log.info("weight receiver %s: the sender moved from %s to %s", self.name, self.address, published)
            meeting = self._meeting
            self.close()   # the socket; connected again to the new address below
            self._meeting, self.address, self._opened = meeting, published, {}

    def _send(self, message: tuple) -> None:
        """Queue a control message without ever blocking: with the sender gone, ZeroMQ's queue
        fills (a hello every few seconds) and a blocking send would wait for ever. A message
        that does not fit is dropped; the sender's own deadline names a receiver that never
        acknowledged."""
        try:
            self._socket.send(pickle.dumps(message), self._zmq.NOBLOCK)
        except self._zmq.Again:
            pass

    def _next(self, timeout_s: float):
        if not self._socket.poll(max(0, int(timeout_s * 1000))):
            return None
        return pickle.loads(self._socket.recv())

    def receive(self, sink, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        if not self._connect(timeout_s):
            return None   # the sender is not up yet: as if it had sent nothing
        while True:  # skip what is left of a version given up earlier
            msg = self._next(deadline - time.monotonic())
            if msg is None:
                return None
            if msg[0] == "bucket" and msg[2] == 0 and msg[1] > self.version:
                break
        version, count = msg[1], msg[3]
        began = committing = False
        t_announced = time.monotonic()
        try:
            # Every part and handle first (opening a handle the first time takes a while), then
            # the writes: the sink is held only while they are queued.
            parts = []
            for i in range(count):
                if i:
                    msg = self._next(self.timeout_s)
                    if msg is None:
                        raise WeightSyncError(f"weight sender {self.address} sent {i} of {count} parts of version "
                                              f"{version}, then nothing for {self.timeout_s}s")
                    if msg[0] != "bucket" or msg[1] != version or msg[2] != i:
                        raise WeightSyncError(f"weight sender {self.address} sent part {msg[2]} of version {msg[1]} "
                                              f"while part {i} of version {version} was due")
                parts.append([(name, self._open(name, hid, args, msg[4])) for name, hid, args in msg[5]])
            if sink.writes_in_place:   # refused whole before its first write
                sink.check_version(version, {name: tensor for part in parts for name, tensor in part})
            sink.begin(version)
            began = True
            for part in parts:
                sink.write_many(part)
            t_written = time.monotonic()
            committing = True
            sink.commit(version)
        except BaseException as e:
            if began and not committing:  # commit releases the staging itself, failed or not
                sink.abort()
            self._send(("nack", version, f"{type(e).__name__}: {e}"))
            raise
        self._send(("ack", version))
        self.version = version
        t_committed = time.monotonic()
        # where a receive spends its time (benches): begin to writes queued, then the wait for them
        self.last_timing = {"write_ms": (t_written - t_announced) * 1e3, "commit_ms": (t_committed - t_written) * 1e3}
        return version

    def _open(self, name: str, hid: str, args, sender_uuid: str) -> torch.Tensor:
        opened = self._opened.get(name)
        if opened is not None and opened[0] == hid:
            return opened[1]
        if args is None:
            raise WeightSyncError(f"weight sender {self.address} sent no handle for {name!r}, which this "
                                  f"receiver never opened")
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        device = torch.cuda.current_device()
        if sender_uuid and sender_uuid != _gpu_uuid(device):
            raise WeightSyncError(f"weight sender {self.address} is on GPU {sender_uuid}, this receiver on "
                                  f"{_gpu_uuid(device)}: CUDA IPC needs the same GPU")
        args = list(args)
        args[6] = device  # the sender's device index means nothing here
        try:
            tensor = rebuild_cuda_tensor(*args)
        except Exception as e:  # a sender that died takes its memory with it
            raise WeightSyncError(f"could not open the CUDA IPC handle of {name!r} from weight sender "
                                  f"{self.address}: {e}") from e
        self._opened[name] = (hid, tensor)
        return tensor

    def close(self) -> None:
        self._meeting = None   # the rendezvous store's client, if the sender was never found
        if self._socket is not None:
            self._socket.close(0)
            self._socket = None
