"""Run metrics: one JSON object per learner step in <run.dir>/metrics.jsonl, one per held-out
evaluation (with "kind": "eval"), and progress on stdout: on a terminal, a bar with the time
left redrawn in place (evaluations print above it); on a log, one summary line per step.
Metric names are `area/name`."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from common.progress import bar, is_terminal
from common.progress import eta as progress_eta

PROGRESS = [  # (metric, label, format) shown on the progress line
    ("weights/version", "v", "{:.0f}"), ("reward/mean", "reward", "{:.3f}"),
    ("staleness/mean", "stale", "{:.2f}"), ("staleness/max", "max", "{:.0f}"),
    ("buffer/size", "buffer", "{:.0f}"), ("buffer/dropped_stale", "dropped", "{:.0f}"),
    ("actor/tokens_per_s", "tok/s", "{:.0f}"), ("learner/step_s", "step", "{:.2f}s"),
    ("weights/sync_s", "sync", "{:.3f}s"),
]


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, stream=sys.stdout, sinks=()):
        """`sinks`: objects whose log(row) gets every row as written (common/wandb_run.py)."""
        self.sinks = list(sinks)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        self.total_steps, self.stream = total_steps, stream
        self.started = time.monotonic()
        self._first = None   # (step, when) the ETA counts from: the first step logged
        self.terminal = is_terminal(stream)
        self._bar = ""       # the bar line on the terminal now, to draw again below a printed line

    def _write(self, metrics: dict) -> dict:
        metrics = {"time_s": round(time.monotonic() - self.started, 3), **metrics}
        self._file.write(json.dumps({k: _jsonable(v) for k, v in metrics.items()}) + "\n")
        for sink in self.sinks:
            sink.log(metrics)
        return metrics

    def log(self, metrics: dict) -> None:
        metrics = self._write(metrics)
        shown = " | ".join(f"{label} {fmt.format(metrics[key])}" for key, label, fmt in PROGRESS
                           if isinstance(metrics.get(key), (int, float)))
        step = metrics.get("step")
        if self._first is None and isinstance(step, int):
            self._first = (step - 1, time.monotonic())   # the step before this one ended about now
        eta = ""
        if isinstance(step, int) and step - self._first[0] > 1:   # the pace of two steps at least
            first, since = self._first
            eta = progress_eta(since, step - first, self.total_steps - first)
        line = f"step {step}/{self.total_steps} | {shown} | {metrics['time_s']:.0f}s{eta}"
        if not self.terminal:
            print(line, file=self.stream, flush=True)
            return
        self._bar = f"{bar(step, self.total_steps)} {line}" if isinstance(step, int) else line
        last = step == self.total_steps
        print("\r\x1b[K" + self._bar, end="\n" if last else "", file=self.stream, flush=True)
        self._bar = "" if last else self._bar

    def log_eval(self, metrics: dict) -> None:
        """A held-out evaluation's row ("kind": "eval"; its `step` is the learner step whose
        weights it scored)."""
        metrics = self._write({"kind": "eval", **metrics})
        line = (f"eval of step {metrics.get('step')} (version {metrics.get('weights/version')}) | held-out reward "
                f"{metrics.get('eval/reward', float('nan')):.3f} over {metrics.get('eval/tasks')} tasks | "
                f"{metrics.get('eval/s', 0):.1f}s")
        if self.terminal:   # above the bar, which is drawn again below it
            line = "\r\x1b[K" + line + ("\n" + self._bar if self._bar else "")
        print(line, end="" if self.terminal and self._bar else "\n", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar:   # a run that ended early leaves its bar, ended by a newline
            print(file=self.stream, flush=True)
            self._bar = ""
        self._file.close()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir, kind: str = "step") -> list:
    """The rows of one kind: "step" (one per learner step) or "eval" (one per held-out evaluation)."""
    return [r for r in read_rows(run_dir) if r.get("kind", "step") == kind]


def curve(rows: list, metric: str = "reward/mean") -> list:
    """(seconds, value) of every row of a run's metrics.jsonl that has `metric`, in time order:
    a step row at its time_s; for eval/ metrics, an evaluation at the time its weights were
    published (eval/at_s), which is what wall-clock to the same accuracy needs."""
    if metric.startswith("eval/"):
        points = [(r["eval/at_s"], r[metric]) for r in rows if r.get("kind") == "eval" and r.get(metric) is not None]
    else:
        points = [(r["time_s"], r[metric]) for r in rows
                  if r.get("kind", "step") == "step" and r.get(metric) is not None]
    return sorted(points)


def smoothed(rows: list, window: int, metric: str = "reward/mean") -> list:
    """(seconds, mean of the last `window` values) from the window-th point on."""
    points = curve(rows, metric)
    return [(points[i][0], sum(v for _, v in points[i - window + 1:i + 1]) / window)
            for i in range(window - 1, len(points))]


def time_to(rows: list, target: float, window: int, metric: str = "reward/mean") -> float | None:
    """Seconds until the smoothed `metric` first reaches `target`; None if it never does."""
    return next((t for t, v in smoothed(rows, window, metric) if v >= target), None)


def read_rows(path) -> list:
    """Every row of a run folder's metrics.jsonl (or of a JSONL file), of every kind."""
    path = Path(path)
    with open(path / "metrics.jsonl" if path.is_dir() else path) as f:
        return [json.loads(line) for line in f if line.strip()]
