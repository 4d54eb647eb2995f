"""The run report: plots of real numbers, several runs overlaid, wall-clock to each level."""
import json
import subprocess
import sys

import pytest

from launch import report


def write_run(folder, rewards, seconds_per_step, evals=()):
    """A run folder whose metrics.jsonl holds these steps (and evaluations: (step, reward))."""
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for i, r in enumerate(rewards, 1):
            f.write(json.dumps({"time_s": i * seconds_per_step, "step": i, "weights/version": i, "reward/mean": r,
                                "staleness/mean": 0.5, "staleness/max": 1, "actor/tokens_per_s": 100.0 * i,
                                "learner/step_s": seconds_per_step, "learner/wait_s": 0.2 * seconds_per_step,
                                "learner/train_s": 0.7 * seconds_per_step, "weights/sync_s": 0.01,
                                "weights/gather_s": 0.004, "weights/send_s": 0.006,
                                "actor/time/generation": 0.6, "actor/time/environment": 0.3,
                                "actor/time/buffer": 0.02, "actor/time/waiting": 0.0, "actor/time/idle": 0.08,
                                "buffer/staleness_histogram": {"0": 2 * i, "1": i},
                                "buffer/dropped_staleness_histogram": {"3": 1} if i > 2 else {}}) + "\n")
        for step, r in evals:
            f.write(json.dumps({"time_s": step * seconds_per_step + 0.5, "kind": "eval", "step": step,
                                "eval/at_s": step * seconds_per_step, "eval/reward": r}) + "\n")
    return folder


def test_a_report_overlays_runs_and_tabulates_wall_clock_to_each_level(tmp_path):
    fast = write_run(tmp_path / "async_grpo", [0.1, 0.3, 0.6, 0.9], 1.0, evals=[(0, 0.2), (2, 0.55), (4, 0.95)])
    slow = write_run(tmp_path / "sync_grpo", [0.1, 0.2, 0.5, 0.8], 2.0, evals=[(0, 0.2), (2, 0.4), (4, 0.85)])
    path = report.write([fast, slow], levels=(0.5, 0.9))
    assert path == fast / "report.html"
    text = path.read_text()
    assert "async_grpo" in text and "sync_grpo" in text
    # held-out accuracy at the time its weights existed: async 0.55 at 2 s, 0.95 at 4 s; sync 0.85 at 8 s
    metric, rows = report.reach_table([report.load_run(fast), report.load_run(slow)], (0.5, 0.9), 5)
    assert metric == "eval/reward"
    assert rows == [("async_grpo", 0.2, 0.95, [2.0, 4.0]), ("sync_grpo", 0.2, 0.85, [8.0, None])]
    assert "<td>2 s</td><td>4 s</td>" in text and "<td>8 s</td><td>never</td>" in text
    for stem in ("reward", "held_out", "staleness", "throughput", "staleness_histogram", "step_time", "actor_time"):
        png = (fast / f"{stem}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert text.count("data:image/png;base64,") == 7    # self-contained: every plot inline
    assert "Where the actors&#x27; time goes" in text


def test_without_evaluations_the_table_follows_the_smoothed_training_reward(tmp_path):
    run = write_run(tmp_path / "r", [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], 1.0)
    metric, rows = report.reach_table([report.load_run(run)], (0.5,), 2)
    assert metric == "reward/mean, mean of the last 2 steps"
    assert rows == [("r", 0.1, 0.9, [4.0])]   # (0.4 + 0.6) / 2 at step 4, 4 s in
    path = report.write([run], out=tmp_path / "out")
    assert path.parent == tmp_path / "out" and not (tmp_path / "out" / "held_out.png").exists()


def test_the_command_writes_the_report_and_refuses_a_folder_without_metrics(tmp_path):
    run = write_run(tmp_path / "r", [0.1, 0.5], 1.0)
    done = subprocess.run([sys.executable, "-m", "launch", "report", str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == str(run / "report.html")
    bad = subprocess.run([sys.executable, "-m", "launch", "report", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "holds no metrics.jsonl" in bad.stderr


def test_gpu_telemetry_in_the_metrics_gets_its_plots(tmp_path):
    run = write_run(tmp_path / "gpu_run", [0.1, 0.5, 0.7], 1.0)
    with open(run / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    with open(run / "metrics.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({**r, "learner/gpu0/util": 40.0 + i, "actor0/gpu0/util": 90.0 - i,
                                "learner/gpu0/mem_gb": 30.5}) + "\n")
    report.write([run])
    assert (run / "gpu_util.png").stat().st_size > 5000 and (run / "gpu_mem_gb.png").exists()
    assert not (run / "gpu_power_w.png").exists()   # no power readings, no plot
