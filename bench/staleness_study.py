"""The off-policy study: held-out accuracy and stability against a fixed staleness, for each
off-policy correction, with the same sample budget and seeds in every cell.

Each cell is one `python -m launch async_grpo` run with `trainer.publish_lag=k` and
`buffer.table.max_staleness=k`: the actors get the learner's weights k versions late, so every
group the learner trains on is exactly k versions old (fewer in the first k steps). Cells:
lags x corrections x learning rates x seeds. Scored by the held-out evaluation at the end (the
learner's own final weights, launch/evaluate.py's fixed task set) and by the run's stability
signals, averaged over its steps: KL between behaviour and learner (loss/kl_behaviour), the
gradient norm, the entropy proxy, the share of tokens truncated or masked.

  python -m bench.staleness_study --config tiny --lags 0 2 4 8 --corrections none truncate decoupled \\
      --seeds 0 1 --out runs/staleness/study.json --plot docs/off-policy-heldout.png

--free-running measures what a staleness bound costs instead: no fixed lag (trainer.publish_lag=0),
the actors run ahead as far as the buffer lets them, and k is buffer.table.max_staleness (cells
named bound<k>); each cell then also reports the learner's seconds per step (median, from the
step rows), the actors' tokens/s, the mean staleness trained on and the share of groups dropped
as too old: throughput against accuracy for each bound.

Runs already finished under --runs-dir are read, not run again, so a grid can be continued
(past --budget-s no new cell starts: a grid too large for one sitting, or one device call,
goes on in the next). --resume-from takes the finished cells of an earlier --out JSON instead
(same setting; run folders not needed), so a grid goes on in another session or on another
machine from a file kept in bench/results/. --parallel N runs N cells at once (on one GPU,
give each its share: actors.gpu_memory_utilization=0.15, say), their starts --stagger-s apart
(two vLLM engines profiling one GPU's memory at once can fail to start). A failed cell's
whole stderr and stdout are kept in its folder (study-stderr.log, study-stdout.log). Prints a markdown table (mean and
min-max over seeds per cell), then one JSON line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.metrics import read_metrics  # noqa: E402

# name -> config overrides. "none" is plain policy gradient on the stale tokens (one
# mini-batch: pi_theta = pi_prox, so the clip never acts, and w = 1). Every cap is named, not
# taken from the config, so a cell means the same whatever the default (2 until 2026-12-07, now 8).
CORRECTIONS = {
    "none": ["loss.is_correction=none"],
    "truncate": ["loss.is_correction=truncate", "loss.is_cap=2"],   # token-level truncated IS, weights up to 2
    "truncate_cap8": ["loss.is_correction=truncate", "loss.is_cap=8"],   # the same, weights up to 8
    "mask": ["loss.is_correction=mask", "loss.is_cap=2"],    # token-level masked IS
    "sequence": ["loss.is_correction=sequence", "loss.is_cap=2"],   # one weight per row: geometric mean, truncated
    "decoupled": ["loss.is_correction=truncate", "loss.is_cap=2", "trainer.minibatches=4"],   # trust region from mini-batch 2
    "decoupled_cap8": ["loss.is_correction=truncate", "loss.is_cap=8", "trainer.minibatches=4"],
    "behaviour_ppo": ["loss.objective=behaviour", "trainer.minibatches=4"],  # clip pi_theta/mu directly
    # the default correction with dynamic sampling: actors drop groups that all scored alike (up
    # to 32 a version, the GPU job's batch), so a batch holds groups with a gradient (60-90 % of
    # the GPU job's groups were flat, 2026-12-07, and a stale run's collapse is all-flat batches)
    "truncate_cap8_drop_flat": ["loss.is_correction=truncate", "loss.is_cap=8", "actors.drop_flat_groups=32"],
}
STABILITY = ("loss/kl_behaviour", "learner/grad_norm", "loss/entropy_proxy", "loss/is_truncated_frac",
             "loss/is_masked_frac", "loss/clip_frac", "reward/flat_groups")


def cell_name(lag: int, correction: str, lr: float | None, seed: int, free_running: bool = False) -> str:
    return f"{'bound' if free_running else 'lag'}{lag}-{correction}" + (f"-lr{lr:g}" if lr else "") + f"-seed{seed}"


def learning_rate(text: str) -> float | None:
    """An --lrs value: a number, or 'config' for the config's own lr (cells named without one)."""
    return None if text == "config" else float(text)


