"""The vLLM actor group on one GPU: throughput against vLLM alone, in-flight weight updates
against a device copy of the same bytes and against vLLM's own pause/update/resume path,
greedy tokens after updates against a cold start, and behaviour log-probs against HF.

Per model (SmolLM2-135M's shape, vocabulary 49152, the GPU job's model; Qwen2-0.5B / -1.5B
shapes, vocabulary 151936; random bf16 weights; the engine starts with load_format="dummy" and
gets the learner's weights through the channel):
  1. a learner process (spawned; the bench's own process never touches CUDA, vLLM starts
     first) builds the HF model on the GPU and an IpcWeightSender; a buffer server process
  2. VLLMEngine; bare: AsyncLLM alone on the workload (P prompts of 64 random tokens, 256 new
     tokens, T=1, FINAL_ONLY, logprobs=0), output tokens/s: in rounds (all P at once, then
     wait), and kept full (P requests in flight, a group of G refilled as it ends) for a window
  3. weight updates started (one collective_rpc); asyncrl: EpisodeRunner (one-turn
     environment, word tokenizer over token ids) + inserts into the buffer over ZeroMQ, in
     rounds, then the actor's own loop (RolloutActor.run, P episodes in flight) in windows that
     alternate with vLLM kept full alone (bare, asyncrl, asyncrl, bare, ...: --pairs pairs, so
     a drift of the machine falls on both); ratio_tokens is the mean of asyncrl's windows over
     the mean of bare's, by vLLM's own generated-token counter, with each pair's ratio beside
     it (rounds: ratio_tokens_rounds); while asyncrl runs the learner perturbs its weights and
     sends a version every second; per version: learner has v (just before send) -> the worker
     swapped v in (time.time(), one host)
  4. 0.5B: greedy check (batch 1, after updates, against a cold-started engine on the saved
     weights, same CUDA-graph setting) and the log-prob gap (learner's HF forward, bf16)
  5. 1.5B: vLLM's native path under load: pause_generation(keep), IPC weight-transfer
     update, resume; and the floor: a device-to-device copy of the weights' bytes
--transport nccl (2 GPUs, the two-GPU issue): the learner process on GPU 0 sends through the
broadcast channel (NCCL) to vLLM on GPU 1, and vLLM's native path uses its NCCL engine; the
floor (a plain NCCL broadcast of the same bytes) is bench/weight_push_bench.py's, run in the
same device call. Not run yet: written on CPU, no 2-GPU kind lent.
Writes $OUT/actor_bench_<models>.json; prints a table, then one JSON line.
Usage: python -m bench.actor_bench [--models 0.5b,1.5b|135m] [--quick] [--rounds 0] [--pairs 2] [--continuous-s 12]
                                   [--transport ipc|nccl]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import importlib.util
import itertools
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import torch.multiprocessing as tmp

from common.net import free_port

MODELS = {  # name -> architecture, vocabulary and shape; all with tied embeddings
    "135m": dict(arch="llama", vocab=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3),   # SmolLM2-135M (no biases)
    "0.5b": dict(arch="qwen2", vocab=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),   # Qwen2-0.5B (q/k/v biases)
    "1.5b": dict(arch="qwen2", vocab=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2),   # Qwen2-1.5B
}
PROMPT_TOKENS, NEW_TOKENS, GROUP = 64, 256, 8


def write_config(path: str, shape: str) -> str:
    os.makedirs(path, exist_ok=True)
    model = dict(MODELS[shape])
    arch, vocab = model.pop("arch"), model.pop("vocab")
    cfg = dict(vocab_size=vocab, hidden_act="silu", max_position_embeddings=4096, tie_word_embeddings=True,
               attention_dropout=0.0, initializer_range=0.02, bos_token_id=0, eos_token_id=1, dtype="bfloat16",
               torch_dtype="bfloat16", **model)
    if arch == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0, rms_norm_eps=1e-6,
                   use_sliding_window=False, sliding_window=None, max_window_layers=model["num_hidden_layers"])
    else:   # SmolLM2's: Llama with plain RoPE, no biases
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=100000.0, rms_norm_eps=1e-5,
                   attention_bias=False, mlp_bias=False, head_dim=model["hidden_size"] // model["num_attention_heads"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return path


# -- the learner process: HF model on the GPU, IpcWeightSender --------------------------------
def learner_main(conn, model_dir: str, seed: int, transport: str = "ipc") -> None:
    try:
        _learner(conn, model_dir, seed, transport)
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _learner(conn, model_dir: str, seed: int, transport: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from common.rendezvous import RendezvousHost
    from common.weights_broadcast import BroadcastChannelSpec
    from common.weights_ipc import IpcChannelSpec

    torch.cuda.set_device(0)
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).to(torch.bfloat16)
    model.eval().requires_grad_(False)
    named = {n: p.detach() for n, p in model.named_parameters()}  # tied: one embedding
    nbytes = sum(p.numel() * p.element_size() for p in named.values())
    meeting = RendezvousHost("127.0.0.1")   # where the engine's receiver finds this sender, as in a job
    if transport == "nccl":   # the engine on the other GPU, over a broadcast group
        spec = BroadcastChannelSpec(meeting.rendezvous("weights"), receivers=1, backend="nccl", timeout_s=120.0)
    else:
        spec = IpcChannelSpec(meeting.rendezvous("weights"), timeout_s=120.0)
    sender = spec.sender()
    state = {"version": 0, "log": [], "stop": threading.Event(), "thread": None, "native_group": None}

    def publish() -> dict:
        for p in named.values():  # a new version: every tensor changes
            p.add_(torch.randn_like(p), alpha=2e-3)
        torch.cuda.synchronize()
        state["version"] += 1
        t_has, t = time.time(), time.perf_counter()
        sender.send(state["version"], named)
        record = {"version": state["version"], "t_has": t_has, "send_ms": (time.perf_counter() - t) * 1e3}
        state["log"].append(record)
        return record

    def publish_every(period_s: float) -> None:
        while not state["stop"].is_set():
            t = time.monotonic()
            publish()
            state["stop"].wait(max(0.0, period_s - (time.monotonic() - t)))

    conn.send(("ready", spec, nbytes, len(named), torch.cuda.get_device_name(0)))
    while True:
        cmd, *args = conn.recv()
        if cmd == "wait_receivers":
            sender.wait_for_receivers(*args)
            conn.send(("ok",))
        elif cmd == "publish_once":
            conn.send(("ok", publish()))
        elif cmd == "publish_start":
            state["stop"].clear()
            state["thread"] = threading.Thread(target=publish_every, args=args, daemon=True)
            state["thread"].start()
            conn.send(("ok",))
        elif cmd == "publish_stop":
            state["stop"].set()
            state["thread"].join()
            conn.send(("ok", list(state["log"])))
        elif cmd == "perturb":  # a new version for vLLM's own path (no send)
            for p in named.values():
                p.add_(torch.randn_like(p), alpha=2e-3)
            torch.cuda.synchronize()
            conn.send(("ok", time.time()))
        elif cmd == "native_handles":
            from torch.multiprocessing.reductions import reduce_tensor
            uuid = str(torch.cuda.get_device_properties(0).uuid)
            conn.send(("ok", dict(names=list(named), dtype_names=[str(p.dtype).split(".")[-1] for p in named.values()],
                                  shapes=[list(p.shape) for p in named.values()],
                                  ipc_handles=[{uuid: reduce_tensor(p)[1]} for p in named.values()], packed=False)))
        elif cmd == "native_nccl_init":   # vLLM's own NCCL path: this process is rank 0 of its group
            from vllm.distributed.weight_transfer.nccl_common import trainer_init
            address, port = args
            state["native_group"] = trainer_init({"master_address": address, "master_port": port, "world_size": 2})
            conn.send(("ok", dict(names=list(named), dtype_names=[str(p.dtype).split(".")[-1] for p in named.values()],
                                  shapes=[list(p.shape) for p in named.values()], packed=True)))
        elif cmd == "native_nccl_send":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
            NCCLWeightTransferEngine.trainer_send_weights(iter(named.items()),
                                                          {"group": state["native_group"], "packed": True})
            torch.cuda.synchronize()
            conn.send(("ok", time.time()))
        elif cmd == "floor" and transport == "nccl":   # between GPUs: bench/weight_push_bench.py measures it
            conn.send(("ok", None))
        elif cmd == "floor":
            src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            times = []
            for i in range(13):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            del src, dst
            torch.cuda.empty_cache()
            conn.send(("ok", statistics.median(times[3:])))
        elif cmd == "save":
            model.save_pretrained(args[0])
            conn.send(("ok",))
        elif cmd == "score":
            conn.send(("ok", _score(model, *args)))
        elif cmd == "exit":
            sender.close()
            conn.send(("ok",))
            return


def _score(model, samples: list, temperature: float) -> dict:
    """|vLLM behaviour log-prob - HF log_softmax(logits / T)| of the same tokens, same weights."""
    import torch

    gaps = []
    with torch.no_grad():
        for i in range(0, len(samples), 8):
            chunk = samples[i:i + 8]
            width = max(len(p) + len(t) for p, t, _ in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long, device="cuda")
            mask = torch.zeros_like(ids)
            for row, (p, t, _) in enumerate(chunk):
                ids[row, :len(p) + len(t)] = torch.tensor(p + t)
                mask[row, :len(p) + len(t)] = 1
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float() / temperature, -1)
            for row, (p, t, lp) in enumerate(chunk):
                pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device="cuda")
                hf = logprobs[row, pos, torch.tensor(t, device="cuda")]
                gaps.append((hf - torch.tensor(lp, device="cuda")).abs())
            del logprobs
    gaps = torch.cat(gaps)
    return {"mean": float(gaps.mean()), "max": float(gaps.max()), "tokens": int(gaps.numel())}


class Learner:
    def __init__(self, model_dir: str, seed: int = 0, transport: str = "ipc"):
        ctx = tmp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=learner_main, args=(child, model_dir, seed, transport), daemon=True)
        self.proc.start()
        _, self.spec, self.nbytes, self.ntensors, self.device = self._recv(300)

    def ask(self, *cmd, timeout_s: float = 300):
        self.conn.send(cmd)
        reply = self._recv(timeout_s)
        return reply[1] if len(reply) > 1 else None

    def _recv(self, timeout_s: float):
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"the learner process did not answer within {timeout_s}s")
        reply = self.conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"learner process failed:\n{reply[1]}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("exit", timeout_s=20)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()


def buffer_main(conn) -> None:
    from buffer.server import BufferConfig, BufferServer
    from buffer.table import TableConfig

    server = BufferServer(BufferConfig(table=TableConfig(max_size=100_000, max_staleness=1_000_000))).start()
    conn.send(server.address)
    conn.recv()
    server.stop()


# -- the actor group's parts: a word tokenizer over ids and a one-turn environment -------------
class IdTokenizer:
    """Text "t12 t7 ..." <-> token ids [12, 7, ...]: the rollout loop's renderer on raw ids."""
    chat_template = None
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return " ".join(f"t{t}" for t in tokens)


