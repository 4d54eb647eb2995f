"""CPU cost of the rollout loop itself, per episode, without an engine's compute: how many
episodes per second one actor process can drive at most, whatever the GPU does.

    python -m bench.rollout_overhead [--episodes 4096] [--group-size 8] [--env-workers N] [--model PATH] [--profile]

The engine here (actors/engines/scripted.py) answers every request at once with a fixed
completion, which isolates the loop's CPU time; a real engine only adds to it. The environment is the default
job's (arithmetic) with the default model's chat template, unless --model names another
Hugging Face folder. Reported: microseconds of wall-clock per episode and per group (render,
tokenize, environment calls, decode, group assembly and its wire encoding), and with
--profile the top functions by cumulative time. --env-workers N runs the environments in N
worker processes (rollout.env_workers) instead of threads of this process. --engine-process
puts the engine in a process of its own (actors/engine_process.py, as runs do for vLLM) and
reports that process's CPU per request: what the actor's requests cost the process that, with
vLLM, holds its frontend (bound by one core at hundreds of sequences).
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from actors.engines.scripted import ScriptedEngine  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=4096)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=256, help="episodes in flight")
    parser.add_argument("--model", help="a Hugging Face folder (default: the default job's model)")
    parser.add_argument("--env-workers", type=int, default=0, help="rollout.env_workers (0: threads)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--engine-process", action="store_true", help="the engine in a process of its own")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from actors.rollout import EpisodeRunner, RolloutConfig
    from common.wire import encode
    from envs import registry
    from launch.models import ModelConfig, resolve

    model = args.model or resolve(ModelConfig(), "/tmp", 0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    env_config = registry.EnvConfig(name="arithmetic")
    make_env = registry.factory(env_config)
    environments = make_env
    if args.env_workers:
        from actors.environments import ProcessEnvironments
        environments = ProcessEnvironments(env_config, args.env_workers, 30.0)
        environments.wait_ready(60)
    # every request answered at once with "42": only the loop's CPU is timed (the engine's
    # decode of each prompt counts too, a few µs)
    if args.engine_process:
        from actors.engine_process import EngineProcess
        engine = EngineProcess("bench.rollout_overhead:answer_42", {"model": model}, name="scripted engine")
    else:
        engine = answer_42(model)
    runner = EpisodeRunner(engine, tokenizer, environments,
                           RolloutConfig(group_size=args.group_size, max_new_tokens=24, temperature=0.7),
                           [tokenizer.eos_token_id])
    source, rng = make_env(), random.Random(0)
    groups = args.episodes // args.group_size

    async def drive():
        pending, done = set(), 0
        started = 0
        while done < groups:
            while started < groups and len(pending) * args.group_size < args.inflight:
                pending.add(asyncio.ensure_future(runner.group(source.sample(rng))))
                started += 1
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for f in finished:
                encode(f.result().to_wire())  # what an insert sends
                done += 1

    profiler = cProfile.Profile() if args.profile else None
    engine_cpu = _cpu_s(engine.proc.pid) if args.engine_process else None
    t = time.perf_counter()
    if profiler:
        profiler.enable()
    asyncio.run(drive())
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - t
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    extra = {}
    if args.engine_process:   # one request per episode (one turn)
        extra["engine_process_us_per_request"] = round((_cpu_s(engine.proc.pid) - engine_cpu) /
                                                       (groups * args.group_size) * 1e6, 1)
        engine.close()
    print(json.dumps({"episodes": groups * args.group_size, "seconds": round(seconds, 3),
                      "us_per_episode": round(seconds / (groups * args.group_size) * 1e6, 1),
                      "episodes_per_s": round(groups * args.group_size / seconds),
                      "env_s": round(runner.env_s, 3), "env_workers": args.env_workers,
                      "engine_process": args.engine_process, **extra, "model": model}))
    if args.env_workers:
        environments.shutdown()


def answer_42(model: str) -> ScriptedEngine:
    """Answers every request at once with "42" (built in the engine process when there is one)."""
    from transformers import AutoTokenizer

    return ScriptedEngine(AutoTokenizer.from_pretrained(model), lambda text: "42")


def _cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


if __name__ == "__main__":
    main()