class Stagger:
    """Starts at least `gap_s` apart, in the order asked, across the pool's threads."""

    def __init__(self, gap_s: float):
        self.gap_s, self.lock, self.last = gap_s, threading.Lock(), None

    def wait(self) -> None:
        with self.lock:
            if self.last is not None:
                time.sleep(max(0.0, self.last + self.gap_s - time.monotonic()))
            self.last = time.monotonic()


def run_cell(args, lag: int, correction: str, lr: float | None, seed: int, deadline: float = float("inf"),
             finished: dict | None = None, stagger: Stagger | None = None) -> dict:
    """Run (or read) one cell; returns its scores, or why it has none. `finished`: cells
    read from --resume-from, by name."""
    run_dir = Path(args.runs_dir) / cell_name(lag, correction, lr, seed, args.free_running)
    if finished and run_dir.name in finished:
        return finished[run_dir.name]
    done = run_dir / "study.done"
    if not done.exists():
        if time.monotonic() < deadline and stagger is not None:
            stagger.wait()   # (a cell past the budget waits for no gap)
        if time.monotonic() >= deadline:
            return {"cell": run_dir.name, "skipped": f"not started: --budget-s {args.budget_s:g} was spent"}
        overrides = [f"run.dir={run_dir}", f"run.seed={seed}", f"trainer.publish_lag={0 if args.free_running else lag}",
                     f"buffer.table.max_staleness={lag}", f"trainer.max_steps={args.steps}",
                     f"eval.every={args.steps}", f"eval.tasks={args.eval_tasks}", "run.wandb=disabled",
                     *CORRECTIONS[correction], *([f"trainer.lr={lr}"] if lr else []), *args.overrides]
        command = [sys.executable, "-m", "launch", "async_grpo", *(["--config", args.config] if args.config else []),
                   *(["--actors", str(args.actors)] if args.actors else []), *overrides]
        t = time.monotonic()
        print(f"[study] {run_dir.name} ...", flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
        except subprocess.TimeoutExpired as e:   # one cell past its time fails alone; the grid goes on
            tail = (e.stderr or b"")[-1500:]
            return {"cell": run_dir.name, "error": f"timed out after {args.timeout_s:g}s (--timeout-s); stderr ends:\n"
                                                   f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}"}
        if result.returncode != 0:   # the root cause is often far above the tail (an engine's start)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "study-stderr.log").write_text(result.stderr)
            (run_dir / "study-stdout.log").write_text(result.stdout)
            return {"cell": run_dir.name, "error": result.stderr[-1500:]}
        done.write_text(json.dumps({"wall_s": time.monotonic() - t, "setting": setting(args)}))
    return score(run_dir, json.loads(done.read_text())["wall_s"]) | {
        "cell": run_dir.name, "lag": lag, "correction": correction, "lr": lr, "seed": seed}


def setting(args) -> dict:
    """What a cell's name does not say but its result depends on: a finished cell is read
    back only under the same setting."""
    return {"config": args.config, "actors": args.actors, "steps": args.steps, "eval_tasks": args.eval_tasks,
            "overrides": list(args.overrides), "free_running": args.free_running}


def resumed_cells(args, paths: list) -> dict:
    """The finished cells (no error) of earlier --out files, by name, where those files ran
    under this command's setting (the keys a file records; files before the setting was
    recorded have config, steps, overrides and free_running). Another setting is an error."""
    now, finished = setting(args), {}
    for path in paths:
        try:
            earlier = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--resume-from {path}: cannot read it as a study's --out JSON ({e})")
        were = earlier.get("setting") or {k: earlier[k] for k in ("config", "steps", "overrides", "free_running")
                                          if k in earlier}
        if any(now[k] != v for k, v in were.items() if k in now):
            raise SystemExit(f"--resume-from {path} ran with another setting ({were}; now {now}): "
                             "its cells are not this grid's")
        for row in earlier.get("runs", []):
            if "error" not in row and "skipped" not in row and row.get("held_out") is not None:
                finished[row["cell"]] = row
    return finished


def stale_cells(args, cells: list) -> list:
    """Finished cells under --runs-dir that ran with another setting than this command's."""
    out = []
    for cell in cells:
        done = Path(args.runs_dir) / cell_name(*cell, args.free_running) / "study.done"
        if done.exists():
            were = json.loads(done.read_text()).get("setting")
            if were is not None and were != setting(args):
                out.append((done.parent.name, were))
    return out


def score(run_dir: Path, wall_s: float) -> dict:
    steps, evals = read_metrics(run_dir), read_metrics(run_dir, "eval")
    final = max(evals, key=lambda e: e["weights/version"]) if evals else {}
    start = min(evals, key=lambda e: e["weights/version"]) if evals else {}
    last = steps[-1] if steps else {}
    out = {"held_out": final.get("eval/reward"), "held_out_start": start.get("eval/reward"),
           "reward_last5": statistics.mean(m["reward/mean"] for m in steps[-5:]) if steps else None,
           "staleness_mean": statistics.mean(m["staleness/mean"] for m in steps) if steps else None,
           "dropped_share": last.get("buffer/dropped_stale", 0) / max(last.get("buffer/inserts", 0), 1),
           "steps": len(steps), "wall_s": wall_s,
           # throughput: the learner's seconds per step (median; the first steps wait for the
           # first groups), and the actors' generated tokens/s
           "step_s": statistics.median(b["time_s"] - a["time_s"] for a, b in zip(steps, steps[1:]))
           if len(steps) > 1 else None,
           "actor_tokens_per_s": statistics.mean(m["actor/tokens_per_s"] for m in steps[1:])
           if len(steps) > 1 else None}
    for key in STABILITY:
        values = [m[key] for m in steps if m.get(key) is not None]
        out[key] = statistics.mean(values) if values else None
        out[key + "_max"] = max(values) if values else None
    return out


def summarise(rows: list) -> list:
    """One row per (lag, correction, lr): means over seeds, and the held-out spread."""
    cells = {}
    for r in rows:
        if "error" not in r:
            cells.setdefault((r["lag"], r["correction"], r["lr"]), []).append(r)
    out = []
    for (lag, correction, lr), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2] or 0, kv[0][0])):
        held = [r["held_out"] for r in runs if r["held_out"] is not None]

        def mean(key):
            values = [r[key] for r in runs if r.get(key) is not None]
            return statistics.mean(values) if values else None
        out.append({"lag": lag, "correction": correction, "lr": lr, "seeds": len(runs),
                    "held_out": statistics.mean(held) if held else None,
                    "held_out_min": min(held, default=None), "held_out_max": max(held, default=None),
                    "held_out_start": mean("held_out_start"), "reward_last5": mean("reward_last5"),
                    "kl_behaviour": mean("loss/kl_behaviour"), "kl_behaviour_max": mean("loss/kl_behaviour_max"),
                    "grad_norm": mean("learner/grad_norm"), "entropy_proxy": mean("loss/entropy_proxy"),
                    "truncated": mean("loss/is_truncated_frac"), "masked": mean("loss/is_masked_frac"),
                    "flat_groups": mean("reward/flat_groups"),
                    "dropped_share": mean("dropped_share"), "staleness_mean": mean("staleness_mean"),
                    "wall_s": mean("wall_s"), "step_s": mean("step_s"), "actor_tokens_per_s": mean("actor_tokens_per_s")})
    return out


