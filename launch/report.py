"""python -m launch report RUN_DIR [RUN_DIR ...] [--out DIR] [--levels 0.5 0.8] [--window N]

A run's report from its metrics.jsonl: report.html (self-contained, the plots inline) and the
PNGs beside it, in the first run's folder unless --out says otherwise. Several runs (async and
sync, say) are overlaid on the same axes, and a table gives each run's wall-clock to each
reward level: held-out accuracy (eval/reward, at the time its weights were published) where
the runs have evaluations, the training reward (reward/mean, smoothed over --window steps)
otherwise. Every launched run writes its own at the end.
"""
from __future__ import annotations

import argparse
import base64
import html
from pathlib import Path

from actors.activity import SHARES as ACTOR_PARTS   # what an actor's wall-clock is split into
from common.config import ConfigError
from common.metrics import read_rows, smoothed, time_to

DEFAULT_LEVELS = (0.5, 0.7, 0.8, 0.9)
# (file stem, title, [(metric, label)]): each plotted against steps and against wall-clock
PLOTS = [
    ("reward", "Training reward", [("reward/mean", "reward/mean")]),
    ("held_out", "Held-out accuracy", [("eval/reward", "eval/reward")]),
    ("staleness", "Staleness of the groups trained on", [("staleness/mean", "mean"), ("staleness/max", "max")]),
    ("throughput", "Tokens/s", [("actor/tokens_per_s", "actors: generated"),
                                ("learner/tokens_per_s", "learner: policy tokens trained")]),
    ("mfu", "Learner MFU (model FLOPs / the GPUs' dense bf16 peak)", [("learner/mfu", "learner/mfu")]),
]
# the parts of a learner step (learner/step_s), shown as one stacked bar per run
STEP_PARTS = [("learner/wait_s", "waiting for the buffer"), ("learner/train_s", "training"),
              ("weights/gather_s", "gathering weights"), ("weights/send_s", "sending weights")]


def load_run(path) -> dict:
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise ConfigError("RUN_DIR", f"{path} holds no metrics.jsonl (is it a run folder?)")
    rows = read_rows(path)
    return {"name": path.name, "path": path, "steps": [r for r in rows if r.get("kind", "step") == "step"],
            "evals": [r for r in rows if r.get("kind") == "eval"], "rows": rows}


