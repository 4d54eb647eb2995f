"""A rollout actor group: one engine, episodes generated continuously into the buffer.

It keeps up to `max_inflight_episodes` episodes in flight: a new group of G starts as soon as
G episode slots are free, and a slot frees as each episode ends, not when its whole group
does (the episodes of a group end at different times; counting whole groups left the engine
running a fraction of its sequences while each group's slowest episode finished). Each group
is inserted as soon as its G episodes end: no barrier spans groups. It never waits for the
learner's weights: the engine swaps each new version in between two of its steps.
Back-pressure is the buffer's: every insert's reply says how many more groups the table's rate
limiter would take now (`room`; queue: free places; ratio: what the learner's pace allows), and
the actor has no more groups in flight than its share of that (the actor groups share it
evenly). With none in flight and no room it waits on the buffer for room, leaving the engine
(and on CPU the cores) to the learner, so that the groups the learner takes were started on
recent weights instead of waiting, generated, while the learner moved on. Room comes when the
learner samples, just after it published new weights: the groups started then wait (up to
CATCH_UP_S) until the engine serves them. Groups that find no room anyway wait in a held insert.
Plain Python; launch/ runs it as a Ray actor.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as futures
import random
import threading
import time
from dataclasses import dataclass
from functools import partial

import torch
from transformers import AutoTokenizer

from actors.engine_process import EngineProcess
from actors.evaluation import EvalConfig, TrainingTasks, held_out_tasks, play
from actors.environments import ProcessEnvironments
from actors.rollout import EpisodeRunner, RolloutConfig
from buffer.client import BufferClient, BufferHeld
from common import dotted, telemetry
from common.config import check
from envs import registry

ENGINES = ("hf", "vllm")
ENGINE_PLACES = ("auto", "own", "actor")
WEIGHT_STAGING = ("auto", "full", "none")


@dataclass
class ActorsConfig:
    count: int = 1
    """Actor groups, each with its own engine (--actors)."""
    engine: str = "hf"
    """Inference engine: hf (transformers; CPU, or one GPU) or vllm (vLLM's AsyncLLM; GPUs)."""
    engine_process: str = "auto"
    """Where the engine runs: own (a process of its own, actors/engine_process.py: vLLM's
    frontend takes a whole core at hundreds of sequences, and a rollout loop sharing its GIL
    takes throughput from it), actor (the actor's process), or auto: own for vllm with a
    broadcast or ipc weight transport, actor otherwise (a Ray object-store receiver needs the
    actor's Ray connection)."""
    max_inflight_episodes: int = 16
    """Episodes in flight per actor group; the engine batches their pending requests. A group
    of rollout.group_size starts once that many slots are free; a slot frees as its episode
    ends."""
    gpus_per_group: int = 0
    """GPUs of each actor group (vLLM's tensor parallel size); 0 runs the HF engine on CPU."""
    gpu_memory_utilization: float = 0.85
    """Share of each of its GPUs' memory a vLLM engine takes (weights and KV cache); sharing a
    GPU with the learner (run.colocate), leave the learner its room."""
    max_num_seqs: int = 256
    """Sequences a vLLM engine batches at once."""
    enforce_eager: bool = False
    """vLLM without CUDA graphs: starts faster, generates slower."""
    weight_staging: str = "auto"
    """How a new weight version reaches the served weights. full: received into a staging copy
    beside them while generation goes on, then swapped in between two steps (generation stands
    still for one device copy; costs a full copy of the weights in the engine's memory). none:
    written straight into them while the engine waits between two steps (no copy; generation
    stands still for the whole transfer, a device copy with CUDA IPC, the network transfer over
    a broadcast). With none, a transfer that fails after its first write stops the engine: its
    weights are then no policy's. auto: full where a full copy fits in the engine's GPU beside
    what it holds (1 GiB to spare; always on the CPU), none where it does not."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for each actor."""
    torch_threads: int = 1
    """Torch intra-op threads of each actor process (CPU engines)."""
    groups_per_version: int = 0
    """0: never wait for the learner (asynchronous). N > 0: start N groups on one weight
    version, then wait for the next version (the synchronous baseline sets this)."""
    drop_flat_groups: int = 0
    """Dynamic sampling (as DAPO's): a group whose completions all scored alike carries no GRPO
    gradient, so it is dropped rather than inserted and another group starts in its place, up to
    this many per weight version an actor serves; past that, flat groups go in as any other (a
    task set the policy always fails, or always passes, still moves the learner on). 0 inserts
    every group. Counted as actor/flat_groups_dropped."""
    max_unusable_in_a_row: int = 64
    """An actor fails, naming the episodes' error, once this many groups in a row generated no
    token at all (every reset failing, say): each is made again, so without a limit a broken
    environment would keep the actor busy and the learner waiting until its sample deadline.
    0: never fail. Counted as actor/groups_unusable."""
    wait_timeout_s: float = 1800.0
    """How long an actor waits for new weights (groups_per_version > 0), or for the buffer's
    rate limiter to take an insert (back-pressure: buffer.table.rate_limiter), before failing."""

    def validate(self):
        check(self.count >= 1, "count", f"must be >= 1, got {self.count}")
        check(self.engine in ENGINES, "engine", f"must be one of {ENGINES}, got {self.engine!r}")
        check(self.engine_process in ENGINE_PLACES, "engine_process",
              f"must be one of {ENGINE_PLACES}, got {self.engine_process!r}")
        check(self.max_inflight_episodes >= 1, "max_inflight_episodes", "must be >= 1")
        check(self.gpus_per_group >= 0, "gpus_per_group", f"must be >= 0, got {self.gpus_per_group}")
        if self.engine == "vllm":
            check(self.gpus_per_group >= 1, "gpus_per_group", "the vllm engine needs >= 1 GPU per actor group")
        else:
            check(self.gpus_per_group <= 1, "gpus_per_group",
                  f"the hf engine runs on one device (0: CPU, 1: a GPU), got {self.gpus_per_group}")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
              f"must lie in (0, 1], got {self.gpu_memory_utilization}")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.weight_staging in WEIGHT_STAGING, "weight_staging",
              f"must be one of {WEIGHT_STAGING}, got {self.weight_staging!r}")
        check(self.torch_threads >= 1, "torch_threads", "must be >= 1")
        check(self.groups_per_version >= 0, "groups_per_version", "must be >= 0")
        check(self.drop_flat_groups >= 0, "drop_flat_groups", f"must be >= 0, got {self.drop_flat_groups}")
        check(self.max_unusable_in_a_row >= 0, "max_unusable_in_a_row", f"must be >= 0, got {self.max_unusable_in_a_row}")
        check(self.wait_timeout_s > 0, "wait_timeout_s", "must be > 0")


