"""The inference engine interface: the rollout loop drives any engine through it.

Tokens in, tokens out: prompts and samples are token ids, so the rollout loop owns the
tokenizer and the engine never re-tokenizes. One `generate` call is one request; every
episode awaits its own, many are pending at once, and the engine batches whatever is pending
(continuous batching in vLLM; pending requests gathered into one batch by the HF engine).
Cancelling the task that awaits a request abandons it.

Weights: `version` is the policy version the engine serves (0 = the initial weights; +1 per
learner publication). A new version is received beside the served weights (StagedWeights)
and swapped in between two engine steps, so no request is aborted and generation stalls
only for the in-place copy; each sampled token records the version that produced it. Where a
full copy does not fit (actors.weight_staging=none), DirectWeights writes a version straight
into the served weights while the engine is held between two steps: no copy, and generation
stands still for the transfer instead.
"""
from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    tokens: list          # generated token ids, the stop token included when one was sampled
    logprobs: list        # log-prob of each token under the sampling distribution (logits / T)
    versions: list        # policy version of the weights that sampled each token
    finish_reason: str    # "stop" (a stop token) or "length" (max_new_tokens reached)


class Engine(ABC):
    @property
    @abstractmethod
    def version(self) -> int:
        """The policy version being served now."""

    @abstractmethod
    async def generate(self, prompt: list, max_new_tokens: int, temperature: float) -> Sample:
        """Sample one continuation of `prompt` (token ids) at `temperature`, with no top-k/top-p
        truncation or penalties, so that the log-probs are exactly those of the behaviour policy.
        Temperature 0 is greedy (for evaluation)."""

    @abstractmethod
    def start_weight_updates(self, receiver) -> None:
        """Receive every new version from `receiver` (common/weights.py) in the background and
        swap each in between two engine steps. A failed transfer leaves the served version as
        it was (with actors.weight_staging=none, one that failed after its first write stops
        the engine instead: DirectWeights); `check()` then raises its error."""

    @abstractmethod
    def check(self) -> None:
        """Raise the error of a background part (batching loop, weight receiver) that failed."""

    @abstractmethod
    def close(self) -> None:
        """Stop background work; pending requests fail."""

    @abstractmethod
    def stats(self) -> dict:
        """Counters for the run's metrics: at least `weight_swaps`."""


def settle_from_thread(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result=None,
                       error: BaseException | None = None) -> None:
    """Give `future` (of `loop`) its result or error from another thread. A future already
    done (its awaiting task was cancelled: nobody waits) or a loop already closed is left be."""
    def settle():
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop has closed
        pass


class WeightUpdateError(RuntimeError):
    """A received version does not fit the engine's parameters; the text names the tensor."""


class StagedWeights:
    """The next policy version, received beside the served parameters and swapped in between
    two engine steps.

    It owns one staging tensor per served parameter: the one full copy an update costs. A
    weight receiver (common/weights.py) calls begin(version), write(name, tensor) for every
    tensor (Hugging Face names; `route` maps one to the staging views it fills, so engines with
    fused parameters such as vLLM's qkv_proj map q/k/v into row slices), then commit(version)
    or, if the transfer failed, abort(). The engine calls swap_if_ready() at each step
    boundary: if a committed version waits and no transfer is under way, it is copied into the
    served parameters in place (CUDA graphs and other pointers to them stay valid).
    """

    writes_in_place = False
    """True where writes go into the served weights (DirectWeights): a receiver then checks a
    version whole (check_version) before its first write wherever it knows the whole version."""

    def __init__(self, params: dict, route=None, expected: set | None = None):
        self.params = params                                            # served, in engine layout
        self.staging = self._staging_for(params)
        self._on_gpu = any(t.is_cuda for t in self.staging.values())   # commit waits for the copies
        self._served_list = list(params.values())                      # the swap's operands, built once
        self._staging_list = [self.staging[n] for n in params]
        self.route = route or (lambda name, tensor: [(self.staging[name], tensor)] if name in self.staging else [])
        self.expected = set(params) if expected is None else set(expected)  # HF names a version must hold
        self._lock = threading.Lock()      # held for a whole transfer and for a swap
        self._received: set = set()
        self._routes: dict = {}            # name -> (source tensor, its targets), for write_many
        self._pending: int | None = None   # a committed version not yet swapped in
        self.swaps = 0
        self.last_swap_s = 0.0
        self.swap_s = 0.0   # all swaps so far: the time generation stood still for new weights

    def _staging_for(self, params: dict) -> dict:
        return {n: torch.empty_like(p) for n, p in params.items()}

    def check_version(self, version: int, tensors: dict) -> None:
        """Refuse a whole version held in memory (name -> tensor) before anything of it is
        written: a name that is not a parameter, a shape that does not fit, a weight missing."""
        for name, tensor in tensors.items():
            self._targets(name, tensor)
        self._check_complete(version, tensors)

    def _check_complete(self, version: int, received) -> None:
        missing = sorted(self.expected - set(received))
        if missing:
            raise WeightUpdateError(f"version {version} lacks {len(missing)} weight(s), e.g. {missing[:3]}")

    def begin(self, version: int) -> None:
        self._lock.acquire()
        self._pending, self._received = None, set()  # staging is overwritten from here on

    def _targets(self, name: str, tensor: torch.Tensor) -> list:
        """(staging view, source view) pairs a received tensor fills, checked."""
        targets = self.route(name, tensor)
        if not targets:
            raise WeightUpdateError(f"received weight {name!r} is not a parameter of the engine's model")
        for staging, source in targets:
            if tuple(staging.shape) != tuple(source.shape):
                raise WeightUpdateError(f"received weight {name!r} has shape {tuple(source.shape)}, "
                                        f"the engine's needs {tuple(staging.shape)}")
        return targets

    @torch.no_grad()   # the targets may be the served parameters themselves (DirectWeights)
    def write(self, name: str, tensor: torch.Tensor) -> None:
        targets = self._targets(name, tensor)   # checked before anything is copied
        self._writing()
        for staging, source in targets:
            staging.copy_(source, non_blocking=True)
        self._received.add(name)

    @torch.no_grad()
    def write_many(self, items: list) -> None:
        """write() for many (name, tensor) at once: the copies go out as one batched launch,
        so a receiver thread holds the GIL once per version instead of once per tensor (it
        competes with the engine's own thread). The routes are kept per source tensor, for
        receivers whose sources stay the same tensors from version to version (CUDA IPC)."""
        staging, sources = [], []
        for name, tensor in items:
            cached = self._routes.get(name)
            if cached is None or cached[0] is not tensor:
                cached = self._routes[name] = (tensor, self._targets(name, tensor))
            for dst, src in cached[1]:
                staging.append(dst)
                sources.append(src)
            self._received.add(name)
        if staging:
            self._writing()
            torch._foreach_copy_(staging, sources, non_blocking=True)

    def _writing(self) -> None:
        """Called once the tensors of a write are checked, before they are copied."""

    def commit(self, version: int) -> None:
        try:
            self._check_complete(version, self._received)
            self._landed()
            self._pending = version
        finally:
            self._lock.release()

    def _landed(self) -> None:
        """Wait until the copies issued by write/write_many have landed."""
        if self._on_gpu:
            torch.cuda.current_stream().synchronize()

    def abort(self) -> None:
        if self._lock.locked():
            self._lock.release()

    @torch.no_grad()
    def swap_if_ready(self) -> int | None:
        """At a step boundary: swap in a committed version; returns it, or None."""
        if self._pending is None or not self._lock.acquire(blocking=False):
            return None
        try:
            if self._pending is None:
                return None
            t = time.perf_counter()
            self._copy_in(self._pending)
            version, self._pending = self._pending, None
            self.swaps += 1
            self.last_swap_s = time.perf_counter() - t
            self.swap_s += self.last_swap_s
            return version
        finally:
            self._lock.release()

    def _copy_in(self, version: int) -> None:
        """The swap itself, under the lock (engines on a GPU add their stream bookkeeping)."""
        torch._foreach_copy_(self._served_list, self._staging_list)


