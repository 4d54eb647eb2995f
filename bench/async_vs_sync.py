"""Async against sync on the same machine: wall-clock to the same reward.

Runs `python -m launch sync_grpo` and `python -m launch async_grpo` with the same config and
overrides, one after the other, and reports for each the seconds (from the launcher's start
of training) until the reward, averaged over a window of steps, first reaches each target,
then writes both runs' report on the same axes (launch/report.py) into RUNS_DIR/comparison.
Usage:
  python bench/async_vs_sync.py --config tiny --actors 2 --targets 0.5 0.9
  python bench/async_vs_sync.py --targets 0.4 0.5 trainer.max_steps=16     # the default job
  python bench/async_vs_sync.py --metric eval/reward --window 1 --targets 0.3 0.5 eval.every=5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.time_to_reward import load, table, time_to  # noqa: E402
from launch import report  # noqa: E402
from launch.__main__ import RECIPES  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--actors", type=int)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--window", type=int, default=3, help="points the metric is averaged over")
    parser.add_argument("--metric", default="reward/mean",
                        help="reward/mean (training reward per step) or eval/reward (held-out; needs eval.every)")
    parser.add_argument("--runs-dir", help="keep both runs' folders here (default: temporary folders)")
    parser.add_argument("--timeout-s", type=float, help="deadline of each run")
    parser.add_argument("--recipes", nargs="+", default=["sync_grpo", "async_grpo"], choices=sorted(RECIPES),
                        help="run only some (compare with earlier runs by bench/time_to_reward.py); "
                             "key=value overrides go before it, or it takes them for recipes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = (["--config", args.config] if args.config else []) + (["--actors", str(args.actors)] if args.actors else [])
    rows, folders = [], []
    for recipe in args.recipes:
        if args.runs_dir:
            run_dir = os.path.join(args.runs_dir, recipe)
            os.makedirs(run_dir, exist_ok=True)
        else:
            run_dir = tempfile.mkdtemp(prefix=f"bench-{recipe}-")
        t = time.monotonic()
        with open(os.path.join(run_dir, "stdout.log"), "w") as out, open(os.path.join(run_dir, "stderr.log"), "w") as err:
            try:
                code = subprocess.run([sys.executable, "-m", "launch", recipe, *common, f"run.dir={run_dir}",
                                       *args.overrides], stdout=out, stderr=err, timeout=args.timeout_s).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code != 0:  # the other recipe still runs; the failure is reported with what it logged
            print(f"{recipe} failed ({code}); its log: {run_dir}/stderr.log", file=sys.stderr)
            with open(os.path.join(run_dir, "stderr.log")) as err:
                print(err.read()[-3000:], file=sys.stderr)
        metrics = load(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
        rows.append((recipe, metrics, time.monotonic() - t))
        if metrics:
            folders.append(run_dir)
    print(table({recipe: metrics for recipe, metrics, _ in rows}, args.targets, args.window, args.metric))
    print("wall-clock of each whole run (start-up included): "
          + ", ".join(f"{recipe} {wall:.0f}s" for recipe, _, wall in rows))
    if folders:   # both runs on the same axes, beside the first run's folder
        out = os.path.join(args.runs_dir, "comparison") if args.runs_dir else tempfile.mkdtemp(prefix="bench-comparison-")
        print("comparison report:", report.write(folders, out, levels=args.targets, window=args.window))
    if len(rows) < 2:
        return
    (_, s_metrics, s_wall), (_, a_metrics, a_wall) = rows
    result = {"metric": args.metric, "window": args.window, "wall_s_sync": round(s_wall, 1),
              "wall_s_async": round(a_wall, 1)}
    for x in args.targets:
        s, a = time_to(s_metrics, x, args.window, args.metric), time_to(a_metrics, x, args.window, args.metric)
        result[f"to_{x}_s_sync"], result[f"to_{x}_s_async"] = s, a
        if s and a:
            print(f"{args.metric} {x}: async reaches it in {a / s:.2f}x the synchronous wall-clock")
            result[f"ratio_to_{x}"] = round(a / s, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
