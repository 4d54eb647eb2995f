"""TRL's GRPOTrainer on the default job's task, for the side-by-side with asyncrl.

Same model (the converted SmolLM2-135M-Instruct), same prompts and reward (envs/arithmetic.py),
same batch (4 prompts x 8 completions), temperature 0.7, 24 new tokens, lr 3e-5 constant,
clip 0.2/0.28, token-level loss, no KL term. Writes one JSON line per step (time since training
began, reward mean) to --out, stops after --seconds of training, and saves the model to --save
(score it with python -m launch.evaluate).

TRL pins its own versions, so run it in its own environment:
  python3 -m venv /tmp/trl && . /tmp/trl/bin/activate && pip install torch==2.13.0 trl datasets
  python bench/trl_grpo_baseline.py --model ~/.cache/asyncrl/models/HuggingFaceTB--SmolLM2-135M-Instruct
Compare with an asyncrl run's metrics.jsonl: python bench/time_to_reward.py RUN_DIR trl.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from envs.arithmetic import ArithmeticEnv  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--out", default="trl.jsonl")
    parser.add_argument("--save", default="", help="folder to save the final model in")
    args = parser.parse_args()

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    env, rng = ArithmeticEnv(), random.Random(0)
    tasks = [env.sample(rng) for _ in range(2000)]
    dataset = Dataset.from_list([{"prompt": env.reset(t), **{k: t[k] for k in ("question", "a", "op", "b", "answer")}}
                                 for t in tasks])

    def reward(prompts, completions, question, a, op, b, answer, **_):
        out = []
        for text, *task in zip(completions, question, a, op, b, answer):
            env.reset(dict(zip(("question", "a", "op", "b", "answer"), task)))
            out.append(env.step([{"role": "assistant", "content": text[0]["content"]}]).reward)
        return out

    class Record(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.start = time.monotonic()
            self.file = open(args.out, "w")

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "reward" in logs:
                elapsed = time.monotonic() - self.start
                self.file.write(json.dumps({"step": state.global_step, "time_s": elapsed,
                                            "reward/mean": logs["reward"]}) + "\n")
                self.file.flush()
                print(f"trl step {state.global_step} reward {logs['reward']:.3f} {elapsed:.0f}s", flush=True)
                if elapsed > args.seconds:
                    control.should_training_stop = True

    config = GRPOConfig(
        output_dir="/tmp/trl-grpo-out", learning_rate=3e-5, lr_scheduler_type="constant", warmup_steps=0,
        per_device_train_batch_size=32, num_generations=8, gradient_accumulation_steps=1,
        max_completion_length=24, temperature=0.7, top_k=0, top_p=1.0, beta=0.0, epsilon=0.2, epsilon_high=0.28,
        loss_type="dapo", max_grad_norm=1.0, max_steps=1000, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=0)
    trainer = GRPOTrainer(model=args.model, reward_funcs=reward, args=config, train_dataset=dataset,
                          callbacks=[Record()])
    trainer.train()
    if args.save:
        trainer.save_model(args.save)
        trainer.processing_class.save_pretrained(args.save)


if __name__ == "__main__":
    main()
