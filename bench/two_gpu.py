"""The two-GPU issue's figures in one JSON (bench/results/two_gpu.json), from what one GPU session
wrote under its $OUT with `bash bench/gpu_session.sh push actor job2` on a kind of 2+ GPUs
(ACTOR_ARGS with `--models 1.5b --transport nccl`):

  weight_push.json        bench/weight_push_bench.py --backend nccl: the broadcast channel's push
                          (learner on GPU 0 -> receiver on GPU 1) and a plain NCCL broadcast of
                          the same bytes between the same processes
  actor_bench_1.5b.json   bench/actor_bench.py --transport nccl: a vLLM actor group on GPU 1 fed
                          by the learner on GPU 0, generating, and vLLM's own NCCL update path
  job2.txt, runs2.tgz     bench/async_vs_sync.py on both GPUs: its last line (a JSON object) and
                          the async run's metrics.jsonl

Figures (None where its part did not run; `missing` names those parts):
  transfer_ms_1p5b, floor_ms_1p5b   push and floor (goal: transfer <= 2x floor)
  serving_ms_1p5b                   learner has v -> the engine serves v, median (goal <= 20 ms)
  stall_ms                          generation stall per update, GPU time of the swap (goal <= 5 ms)
  native_serving_ms_1p5b            vLLM's own path, pause keep + NCCL update + resume, median
  async_over_sync                   the synchronous run's wall-clock to the highest held-out target
                                    both runs reach, over the asynchronous run's (goal >= 2)
  staleness_histogram, dropped_share  of the async run: staleness -> groups trained on; groups
                                    dropped as stale over groups inserted

    python -m bench.two_gpu DIR [DIR ...] [--out bench/results/two_gpu.json]

DIRs: the folders the device calls' $OUT came back in (one call each is fine); each part is read
from the first DIR that holds it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tarfile


def figures(push: dict | None, actor: dict | None, job: dict | None, async_metrics: list | None) -> dict:
    """The issue's figures from the parts' own outputs (any may be None: not run)."""
    push, summary = (push or {}).get("summary", {}), (actor or {}).get("summary", {})
    out = {"transfer_ms_1p5b": push.get("transfer_ms_1p5b"), "floor_ms_1p5b": push.get("floor_ms_1p5b"),
           "transfer_ms_0p5b": push.get("transfer_ms_0p5b"), "floor_ms_0p5b": push.get("floor_ms_0p5b"),
           "serving_ms_1p5b": summary.get("update_ms_1p5b"), "serving_ms_max_1p5b": summary.get("update_ms_max_1p5b"),
           "stall_ms": summary.get("stall_ms"), "native_serving_ms_1p5b": summary.get("native_update_ms_1p5b"),
           "ratio_tokens_1p5b": summary.get("ratio_tokens_1p5b")}
    out["transfer_over_floor_1p5b"] = (out["transfer_ms_1p5b"] / out["floor_ms_1p5b"]
                                       if out["transfer_ms_1p5b"] and out["floor_ms_1p5b"] else None)
    out.update(async_over_sync(job))
    if async_metrics:
        last = async_metrics[-1]
        inserts = last.get("buffer/inserts") or 0
        out["staleness_histogram"] = last.get("buffer/staleness_histogram")
        out["dropped_share"] = last.get("buffer/dropped_stale", 0) / inserts if inserts else None
    else:
        out["staleness_histogram"] = out["dropped_share"] = None
    out["missing"] = [name for name, part in (("push", push), ("actor", summary), ("job", job),
                                              ("async metrics", async_metrics)) if not part]
    out["device"] = push.get("device") or summary.get("device")
    out["date"] = datetime.date.today().isoformat()
    return out


def async_over_sync(job: dict | None) -> dict:
    """From bench/async_vs_sync.py's JSON (to_<x>_s_sync / _async per held-out target x): the
    speed-up at the highest target both runs reached."""
    if not job:
        return {"async_over_sync": None, "target": None}
    reached = [key[3:-7] for key, value in job.items()   # "to_0.6_s_sync" -> "0.6"
               if key.startswith("to_") and key.endswith("_s_sync") and value and job.get(key[:-4] + "async")]
    if not reached:
        return {"async_over_sync": None, "target": None}
    x = max(reached, key=float)
    sync, async_ = job[f"to_{x}_s_sync"], job[f"to_{x}_s_async"]
    return {"async_over_sync": sync / async_, "target": float(x), "to_target_s_sync": sync,
            "to_target_s_async": async_}


def _json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _last_json_line(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [line for line in f if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _async_metrics(folder: str):
    """The async run's metrics rows from folder/runs2/, or from folder/runs2.tgz (gpu_session.sh
    bundles a job's runs: a call brings back at most 8 files)."""
    member = "runs2/async_grpo/metrics.jsonl"
    if os.path.exists(os.path.join(folder, member)):
        with open(os.path.join(folder, member)) as f:
            lines = f.read().splitlines()
    elif os.path.exists(os.path.join(folder, "runs2.tgz")):
        with tarfile.open(os.path.join(folder, "runs2.tgz")) as tar:
            try:
                lines = tar.extractfile(member).read().decode().splitlines()
            except KeyError:
                return None
    else:
        return None
    return [row for row in map(json.loads, lines) if "buffer/inserts" in row] or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="what the GPU session's calls wrote under $OUT")
    p.add_argument("--out", default="bench/results/two_gpu.json")
    args = p.parse_args()

    def part(read, *path):
        return next((got for d in args.dirs if (got := read(os.path.join(d, *path))) is not None), None)
    result = figures(part(_json, "weight_push.json"), part(_json, "actor_bench_1.5b.json"),
                     part(_last_json_line, "job2.txt"), part(_async_metrics))
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
