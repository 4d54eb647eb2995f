"""Evaluate a model on an environment: mean reward over a fixed set of tasks.

    python -m launch.evaluate MODEL [--env arithmetic] [--samples 256] [--temperature 0.7] [--greedy]

MODEL is a local Hugging Face folder (a run's final/, a converted cache entry) or `tiny`-built
folder. The tasks are the held-out set of actors/evaluation.py (distinct tasks drawn with a
fixed seed, which a run with the same eval.seed never trains on), so every model is scored on
the same ones; with --greedy each task is answered once without sampling.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch
from transformers import AutoTokenizer

from actors.engines.hf import HFEngine
from actors.evaluation import EvalConfig, held_out_tasks, play
from actors.rollout import EpisodeRunner, RolloutConfig
from envs import registry


def evaluate(model_path: str, env: registry.EnvConfig, samples: int = 256, temperature: float = 0.7,
             max_new_tokens: int = 24, batch: int = 32, seed: int = 1234) -> dict:
    """Mean reward over the held-out tasks of `seed` (the set a run with eval.seed=seed and
    eval.tasks=samples evaluates on and never trains on)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    engine = HFEngine(model_path, stop_token_ids=[tokenizer.eos_token_id],
                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, seed=seed)
    make_env = registry.factory(env)
    runner = EpisodeRunner(engine, tokenizer, make_env, RolloutConfig(max_new_tokens=max_new_tokens))
    tasks = held_out_tasks(make_env(), EvalConfig(tasks=samples, seed=seed))
    t, rewards = time.monotonic(), []
    for i in range(0, len(tasks), batch):
        result = asyncio.run(play(runner, tasks[i:i + batch], temperature, max_new_tokens))
        rewards.append(result["eval/reward"] * result["eval/tasks"])
    engine.close()
    return {"model": model_path, "env": env.name, "samples": len(tasks), "temperature": temperature,
            "reward/mean": sum(rewards) / len(tasks), "seconds": round(time.monotonic() - t, 1)}


class PeriodicEvaluation:
    """A run's held-out evaluations, on actor 0, never holding up a learner step: each is
    requested for the version the learner has just published and its result is logged as an
    eval row of metrics.jsonl when it arrives. One runs at a time: one falling due while the
    last is still running is skipped. The final one is awaited."""

    def __init__(self, config: EvalConfig, actor, logger, max_steps: int):
        self.config, self.actor, self.logger, self.max_steps = config, actor, logger, max_steps
        self.pending = None  # (ref, step, version, requested at)
        self.skipped = 0

    def due(self, step: int) -> bool:
        return step == 0 or step % self.config.every == 0 or step == self.max_steps

    def request(self, step: int, version: int) -> None:
        self.poll()
        if self.pending is not None:
            self.skipped += 1
            return
        at_s = round(time.monotonic() - self.logger.started, 3)
        self.pending = (self.actor.evaluate.remote(version), step, version, at_s)

    def poll(self, timeout_s: float = 0.0) -> None:
        """Log the pending evaluation's result if it is there (waiting up to timeout_s)."""
        import ray

        from launch.cluster import get

        if self.pending is None:
            return
        ref, step, version, at_s = self.pending
        if not ray.wait([ref], timeout=timeout_s)[0]:
            if timeout_s:
                raise TimeoutError(f"the held-out evaluation of step {step} on actor 0 did not finish within "
                                   f"{timeout_s:.0f}s (eval.timeout_s)")
            return
        self.pending = None
        result = get(ref, 5.0, f"held-out evaluation of step {step} on actor 0")
        self.logger.log_eval({"step": step, "weights/version": version, "eval/at_s": at_s,
                              "eval/skipped": self.skipped, **result})

    def finish(self, step: int, version: int) -> None:
        """Wait for the pending evaluation, then evaluate `version` and wait for that too."""
        self.poll(self.config.timeout_s)
        self.request(step, version)
        self.poll(self.config.timeout_s)


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
                                  0.0 if args.greedy else args.temperature, args.max_new_tokens)), flush=True)


if __name__ == "__main__":
    main()
