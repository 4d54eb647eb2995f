"""Async against sync on the same machine: wall-clock to the same reward.

Runs `python -m launch sync_grpo` and `python -m launch async_grpo` with the same config and
overrides, one after the other, and reports for each the seconds (from the launcher's start
of training) until the reward, averaged over a window of steps, first reaches each target.
Usage:
  python bench/async_vs_sync.py --config tiny --actors 2 --targets 0.5 0.9
  python bench/async_vs_sync.py --targets 0.4 0.5 trainer.max_steps=30     # the default job
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.time_to_reward import table, time_to  # noqa: E402
from common.metrics import read_metrics  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--actors", type=int)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--window", type=int, default=3, help="steps the reward is averaged over")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = (["--config", args.config] if args.config else []) + (["--actors", str(args.actors)] if args.actors else [])
    rows = []
    for recipe in ("sync_grpo", "async_grpo"):
        run_dir = tempfile.mkdtemp(prefix=f"bench-{recipe}-")
        t = time.monotonic()
        subprocess.run([sys.executable, "-m", "launch", recipe, *common, f"run.dir={run_dir}", *args.overrides],
                       check=True, stdout=subprocess.DEVNULL)
        metrics = read_metrics(run_dir)
        rows.append((recipe, metrics, time.monotonic() - t))
    print(table({recipe: metrics for recipe, metrics, _ in rows}, args.targets, args.window))
    print("wall-clock of each whole run (start-up included): "
          + ", ".join(f"{recipe} {wall:.0f}s" for recipe, _, wall in rows))
    (_, s_metrics, _), (_, a_metrics, _) = rows
    for x in args.targets:
        s, a = time_to(s_metrics, x, args.window), time_to(a_metrics, x, args.window)
        if s and a:
            print(f"reward {x}: async reaches it in {a / s:.2f}x the synchronous wall-clock")


if __name__ == "__main__":
    main()
