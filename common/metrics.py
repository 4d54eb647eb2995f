"""Run metrics: one JSON object per learner step in <run.dir>/metrics.jsonl, one per held-out
evaluation (with "kind": "eval"), and a progress line on stdout. Metric names are `area/name`."""
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

    def _write(self, metrics: dict) -> dict:
        metrics = {"time_s": round(time.monotonic() - self.started, 3), **metrics}
        self._file.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        return metrics

    def log(self, metrics: dict) -> None:
        metrics = self._write(metrics)
        shown = " | ".join(f"{label} {fmt.format(metrics[key])}" for key, label, fmt in PROGRESS
                           if isinstance(metrics.get(key), (int, float)))
        print(f"step {metrics.get('step')}/{self.total_steps} | {shown} | {metrics['time_s']:.0f}s",
              file=self.stream, flush=True)

    def log_eval(self, metrics: dict) -> None:
        """A held-out evaluation's row ("kind": "eval"; its `step` is the learner step whose
        weights it scored)."""
        metrics = self._write({"kind": "eval", **metrics})
        print(f"eval of step {metrics.get('step')} (version {metrics.get('weights/version')}) | held-out reward "
              f"{metrics.get('eval/reward', float('nan')):.3f} over {metrics.get('eval/tasks')} tasks | "
              f"{metrics.get('eval/s', 0):.1f}s", file=self.stream, flush=True)

    def close(self) -> None:
        self._file.close()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir, kind: str = "step") -> list:
    """The rows of one kind: "step" (one per learner step) or "eval" (one per held-out evaluation)."""
    path = Path(run_dir)
    with open(path / "metrics.jsonl" if path.is_dir() else path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("kind", "step") == kind]
