"""The vLLM engine: vLLM 0.26's AsyncLLM behind the Engine interface (GPU, tensor parallel).

Every `generate` is one vLLM request (tokens in, FINAL_ONLY out, no detokenization), sampled
with nothing but the temperature (top_p=1, no top-k/min-p/penalties) and
`logprobs_mode="processed_logprobs"`, so the log-prob of each sampled token is that of
softmax(logits / T), the distribution the learner scores.

The AsyncLLM lives on an event loop of its own, in a thread the engine owns. AsyncLLM binds
its output handler and queues to the loop that first uses it (async_llm.py:169-176 starts the
handler only inside a running loop, core_client.py:973 makes an asyncio.Queue), so one built in
an actor's __init__ and then used from `asyncio.run` would work once, and hang or fail on the
next `asyncio.run` (EpisodeRunner.run and the actor each start their own). Requests from any
loop are handed to the engine's loop with run_coroutine_threadsafe (a caller on that loop
itself, as the engine process's server is, awaits directly); cancelling the awaiting task
aborts the vLLM request.

Weights: start_weight_updates makes ONE collective_rpc (actors/engines/vllm_worker.py) after
which every worker receives versions from the channel and swaps them in between two steps by
itself. The workers push a version log over ZeroMQ (PULL socket here): per request, the
versions that served it and from which output token on; it is drained before a request's
result is returned and turned into one version per token (`token_versions`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import pickle
import tempfile
import threading
import uuid

from actors.engine import Engine, Sample


def token_versions(records: list, num_tokens: int, default: int) -> list:
    """The policy version of each of a request's `num_tokens` output tokens.

    `records` are (version, n) in step order: from output token n on, `version` served the
    request (n = output tokens the request had before that step). A later record overrides an
    earlier one from its n on; tokens before the first record get that record's version (or
    `default` when there is none); records past the final length (tokens sampled in flight
    after the request finished and discarded) are trimmed away."""
    if not records:
        return [default] * num_tokens
    versions = [records[0][0]] * num_tokens
    for version, n in records:
        n = max(0, int(n))
        if n < num_tokens:
            versions[n:] = [version] * (num_tokens - n)
    return versions


class VersionLog:
    """The engine's end of the workers' log: a PULL socket and what it has told so far."""

    def __init__(self):
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        path = os.path.join(tempfile.gettempdir(), f"asyncrl-vlog-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.address = f"ipc://{path}"
        self._socket.bind(self.address)
        self._lock = threading.Lock()        # the socket and the maps are touched from two threads
        self.live: dict = {}                 # req_id -> [(version, n)] for requests not yet returned
        self.version = 0                     # newest version swapped in
        self.swaps: list = []                # {version, t, host_ms, gpu_ms}
        self.staged: list = []               # {version, t}: received into staging
        self.staging_bytes: dict = {}        # TP rank -> bytes
        self.error: str | None = None

    def open(self, req_id: str) -> None:
        with self._lock:
            self.live[req_id] = []

    def close(self, req_id: str) -> list:
        with self._lock:
            self._drain()
            return self.live.pop(req_id, [])

    def drain(self) -> None:
        with self._lock:
            self._drain()

    def _drain(self) -> None:
        import msgpack

        while True:
            try:
                frame = self._socket.recv(self._zmq.NOBLOCK)
            except self._zmq.Again:
                return
            for m in msgpack.unpackb(frame):
                kind = m["kind"]
                if kind == "versions":
                    for req_id, n in m["records"]:
                        log = self.live.get(req_id.split("-", 1)[0])  # vLLM appends "-<random>" to our ids
                        if log is not None:
                            log.append((m["version"], n))
                elif kind == "swap":
                    self.version = max(self.version, m["version"])
                    self.swaps.append({"version": m["version"], "t": m["t"], "host_ms": m["host_ms"]})
                elif kind == "swap_gpu":
                    for s in reversed(self.swaps):
                        if s["version"] == m["version"]:
                            s["gpu_ms"] = m["ms"]
                            break
                elif kind == "staged":
                    self.staged.append({k: v for k, v in m.items() if k != "kind"})
                elif kind == "installed":
                    self.staging_bytes[m["rank"]] = m["staging_bytes"]
                elif kind == "error":
                    self.error = self.error or f"weight receiver on TP rank {m['rank']} failed: {m['error']}"

    def shutdown(self) -> None:
        self._socket.close(0)
        if self.address.startswith("ipc://"):
            try:
                os.unlink(self.address[len("ipc://"):])
            except OSError:
                pass


class VLLMEngine(Engine):
    def __init__(self, model_path: str, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_num_seqs: int = 256, enforce_eager: bool = False, dtype: str = "bfloat16", seed: int = 0,
                 max_model_len: int | None = None, stop_token_ids: list = (), load_format: str = "auto",
                 startup_timeout_s: float = 900.0, weight_staging: str = "auto", **engine_args):
        """`engine_args` go to vLLM's AsyncEngineArgs as they are (e.g. enable_prefix_caching,
        hf_overrides, weight_transfer_config). `weight_staging`: actors.weight_staging (auto, full or none)."""
        self.stop_token_ids = list(stop_token_ids)
        self.weight_staging = weight_staging
        self.tensor_parallel_size = tensor_parallel_size
        self.log = VersionLog()
        self._ids = itertools.count()
        self._sampling: dict = {}   # (max_new_tokens, temperature) -> SamplingParams
        self._closed = False
        self._updates_started = False
        self.prompt_tokens = self.prompt_tokens_cached = 0   # of the requests returned so far
        self.args = {**dict(model=model_path, tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                            enforce_eager=enforce_eager, dtype=dtype, seed=seed, max_model_len=max_model_len,
                            load_format=load_format, distributed_executor_backend="mp",
                            logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
                            generation_config="vllm",  # never the model's generation_config.json defaults
                            worker_extension_cls="actors.engines.vllm_worker.AsyncRLWorker",
                            disable_log_stats=True), **engine_args}   # engine_args may override these
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        try:
            self.llm = self.call(self._build(), timeout_s=startup_timeout_s, what="starting")
        except BaseException:
            self._stop_loop()
            self.log.shutdown()
            raise

    async def _build(self):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**self.args))  # inside our loop: its handler starts here

    def call(self, coroutine, timeout_s: float | None = None, what: str = "a call"):
        """Run a coroutine on the engine's loop from a thread outside it; its result. Past
        timeout_s it is cancelled and TimeoutError names `what`."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the vLLM engine did not finish {what} within {timeout_s}s") from None

    @property
    def version(self) -> int:
        self.log.drain()
        return self.log.version

    # -- sampling ---------------------------------------------------------------------------
    def sampling_params(self, max_new_tokens: int, temperature: float):
        """temperature 0 is greedy (for checks); otherwise softmax(logits / T), untruncated.
        Made once per (max_new_tokens, temperature) and shared: vLLM clones the params of each
        request, and building them (with every stop id) is frontend CPU, the engine's limit."""
        key = (int(max_new_tokens), float(temperature))
        params = self._sampling.get(key)
        if params is None:
            if len(self._sampling) >= 64:
                self._sampling.clear()
            params = self._sampling[key] = self._new_sampling_params(*key)
        return params

    def _new_sampling_params(self, max_new_tokens: int, temperature: float):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(temperature=temperature, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
                              frequency_penalty=0.0, repetition_penalty=1.0, max_tokens=max_new_tokens,
                              logprobs=0, flat_logprobs=True, stop_token_ids=self.stop_token_ids,
                              ignore_eos=True,  # stop on stop_token_ids alone, as the HF engine does
                              detokenize=False, skip_special_tokens=False,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    async def generate(self, prompt: list, max_new_tokens: int, temperature: float) -> Sample:
        self.check()
        if asyncio.get_running_loop() is self.loop:   # a caller on the engine's own loop (the engine process)
            return await self._generate(list(prompt), max_new_tokens, temperature)
        future = asyncio.run_coroutine_threadsafe(self._generate(list(prompt), max_new_tokens, temperature), self.loop)
        return await asyncio.wrap_future(future)

    async def _generate(self, prompt: list, max_new_tokens: int, temperature: float) -> Sample:
        from vllm import TokensPrompt

        req_id = f"asyncrl{next(self._ids)}"   # no "-": vLLM's internal id is ours + "-<random>"
        self.log.open(req_id)
        final = None
        try:
            # salted by the version served now: a new request never reuses prompt KV that older
            # weights computed (vLLM's prefix cache is keyed by tokens alone), while the requests
            # of one version, a group's above all, still share theirs
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt,
                                                            cache_salt=f"asyncrl-v{self.log.version}"),
                                               self.sampling_params(max_new_tokens, temperature), req_id):
                final = out
        finally:
            records = self.log.close(req_id)
        self.prompt_tokens += len(prompt)
        self.prompt_tokens_cached += final.num_cached_tokens or 0
        completion = final.outputs[0]
        tokens = list(completion.token_ids)
        flat = completion.logprobs
        if len(flat.logprobs) == len(tokens):  # logprobs=0: one entry per position, the sampled token
            logprobs = list(flat.logprobs)
        else:
            logprobs = [flat.logprobs[flat.start_indices[i]] for i in range(len(tokens))]
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM request {req_id} ended with {completion.finish_reason!r}")
        versions = token_versions(records, len(tokens), default=self.log.version)
        return Sample(tokens, logprobs, versions, completion.finish_reason)

    # -- weights ----------------------------------------------------------------------------
    def start_weight_updates(self, receiver) -> list:
        """`receiver`: a WeightReceiver that connects on first use (e.g. IpcChannelSpec.receiver(i)),
        pickled to every worker, which receives with its own copy. One collective_rpc; returns
        each worker's {rank, staging (full or none), staging_bytes, parameters}."""
        if self._updates_started:
            raise RuntimeError("weight updates are already started")
        if self.tensor_parallel_size > 1:
            # each rank would swap at its own step boundary: ranks must agree on the step first
            raise NotImplementedError("in-flight weight updates need tensor_parallel_size=1 for now: "
                                      "a swap coordinated across TP ranks is not built yet")
        self._updates_started = True
        # Installing waits for the step under way, and opening IPC handles takes seconds.
        return self.call(self.llm.collective_rpc("asyncrl_install", args=(pickle.dumps(receiver), self.log.address,
                                                                          self.weight_staging)),
                         timeout_s=300.0, what="installing weight updates")

    def check(self) -> None:
        if self._closed:
            raise RuntimeError("the vLLM engine is closed")
        self.log.drain()
        if self.log.error:
            from common.weights import WeightSyncError
            raise WeightSyncError(self.log.error)
        if getattr(self, "llm", None) is not None and self.llm.errored:
            raise RuntimeError("the vLLM engine core died; see its log above")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.llm.shutdown()
        finally:
            self._stop_loop()
            self.log.shutdown()

    def stats(self) -> dict:
        self.log.drain()
        return {"weight_swaps": len(self.log.swaps), "staging_bytes": sum(self.log.staging_bytes.values()),
                "weight_swap_s": sum(s["host_ms"] for s in self.log.swaps) / 1e3,
                "prompt_tokens": self.prompt_tokens, "prompt_tokens_cached": self.prompt_tokens_cached}

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10.0)
