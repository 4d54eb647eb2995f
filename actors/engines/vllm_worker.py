"""The vLLM worker extension: weight versions staged in vLLM's layout and swapped in between
two engine steps by the worker itself, with a log of which version served each request.

vLLM mixes `AsyncRLWorker` into every worker (`worker_extension_cls`); one collective_rpc
(`asyncrl_install`, made by VLLMEngine.start_weight_updates) then sets up, per worker:
  - a StagedWeights over the model's own parameters (fused qkv_proj and gate_up_proj, padded
    vocabulary), filled by a receiver thread from the weight channel on a CUDA stream of its
    own while the engine generates;
  - the swap: as soon as a version is committed the receiver thread copies it in place
    (torch._foreach_copy_, so CUDA graphs keep their pointers) on the engine's own stream,
    holding a step lock that the wrappers of `execute_model` and `sample_tokens` hold for a
    whole step, so the swap falls between two steps (ordered after every forward queued
    before it and before every later one), with no wait for the next step and also while the
    engine is idle;
  - with actors.weight_staging=none, no staging copy: the receiver thread takes the step lock
    for the whole transfer and writes into the parameters themselves (DirectWeights), after
    the forwards queued before it;
  - a wrapper around this worker's `execute_model` that, at the start of every step, swaps a
    version the receiver thread has not yet swapped and, on TP rank 0, pushes to the engine's process (ZeroMQ PUSH, msgpack) a record
    (version, output tokens the request had before this step) for every scheduled request
    whose serving version changed, plus each swap's time and duration.
No engine RPC is made per update. The mixin's __init__ never runs (vLLM does not call it)
and vLLM refuses names the worker already has, so every attribute here starts `asyncrl_`.

The HF -> vLLM layout (`vllm_layout`) is a pure function of the Hugging Face config, so it is
tested on CPU without vLLM; the worker checks it against the real parameters at install.
"""
from __future__ import annotations

import pickle
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from actors.engine import DirectWeights, StagedWeights, WeightUpdateError, choose_staging

VOCAB_PADDING = 64  # vLLM pads embed_tokens / lm_head rows to a multiple of this (vocab_parallel_embedding.py)


# -- the layout: Hugging Face names -> slices of vLLM's parameters ---------------------------
@dataclass(frozen=True)
class Piece:
    """Rows (dim 0) or columns (dim 1) [src, src+size) of a Hugging Face tensor, written to
    [dst, dst+size) of the vLLM parameter `target` along the same dimension."""
    target: str
    dim: int
    dst: int
    src: int
    size: int


def _cfg(cfg, key, default=None):
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def _dims(cfg) -> dict:
    heads = _cfg(cfg, "num_attention_heads")
    hidden = _cfg(cfg, "hidden_size")
    qwen2 = _cfg(cfg, "model_type") == "qwen2"
    return dict(
        hidden=hidden, heads=heads, kv_heads=_cfg(cfg, "num_key_value_heads") or heads,
        head_dim=_cfg(cfg, "head_dim") or hidden // heads, inter=_cfg(cfg, "intermediate_size"),
        layers=_cfg(cfg, "num_hidden_layers"), vocab=_cfg(cfg, "vocab_size"),
        tied=bool(_cfg(cfg, "tie_word_embeddings", False)),
        qkv_bias=qwen2 or bool(_cfg(cfg, "attention_bias", False)),   # Qwen2: q/k/v biases, none on o_proj
        o_bias=(not qwen2) and bool(_cfg(cfg, "attention_bias", False)),
        mlp_bias=bool(_cfg(cfg, "mlp_bias", False)))


def hf_parameter_shapes(cfg) -> dict:
    """Shapes of a Qwen2/Llama causal LM's Hugging Face parameters (tied: no lm_head.weight)."""
    d = _dims(cfg)
    H, q, kv, inter = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["inter"]
    shapes = {"model.embed_tokens.weight": (d["vocab"], H), "model.norm.weight": (H,)}
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
                       p + "mlp.down_proj.weight": (H, inter),
                       p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
        if d["qkv_bias"]:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if d["o_bias"]:
            shapes[p + "self_attn.o_proj.bias"] = (H,)
        if d["mlp_bias"]:
            shapes.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                           p + "mlp.down_proj.bias": (H,)})
    if not d["tied"]:
        shapes["lm_head.weight"] = (d["vocab"], H)
    return shapes


