"""The weight channel over a torch.distributed broadcast group: gloo between CPU processes,
NCCL between GPUs.

The group belongs to the channel alone (a ProcessGroupGloo or ProcessGroupNCCL over a
TCPStore that the sender hosts), so it never touches the learner's own FSDP group. Rank 0
sends (learner rank 0); ranks 1..N receive (one per actor group, or engine worker). Tensors
travel packed into byte buckets of about `bucket_mb`, so the receiving side holds one bucket
beside its staging copy, never a second full copy.

The sender binds its store and its control socket on ports the OS picks, then publishes the
store's address at the job's rendezvous store (common/rendezvous.py, key "sender" under the
spec's prefix), where each receiver looks it up: no port is picked free first and bound
later, when another process may have taken it.

The control plane is a ZeroMQ ROUTER socket of the sender (its port in the store, under
"control"), one DEALER per receiver, greeting it with its rank when it connects. Transfer k:

  sender    sends each receiver meta: [k, version, tensors: [name, dtype, shape, bucket,
            offset], buckets]
  receivers answer ready once they wait in receive()
  sender    waits for every ready (deadline; the error names the receivers missing), then
            broadcasts the buckets
  receivers write each tensor into the sink (StagedWeights) and commit

Why messages and not store keys: each side then wakes when the other's message lands. Keys
were polled (every 5 ms, both ways), which cost about as much as the broadcast of a 0.5B model
over NVLink; a store wait that times out logs a warning at every idle turn of a receiver.

Every wait has a deadline. A sender that dies takes the store and the group with it: the
receiver raises WeightSyncError naming the sender (an idle receiver finds out at its next
receive(), which looks at the store once when nothing came), and the sink is aborted, so the
engine keeps serving its old version.
"""
from __future__ import annotations

import datetime
import logging
import threading
import time
from dataclasses import dataclass

import msgpack
import torch
import torch.distributed as dist
import zmq

from common.rendezvous import Rendezvous
from common.weights import WeightReceiver, WeightSender, WeightSyncError

HELLO, READY = b"hello", b"ready"
log = logging.getLogger(__name__)


@dataclass
class BroadcastChannelSpec:
    """Where the group meets (`meet`: the receivers find the sender's address there); picklable,
    so launch/ hands it to every part."""
    meet: Rendezvous
    receivers: int
    backend: str = "gloo"       # gloo (CPU tensors) or nccl (CUDA tensors)
    timeout_s: float = 300.0    # deadline of joining the group and of each transfer
    bucket_mb: float = 256.0

    @property
    def world_size(self) -> int:
        return self.receivers + 1

    def sender_name(self, address: str | None = None) -> str:
        return "the weight sender (learner rank 0)" + (f" at {address}" if address else "")

    def sender(self) -> "BroadcastWeightSender":
        return BroadcastWeightSender(self)

    def receiver(self, index: int) -> "BroadcastWeightReceiver":
        return BroadcastWeightReceiver(self, rank=index + 1)


def _group(spec: BroadcastChannelSpec, store, rank: int):
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    prefixed = dist.PrefixStore("asyncrl-weights/", store)
    if spec.backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(prefixed, rank, spec.world_size, options)


def _broadcast(group, tensor: torch.Tensor, timeout_s: float) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait(datetime.timedelta(seconds=timeout_s))


