"""Where a job's parts meet: a torch.distributed TCPStore that a process other than them hosts
(launch/ runs RendezvousHost as a Ray actor on learner rank 0's node; a test or a bench hosts
one in its own process).

The host binds a port the OS picks and reports it, so no port is picked first and bound later:
a port chosen free and bound later can be taken in between (by another job, or by a test
running beside), and the parts then fail to meet, or meet someone else's store. Two kinds of
meeting use it, each under its own key prefix:
- the learner ranks form their process group (`join`);
- the weight sender, once it has bound its own sockets on ports the OS picked, publishes where
  it listens, and the receivers look it up (`publish`, `look_up`; common/weights_broadcast.py,
  common/weights_ipc.py).
A group formed again in the same store (a learner restored after a fault) takes a new
`prefix`, so that it never reads the keys of the group before.
"""
from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Rendezvous:
    """Picklable: what each part needs to meet the others. `holder` is the Ray actor that hosts
    the store (None when the caller keeps it alive): every learner rank keeps this object (the
    Learner does), so that the store lives as long as a rank does. Ray ends an actor nobody
    refers to, and NCCL reads the store again whenever it builds a communicator (the first
    collective, new groups). Give parts that are not Ray workers (a vLLM worker process) one
    without a holder: a Ray handle cannot be unpickled outside Ray."""
    host: str
    port: int
    prefix: str = "learners"
    holder: object = None

    @property
    def name(self) -> str:
        return f"the rendezvous store at {self.host}:{self.port}"

    def connect(self, timeout_s: float, who: str) -> dist.PrefixStore:
        """A client of the store under this prefix; ConnectionError naming the store and `who`
        asked if it does not answer within timeout_s."""
        try:
            return dist.PrefixStore(self.prefix, dist.TCPStore(self.host, self.port, None, is_master=False,
                                                               timeout=datetime.timedelta(seconds=timeout_s)))
        except RuntimeError as e:   # DistNetworkError and DistStoreError are RuntimeErrors
            raise ConnectionError(f"{who} could not reach {self.name} within {timeout_s:g}s: "
                                  f"{str(e).splitlines()[0]}") from None

    def join(self, backend: str, rank: int, world_size: int, timeout_s: float) -> None:
        """Form the default process group once every rank has reached the store. ConnectionError
        within timeout_s names the store if it does not answer, or the ranks that never came
        (NCCL's init would not wait for them: its first collective would, with no names)."""
        timeout = datetime.timedelta(seconds=timeout_s)
        store = self.connect(timeout_s, f"learner rank {rank}")
        store.set(f"arrived/{rank}", "1")
        try:
            store.wait([f"arrived/{r}" for r in range(world_size)], timeout)
        except RuntimeError:
            missing = [r for r in range(world_size) if not store.check([f"arrived/{r}"])]
            raise ConnectionError(f"learner rank {rank}: rank(s) {missing} of {world_size} did not reach "
                                  f"{self.name} within {timeout_s:g}s") from None
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)

    def own_address(self) -> str:
        """The address the other parts reach this process at, to publish: this node's as Ray
        sees it when Ray runs here (launch/ hosts the store on learner rank 0's node, but a
        sender need not be there), else the store's host (one machine: tests, benches)."""
        import ray
        return ray.util.get_node_ip_address() if ray.is_initialized() else self.host

    def publish(self, key: str, value: str, timeout_s: float, who: str) -> None:
        """Set `key` (a sender's address, once bound) for the parts that look it up."""
        self.connect(timeout_s, who).set(key, value)

    def look_up(self, store: dist.PrefixStore, key: str, wait_s: float) -> str | None:
        """`key`'s value once set, waiting up to wait_s for it (None if it is still unset then);
        ConnectionError naming the store if it stops answering."""
        try:
            if wait_s > 0:
                try:
                    store.wait([key], datetime.timedelta(seconds=wait_s))
                except dist.DistStoreError:   # the wait's deadline (a store that is gone: DistNetworkError)
                    pass
            return store.get(key).decode() if store.check([key]) else None
        except RuntimeError as e:
            raise ConnectionError(f"lost {self.name}: {str(e).splitlines()[0]}") from None


class RendezvousHost:
    """Hosts the store, on a port the OS picked, for as long as this object lives."""

    def __init__(self, host: str | None = None, timeout_s: float = 300.0):
        # The address the parts connect to; the store listens on every interface.
        self.host = host or node_address()
        self.store = dist.TCPStore(self.host, 0, None, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))

    def rendezvous(self, prefix: str = "learners") -> Rendezvous:
        """Where to meet; its holder is None: the caller keeps this host alive (launch/ adds the
        Ray actor's handle)."""
        return Rendezvous(self.host, self.store.port, prefix)


def node_address() -> str:
    """This node's address as the other nodes reach it (Ray's view, when Ray runs here)."""
    import ray
    return ray.util.get_node_ip_address() if ray.is_initialized() else socket.gethostbyname(socket.gethostname())