def _series(run: dict, metric: str, x: str) -> tuple[list, list]:
    """(xs, ys) of `metric` against x ("step" or "time_s"; evaluations at eval/at_s)."""
    rows = run["evals"] if metric.startswith("eval/") else run["steps"]
    key = "eval/at_s" if (metric.startswith("eval/") and x == "time_s") else x
    points = [(r[key], r[metric]) for r in rows if r.get(metric) is not None and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot(runs: list, stem: str, title: str, metrics: list, out: Path) -> Path | None:
    """One PNG: the metrics against steps (left) and wall-clock (right), every run overlaid.
    None when no run has any of them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(_series(run, m, "step")[0] for run in runs for m, _ in metrics):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), constrained_layout=True)
    for ax, x, xlabel in ((axes[0], "step", "learner step"), (axes[1], "time_s", "wall-clock (s)")):
        for run in runs:
            for metric, label in metrics:
                xs, ys = _series(run, metric, x)
                if xs:
                    name = run["name"] if len(metrics) == 1 else f"{run['name']}: {label}"
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_title(title, loc="left")
    axes[1].legend(fontsize=8, loc="best")
    path = out / f"{stem}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_step_time(runs: list, out: Path) -> Path | None:
    """Where a learner step's time goes: per run, the mean seconds of each part of a step
    (the first step, which includes start-up, left out), stacked; the rest is "other"."""
    bars = []
    for run in runs:
        steps = run["steps"][1:] or run["steps"]
        total = _mean(r.get("learner/step_s") for r in steps)
        if total is None:
            continue
        parts = [(label, _mean(r.get(metric) for r in steps) or 0.0) for metric, label in STEP_PARTS]
        parts.append(("other", max(0.0, total - sum(v for _, v in parts))))
        bars.append((run["name"], parts))
    return _stacked_bars(bars, "seconds per learner step (mean)", "Where a learner step's time goes",
                         out / "step_time.png")


def plot_actor_time(runs: list, out: Path) -> Path | None:
    """Where the actors' time goes (actors/activity.py): per run, the share of each kind over
    the whole run (each step's shares weighted by its wall-clock), stacked."""
    bars = []
    for run in runs:
        weighted, spans, last = dict.fromkeys(ACTOR_PARTS, 0.0), 0.0, 0.0
        for r in run["steps"]:
            span, last = r.get("time_s", last) - last, r.get("time_s", last)
            if all(isinstance(r.get(f"actor/time/{k}"), (int, float)) for k in ACTOR_PARTS):
                for k in ACTOR_PARTS:
                    weighted[k] += r[f"actor/time/{k}"] * span
                spans += span
        if spans > 0:
            bars.append((run["name"], [(k, weighted[k] / spans) for k in ACTOR_PARTS]))
    return _stacked_bars(bars, "share of the actors' wall-clock (mean over actor groups)",
                         "Where the actors' time goes", out / "actor_time.png")


def _stacked_bars(bars: list, xlabel: str, title: str, path: Path) -> Path | None:
    """One horizontal bar per (name, [(part, value)]), its parts stacked; None with no bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not bars:
        return None
    legend_rows = max(len(parts) for _, parts in bars)   # the legend beside the bars must fit too
    fig, ax = plt.subplots(figsize=(11, max(0.6 + 0.55 * len(bars), 0.9 + 0.22 * legend_rows)), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (name, parts) in enumerate(bars):
        left = 0.0
        for i, (label, value) in enumerate(parts):
            ax.barh(row, value, left=left, color=colors[i % len(colors)], label=label if row == 0 else None)
            left += value
    ax.set_yticks(range(len(bars)), [name for name, _ in bars])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, loc="left")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_staleness_histogram(runs: list, out: Path) -> Path | None:
    """The staleness of every group handed to the learner, and of those dropped as too stale,
    over the whole run (the last step row's counts), one pair of bar series per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    hists = []
    for run in runs:
        last = next((r for r in reversed(run["steps"]) if "buffer/staleness_histogram" in r), None)
        if last is not None:
            hists.append((run["name"], {int(k): v for k, v in (last["buffer/staleness_histogram"] or {}).items()},
                          {int(k): v for k, v in (last.get("buffer/dropped_staleness_histogram") or {}).items()}))
    if not hists:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.6), constrained_layout=True)
    width = 0.8 / (2 * len(hists))
    for i, (name, sampled, dropped) in enumerate(hists):
        for j, (counts, label, hatch) in enumerate(((sampled, "trained on", None), (dropped, "dropped", "//"))):
            if counts:
                offset = (2 * i + j) * width - 0.4 + width / 2
                ax.bar([k + offset for k in counts], list(counts.values()), width, hatch=hatch,
                       label=f"{name}: {label}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("staleness (learner version - the group's oldest version)")
    ax.set_ylabel("groups")
    ax.set_title("Staleness of the groups over the run", loc="left")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    path = out / "staleness_histogram.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reach_table(runs: list, levels, window: int) -> tuple[str, list]:
    """(the metric used, [(run name, start, end, [seconds to each level or None])])."""
    metric = "eval/reward" if all(run["evals"] for run in runs) else "reward/mean"
    win = 1 if metric == "eval/reward" else window
    rows = []
    for run in runs:
        values = smoothed(run["rows"], win, metric)
        rows.append((run["name"], values[0][1] if values else None, values[-1][1] if values else None,
                     [time_to(run["rows"], level, win, metric) for level in levels]))
    return (metric if win == 1 else f"{metric}, mean of the last {win} steps"), rows


def summary(run: dict) -> dict:
    steps, evals = run["steps"], run["evals"]
    last = steps[-1] if steps else {}
    return {"steps": len(steps), "wall-clock (s)": last.get("time_s"), "final version": last.get("weights/version"),
            "final reward/mean": last.get("reward/mean"),
            "held-out accuracy (first, last)": (evals[0].get("eval/reward"), evals[-1].get("eval/reward")) if evals else None,
            "mean staleness": _mean(s.get("staleness/mean") for s in steps),
            "actor tokens/s (mean)": _mean(s.get("actor/tokens_per_s") for s in steps),
            "learner step s (median)": _median(s.get("learner/step_s") for s in steps),
            "episode errors": sum(s.get("rollout/episode_errors") or 0 for s in steps)}


def _mean(values):
    values = [v for v in values if isinstance(v, (int, float))]
    return sum(values) / len(values) if values else None


def _median(values):
    values = sorted(v for v in values if isinstance(v, (int, float)))
    return values[len(values) // 2] if values else None


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):
        return " → ".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return html.escape(str(value))


def write(run_dirs: list, out: Path | None = None, levels=DEFAULT_LEVELS, window: int = 5) -> Path:
    """Write report.html and its PNGs; returns the HTML's path."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(out) if out else runs[0]["path"]
    out.mkdir(parents=True, exist_ok=True)
    plots = list(PLOTS)
    for reading, title in (("util", "GPU utilization (%)"), ("mem_gb", "GPU memory used (GB)"), ("power_w", "GPU power (W)")):
        keys = sorted({k for run in runs for r in run["steps"] for k in r if "/gpu" in k and k.endswith("/" + reading)})
        if keys:   # telemetry (common/telemetry.py): one line per part and GPU
            plots.append((f"gpu_{reading}", title, [(k, k.rsplit("/", 1)[0]) for k in keys]))
    images = [(title, path) for stem, title, metrics in plots
              if (path := plot(runs, stem, title, metrics, out)) is not None]
    if (path := plot_staleness_histogram(runs, out)) is not None:
        images.append(("Staleness of the groups over the run", path))
    if (path := plot_step_time(runs, out)) is not None:
        images.append(("Where a learner step's time goes", path))
    if (path := plot_actor_time(runs, out)) is not None:
        images.append(("Where the actors' time goes", path))
    metric, reach = reach_table(runs, levels, window)
    names = ", ".join(html.escape(r["name"]) for r in runs)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>asyncrl report: {names}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th:first-child,td:first-child{text-align:left}img{width:100%}</style></head><body>",
             f"<h1>asyncrl report</h1><p>Runs: {names}</p>"]
    keys = list(summary(runs[0]))
    parts.append("<h2>Summary</h2><table><tr><th>run</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
    for run in runs:
        s = summary(run)
        parts.append(f"<tr><td>{html.escape(run['name'])}<br><small>{html.escape(str(run['path']))}</small></td>"
                     + "".join(f"<td>{_fmt(s[k])}</td>" for k in keys) + "</tr>")
    parts.append("</table>")
    parts.append(f"<h2>Wall-clock to each level</h2><p>{html.escape(metric)}; seconds from the start of training.</p>"
                 "<table><tr><th>run</th><th>start</th><th>end</th>"
                 + "".join(f"<th>to {level:g}</th>" for level in levels) + "</tr>")
    for name, start, end, seconds in reach:
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{_fmt(start)}</td><td>{_fmt(end)}</td>"
                     + "".join(f"<td>{'never' if s is None else f'{s:.0f} s'}</td>" for s in seconds) + "</tr>")
    parts.append("</table>")
    for title, path in images:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    report = out / "report.html"
    report.write_text("\n".join(parts))
    return report


def main(argv: list) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", help="folder for report.html and the PNGs (default: the first run's)")
    parser.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LEVELS))
    parser.add_argument("--window", type=int, default=5, help="steps the training reward is averaged over")
    args = parser.parse_args(argv)
    print(write(args.runs, args.out, args.levels, args.window))
