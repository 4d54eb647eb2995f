"""Run metrics: one JSON object per learner step in <run.dir>/metrics.jsonl, and a progress
line on stdout. Metric names are `area/name`."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

PROGRESS = [  # (metric, label, format) shown on the progress line
    ("weights/version", "v", "{:.0f}"), ("reward/mean", "reward", "{:.3f}"),
    ("staleness/mean", "stale", "{:.2f}"), ("staleness/max", "max", "{:.0f}"),
    ("buffer/size", "buffer", "{:.0f}"), ("buffer/dropped_stale", "dropped", "{:.0f}"),
    ("actor/tokens_per_s", "tok/s", "{:.0f}"), ("learner/step_s", "step", "{:.2f}s"),
    ("weights/sync_s", "sync", "{:.3f}s"),
]


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, stream=sys.stdout):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self.total_steps, self.stream = total_steps, stream
        self.started = time.monotonic()

    def log(self, metrics: dict) -> None:
        metrics = {"time_s": round(time.monotonic() - self.started, 3), **metrics}
        self._file.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        shown = " | ".join(f"{label} {fmt.format(metrics[key])}" for key, label, fmt in PROGRESS
                           if isinstance(metrics.get(key), (int, float)))
        print(f"step {metrics.get('step')}/{self.total_steps} | {shown} | {metrics['time_s']:.0f}s",
              file=self.stream, flush=True)

    def close(self) -> None:
        self._file.close()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir) -> list:
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]
