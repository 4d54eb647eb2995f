"""Evaluate a model on an environment: mean reward over a fixed set of tasks.

    python -m launch.evaluate MODEL [--env arithmetic] [--samples 256] [--temperature 0.7] [--greedy]

MODEL is a local Hugging Face folder (a run's final/, a converted cache entry) or `tiny`-built
folder. The tasks come from the environment with a fixed seed, so every model is scored on the
same ones; with --greedy each task is answered once without sampling (temperature -> 0 is
approximated by 1e-4).
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch
from transformers import AutoTokenizer

from actors.engines.hf import HFEngine
from actors.rollout import EpisodeRunner, RolloutConfig
from envs import registry


def evaluate(model_path: str, env: registry.EnvConfig, samples: int = 256, temperature: float = 0.7,
             max_new_tokens: int = 24, batch: int = 32, seed: int = 1234) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = HFEngine(model_path, stop_token_ids=[tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, seed=seed)
    make_env = registry.factory(env)
    runner = EpisodeRunner(engine, tokenizer, make_env,
                           RolloutConfig(group_size=1, max_new_tokens=max_new_tokens, temperature=temperature))
    source, rng = make_env(), random.Random(seed)
    tasks = [source.sample(rng) for _ in range(samples)]
    t, rewards = time.monotonic(), []
    for i in range(0, samples, batch):
        rewards += [float(g.rewards[0]) if g is not None else 0.0 for g in runner.run(tasks[i:i + batch])]
    engine.close()
    return {"model": model_path, "env": env.name, "samples": samples, "temperature": temperature,
            "reward/mean": sum(rewards) / len(rewards), "seconds": round(time.monotonic() - t, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--env", default="arithmetic")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model in args.models:
        print(json.dumps(evaluate(model, registry.EnvConfig(name=args.env), args.samples,
                                  1e-4 if args.greedy else args.temperature, args.max_new_tokens)), flush=True)


if __name__ == "__main__":
    main()