def make_env(vocab: int):
    from envs.base import Environment, StepResult, last_reply

    class CountEnv(Environment):
        """Reward: the share of reply tokens below 1000 (any cheap single-turn check will do)."""
        def sample(self, rng):  # the bench builds its tasks itself (the same prompts as bare vLLM's)
            p = prompts(rng, 1, vocab)[0]
            return {"id": f"sampled-{rng.getrandbits(32)}", "prompt": " ".join(f"t{t}" for t in p)}

        def reset(self, task):
            return [{"role": "user", "content": task["prompt"]}]

        def step(self, messages):
            words = last_reply(messages).split()
            return StepResult(reward=sum(int(w[1:]) < 1000 for w in words) / max(1, len(words)), done=True)
    return CountEnv()


def prompts(rng: random.Random, n: int, vocab: int) -> list:
    return [[rng.randrange(100, vocab - 100) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def stop_tokens(share: float, vocab: int) -> list:
    """A fixed random `share` of the vocabulary as stop tokens (random weights sample nearly
    uniformly, so each token stops a request with about that probability)."""
    return sorted(random.Random(5).sample(range(vocab), int(vocab * share))) if share > 0 else []


def bare_round(engine, batch: list, new_tokens: int) -> dict:
    """AsyncLLM alone on the engine's loop: every prompt at once, FINAL_ONLY, logprobs=0."""
    params = engine.sampling_params(new_tokens, 1.0)

    async def one(i, p):
        from vllm import TokensPrompt
        final = None
        async for out in engine.llm.generate(TokensPrompt(prompt_token_ids=p), params, f"bare{i}-{time.time_ns()}"):
            final = out
        return len(final.outputs[0].token_ids)

    async def all_():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
    t = time.perf_counter()
    tokens = sum(engine.call(all_()))
    wall = time.perf_counter() - t
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def actor_round(engine, runner, client, tasks: list) -> dict:
    """The actor group: every episode its own task, groups inserted into the buffer as they end."""
    pool = ThreadPoolExecutor(1)  # the buffer client's socket stays on one thread

    async def group(task):
        g = await runner.group(task)
        await asyncio.get_running_loop().run_in_executor(pool, client.insert, g)
        return g

    async def all_():
        return await asyncio.gather(*(group(t) for t in tasks))
    before, t = runner.generated_tokens, time.perf_counter()
    groups = asyncio.run(all_())
    wall = time.perf_counter() - t
    pool.shutdown()
    tokens = runner.generated_tokens - before
    versions = sorted({int(v) for g in groups for v in g.token_versions.ravel() if v >= 0})
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "groups": len(groups),
            "versions_seen": [versions[0], versions[-1]] if versions else [], "t0": time.time() - wall, "t1": time.time()}


def vllm_generated_tokens() -> float | None:
    """vLLM's own count of the tokens it generated (its Prometheus counter, advanced at every
    engine step, so a window's count does not depend on when requests end); None without it."""
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return None
    found = [s.value for m in REGISTRY.collect() for s in m.samples if s.name == "vllm:generation_tokens_total"]
    return sum(found) if found else None


def engine_counter(engine) -> float | None:
    """vLLM's generated-token counter, read where the engine runs (EngineProcess.run)."""
    return vllm_generated_tokens()


def engine_log(engine) -> dict:
    """The engine's version log (swaps and staged versions), read where the engine runs."""
    engine.log.drain()
    return {"swaps": engine.log.swaps, "staged": engine.log.staged}


def bare_continuous(engine, rng: random.Random, vocab: int, inflight: int, warm_s: float, window_s: float) -> dict:
    """AsyncLLM alone, kept full: inflight/G lanes, each generating one group of G requests of
    one prompt after another; output tokens of the requests that end inside the window (after
    warm_s), per second. The lanes are cancelled (their requests aborted) when it closes."""
    params = engine.sampling_params(NEW_TOKENS, 1.0)
    cpu = [{}, {}]

    async def run():
        from vllm import TokensPrompt
        start = time.perf_counter()
        opens, closes = start + warm_s, start + warm_s + window_s
        counted = [0]

        async def one(p, rid):
            final = None
            async for out in engine.llm.generate(TokensPrompt(prompt_token_ids=p), params, rid):
                final = out
            if opens <= time.perf_counter() <= closes:
                counted[0] += len(final.outputs[0].token_ids)

        async def lane(i):
            for k in itertools.count():
                p = prompts(rng, 1, vocab)[0]
                await asyncio.gather(*(one(p, f"bare{i}-{k}-{j}-{time.time_ns()}") for j in range(GROUP)))

        lanes = [asyncio.ensure_future(lane(i)) for i in range(max(1, inflight // GROUP))]
        await asyncio.sleep(warm_s)
        c0, cpu[0] = vllm_generated_tokens(), cpu_seconds()
        await asyncio.sleep(window_s)
        c1, cpu[1] = vllm_generated_tokens(), cpu_seconds()
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        return counted[0], c0, c1
    tokens, c0, c1 = engine.call(run(), timeout_s=warm_s + window_s + 120)
    return {"tokens": tokens, "window_s": window_s, "tokens_per_s": tokens / window_s,
            "engine_tokens_per_s": (c1 - c0) / window_s if c0 is not None else None, "cpu_s": cpu_delta(*cpu)}


def actor_continuous(runner, client, vocab: int, inflight: int, warm_s: float, window_s: float, counter=None,
                     in_flight=None) -> dict:
    """The actor's own loop (actors/actor.py: RolloutActor.run) over the bench's engine, kept at
    `inflight` episodes; tokens of the episodes that end inside the window, per second. With
    `in_flight` (requests in the engine now), its mean over the window, read every 0.5 s."""
    from actors.actor import ActorsConfig, RolloutActor

    counter = counter or vllm_generated_tokens
    actor = RolloutActor.of_parts(0, ActorsConfig(engine="vllm", gpus_per_group=1, max_inflight_episodes=inflight),
                                  runner.config, runner, make_env(vocab), client)
    result = {}
    thread = threading.Thread(target=lambda: result.update(actor.run()), daemon=True)
    thread.start()
    time.sleep(warm_s)
    before, c0, t0, cpu0 = runner.generated_tokens, counter(), time.time(), cpu_seconds()
    seen = []
    while time.time() < t0 + window_s:
        time.sleep(min(0.5, max(0.0, t0 + window_s - time.time())))
        if in_flight is not None:
            seen.append(in_flight())
    tokens, c1, t1, cpu1 = runner.generated_tokens - before, counter(), time.time(), cpu_seconds()
    actor.stop()
    thread.join(120)
    if thread.is_alive():
        raise TimeoutError("the actor's loop did not stop within 120 s of stop()")
    return {"tokens": tokens, "wall_s": t1 - t0, "tokens_per_s": tokens / (t1 - t0), "groups": actor.groups,
            "engine_tokens_per_s": (c1 - c0) / (t1 - t0) if c0 is not None else None,
            "activity_s": result.get("activity_s"), "t0": t0, "t1": t1, "cpu_s": cpu_delta(cpu0, cpu1),
            "requests_in_flight_mean": statistics.mean(seen) if seen else None}


def cpu_seconds() -> dict:
    """CPU seconds so far of each thread of this process (by thread name; threads Python did
    not start, such as ZeroMQ's, by native id) and of each child process (by its name): the
    difference over a window says which thread was busy. {} without psutil."""
    try:
        import psutil
    except ImportError:
        return {}
    names = {t.native_id: t.name for t in threading.enumerate()}
    me = psutil.Process()
    out = {}
    for t in me.threads():
        key = names.get(t.id, f"native-{t.id}")
        out[key] = out.get(key, 0.0) + t.user_time + t.system_time
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            key = f"process {child.name()}"
            out[key] = out.get(key, 0.0) + times.user + times.system
    return out


def cpu_delta(before: dict, after: dict, top: int = 8) -> dict:
    """Per thread or child process, CPU seconds between two cpu_seconds() readings, busiest first."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return {k: round(v, 2) for k, v in sorted(delta.items(), key=lambda kv: -kv[1])[:top]}


def continuous_ratios(bare: list, ours: list) -> dict:
    """asyncrl over bare from alternating windows: by vLLM's generated-token counter where it
    is there (completions of 256-token requests kept in step end in waves a few seconds apart,
    too coarse for windows of seconds), else by completed tokens; each pair's ratio beside the
    ratio of the means, so the spread shows."""
    def rates(rows, key):
        return [x[key] for x in rows] if all(x.get(key) for x in rows) else None

    out = {}
    for suffix, key in (("", "engine_tokens_per_s"), ("_completed", "tokens_per_s")):
        b, o = rates(bare, key), rates(ours, key)
        if b and o:
            out[f"ratio_tokens{suffix}"] = statistics.mean(o) / statistics.mean(b)
            out[f"ratio_tokens{suffix}_pairs"] = [y / x for x, y in zip(b, o)]
    if "ratio_tokens" not in out:
        out["ratio_tokens"] = out.get("ratio_tokens_completed")
    return out


def greedy(engine, batch: list, new_tokens: int) -> list:
    """Batch-1 greedy continuations (one request at a time: the same kernels on any engine)."""
    async def run():
        return [await engine.generate(p, new_tokens, 0.0) for p in batch]
    return asyncio.run(run())


# -- the native path: pause(keep), IPC update, resume ------------------------------------------
def native_updates(engine, learner, batch: list, n: int, here, transport: str = "ipc") -> dict:
    """vLLM's own path under load: pause (keep), start, update_weights, finish, resume; per
    update from "the learner has v". ipc: the learner's CUDA IPC handles (one GPU); nccl: the
    learner on the other GPU broadcasts into update_weights through vLLM's NCCL engine. `here`
    runs a function where the engine is (its own process, or this one), as for the bare windows."""
    if transport == "nccl":
        port = free_port()
        learner.conn.send(("native_nccl_init", "127.0.0.1", port))   # it waits in the group's rendezvous
        here(native_init, {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2})
        info = learner._recv(120)[1]
    else:
        info = learner.ask("native_handles")
        here(native_init, {})
    rows = []
    load = threading.Thread(target=here, args=(bare_round, batch, NEW_TOKENS), daemon=True)
    load.start()
    time.sleep(1.5)
    for i in range(n + 1):  # the first opens the handles or warms the group up: reported apart
        t_has = learner.ask("perturb")
        if transport == "nccl":
            learner.conn.send(("native_nccl_send",))   # the learner waits in the broadcast until vLLM joins it
        rows.append(here(native_update, t_has, info))
        if transport == "nccl":
            learner._recv(120)   # the learner's send returned
        time.sleep(0.4)
    load.join(120)
    timed = rows[1:]
    return {"first": rows[0], "rows": timed, "total_ms_median": statistics.median(r["total_ms"] for r in timed),
            "pause_ms_median": statistics.median(r["pause_ms"] for r in timed),
            "update_ms_median": statistics.median(r["update_ms"] for r in timed)}


def native_init(engine, init_info: dict) -> None:
    """Where the engine runs: vLLM's weight-transfer engine set up (empty init_info: IPC)."""
    from vllm.distributed.weight_transfer.base import WeightTransferInitRequest
    engine.call(engine.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info)), timeout_s=120)


def native_update(engine, t_has: float, info: dict) -> dict:
    """Where the engine runs: one update by vLLM's own path, timed from t_has (time.time())."""
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest
    llm = engine.llm

    async def one_update():
        t = [time.time()]
        await llm.pause_generation(mode="keep", clear_cache=False)
        t.append(time.time())
        await llm.start_weight_update()
        await llm.update_weights(WeightTransferUpdateRequest(update_info=dict(info)))
        await llm.finish_weight_update()
        t.append(time.time())
        await llm.resume_generation()
        t.append(time.time())
        return {"total_ms": (t[3] - t_has) * 1e3, "pause_ms": (t[1] - t[0]) * 1e3,
                "update_ms": (t[2] - t[1]) * 1e3, "resume_ms": (t[3] - t[2]) * 1e3}
    return engine.call(one_update(), timeout_s=120)


def ray_stub() -> str | None:
    """vLLM's IPC weight-transfer module imports ray at its top but needs it only for
    send_mode="ray"; where Ray is not installed, an empty stand-in lets it import."""
    if importlib.util.find_spec("ray") is not None:
        return None
    root = os.path.join(tempfile.gettempdir(), "asyncrl-ray-stub")
    os.makedirs(os.path.join(root, "ray"), exist_ok=True)
    with open(os.path.join(root, "ray", "__init__.py"), "w") as f:
        f.write('"""Stand-in: Ray is not installed."""\n\ndef is_initialized():\n    return False\n')
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    return root


# -- one model ---------------------------------------------------------------------------------
class Phases:
    """Runs the bench's phases; a failing phase is recorded and the next one runs."""

    def __init__(self, result: dict, path: str, deadline: float):
        self.result, self.path, self.deadline = result, path, deadline

    def has_time(self, name: str, needs_s: float) -> bool:
        if time.monotonic() + needs_s <= self.deadline:
            return True
        self.result.setdefault("skipped", []).append(name)
        print(f"[bench] skip {name}: out of time", flush=True)
        return False

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.monotonic()
        print(f"[bench] {name} ...", flush=True)
        try:
            yield
        except Exception:
            self.result.setdefault("errors", {})[name] = traceback.format_exc(limit=6)
            print(f"[bench] {name} FAILED:\n{self.result['errors'][name]}", flush=True)
        self.result.setdefault("phase_s", {})[name] = round(time.monotonic() - t, 1)
        with open(self.path, "w") as f:
            json.dump(self.result, f, indent=1, default=str)


def bench_model(shape: str, args, out: dict, path: str, deadline: float) -> None:
    from actors.engines.vllm import VLLMEngine
    from actors.rollout import EpisodeRunner, RolloutConfig
    from buffer.client import BufferClient

    vocab = MODELS[shape]["vocab"]
    r = out.setdefault(shape, {"vocab": vocab, "prompts": args.prompts, "new_tokens": NEW_TOKENS})
    phase = Phases(out, path, deadline)
    work = tempfile.mkdtemp(prefix=f"actor-bench-{shape}-")
    model_dir = write_config(os.path.join(work, "model"), shape)
    rng = random.Random(0)
    native = shape == "1.5b" and not args.no_native
    engine = learner = buffer = None
    sent = []
    stops = stop_tokens(args.stop_share, vocab)
    r["stop_tokens"] = len(stops)
    with phase(f"{shape}/start"):
        ctx = tmp.get_context("spawn")
        bconn, child = ctx.Pipe()
        buffer = (ctx.Process(target=buffer_main, args=(child,), daemon=True), bconn)
        buffer[0].start()
        client = BufferClient(bconn.recv(), timeout_s=60)
        if args.transport == "nccl":   # the learner on GPU 0, vLLM (its processes spawned after this) on GPU 1
            os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
        learner = Learner(model_dir, transport=args.transport)  # built before vLLM measures free memory
        if args.transport == "nccl":
            os.environ["CUDA_VISIBLE_DEVICES"] = "1,0"
        r["transport"] = args.transport
        r.update(weight_bytes=learner.nbytes, tensors=learner.ntensors)
        out["device"] = learner.device
        extra = {}
        if native:
            r["ray_stub"] = ray_stub()
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # IPC handles ride vLLM's RPC pickled
            extra["weight_transfer_config"] = {"backend": args.transport}
        t = time.monotonic()
        kwargs = dict(model_path=model_dir, gpu_memory_utilization=args.gpu_memory_utilization,
                      max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager, seed=0,
                      max_model_len=1024, load_format="dummy", disable_log_stats=False, stop_token_ids=stops,
                      weight_staging=args.weight_staging, **extra)
        if args.engine_process:   # as a run places it (actors.engine_process=own)
            from actors.engine_process import EngineProcess
            engine = EngineProcess("actors.engines.vllm:VLLMEngine", kwargs, name="vllm engine")
        else:
            engine = VLLMEngine(**kwargs)
        r["engine_start_s"] = round(time.monotonic() - t, 1)
        r["engine_process"] = bool(args.engine_process)
    if engine is None:
        return

    def here(function, *more):
        """function(engine, *more) where the engine runs: vLLM alone stays vLLM alone."""
        if args.engine_process:
            return engine.run(f"bench.actor_bench:{function.__name__}", *more, timeout_s=600)
        return function(engine, *more)
    with phase(f"{shape}/bare"):
        here(bare_round, prompts(rng, 64, vocab), 32)  # warm-up
        r["bare"] = [here(bare_round, [p for p in prompts(rng, args.prompts // GROUP, vocab) for _ in range(GROUP)],
                          NEW_TOKENS) for _ in range(args.rounds)]
    check_prompts = prompts(random.Random(7), 8, vocab)
    with phase(f"{shape}/install"):
        r["install"] = engine.start_weight_updates(learner.spec.receiver(0))
        learner.ask("wait_receivers", 1, 60.0)
        t = time.monotonic()
        first = learner.ask("publish_once")  # the worker opens every handle: seconds, once
        r["first_update"] = {"send_ms": first["send_ms"], "wall_s": time.monotonic() - t}
        r["staging_bytes"] = sum(w["staging_bytes"] for w in r["install"])
    with phase(f"{shape}/asyncrl"):
        runner = EpisodeRunner(engine, IdTokenizer(), functools.partial(make_env, vocab), RolloutConfig(
            group_size=GROUP, max_new_tokens=NEW_TOKENS, temperature=1.0, max_turns=1, max_seq_len=4096))
        rounds, bare_windows, ours_windows, quiet_windows = [], [], [], []
        counter = lambda: here(engine_counter)   # noqa: E731
        in_flight = ((lambda: engine.stats()["pending_requests"]) if args.engine_process   # noqa: E731
                     else (lambda: len(engine.log.live)))
        try:
            learner.ask("publish_start", args.update_every_s)
            for i in range(args.rounds):
                tasks = [{"id": f"{shape}-{i}-{j}", "prompt": " ".join(f"t{t}" for t in p)}
                         for j, p in enumerate(prompts(rng, args.prompts // GROUP, vocab))]
                rounds.append(actor_round(engine, runner, client, tasks))
            sent = learner.ask("publish_stop")
            for i in range(args.pairs if args.continuous_s else 0):   # bare, ours, ours, bare, ...
                kinds = ("bare", "asyncrl") if i % 2 == 0 else ("asyncrl", "bare")
                for kind in kinds + (("quiet",) if args.quiet_windows else ()):
                    if kind == "bare":    # no version arrives: the learner is quiet
                        bare_windows.append(here(bare_continuous, rng, vocab, args.prompts, args.warm_s, args.continuous_s))
                        continue
                    if kind == "quiet":   # the actor's loop with no weight updates: what the updates cost
                        quiet_windows.append(actor_continuous(runner, client, vocab, args.prompts, args.warm_s,
                                                              args.continuous_s, counter, in_flight))
                        continue
                    learner.ask("publish_start", args.update_every_s)
                    try:
                        ours_windows.append(actor_continuous(runner, client, vocab, args.prompts, args.warm_s,
                                                             args.continuous_s, counter, in_flight))
                    finally:
                        sent = learner.ask("publish_stop")   # every version sent so far
        finally:
            with contextlib.suppress(Exception):
                sent = learner.ask("publish_stop")
        r.update(asyncrl=rounds, bare_continuous=bare_windows, asyncrl_continuous=ours_windows,
                 asyncrl_quiet_continuous=quiet_windows)
        if bare_windows and quiet_windows:
            r["ratio_tokens_quiet"] = continuous_ratios(bare_windows, quiet_windows).get("ratio_tokens")
        engine.check()
        r.update(update_stats(sent, here(engine_log), rounds + ours_windows))
        if r.get("bare") and rounds:
            bare = statistics.mean(x["tokens_per_s"] for x in r["bare"])
            r["ratio_tokens_rounds"] = statistics.mean(x["tokens_per_s"] for x in rounds) / bare
        if bare_windows and ours_windows:   # the figure: both kept full, windows alternating
            r.update(continuous_ratios(bare_windows, ours_windows))
        else:
            r["ratio_tokens"] = r.get("ratio_tokens_rounds")
    with phase(f"{shape}/floor"):
        r["floor_ms"] = learner.ask("floor")
    if shape == "0.5b" or args.checks_all:
        with phase(f"{shape}/checks"):
            final = sent[-1]["version"]  # the learner's last version; an idle engine swaps it in at its next step
            r["final_version"] = final
            after = greedy(engine, check_prompts, args.greedy_tokens)
            r["greedy_versions_ok"] = all(set(s.versions) == {final} for s in after)
            r["greedy_after"] = [s.tokens for s in after]

            scored = prompts(random.Random(11), 64, vocab)

            async def sampled():
                return await asyncio.gather(*(engine.generate(p, 128, 1.0) for p in scored))
            batch = list(zip(scored, asyncio.run(sampled())))
            samples = [(p, s.tokens, s.logprobs) for p, s in batch if set(s.versions) == {final}]
            gap = learner.ask("score", samples, 1.0)
            r.update(logprob_gap_mean=gap["mean"], logprob_gap_max=gap["max"], logprob_gap_tokens=gap["tokens"])
            learner.ask("save", os.path.join(work, "final"))
    if native and phase.has_time(f"{shape}/native", 40):
        with phase(f"{shape}/native"):
            r["native"] = native_updates(engine, learner, [p for p in prompts(rng, 32, vocab) for _ in range(GROUP)], 4,
                                         here, args.transport)
    with phase(f"{shape}/close"):
        engine.close()
    if "greedy_after" in r and phase.has_time(f"{shape}/cold", 150):
        with phase(f"{shape}/cold"):
            cold = VLLMEngine(os.path.join(work, "final"), gpu_memory_utilization=args.gpu_memory_utilization,
                              max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager, seed=0,
                              max_model_len=1024, stop_token_ids=stops)
            try:
                tokens = [s.tokens for s in greedy(cold, check_prompts, args.greedy_tokens)]
            finally:
                cold.close()
            r["greedy_equal"] = tokens == r["greedy_after"]
            r["greedy_tokens_equal"] = sum(a == b for x, y in zip(tokens, r["greedy_after"]) for a, b in zip(x, y))
            r["greedy_tokens_total"] = sum(len(x) for x in tokens)
    with phase(f"{shape}/stop"):
        learner.close()
        buffer[1].send("stop")
        buffer[0].join(10)


def update_stats(sent: list, log, rounds: list) -> dict:
    """Per version sent and swapped in while a round ran (an idle engine swaps at its next
    request): learner has v -> the worker swapped v in."""
    swaps = {s["version"]: s for s in log["swaps"]}
    staged = {s["version"]: s for s in log["staged"]}
    windows = [(x["t0"], x["t1"]) for x in rounds]
    rows = []
    for s in sent:
        v = s["version"]
        if v in swaps and any(a <= s["t_has"] and swaps[v]["t"] <= b for a, b in windows if s["t_has"] <= b):
            rows.append({"version": v, "update_ms": (swaps[v]["t"] - s["t_has"]) * 1e3, "send_ms": s["send_ms"],
                         "staged_ms": (staged[v]["t"] - s["t_has"]) * 1e3 if v in staged else None,
                         "write_ms": staged.get(v, {}).get("write_ms"), "commit_ms": staged.get(v, {}).get("commit_ms"),
                         "stall_gpu_ms": swaps[v].get("gpu_ms"), "stall_host_ms": swaps[v]["host_ms"]})
    out = {"updates": rows, "versions_sent": len(sent), "versions_swapped": len(swaps)}
    if rows:
        for key in ("update_ms", "send_ms", "staged_ms", "write_ms", "commit_ms", "stall_gpu_ms", "stall_host_ms"):
            vals = [x[key] for x in rows if x[key] is not None]
            if vals:
                out[f"{key}_median"], out[f"{key}_max"] = statistics.median(vals), max(vals)
    return out


def summary(out: dict) -> dict:
    a, b = out.get("0.5b", {}), out.get("1.5b", {})
    return {"ratio_tokens": a.get("ratio_tokens", b.get("ratio_tokens")),
            "ratio_tokens_0p5b": a.get("ratio_tokens"), "ratio_tokens_1p5b": b.get("ratio_tokens"),
            "ratio_tokens_rounds_0p5b": a.get("ratio_tokens_rounds"),
            "ratio_tokens_completed_0p5b": a.get("ratio_tokens_completed"),
            "ratio_tokens_quiet_0p5b": a.get("ratio_tokens_quiet"), "stop_tokens": (a or b).get("stop_tokens"),
            "ratio_tokens_pairs_0p5b": a.get("ratio_tokens_pairs"), "ratio_tokens_pairs_1p5b": b.get("ratio_tokens_pairs"),
            "bare_tokens_per_s_0p5b": _mean(a.get("bare_continuous") or a.get("bare"), "engine_tokens_per_s"
                                            if a.get("bare_continuous") else "tokens_per_s"),
            "asyncrl_tokens_per_s_0p5b": _mean(a.get("asyncrl_continuous") or a.get("asyncrl"), "engine_tokens_per_s"
                                               if a.get("asyncrl_continuous") else "tokens_per_s"),
            "update_ms_0p5b": a.get("update_ms_median"), "update_ms_max_0p5b": a.get("update_ms_max"),
            "update_ms_1p5b": b.get("update_ms_median"), "update_ms_max_1p5b": b.get("update_ms_max"),
            "floor_ms_0p5b": a.get("floor_ms"), "floor_ms_1p5b": b.get("floor_ms"),
            "stall_ms": (b or a).get("stall_gpu_ms_median"), "stall_ms_0p5b": a.get("stall_gpu_ms_median"),
            "stall_host_ms": (b or a).get("stall_host_ms_median"),   # the engine held (weight_staging none: the transfer)
            "weight_staging": out["args"].get("weight_staging"),
            "send_ms_1p5b": b.get("send_ms_median"), "staged_ms_1p5b": b.get("staged_ms_median"),
            "receive_write_ms_1p5b": b.get("write_ms_median"), "receive_commit_ms_1p5b": b.get("commit_ms_median"),
            "native_update_ms_1p5b": (b.get("native") or {}).get("total_ms_median"),
            "native_pause_ms_1p5b": (b.get("native") or {}).get("pause_ms_median"),
            "staging_bytes_0p5b": a.get("staging_bytes"), "staging_bytes_1p5b": b.get("staging_bytes"),
            "logprob_gap_mean": a.get("logprob_gap_mean"), "logprob_gap_max": a.get("logprob_gap_max"),
            "greedy_equal": a.get("greedy_equal"), **_small(out.get("135m", {})),
            "vocab": {shape: out[shape]["vocab"] for shape in MODELS if shape in out}, "device": out.get("device"),
            "date": out.get("date") or datetime.date.today().isoformat(), "errors": sorted(out.get("errors", {})),
            "phases": list(out.get("phase_s", {})), **({"stopped": out["stopped"]} if out.get("stopped") else {})}


def _small(c: dict) -> dict:
    """SmolLM2-135M's figures, where it ran (the GPU job's model: the actor's own CPU work is
    the largest share of each token there)."""
    if not c:
        return {}
    return {"ratio_tokens_135m": c.get("ratio_tokens"), "ratio_tokens_pairs_135m": c.get("ratio_tokens_pairs"),
            "bare_tokens_per_s_135m": _mean(c.get("bare_continuous"), "engine_tokens_per_s"),
            "asyncrl_tokens_per_s_135m": _mean(c.get("asyncrl_continuous"), "engine_tokens_per_s"),
            "update_ms_135m": c.get("update_ms_median"), "floor_ms_135m": c.get("floor_ms"),
            "stall_ms_135m": c.get("stall_gpu_ms_median"), "greedy_equal_135m": c.get("greedy_equal"),
            "greedy_tokens_135m": f"{c['greedy_tokens_equal']}/{c['greedy_tokens_total']}"
            if "greedy_tokens_total" in c else None,
            "logprob_gap_mean_135m": c.get("logprob_gap_mean"), "logprob_gap_max_135m": c.get("logprob_gap_max"),
            "versions_swapped_135m": f"{c['versions_swapped']}/{c['versions_sent']}" if "versions_sent" in c else None}


def _mean(rows, key):
    return statistics.mean(x[key] for x in rows) if rows else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="0.5b,1.5b", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--quick", action="store_true", help="256 prompts, one round each")
    p.add_argument("--prompts", type=int, default=512)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--continuous-s", type=float, default=12.0,
                   help="each window of the continuous measure (both kept at --prompts in flight; 0: rounds only)")
    p.add_argument("--pairs", type=int, default=2, help="pairs of alternating windows (bare and asyncrl)")
    p.add_argument("--warm-s", type=float, default=4.0, help="before each continuous window opens")
    p.add_argument("--update-every-s", type=float, default=1.0)
    p.add_argument("--engine-process", action="store_true",
                   help="the engine in a process of its own (actors/engine_process.py), as runs place it; "
                        "vLLM alone and its own update path run there too")
    p.add_argument("--quiet-windows", action="store_true",
                   help="after each pair, a window of the actor's loop with no weight updates")
    p.add_argument("--stop-share", type=float, default=0.0,
                   help="this share of the vocabulary stops a request (both sides): lengths vary "
                        "(geometric, mean ~1/share, capped at 256), so completions do not come in waves")
    p.add_argument("--greedy-tokens", type=int, default=48)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-native", action="store_true")
    p.add_argument("--weight-staging", choices=("auto", "full", "none"), default="full",
                   help="actors.weight_staging: a staging copy swapped in between steps, or none (written in "
                        "place while the engine is held: no copy's memory, a longer stall)")
    p.add_argument("--transport", choices=("ipc", "nccl"), default="ipc",
                   help="ipc: the learner process on the engine's GPU (CUDA IPC); nccl: the learner on GPU 0, "
                        "vLLM on GPU 1, weights over the broadcast channel and vLLM's own path over NCCL "
                        "(needs 2 GPUs; the floor then comes from bench/weight_push_bench.py)")
    p.add_argument("--checks-all", action="store_true", help="greedy and log-prob checks for every model")
    p.add_argument("--budget-s", type=float, default=540, help="optional phases are skipped past this")
    p.add_argument("--summary-of", metavar="JSON",
                   help="print the summary of an earlier run's actor_bench_<models>.json (one cut short too) and exit")
    args = p.parse_args()
    if args.summary_of:
        with open(args.summary_of) as f:
            finish(json.load(f))
        return
    if args.quick:
        args.prompts, args.rounds = 256, 1
    if args.transport == "nccl":
        import torch
        if torch.cuda.device_count() < 2:   # NVML's count: no CUDA context in this process before vLLM's
            p.error(f"--transport nccl needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    deadline = time.monotonic() + args.budget_s
    out_dir = os.environ.get("OUT") or tempfile.mkdtemp(prefix="actor-bench-")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in models if m not in MODELS]:
        p.error(f"--models: unknown {unknown}; known: {', '.join(MODELS)}")
    path = os.path.join(out_dir, f"actor_bench_{'_'.join(models)}.json")
    out = {"args": vars(args), "date": datetime.date.today().isoformat()}
    # a deadline's SIGTERM (timeout(1), the device call's limit) still gets the summary of what ran
    signal.signal(signal.SIGTERM, _terminated)
    try:
        for shape in models:
            bench_model(shape, args, out, path, deadline)
    except Stopped:
        out["stopped"] = "SIGTERM: the phase after the last one in phase_s was cut short, and later ones did not run"
    finish(out, path)


class Stopped(BaseException):
    """SIGTERM arrived: the bench stops where it is and writes what it has (a BaseException,
    so that no phase's handler takes it for that phase's failure and goes on)."""


def _terminated(signum, frame):
    raise Stopped()


def finish(out: dict, path: str | None = None) -> dict:
    """The summary of a run (finished or not): into `out` (and its file), a table, then one JSON line."""
    out["summary"] = summary(out)
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(f"\n{'figure':28s} value")
    for k, v in out["summary"].items():
        print(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    print(json.dumps(out["summary"], default=str), flush=True)
    return out["summary"]


def _reap() -> None:
    """Stop what this bench started (engine cores, workers, learner) before exiting."""
    try:
        import psutil
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(Exception):
                child.kill()
    except ImportError:
        pass


if __name__ == "__main__":
    status = 1
    try:
        main()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _reap()
        os._exit(status)   # vLLM's threads would otherwise hold the exit