ENV_WORKERS_START_S = 120.0  # an environment's worker processes start (import it) within this
HELD_POLL_S = 1.0  # an insert the buffer's rate limiter holds is asked again this often
CATCH_UP_S = 10.0  # after a wait for room, new groups wait at most this long for the newest published weights
CATCH_UP_POLL_S = 0.05


class RolloutActor:
    def __init__(self, actor_id: int, model_path: str, dtype: str, actors: ActorsConfig,
                 rollout: RolloutConfig, env: registry.EnvConfig, buffer_address: str,
                 buffer_timeout_s: float, weights, seed: int = 0, evaluation: EvalConfig | None = None):
        torch.set_num_threads(actors.torch_threads)
        self.actor_id, self.config, self.rollout = actor_id, actors, rollout
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        stop_token_ids = [tokenizer.eos_token_id]
        self.engine = make_engine(actors, model_path, dtype, tokenizer, stop_token_ids, seed * 1000 + actor_id,
                                  max_model_len=rollout.max_seq_len + rollout.max_new_tokens)
        self.engine.start_weight_updates(weights.receiver(actor_id))  # a channel spec (common/weights.py)
        make_env = registry.factory(env)
        environments = make_env
        if rollout.env_workers:  # started, and ready, before the first episode
            environments = ProcessEnvironments(env, rollout.env_workers, rollout.env_timeout_s, rollout.env_threads)
            environments.wait_ready(ENV_WORKERS_START_S)
        runner = EpisodeRunner(self.engine, tokenizer, environments, rollout, stop_token_ids)
        self._assemble(runner, make_env(), BufferClient(buffer_address, timeout_s=buffer_timeout_s), seed,
                       environments=environments if rollout.env_workers else None, evaluation=evaluation)

    @classmethod
    def of_parts(cls, actor_id: int, actors: ActorsConfig, rollout: RolloutConfig, runner: EpisodeRunner, env,
                 buffer: BufferClient, seed: int = 0, evaluation: EvalConfig | None = None) -> "RolloutActor":
        """An actor over parts built elsewhere: `runner` (its engine, with weight updates
        started), an environment to draw tasks from and a buffer client. A bench drives the
        actor's own loop over an engine it also measures alone this way."""
        self = cls.__new__(cls)
        self.actor_id, self.config, self.rollout, self.engine = actor_id, actors, rollout, runner.engine
        self._assemble(runner, env, buffer, seed, environments=None, evaluation=evaluation)
        return self

    def _assemble(self, runner: EpisodeRunner, env, buffer: BufferClient, seed: int, environments,
                  evaluation: EvalConfig | None) -> None:
        self.runner, self.buffer = runner, buffer
        self.environments = environments   # worker processes to end, if any
        self.eval_config = evaluation or EvalConfig()
        self.held_out = held_out_tasks(env, self.eval_config)
        self.tasks = TrainingTasks(env, self.held_out)  # never a held-out task
        self._loop = None  # the running generate loop, which evaluations join
        self.rng = random.Random(seed * 1000 + self.actor_id)
        self._io = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="buffer-io")  # the client is not thread-safe
        self._stop = threading.Event()
        self.groups = 0
        self.flat_groups_dropped = 0
        self.started = time.monotonic()

    def run(self, max_groups: int | None = None) -> dict:
        """Generate and insert until stop() (or max_groups groups); returns stats()."""
        # The coroutines live outside the class: Ray would otherwise run this actor's methods
        # on an event loop of its own, and stats() and stop() must answer while run() runs.
        return asyncio.run(_generate(self, max_groups))

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """After run() has returned: end the environment workers (their socket files go with
        them; Ray would otherwise kill them unseen), the engine and the buffer connection."""
        if self.environments is not None:
            self.environments.shutdown()
        self.engine.close()
        self._io.shutdown(wait=False)
        self.buffer.close()

    def evaluate(self, min_version: int = 0) -> dict:
        """Play each held-out task once on the served weights, as soon as they are at least
        `min_version`, beside the rollouts; returns the eval/ metrics (actors/evaluation.py)."""
        loop, coroutine = self._loop, _evaluate(self, min_version)
        if loop is None:  # not generating: play on a loop of its own
            return asyncio.run(coroutine)
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(self.eval_config.timeout_s)

    def stats(self) -> dict:
        return {"actor_id": self.actor_id, "version": self.engine.version, "groups": self.groups,
                "flat_groups_dropped": self.flat_groups_dropped,
                **self.runner.stats(),
                "activity_s": self.runner.activity.seconds(),   # where its time went (actors/activity.py)
                "uptime_s": time.monotonic() - self.started, **self.engine.stats(),
                "telemetry": telemetry.sample(f"actor{self.actor_id}")}   # {} without a GPU


