"""A Hugging Face transformers engine (CPU or one GPU).

A batching thread takes every pending request (up to `max_batch`, those with the same
settings) and samples the batch with its own decoding loop: softmax(logits / T) over the whole
vocabulary, nothing else. Every forward of that loop is a step: it holds the step lock and
first swaps in a weight version that is ready, so a version arrives between two tokens of a
batch, as in vLLM, and each token records the version of the forward that sampled it. The model's
generation_config.json (repetition penalty, top-k, ...) is never consulted, so the behaviour
log-probs reported are exactly those of the distribution sampled from.
"""
from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoModelForCausalLM

from actors.engine import (DirectWeights, Engine, Sample, StagedWeights, WeightUpdateError, choose_staging,
                           settle_from_thread)
from common.weights import deliver


@dataclass
class _Request:
    prompt: list
    max_new_tokens: int
    temperature: float
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class HFEngine(Engine):
    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu",
                 stop_token_ids: list = (), pad_token_id: int = 0, seed: int = 0, max_batch: int = 64,
                 weight_staging: str = "auto"):
        self.device = torch.device(device)
        transformers.logging.disable_progress_bar()  # one bar per process per load floods the driver's log
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = pad_token_id
        self.max_batch = max_batch
        # transformers renamed the KV-cache argument (past_key_values -> cache) in 5.2x; take either
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._step_lock = threading.Lock()   # held by each forward (and an idle swap): a step of this engine
        params = dict(self.model.named_parameters())
        self.weight_staging = choose_staging(weight_staging, params)   # actors.weight_staging
        self.staged = DirectWeights(params, self._step_lock) if self.weight_staging == "none" else StagedWeights(params)
        self._version = 0
        self._generator = torch.Generator(self.device).manual_seed(seed)
        self._requests: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._error: BaseException | None = None
        self.busy_s = 0.0  # seconds spent sampling batches
        self.batches = 0
        self._thread = threading.Thread(target=self._serve, name="hf-engine", daemon=True)
        self._thread.start()

    @property
    def version(self) -> int:
        return self._version

    async def generate(self, prompt: list, max_new_tokens: int, temperature: float) -> Sample:
        self.check()
        loop = asyncio.get_running_loop()
        request = _Request(list(prompt), max_new_tokens, temperature, loop.create_future(), loop)
        self._requests.put(request)
        return await request.future

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"HF engine failed: {type(self._error).__name__}: {self._error}") from self._error

    def close(self) -> None:
        self._closed.set()
        self._thread.join(10.0)

    def stats(self) -> dict:
        return {"weight_swaps": self.staged.swaps, "weight_swap_s": self.staged.swap_s, "engine_busy_s": self.busy_s,
                "engine_batches": self.batches}

    # -- weights ----------------------------------------------------------------------------
    def start_weight_updates(self, receiver) -> None:
        threading.Thread(target=self._receive_weights, args=(receiver,), name="hf-weights", daemon=True).start()

    def _receive_weights(self, receiver) -> None:
        try:
            while not self._closed.is_set():
                receiver.receive(self.staged, timeout_s=0.5)
        except BaseException as e:  # reported by check(); the served version stays as it was
            self._error = e

    def load_weights(self, weights: dict, version: int) -> None:
        """Stage `weights` (Hugging Face names -> tensors or arrays) as `version`; served from
        the next batch on. Raises WeightUpdateError naming a tensor that does not fit."""
        deliver(self.staged, version, weights)

    # -- the batching loop ------------------------------------------------------------------
    def _serve(self) -> None:
        held: list = []  # taken from the queue but of other settings than the batch being run
        while not self._closed.is_set():
            try:
                first = held.pop(0) if held else self._requests.get(timeout=0.05)
            except queue.Empty:
                try:
                    with self._step_lock:
                        self._swap()  # idle is a step boundary too
                except WeightUpdateError as e:  # weights left mixed (weight_staging=none): check() raises it
                    self._error = self._error or e
                continue
            batch, rest = [first], []
            for r in held + self._drain():
                same = (r.max_new_tokens, r.temperature) == (first.max_new_tokens, first.temperature)
                (batch if same and len(batch) < self.max_batch else rest).append(r)
            held = rest
            batch = [r for r in batch if not r.future.done()]
            if not batch:
                continue
            t = time.monotonic()
            try:
                samples = self._sample([r.prompt for r in batch], first.max_new_tokens, first.temperature)
            except Exception as e:  # every request of the batch fails with it; the loop goes on
                if isinstance(e, WeightUpdateError):   # weights left mixed: check() stops the actor too
                    self._error = self._error or e
                for r in batch:
                    settle_from_thread(r.loop, r.future, error=e)
                continue
            self.busy_s += time.monotonic() - t
            self.batches += 1
            for r, s in zip(batch, samples):
                settle_from_thread(r.loop, r.future, result=s)

    def _swap(self) -> None:
        swapped = self.staged.swap_if_ready()
        if swapped is not None:
            self._version = swapped

    def _step(self, **inputs) -> tuple:
        """One forward between two weight swaps: (its output, the version that computed it)."""
        with self._step_lock:
            self._swap()
            return self.model(**inputs), self._version

    def _drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self._requests.get_nowait())
            except queue.Empty:
                return out

    @torch.no_grad()
    def _sample(self, prompts: list, max_new_tokens: int, temperature: float) -> list:
        rows, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row continues at the end
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        out, version = self._step(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                  use_cache=True, logits_to_keep=1)
        stops = torch.tensor(self.stop_token_ids or [-1], device=self.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=self.device)
        next_position = positions[:, -1:] + 1
        tokens, logprobs, versions = [], [], []
        for step in range(max_new_tokens):
            versions.append(version)
            step_logprobs = torch.log_softmax(out.logits[:, -1].float() / (temperature or 1.0), dim=-1)  # [B, V]
            if temperature == 0:  # greedy (evaluation); the log-probs are then those at T = 1
                token = step_logprobs.argmax(-1, keepdim=True)                                  # [B, 1]
            else:
                token = torch.multinomial(step_logprobs.exp(), 1, generator=self._generator)    # [B, 1]
            tokens.append(token[:, 0])
            logprobs.append(step_logprobs.gather(1, token)[:, 0])
            finished |= torch.isin(token[:, 0], stops)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            out, version = self._step(input_ids=token, attention_mask=attention_mask, position_ids=next_position,
                                      use_cache=True, **{self._cache_arg: getattr(out, self._cache_arg)})
            next_position = next_position + 1
        new_tokens, new_logprobs = torch.stack(tokens, 1).tolist(), torch.stack(logprobs, 1).tolist()   # [B, N]
        stop_set, samples = set(self.stop_token_ids), []
        for row, row_logprobs in zip(new_tokens, new_logprobs):
            end = next((i + 1 for i, t in enumerate(row) if t in stop_set), None)
            n = end if end is not None else len(row)
            samples.append(Sample(row[:n], row_logprobs[:n], versions[:n], "stop" if end is not None else "length"))
        return samples
