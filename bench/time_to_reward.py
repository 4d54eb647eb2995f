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
import json
from pathlib import Path


def load(path) -> list:
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curve(rows: list, metric: str = "reward/mean") -> list:
    """(seconds, value) of every row that has `metric`, in time order."""
    if metric.startswith("eval/"):
        points = [(r["eval/at_s"], r[metric]) for r in rows if r.get("kind") == "eval" and metric in r]
    else:
        points = [(r["time_s"], r[metric]) for r in rows if r.get("kind", "step") == "step" and metric in r]
    return sorted(points)


def smoothed(rows: list, window: int, metric: str = "reward/mean") -> list:
    """(seconds, mean of the last `window` values) from the window-th point on."""
    points = curve(rows, metric)
    return [(points[i][0], sum(v for _, v in points[i - window + 1:i + 1]) / window)
            for i in range(window - 1, len(points))]


def time_to(rows: list, target: float, window: int, metric: str = "reward/mean") -> float | None:
    return next((t for t, v in smoothed(rows, window, metric) if v >= target), None)


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