def make_engine(config: ActorsConfig, model_path: str, dtype: str, tokenizer, stop_token_ids: list, seed: int,
                max_model_len: int):
    """The actor group's engine, by actors.engine, in this process or one of its own
    (actors.engine_process; auto counts as actor here: launch/ resolves it)."""
    if config.engine == "vllm":
        build = "actors.engines.vllm:VLLMEngine"   # vLLM is imported only where it runs
        kwargs = dict(model_path=model_path, tensor_parallel_size=config.gpus_per_group,
                      gpu_memory_utilization=config.gpu_memory_utilization, max_num_seqs=config.max_num_seqs,
                      enforce_eager=config.enforce_eager, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      stop_token_ids=stop_token_ids, weight_staging=config.weight_staging)
    else:
        device = "cuda" if config.gpus_per_group and torch.cuda.is_available() else "cpu"
        build = "actors.engines.hf:HFEngine"
        kwargs = dict(model_path=model_path, dtype=dtype, device=device, stop_token_ids=stop_token_ids,
                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, seed=seed,
                      weight_staging=config.weight_staging)
    if config.engine_process == "own":
        return EngineProcess(build, kwargs, name=f"{config.engine} engine")
    return dotted.load(build)(**kwargs)


async def _generate(a: RolloutActor, max_groups: int | None) -> dict:
    inflight: set = set()
    started_on: dict = {}   # group task -> the version the gate served when it started
    gate = _StartGate(a)
    a._loop = asyncio.get_running_loop()
    try:
        while not a._stop.is_set() and (max_groups is None or a.groups < max_groups):
            a.engine.check()
            while gate.may_start(len(inflight), max_groups):
                slots = gate.started()
                group = asyncio.ensure_future(a.runner.group(a.tasks.sample(a.rng), a.actor_id, slots.episode_ended))
                group.add_done_callback(slots.group_done)
                inflight.add(group)
                started_on[group] = gate.version
            if not inflight:
                if gate.room == 0:   # the buffer takes no more groups now: wait until it does
                    with a.runner.activity.doing("buffer"):
                        await _wait_room(a, gate)
                else:
                    await asyncio.sleep(0.02)
                continue
            done, inflight = await asyncio.wait(inflight, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
            groups = []
            for task in done:
                group, version = task.result(), started_on.pop(task)
                if group is None or gate.drops(group):   # no row generated, or flat and dropped
                    gate.discarded(version)
                    _check_unusable(a)
                else:
                    groups.append(group)
            if groups:  # the groups that ended together go in one request
                with a.runner.activity.doing("buffer"):   # held here while the rate limiter says so
                    a.groups += await _insert(a, groups, gate)
    finally:
        a._loop = None
        for task in inflight:
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
    return a.stats()


def _check_unusable(a: RolloutActor) -> None:
    limit = a.config.max_unusable_in_a_row
    if limit and a.runner.unusable_in_a_row >= limit:
        raise RuntimeError(f"actor {a.actor_id}: {a.runner.unusable_in_a_row} groups in a row generated no token "
                           f"(actors.max_unusable_in_a_row={limit}); the last one's episodes ended with: "
                           f"{a.runner.unusable_why}")


async def _evaluate(a: RolloutActor, min_version: int) -> dict:
    deadline = time.monotonic() + a.eval_config.timeout_s
    while a.engine.version < min_version:
        a.engine.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"actor {a.actor_id} still serves weight version {a.engine.version} after "
                               f"eval.timeout_s={a.eval_config.timeout_s}s; version {min_version} never arrived")
        await asyncio.sleep(0.01)
    result = await play(a.runner, a.held_out, a.eval_config.temperature, a.rollout.max_new_tokens)
    return {**result, "eval/actor_id": a.actor_id}