class BroadcastWeightSender(WeightSender):
    """Learner rank 0's end. The group is joined in the background from construction on, so
    building a sender never waits for the actors; the first send waits for the join."""

    def __init__(self, spec: BroadcastChannelSpec):
        self.spec = spec
        self.device_tensors = spec.backend == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if spec.backend == "nccl" else torch.device("cpu")
        host = spec.meet.own_address()
        self.store = dist.TCPStore(host, 0, spec.world_size, is_master=True,
                                   timeout=datetime.timedelta(seconds=spec.timeout_s), wait_for_workers=False)
        self.address = f"{host}:{self.store.port}"
        self._control = zmq.Context.instance().socket(zmq.ROUTER)
        self._control.setsockopt(zmq.LINGER, 0)
        self.store.set("control", str(self._control.bind_to_random_port("tcp://*")))
        try:   # bound: now the receivers may look it up
            spec.meet.publish("sender", self.address, spec.timeout_s, "the weight sender (learner rank 0)")
        except ConnectionError as e:
            self._control.close(0)
            self.store = None   # its port is not held while the error lives on (a failed Learner keeps it)
            raise WeightSyncError(str(e)) from None
        self._receivers: dict = {}   # rank -> its DEALER's identity, from its hello
        self.transfers = 0
        self._group = None
        self._join_error: BaseException | None = None
        self._joined = threading.Thread(target=self._join, name="weights-join", daemon=True)
        self._joined.start()

    def _join(self) -> None:
        try:
            self._group = _group(self.spec, self.store, 0)
        except BaseException as e:
            self._join_error = e

    def wait_for_receivers(self, n: int | None = None, timeout_s: float | None = None) -> None:
        """Return once every receiver has joined the group (`n`, if given, must be their number);
        WeightSyncError after timeout_s (default: the spec's)."""
        if n is not None and n != self.spec.receivers:
            raise ValueError(f"this broadcast group has {self.spec.receivers} receiver(s), not {n}")
        timeout_s = self.spec.timeout_s if timeout_s is None else timeout_s
        self._joined.join(timeout_s)
        if self._group is None:
            raise WeightSyncError(f"weight receivers did not join the broadcast group at {self.address} "
                                  f"within {timeout_s}s: {self._join_error or 'still waiting'}")

    def send(self, version: int, tensors: dict) -> None:
        """Broadcast `tensors` (name -> tensor) as `version` to every receiver."""
        deadline = time.monotonic() + self.spec.timeout_s
        self.wait_for_receivers()
        layout, buckets = _pack_layout(tensors, int(self.spec.bucket_mb * 2 ** 20))
        k, ranks = self.transfers, set(range(1, self.spec.world_size))
        # every receiver greeted before it joined the group: its hello is here or on its way
        self._take(lambda: ranks <= self._receivers.keys(), deadline,
                   lambda: f"weight receiver(s) {sorted(ranks - self._receivers.keys())} never reached the control "
                           f"socket of the weight sender (learner rank 0) within {self.spec.timeout_s}s")
        meta = msgpack.packb([k, version, layout, buckets])
        for rank in sorted(ranks):
            self._control.send_multipart([self._receivers[rank], meta])
        ready: set = set()
        self._take(lambda: ready >= ranks, deadline,
                   lambda: f"weight receiver(s) {sorted(ranks - ready)} did not get ready for version {version} "
                           f"within {self.spec.timeout_s}s", ready=ready, k=k)
        for index, size in enumerate(buckets):
            bucket = torch.empty(size, dtype=torch.uint8, device=self.device)
            for name, _, _, b, offset in layout:
                if b == index:
                    source = tensors[name].detach().contiguous().reshape(-1).view(torch.uint8)
                    bucket[offset:offset + source.numel()].copy_(source)
            try:
                _broadcast(self._group, bucket, max(deadline - time.monotonic(), 0.001))
            except Exception as e:
                raise WeightSyncError(f"broadcast of version {version} (bucket {index + 1}/{len(buckets)}) to the "
                                      f"weight receivers failed: {e}") from None
        self.transfers += 1

    def _take(self, done, deadline: float, error, ready: set | None = None, k: int = -1) -> None:
        """Read the control socket (hellos; readies of transfer k into `ready`) until done();
        WeightSyncError(error()) past the deadline."""
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not self._control.poll(int(left * 1000) + 1):
                if done():
                    return
                raise WeightSyncError(error())
            identity, kind, *rest = self._control.recv_multipart()
            try:
                rank = int(rest[-1])
                if kind == HELLO and 0 < rank < self.spec.world_size:
                    self._receivers[rank] = identity
                elif kind == READY and ready is not None and int(rest[0]) == k:
                    ready.add(rank)
            except (ValueError, IndexError):   # not one of our receivers' messages
                log.warning("weight sender: ignored a malformed control message from %r", identity)

    def close(self) -> None:
        self._control.close(0)


