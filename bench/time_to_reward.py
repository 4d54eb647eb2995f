"""Wall-clock to the same reward, from any runs' per-step logs (asyncrl's metrics.jsonl, or a
baseline's JSONL with `time_s` and `reward/mean` per step), side by side.

  python bench/time_to_reward.py runs/async_grpo-... runs/sync_grpo-... trl.jsonl --targets 0.4 0.5 0.6
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


def smoothed(metrics: list, window: int) -> list:
    """(time_s, mean reward of the last `window` steps) for every step from the window-th on."""
    return [(metrics[i]["time_s"], sum(m["reward/mean"] for m in metrics[i - window + 1:i + 1]) / window)
            for i in range(window - 1, len(metrics))]


def time_to(metrics: list, target: float, window: int) -> float | None:
    return next((t for t, r in smoothed(metrics, window) if r >= target), None)


def table(runs: dict, targets: list, window: int) -> str:
    lines = [f"{'run':<28} {'steps':>5} {'s/step':>6} {'start':>6} {'end':>6} "
             + " ".join(f"{'to ' + str(x):>8}" for x in targets)]
    for name, metrics in runs.items():
        curve = smoothed(metrics, window)
        reach = [time_to(metrics, x, window) for x in targets]
        lines.append(f"{name[-28:]:<28} {len(metrics):>5} {metrics[-1]['time_s'] / len(metrics):>6.1f} "
                     f"{curve[0][1]:>6.3f} {curve[-1][1]:>6.3f} "
                     + " ".join(f"{r:>7.0f}s" if r is not None else f"{'never':>8}" for r in reach))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or JSONL files")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    parser.add_argument("--window", type=int, default=5, help="steps the reward is averaged over")
    args = parser.parse_args()
    print(table({str(r): load(r) for r in args.runs}, args.targets, args.window))


if __name__ == "__main__":
    main()