async def _insert(a: RolloutActor, groups: list, gate: "_StartGate") -> int:
    """Insert the groups, however long the buffer's rate limiter holds them (up to
    actors.wait_timeout_s): asked again every HELD_POLL_S with what is not yet stored, so that
    stop() is seen meanwhile (the groups still held are then given up). Returns how many
    went in; the reply's room goes to the gate."""
    deadline, total = time.monotonic() + a.config.wait_timeout_s, len(groups)
    while groups:
        try:
            reply = await _buffer_call(a, partial(a.buffer.insert, *groups, hold_s=HELD_POLL_S))
            gate.told(reply.get("room"))
            return total
        except BufferHeld as held:
            groups = groups[len(held.stored):]
            if a._stop.is_set():
                return total - len(groups)
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor {a.actor_id} waited actors.wait_timeout_s={a.config.wait_timeout_s}s for "
                                   f"the buffer's rate limiter to take {len(groups)} group(s); is the learner "
                                   f"alive? ({held})") from None


async def _wait_room(a: RolloutActor, gate: "_StartGate") -> None:
    """Wait until the buffer's rate limiter would take a group (up to actors.wait_timeout_s),
    asking again every HELD_POLL_S so that stop() is seen meanwhile."""
    deadline = time.monotonic() + a.config.wait_timeout_s
    while not a._stop.is_set():
        try:
            reply = await _buffer_call(a, partial(a.buffer.room, HELD_POLL_S))
            gate.told(reply["room"])
            await _catch_up(a, reply.get("published_version", 0))
            return
        except BufferHeld as held:
            if time.monotonic() > deadline:
                raise TimeoutError(f"actor {a.actor_id} waited actors.wait_timeout_s={a.config.wait_timeout_s}s for "
                                   f"room in the buffer; is the learner alive? ({held})") from None