STAGING_HEADROOM_BYTES = 2 ** 30   # free GPU memory left beside a full staging copy (auto)


def choose_staging(mode: str, params: dict) -> str:
    """actors.weight_staging as it applies to these parameters: auto is full where a full copy
    of them fits in the free memory of their GPU with STAGING_HEADROOM_BYTES to spare (always on
    the CPU), none where it does not."""
    if mode != "auto":
        return mode
    first = next(iter(params.values()))
    if first.device.type != "cuda":
        return "full"
    need = sum(p.numel() * p.element_size() for p in params.values())
    free, _ = torch.cuda.mem_get_info(first.device)
    return "full" if free >= need + STAGING_HEADROOM_BYTES else "none"


class DirectWeights(StagedWeights):
    """actors.weight_staging=none: no staging copy. A version is written straight into the
    served parameters while `hold` (the engine's step lock, which each engine step holds) keeps
    the engine between two steps: generation stands still for the whole transfer instead of
    for one device copy, and the memory of a full copy is saved. With CUDA IPC the transfer is
    a device copy; over a broadcast it is the network transfer, through the channel's one bucket
    buffer. A transfer that fails after its first write leaves the served weights part old,
    part new: the sink is then broken, and swap_if_ready (called at each step) raises, so the
    engine fails loudly instead of serving them. A version refused before its first write
    (check_version, a name or shape that does not fit) leaves the served weights as they were."""

    writes_in_place = True

    def __init__(self, params: dict, hold: threading.Lock, route=None, expected: set | None = None):
        self.hold = hold
        super().__init__(params, route=route, expected=expected)
        self.broken: str | None = None
        self._holding = False
        self._written = False
        self._incoming = 0
        self._held_since = 0.0

    def _staging_for(self, params: dict) -> dict:
        return params   # the routes write into the served tensors themselves

    def begin(self, version: int) -> None:
        if self.broken:
            raise WeightUpdateError(self.broken)
        self.hold.acquire()
        self._holding, self._written, self._received, self._incoming = True, False, set(), version
        self._held_since = time.perf_counter()

    def _writing(self) -> None:
        self._written = True   # from here on a failure leaves the served weights mixed

    def commit(self, version: int) -> None:
        try:
            self._check_complete(version, self._received)
            self._landed()
            self._pending = version   # labelled at the next step, the first to run on it
            self.swaps += 1
        except BaseException as e:
            self._break(version, e)
            raise
        finally:
            self._release()

    def abort(self) -> None:
        if self._holding:
            self._break(self._incoming, None)
            self._release()

    def swap_if_ready(self) -> int | None:
        """At a step boundary (the caller holds `hold`): the version committed since the last
        step, already in place; raises if a failed transfer left the weights mixed."""
        if self.broken:
            raise WeightUpdateError(self.broken)
        version, self._pending = self._pending, None
        return version

    def _break(self, version: int, error) -> None:
        """After a failed transfer: broken if anything of it was written."""
        if self._written:
            self.broken = (f"version {version} failed after part of it was written into the served weights "
                           f"(actors.weight_staging=none){f': {error}' if error else ''}; they are no "
                           f"policy's now, so this engine stops serving")

    def _release(self) -> None:
        self.last_swap_s = time.perf_counter() - self._held_since
        self.swap_s += self.last_swap_s
        self._holding = False
        self.hold.release()