def table(summary: list, free_running: bool = False) -> str:
    def f(v, spec=".3f"):
        return "–" if v is None else format(v, spec)
    lines = [f"| correction | lr | {'bound' if free_running else 'lag'} | seeds | held-out (min–max) | reward, last 5 | KL(mu‖pi) mean (max) | "
             "grad norm | entropy | truncated | masked | flat groups | dropped | staleness | s/step | actor tokens/s | s/run |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: |"]
    for s in summary:
        lines.append(f"| {s['correction']} | {f(s['lr'], 'g') if s['lr'] else 'config'} | {s['lag']} | {s['seeds']} | "
                     f"{f(s['held_out'])} ({f(s['held_out_min'])}–{f(s['held_out_max'])}) | {f(s['reward_last5'])} | "
                     f"{f(s['kl_behaviour'], '.4f')} ({f(s['kl_behaviour_max'], '.4f')}) | {f(s['grad_norm'])} | "
                     f"{f(s['entropy_proxy'])} | {f(s['truncated'])} | {f(s['masked'])} | {f(s['flat_groups'], '.2f')} | "
                     f"{f(s['dropped_share'], '.2f')} | "
                     f"{f(s['staleness_mean'], '.2f')} | {f(s['step_s'], '.2f')} | {f(s['actor_tokens_per_s'], '.0f')} | "
                     f"{f(s['wall_s'], '.0f')} |")
    return "\n".join(lines)