async def _catch_up(a: RolloutActor, version: int) -> None:
    """Room comes when the learner samples, just after it published `version`: the learner is
    the slower side, so the groups it takes next wait (up to CATCH_UP_S) to start on those
    weights, still on their way, rather than on the ones before."""
    deadline = time.monotonic() + CATCH_UP_S
    while a.engine.version < version and time.monotonic() < deadline and not a._stop.is_set():
        a.engine.check()
        await asyncio.sleep(CATCH_UP_POLL_S)   # an engine process answers each ask with a round trip


async def _buffer_call(a: RolloutActor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(a._io, fn, *args)


class _GroupSlots:
    """The episode slots of one group: freed one by one as its episodes end, and the rest when
    the group's task is done, however it ends (a task cancelled before it began plays none)."""

    def __init__(self, gate: "_StartGate", held: int):
        self.gate, self.held = gate, held

    def episode_ended(self) -> None:
        if self.held:
            self.held -= 1
            self.gate.live_episodes -= 1

    def group_done(self, _task=None) -> None:
        self.gate.live_episodes -= self.held
        self.held = 0


class _StartGate:
    """Whether the actor may start another group: room among the in-flight episodes and, for
    the synchronous baseline, groups left on the version being served. Waiting longer than
    actors.wait_timeout_s for a new version fails the actor."""

    def __init__(self, actor: RolloutActor):
        self.actor = actor
        self.version, self.on_version = actor.engine.version, 0
        self.waiting_since: float | None = None
        self.live_episodes = 0   # of the groups started: episodes not yet ended (or not yet begun)
        self.room: int | None = 0   # this actor's share of what the buffer would take, at its last reply
                                    # (None: unbounded); 0 until asked: the first start waits for room
        self.drop_version, self.dropped_on_version = -1, 0   # flat groups dropped on the version served

    def told(self, room: int | None) -> None:
        """The buffer's room, from a reply: the actors.count actor groups share it evenly (a
        share rounded up, so each may go on; what overshoots waits in held inserts)."""
        self.room = None if room is None else -(-room // self.actor.config.count)

    def started(self) -> "_GroupSlots":
        """A group starts: it holds group_size episode slots until they are freed."""
        self.on_version += 1
        self.live_episodes += self.actor.rollout.group_size
        return _GroupSlots(self, self.actor.rollout.group_size)

    def drops(self, group) -> bool:
        """Whether to drop a finished group (actors.drop_flat_groups): a flat one with no episode
        error (those reach the learner, which counts them), while this version served has
        dropped fewer than the limit."""
        a = self.actor
        if not a.config.drop_flat_groups or not group.flat or any(group.errors):
            return False
        version = a.engine.version
        if version != self.drop_version:
            self.drop_version, self.dropped_on_version = version, 0
        if self.dropped_on_version >= a.config.drop_flat_groups:
            return False
        self.dropped_on_version += 1
        a.flat_groups_dropped += 1
        return True

    def discarded(self, started_on: int) -> None:
        """A group that reaches no learner (dropped, or with no row generated) was started on
        version `started_on`: if the synchronous baseline still serves that version, its place
        is free again and another group starts instead, or the learner would wait for a group
        no actor makes."""
        if started_on == self.version and self.on_version:
            self.on_version -= 1

    def may_start(self, inflight_groups: int, max_groups: int | None) -> bool:
        a, group_size = self.actor, self.actor.rollout.group_size
        if max_groups is not None and a.groups + inflight_groups >= max_groups:
            return False
        if self.room is not None and inflight_groups >= self.room:
            return False   # the buffer would hold what more it generated (back-pressure)
        # room for a whole group among the episode slots (one group may always run, even if
        # larger than the limit)
        if self.live_episodes and self.live_episodes + group_size > a.config.max_inflight_episodes:
            return False
        blocked = ""
        if a.config.groups_per_version:   # the synchronous baseline (asking an engine process is a round trip)
            version = a.engine.version
            if version != self.version:
                self.version, self.on_version = version, 0
            if self.on_version >= a.config.groups_per_version:
                blocked = f"weights newer than version {self.version}; is the learner alive?"
        if not blocked:
            if self.waiting_since is not None:
                a.runner.activity.end("waiting")
            self.waiting_since = None
            return True
        if inflight_groups:
            return False  # still busy; the wait only counts once nothing is in flight
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
            a.runner.activity.begin("waiting")
        if now - self.waiting_since > a.config.wait_timeout_s:
            raise TimeoutError(f"actor {a.actor_id} waited {a.config.wait_timeout_s}s for {blocked}")
        return False