class BroadcastWeightReceiver(WeightReceiver):
    """An actor group's end; runs on the engine's weight thread. It connects (and picks its
    device) on first use, so it can be built in one process and used in another (a vLLM
    worker)."""

    def __init__(self, spec: BroadcastChannelSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.transfers = 0
        self.sender_address = None   # looked up at the rendezvous store on first use
        self._store = self._group = self._bucket = self._control = None

    @property
    def sender_name(self) -> str:
        return self.spec.sender_name(self.sender_address)

    def _connect(self) -> None:
        cuda = self.spec.backend == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self._bucket = torch.empty(0, dtype=torch.uint8, device=self.device)
        meet, timeout_s = self.spec.meet, self.spec.timeout_s
        try:
            self.sender_address = meet.look_up(meet.connect(timeout_s, f"weight receiver {self.rank}"), "sender",
                                               timeout_s)
        except ConnectionError as e:
            raise WeightSyncError(str(e)) from None
        if self.sender_address is None:
            raise WeightSyncError(f"weight receiver {self.rank}: {self.sender_name} did not publish its address at "
                                  f"{meet.name} (prefix {meet.prefix!r}) within {timeout_s:g}s")
        host, port = self.sender_address.rsplit(":", 1)
        try:
            self._store = dist.TCPStore(host, int(port), self.spec.world_size, is_master=False,
                                        timeout=datetime.timedelta(seconds=timeout_s))
            self._control = zmq.Context.instance().socket(zmq.DEALER)
            self._control.setsockopt(zmq.LINGER, 0)
            self._control.connect(f"tcp://{host}:{int(self._store.get('control'))}")
            self._control.send_multipart([HELLO, str(self.rank).encode()])   # before the join, which waits for all
            self._group = _group(self.spec, self._store, self.rank)
        except Exception as e:
            raise WeightSyncError(f"could not join {self.sender_name}: {e}") from None

    def receive(self, sink, timeout_s: float) -> int | None:
        if self._group is None:
            self._connect()
        try:
            if not self._control.poll(max(0, int(timeout_s * 1000))):
                self._store.check(["control"])   # nothing came: is the sender still there?
                return None
            k, version, layout, buckets = msgpack.unpackb(self._control.recv())
        except Exception as e:  # the store lives in the sender's process
            raise WeightSyncError(f"lost {self.sender_name}: {e}") from None
        if sink.writes_in_place:   # refused whole, by its layout, before its first write
            sink.check_version(version, {name: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
                                         for name, dtype, shape, _, _ in layout})
        sink.begin(version)
        committing = False
        try:
            self._control.send_multipart([READY, str(k).encode(), str(self.rank).encode()])
            transfer_deadline = time.monotonic() + self.spec.timeout_s
            for index, size in enumerate(buckets):
                if self._bucket.numel() < size:
                    self._bucket = torch.empty(size, dtype=torch.uint8, device=self.device)
                bucket = self._bucket[:size]
                _broadcast(self._group, bucket, max(transfer_deadline - time.monotonic(), 0.001))
                for name, dtype, shape, b, offset in layout:
                    if b == index:
                        dt = getattr(torch, dtype)
                        nbytes = _numel(shape) * torch.empty(0, dtype=dt).element_size()
                        sink.write(name, bucket[offset:offset + nbytes].view(dt).view(shape))
            committing = True
            sink.commit(version)   # releases the sink itself, failed or not
        except BaseException as e:
            if not committing:
                sink.abort()
            if isinstance(e, WeightSyncError) or not isinstance(e, Exception):
                raise
            raise WeightSyncError(f"version {version} from {self.sender_name} did not arrive: "
                                  f"{type(e).__name__}: {e}") from None
        self.transfers += 1
        return version


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pack_layout(tensors: dict, bucket_bytes: int) -> tuple[list, list]:
    """[name, dtype, shape, bucket, byte offset] per tensor, and each bucket's size in bytes.
    A tensor larger than a bucket gets a bucket of its own."""
    layout, buckets = [], [0]
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if buckets[-1] and buckets[-1] + nbytes > bucket_bytes:
            buckets.append(0)
        offset = (buckets[-1] + 15) // 16 * 16  # aligned, so every dtype view is valid
        layout.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), len(buckets) - 1, offset])
        buckets[-1] = offset + nbytes
    return layout, buckets