def plot(summary: list, path: str, free_running: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    several_lrs = len({s["lr"] for s in summary}) > 1
    for (correction, lr) in sorted({(s["correction"], s["lr"]) for s in summary}, key=str):
        points = sorted((s["lag"], s["held_out"], s["held_out_min"], s["held_out_max"]) for s in summary
                        if s["correction"] == correction and s["lr"] == lr and s["held_out"] is not None)
        if not points:
            continue
        lags, means, lows, highs = zip(*points)
        label = correction + (f", lr {lr:g}" if lr else ", the config's lr" if several_lrs else "")
        ax.errorbar(lags, means, yerr=[[m - lo for m, lo in zip(means, lows)], [hi - m for m, hi in zip(means, highs)]],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("staleness bound k (versions; buffer.table.max_staleness, actors free-running)" if free_running
                  else "staleness k (versions; trainer.publish_lag)")
    ax.set_ylabel("held-out reward at the end\n(mean; bars: min–max over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="configs/<name>.yaml for every run ('' for the default job)")
    p.add_argument("--actors", type=int, default=0, help="--actors of every run (0: the config's)")
    p.add_argument("--lags", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--corrections", nargs="+", default=list(CORRECTIONS), choices=list(CORRECTIONS))
    p.add_argument("--lrs", type=learning_rate, nargs="+", default=[None],
                   help="trainer.lr values; 'config' is the config's own (the default)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=30, help="trainer.max_steps of every run: the same sample budget")
    p.add_argument("--eval-tasks", type=int, default=32)
    p.add_argument("--runs-dir", default="runs/staleness")
    p.add_argument("--timeout-s", type=float, default=1800, help="per run")
    p.add_argument("--parallel", type=int, default=1, help="cells run at once")
    p.add_argument("--stagger-s", type=float, default=0.0, help="at least this long between two cells' starts")
    p.add_argument("--resume-from", nargs="+", default=[], metavar="JSON",
                   help="earlier --out files: their finished cells (same setting) are taken, not run again")
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="no cell starts after this many seconds (those skipped run when the grid is continued)")
    p.add_argument("--out", help="write every run's scores and the summary here (JSON)")
    p.add_argument("--plot", help="held-out accuracy against staleness, one line per correction (PNG)")
    p.add_argument("--free-running", action="store_true",
                   help="k is buffer.table.max_staleness with the actors free-running, not a fixed lag")
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel must be at least 1, got {args.parallel}")
    deadline = time.monotonic() + args.budget_s
    # seed by seed, so a grid stopped early has whole seeds of every cell
    cells = [(lag, correction, lr, seed)
             for seed in args.seeds for lr in args.lrs for lag in args.lags for correction in args.corrections]
    if other := stale_cells(args, cells):
        name, were = other[0]
        p.error(f"{len(other)} finished cell(s) under --runs-dir {args.runs_dir} ran with another setting "
                f"(first: {name}, {were}; now {setting(args)}): give this grid a --runs-dir of its own")
    finished = resumed_cells(args, args.resume_from)
    stagger = Stagger(args.stagger_s) if args.stagger_s > 0 else None
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda cell: run_cell(args, *cell, deadline=deadline, finished=finished,
                                                   stagger=stagger), cells))
    skipped = [r["cell"] for r in rows if "skipped" in r]
    rows = [r for r in rows if "skipped" not in r]
    summary = summarise(rows)
    print(table(summary, args.free_running))
    for r in rows:
        if "error" in r:
            print(f"[study] {r['cell']} failed:\n{r['error']}", file=sys.stderr)
    out = {"config": args.config, "free_running": args.free_running, "steps": args.steps, "lags": args.lags,
           "setting": setting(args), "resumed_from": args.resume_from,
           "corrections": args.corrections,
           "seeds": args.seeds, "lrs": args.lrs, "overrides": args.overrides, "date": time.strftime("%Y-%m-%d"),
           "runs": rows, "summary": summary, "errors": [r["cell"] for r in rows if "error" in r], "skipped": skipped}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    if args.plot:
        plot(summary, args.plot, args.free_running)
    if skipped:
        print(f"[study] {len(skipped)} cell(s) not started within --budget-s: run the same command again to go on",
              file=sys.stderr)
    print(json.dumps({k: out[k] for k in ("config", "steps", "lags", "corrections", "seeds", "date", "errors", "skipped")}
                     | {"held_out": {f"{s['correction']}/lag{s['lag']}": s["held_out"] for s in summary}}))
    return out


if __name__ == "__main__":
    main()