def vllm_layout(cfg, tp_rank: int = 0, tp_size: int = 1) -> tuple[dict, dict]:
    """(vLLM parameter shapes on this tensor-parallel rank, HF name -> [Piece]) for a Qwen2/Llama
    model (qwen2.py / llama.py `stacked_params_mapping`, layers/linear.py sharding):
    q, k, v -> row blocks of qkv_proj (kv heads replicated when tp_size > kv heads); gate, up ->
    halves of gate_up_proj; o_proj/down_proj split by columns; the vocabulary padded to a
    multiple of 64 and split by rows, the HF rows filling the first V; tied embeddings are
    one parameter, so lm_head.weight (if sent) lands on embed_tokens."""
    d = _dims(cfg)
    H, hd, V = d["hidden"], d["head_dim"], d["vocab"]
    if d["heads"] % tp_size or d["inter"] % tp_size:
        raise ValueError(f"heads ({d['heads']}) and intermediate_size ({d['inter']}) must divide by tp_size={tp_size}")
    q_rows = d["heads"] // tp_size * hd
    if tp_size >= d["kv_heads"]:
        kv_rows, kv_shard = hd, tp_rank // (tp_size // d["kv_heads"])  # each rank holds one replicated kv head
    else:
        kv_rows, kv_shard = d["kv_heads"] // tp_size * hd, tp_rank
    inter = d["inter"] // tp_size
    shapes, table = {}, {}

    def full(hf: str, target: str, shape: tuple):
        shapes[target] = shape
        table[hf] = [Piece(target, 0, 0, 0, shape[0])]

    padded = -(-V // VOCAB_PADDING) * VOCAB_PADDING
    per_rank = padded // tp_size
    v_start = tp_rank * per_rank
    vocab_piece = max(0, min(per_rank, V - v_start))
    shapes["model.embed_tokens.weight"] = (per_rank, H)
    table["model.embed_tokens.weight"] = [Piece("model.embed_tokens.weight", 0, 0, v_start, vocab_piece)]
    head = "model.embed_tokens.weight" if d["tied"] else "lm_head.weight"
    shapes[head] = (per_rank, H)
    table["lm_head.weight"] = [Piece(head, 0, 0, v_start, vocab_piece)]
    full("model.norm.weight", "model.norm.weight", (H,))

    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        qkv, gate_up = p + "self_attn.qkv_proj", p + "mlp.gate_up_proj"
        suffixes = ("weight", "bias") if d["qkv_bias"] else ("weight",)
        for s in suffixes:
            shapes[f"{qkv}.{s}"] = (q_rows + 2 * kv_rows, H) if s == "weight" else (q_rows + 2 * kv_rows,)
            table[f"{p}self_attn.q_proj.{s}"] = [Piece(f"{qkv}.{s}", 0, 0, tp_rank * q_rows, q_rows)]
            table[f"{p}self_attn.k_proj.{s}"] = [Piece(f"{qkv}.{s}", 0, q_rows, kv_shard * kv_rows, kv_rows)]
            table[f"{p}self_attn.v_proj.{s}"] = [Piece(f"{qkv}.{s}", 0, q_rows + kv_rows, kv_shard * kv_rows, kv_rows)]
        shapes[p + "self_attn.o_proj.weight"] = (H, q_rows)
        table[p + "self_attn.o_proj.weight"] = [Piece(p + "self_attn.o_proj.weight", 1, 0, tp_rank * q_rows, q_rows)]
        if d["o_bias"]:  # a row-parallel bias is whole on every rank
            full(p + "self_attn.o_proj.bias", p + "self_attn.o_proj.bias", (H,))
        for s in ("weight", "bias") if d["mlp_bias"] else ("weight",):
            shapes[f"{gate_up}.{s}"] = (2 * inter, H) if s == "weight" else (2 * inter,)
            table[f"{p}mlp.gate_proj.{s}"] = [Piece(f"{gate_up}.{s}", 0, 0, tp_rank * inter, inter)]
            table[f"{p}mlp.up_proj.{s}"] = [Piece(f"{gate_up}.{s}", 0, inter, tp_rank * inter, inter)]
        shapes[p + "mlp.down_proj.weight"] = (H, inter)
        table[p + "mlp.down_proj.weight"] = [Piece(p + "mlp.down_proj.weight", 1, 0, tp_rank * inter, inter)]
        if d["mlp_bias"]:
            full(p + "mlp.down_proj.bias", p + "mlp.down_proj.bias", (H,))
        full(p + "input_layernorm.weight", p + "input_layernorm.weight", (H,))
        full(p + "post_attention_layernorm.weight", p + "post_attention_layernorm.weight", (H,))
    return shapes, table


def make_route(cfg, table: dict, staging: dict):
    """StagedWeights' route: an HF-named tensor -> [(staging view, source view)]."""
    hf_shapes = hf_parameter_shapes(cfg)
    if "lm_head.weight" not in hf_shapes:  # tied: a sender may still send it; it equals embed_tokens
        hf_shapes["lm_head.weight"] = hf_shapes["model.embed_tokens.weight"]

    def route(name: str, tensor: torch.Tensor) -> list:
        pieces = table.get(name)
        if pieces is None:
            return []
        if tuple(tensor.shape) != tuple(hf_shapes[name]):
            raise WeightUpdateError(f"received weight {name!r} has shape {tuple(tensor.shape)}, "
                                    f"the model's config needs {tuple(hf_shapes[name])}")
        return [(staging[p.target].narrow(p.dim, p.dst, p.size), tensor.narrow(p.dim, p.src, p.size))
                for p in pieces]
    return route


def expected_names(cfg) -> set:
    """HF names every version must carry."""
    return set(hf_parameter_shapes(cfg))


def check_layout(shapes: dict, params: dict) -> None:
    """The computed layout must match the engine's real parameters exactly."""
    missing = sorted(set(params) - set(shapes))
    extra = sorted(set(shapes) - set(params))
    wrong = sorted(n for n in set(shapes) & set(params) if tuple(params[n].shape) != tuple(shapes[n]))
    if missing or extra or wrong:
        raise WeightUpdateError(
            "the HF -> vLLM layout does not fit this model: "
            + "; ".join(f"{what} {names[:4]}" for what, names in
                        (("not covered", missing), ("not in the model", extra),
                         ("other shape", [f"{n} {tuple(params[n].shape)} vs {shapes[n]}" for n in wrong])) if names))


# -- staging ordered on the GPU --------------------------------------------------------------
class _StreamStaging(StagedWeights):
    """StagedWeights whose writes run on the receiver's CUDA stream. The swap is ordered after
    them because commit() synchronises that stream before marking the version ready; a new
    version's writes are ordered after the last swap, the one reader of the staging, because
    begin() (which takes the lock only once that swap was queued) makes the copy stream wait
    for the event recorded after it, not for the forward passes queued on the engine's
    stream (waiting for those cost ~6 ms per update)."""

    def __init__(self, params: dict, expected: set, copy_stream, main_stream):
        super().__init__(params, expected=expected)
        self.copy_stream, self.main_stream = copy_stream, main_stream
        self.swap_timing = None  # (version, start event, end event) of the last swap
        self._swapped = None     # event recorded on the engine's stream after the last swap

    def begin(self, version: int) -> None:
        super().begin(version)
        if self._swapped is not None:
            try:
                self.copy_stream.wait_event(self._swapped)
            except BaseException:
                self.abort()   # begin failed: the receiver will not abort what it never began
                raise

    def _landed(self) -> None:
        self.copy_stream.synchronize()   # the writes were queued there (the receiver thread's stream)

    def _copy_in(self, version: int) -> None:
        # under the lock: the next begin() sees this swap's event, never an older one
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        super()._copy_in(version)
        end.record()
        self.swap_timing, self._swapped = (version, start, end), end


class _StreamDirect(DirectWeights):
    """DirectWeights whose writes run on the receiver's CUDA stream: begin() (holding the step
    lock, so no forward is being queued) makes that stream wait for every forward queued on
    the engine's stream, the last readers of the old weights; commit() waits for the writes
    on the host before it lets the next step queue its forward."""

    def __init__(self, params: dict, hold, expected: set, copy_stream, main_stream):
        super().__init__(params, hold, expected=expected)
        self.copy_stream, self.main_stream = copy_stream, main_stream
        self.swap_timing = None
        self._start = None

    def begin(self, version: int) -> None:
        super().begin(version)
        try:
            self.copy_stream.wait_stream(self.main_stream)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(self.copy_stream)
        except BaseException:
            self._release()   # begin failed: the receiver will not abort what it never began
            raise

    def _landed(self) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record(self.copy_stream)
        self.copy_stream.synchronize()   # the writes were queued there (the receiver thread's stream)
        self.swap_timing = (None, self._start, end)   # the version is filled in by swap_if_ready

    def swap_if_ready(self) -> int | None:
        version = super().swap_if_ready()
        if version is not None and self.swap_timing is not None:
            self.swap_timing = (version, *self.swap_timing[1:])
        return version


# -- the per-request version log (pure: tested on CPU) ---------------------------------------
class StepLog:
    """Per scheduled request, the version it was last recorded under; `step()` returns the
    records (req_id, output tokens before this step) of requests whose version changed."""

    def __init__(self):
        self.last: dict = {}

    def step(self, scheduler_output, version: int) -> list:
        records = []
        for r in scheduler_output.scheduled_new_reqs:  # new, or (model runner V2) resumed
            prefill, prompt = getattr(r, "prefill_token_ids", None), r.prompt_token_ids
            n = len(prefill) - len(prompt) if prefill is not None and prompt is not None else 0
            if self.last.get(r.req_id) != version:
                self.last[r.req_id] = version
                records.append((r.req_id, n))
        cached = scheduler_output.scheduled_cached_reqs
        # num_output_tokens counts the placeholders of steps still in flight (async scheduling),
        # so it is the index of the token this step samples
        for req_id, n in zip(cached.req_ids, cached.num_output_tokens):
            if self.last.get(req_id) != version:
                self.last[req_id] = version
                records.append((req_id, int(n)))
        for req_id in scheduler_output.finished_req_ids:
            self.last.pop(req_id, None)
        return records


# -- the extension ---------------------------------------------------------------------------
class AsyncRLWorker:
    def asyncrl_install(self, receiver_pickle: bytes, log_address: str, staging: str = "auto") -> dict:
        """Stage, swap and log (see the module docstring). `receiver_pickle`: a pickled
        WeightReceiver not yet connected (each worker unpickles its own copy), or a channel
        spec whose receiver(index) is called with the TP rank. `staging`: actors.weight_staging."""
        from common.weights import WeightReceiver
        import msgpack
        import zmq
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        if getattr(self, "asyncrl_staged", None) is not None:
            raise RuntimeError("asyncrl weight updates are already installed on this worker")
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        cfg = self.vllm_config.model_config.hf_config.get_text_config()
        params = dict(self.get_model().named_parameters())
        shapes, table = vllm_layout(cfg, rank, size)
        check_layout(shapes, params)
        main = torch.cuda.current_stream()
        # A step is execute_model(k) and, when that returns None, sample_tokens(k) (which applies
        # lm_head): the step lock spans both, so a swap from the receiver thread falls between
        # two steps, never inside one. Executors look both methods up per step.
        self.asyncrl_step_lock = threading.Lock()
        staging = choose_staging(staging, params)   # auto: full where a full copy fits beside the engine
        if staging == "none":
            staged = _StreamDirect(params, self.asyncrl_step_lock, expected_names(cfg), torch.cuda.Stream(), main)
            staging_bytes = 0
        else:
            staged = _StreamStaging(params, expected_names(cfg), torch.cuda.Stream(), main)
            with torch.inference_mode():
                for name, p in params.items():  # vocabulary padding rows keep what vLLM put there
                    staged.staging[name].copy_(p)
            torch.cuda.synchronize()
            staging_bytes = sum(t.numel() * t.element_size() for t in staged.staging.values())
        staged.route = make_route(cfg, table, staged.staging)

        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.SNDHWM, 0)   # never drop or block on a record
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(log_address)
        self.asyncrl_rank, self.asyncrl_staged, self.asyncrl_push = rank, staged, push
        self.asyncrl_pack = msgpack.packb
        self.asyncrl_push_lock = threading.Lock()  # the step and the receiver thread both send
        self.asyncrl_version, self.asyncrl_log, self.asyncrl_timing = 0, StepLog(), None
        self.asyncrl_stop = threading.Event()
        receiver = pickle.loads(receiver_pickle)
        if not isinstance(receiver, WeightReceiver):
            receiver = receiver.receiver(rank)
        if size > 1 and hasattr(receiver, "name"):
            receiver.name = f"{receiver.name}/tp{rank}"
        # The receiver thread shares the GIL with the engine's busy loop; a shorter switch
        # interval (CPython's default is 5 ms) hands it over sooner when the thread wakes.
        sys.setswitchinterval(0.0005)
        self.asyncrl_thread = threading.Thread(target=self.asyncrl_receive, args=(receiver,),
                                               name="asyncrl-weights", daemon=True)
        self.asyncrl_thread.start()

        in_step = {"held": False}
        original_execute, original_sample = self.execute_model, self.sample_tokens

        def execute_model(scheduler_output, *args, **kwargs):
            self.asyncrl_step_lock.acquire()
            try:
                self.asyncrl_step(scheduler_output)
                out = original_execute(scheduler_output, *args, **kwargs)
            except BaseException:
                self.asyncrl_step_lock.release()
                raise
            if out is None:        # sample_tokens(k) follows and ends the step
                in_step["held"] = True
            else:
                self.asyncrl_step_lock.release()
            return out

        def sample_tokens(*args, **kwargs):
            try:
                return original_sample(*args, **kwargs)
            finally:
                if in_step["held"]:
                    in_step["held"] = False
                    self.asyncrl_step_lock.release()
        self.execute_model, self.sample_tokens = execute_model, sample_tokens
        self.asyncrl_send([{"kind": "installed", "rank": rank, "staging_bytes": staging_bytes}])
        return {"rank": rank, "staging": staging, "staging_bytes": staging_bytes, "parameters": len(params)}

    def asyncrl_send(self, messages: list) -> None:
        with self.asyncrl_push_lock:
            self.asyncrl_push.send(self.asyncrl_pack(messages))

    def asyncrl_swap(self) -> list:
        """Swap a committed version in (the caller holds the step lock and has the engine's
        stream current); the messages that tell it."""
        with torch.inference_mode():
            version = self.asyncrl_staged.swap_if_ready()
        if version is None:
            return []
        self.asyncrl_version = version
        self.asyncrl_timing = self.asyncrl_staged.swap_timing
        return [{"kind": "swap", "version": version, "t": time.time(),
                 "host_ms": self.asyncrl_staged.last_swap_s * 1e3}]

    def asyncrl_step(self, scheduler_output) -> None:
        """At a step boundary (before this step's forward is queued): swap what the receiver
        thread could not yet, then log."""
        messages = self.asyncrl_swap()
        version = messages[0]["version"] if messages else None
        if self.asyncrl_timing is not None and self.asyncrl_timing[2].query():
            v, start, end = self.asyncrl_timing
            messages.append({"kind": "swap_gpu", "version": v, "ms": start.elapsed_time(end)})
            self.asyncrl_timing = None
        if self.asyncrl_rank == 0:
            records = self.asyncrl_log.step(scheduler_output, self.asyncrl_version)
            if records:
                messages.append({"kind": "versions", "version": self.asyncrl_version, "records": records})
        if messages and (self.asyncrl_rank == 0 or version is not None):
            self.asyncrl_send(messages)

    def asyncrl_receive(self, receiver) -> None:
        """The receiver thread: versions from the channel into staging, until stopped or failed."""
        try:
            torch.cuda.set_device(self.device)
            with torch.inference_mode(), torch.cuda.stream(self.asyncrl_staged.copy_stream):
                while not self.asyncrl_stop.is_set():
                    version = receiver.receive(self.asyncrl_staged, timeout_s=0.5)
                    if version is None:
                        continue
                    messages = [{"kind": "staged", "version": version, "t": time.time(),
                                 **getattr(receiver, "last_timing", {})}]
                    # Swap at once, between two steps (the step lock), on the engine's stream, so
                    # it is ordered after the forward passes queued so far and before the next:
                    # no wait for the next step, and an idle engine serves the new version too.
                    with self.asyncrl_step_lock, torch.cuda.stream(self.asyncrl_staged.main_stream):
                        messages += self.asyncrl_swap()
                    self.asyncrl_send(messages)
        except BaseException as e:  # the served version stays; the engine's check() raises this
            self.asyncrl_send([{"kind": "error", "rank": self.asyncrl_rank,
                                "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc(limit=8)}])

    def asyncrl_checksum(self) -> list:
        """Per parameter, the float64 sum of the served weights (tests and benches)."""
        return [[n, float(p.double().sum())] for n, p in self.get_model().named_parameters()]
