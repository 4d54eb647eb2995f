"""Wall-clock to the same reward, from any runs' logs (asyncrl's metrics.jsonl, or a
baseline's JSONL with `time_s` and `reward/mean` per step), side by side.

  python bench/time_to_reward.py runs/async_grpo-... runs/sync_grpo-... trl.jsonl --targets 0.4 0.5 0.6
  python bench/time_to_reward.py RUN RUN --metric eval/reward --window 1   # held-out accuracy

`--metric reward/mean` (the default) follows the training reward of each step at its time_s;
`--metric eval/reward` the held-out evaluations, each at the time its weights were published
(eval/at_s), which is what a comparison of wall-clock to the same accuracy needs.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.metrics import read_rows, smoothed, time_to  # noqa: E402


load = read_rows


def table(runs: dict, targets: list, window: int, metric: str = "reward/mean") -> str:
    lines = [f"{metric}, mean of the last {window}",
             f"{'run':<28} {'points':>6} {'start':>6} {'end':>6} " + " ".join(f"{'to ' + str(x):>8}" for x in targets)]
    for name, rows in runs.items():
        values = smoothed(rows, window, metric)
        if not values:
            lines.append(f"{name[-28:]:<28} {'no ' + metric}")
            continue
        reach = [time_to(rows, x, window, metric) for x in targets]
        lines.append(f"{name[-28:]:<28} {len(values):>6} {values[0][1]:>6.3f} {values[-1][1]:>6.3f} "
                     + " ".join(f"{r:>7.0f}s" if r is not None else f"{'never':>8}" for r in reach))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or JSONL files")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    parser.add_argument("--window", type=int, default=5, help="points the value is averaged over")
    parser.add_argument("--metric", default="reward/mean", help="reward/mean or eval/reward")
    args = parser.parse_args()
    print(table({str(r): load(r) for r in args.runs}, args.targets, args.window, args.metric))


if __name__ == "__main__":
    main()
