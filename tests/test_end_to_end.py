"""The whole system, run as a user runs it: python -m launch with the tiny config."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from common.metrics import read_metrics

REQUIRED = ["step", "weights/version", "reward/mean", "staleness/mean", "staleness/max", "buffer/size",
            "buffer/dropped_stale", "actor/tokens_per_s", "learner/step_s", "weights/sync_s", "actor/flat_groups_dropped",
            "actor/groups_unusable"]


def launch(recipe, run_dir, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch", recipe, "--config", "tiny", "--actors", "2",
                           f"run.dir={run_dir}", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async")
    t = time.monotonic()
    result = launch("async_grpo", run_dir, "eval.every=10", "eval.tasks=16")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result, time.monotonic() - t


def test_tiny_async_run_learns_its_reward(async_run):
    run_dir, result, seconds = async_run
    metrics = read_metrics(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert len(metrics) == config["trainer"]["max_steps"] == 40
    first = sum(m["reward/mean"] for m in metrics[:3]) / 3
    last = sum(m["reward/mean"] for m in metrics[-5:]) / 5
    assert first < 0.4, f"reward starts near chance (1/19 per word), got {first:.2f}"
    assert last > 0.9, f"reward should climb above 0.9, got {last:.2f}"
    assert metrics[-1]["weights/version"] >= 3


def test_every_step_logs_the_required_metrics_and_a_progress_line(async_run):
    run_dir, result, _ = async_run
    for m in read_metrics(run_dir):
        assert all(isinstance(m[k], (int, float)) for k in REQUIRED), m
    progress = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert len(progress) == 40 and "reward" in progress[-1] and "tok/s" in progress[-1]
    assert all(" | eta " in line for line in progress[1:-1])   # time left, from the steps so far
    starting = [line for line in result.stderr.splitlines() if line.startswith("asyncrl: starting ")]
    assert any("actor group(s) (hf engine): done in" in line for line in starting), starting


def test_every_step_says_where_the_actors_and_the_learners_time_went(async_run):
    run_dir, _, _ = async_run
    steps = read_metrics(run_dir)[1:]
    for m in steps:
        shares = [m[f"actor/time/{kind}"] for kind in ("generation", "environment", "buffer", "waiting", "idle")]
        assert abs(sum(shares) - 1) < 1e-6 and all(s >= 0 for s in shares), m
        assert len(m["actor/time/generation_by_actor"]) == 2
        assert abs(m["weights/gather_s"] + m["weights/send_s"] - m["weights/sync_s"]) < 1e-6
    # the CPU engine is what the actors spend most on, and each actor generates; not in every
    # step: a step of 30 ms can fall wholly while both actors are held by the buffer's back-pressure
    generation = [m["actor/time/generation"] for m in steps]
    assert sum(g > 0 for g in generation) >= 0.8 * len(steps) and sum(generation) / len(steps) > 0.2, generation
    for actor in range(2):
        assert sum(m["actor/time/generation_by_actor"][actor] for m in steps) > 0
    assert (run_dir / "actor_time.png").stat().st_size > 5000


def test_the_staleness_bound_holds_and_actors_follow_the_learner(async_run):
    run_dir, _, _ = async_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    last = read_metrics(run_dir)[-1]   # every group handed to the learner, by its staleness
    histogram = {int(k): v for k, v in last["buffer/staleness_histogram"].items()}
    assert sum(histogram.values()) == 40 * config["trainer"]["batch_groups"]
    bound = config["buffer"]["table"]["max_staleness"]
    assert max(histogram) <= bound
    metrics = read_metrics(run_dir)
    assert all(m["staleness/max"] <= bound for m in metrics)
    assert max(m["staleness/max"] for m in metrics) >= 1  # it really ran off-policy
    assert max(metrics[-1]["actor/versions"]) >= metrics[-1]["weights/version"] - bound - 1
    versions = [m["weights/version"] for m in metrics]
    assert versions == sorted(versions) and versions[-1] == 40  # sync_every=1


def test_held_out_evaluations_follow_the_learners_versions_and_show_it_learning(async_run):
    run_dir, result, _ = async_run
    evals = read_metrics(run_dir, kind="eval")
    steps = [e["step"] for e in evals]
    assert steps[0] == 0 and steps[-1] == 40 and set(steps) <= {0, 10, 20, 30, 40}
    assert len(steps) + evals[-1]["eval/skipped"] == 5
    for e in evals:  # each scored the weights the learner had at its step, or newer ones
        assert e["eval/tasks"] == 16 and e["eval/errors"] == 0
        assert e["eval/version_first"] >= e["weights/version"] == e["step"]
    assert evals[0]["eval/reward"] < 0.4 < 0.8 < evals[-1]["eval/reward"]
    assert [e["eval/at_s"] for e in evals] == sorted(e["eval/at_s"] for e in evals)
    assert sum(line.startswith("eval of step") for line in result.stdout.splitlines()) == len(evals)


def test_the_run_writes_its_report_and_its_wandb_run(async_run):
    run_dir, result, _ = async_run
    assert f"asyncrl: report in {run_dir / 'report.html'}" in result.stdout
    text = (run_dir / "report.html").read_text()
    assert run_dir.name in text and text.count("data:image/png;base64,") >= 4
    assert (run_dir / "held_out.png").stat().st_size > 5000
    # wandb, offline by default: every row logged, and the report's plots
    record = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"reward/mean" in record and b"eval/reward" in record and b"report/held_out" in record


def test_sync_baseline_trains_strictly_on_policy(tmp_path):
    sockets_before = set(Path(tempfile.gettempdir()).glob("asyncrl-env-*"))
    result = launch("sync_grpo", tmp_path, "trainer.max_steps=6")   # environments in worker processes
    assert result.returncode == 0, result.stderr[-3000:]
    # the actors ended their environment workers and removed the socket files
    assert set(Path(tempfile.gettempdir()).glob("asyncrl-env-*")) <= sockets_before
    metrics = read_metrics(tmp_path)
    assert [m["weights/version"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(m["staleness/max"] == 0 for m in metrics)
    assert metrics[-1]["buffer/dropped_stale"] == 0  # no group was generated that could not be used
    actors = yaml.safe_load((tmp_path / "config.yaml").read_text())["actors"]["count"]
    assert metrics[-1]["env/env_workers"] == 2 * actors and metrics[-1]["env/env_worker_crashes"] == 0


def test_a_dead_actor_fails_the_run_loudly_and_names_it(tmp_path):
    t = time.monotonic()
    # on the actor's threads (env_workers 0), the environment's exit is the actor's
    result = launch("async_grpo", tmp_path, "env.name=tests.faults:KillsItsActor", "rollout.env_workers=0", timeout=240)
    assert result.returncode == 1
    assert "run failed: actor" in result.stderr and "failed" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - t < 200


def test_back_pressure_keeps_actors_from_running_ahead(async_run):
    # the recipe's queue limiter: a full table holds the actors' inserts until the learner samples
    run_dir, _, _ = async_run
    table = yaml.safe_load((run_dir / "config.yaml").read_text())["buffer"]["table"]
    assert table["rate_limiter"] == "queue" and table["max_size"] == 4
    metrics = read_metrics(run_dir)
    assert max(m["buffer/size"] for m in metrics) <= 4 and metrics[-1]["buffer/evicted"] == 0
    assert max(m["actor/time/buffer"] for m in metrics) > 0.1   # the actors were held, and it shows


def buffer_pid(run_dir) -> int | None:
    """The pid of the run's buffer process (python -m buffer, checkpointing into run_dir)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"buffer" in args[1:3] and any(str(run_dir).encode() in a for a in args):
            return int(proc.name)
    return None


def descendants(pid: int) -> set:
    """Every live process below `pid` (children, theirs, ...)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        if proc.name.isdigit():
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, not merely a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_steps(run, run_dir, steps: int, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < steps:
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"fewer than {steps} steps in {deadline_s}s"
        time.sleep(0.2)


def test_a_killed_buffer_is_restarted_and_sigterm_stops_every_part(tmp_path):
    # the buffer speaks CurveZMQ: the actors and the learner got the job's keys from the launcher
    run = subprocess.Popen([sys.executable, "-m", "launch", "async_grpo", "--config", "tiny", "--actors", "2",
                            f"run.dir={tmp_path}", "trainer.max_steps=200", "buffer.checkpoint_every_s=1",
                            "buffer.curve=true"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_steps(run, tmp_path, 4)
        pid = buffer_pid(tmp_path)
        assert pid is not None, "no buffer process found"
        os.kill(pid, signal.SIGKILL)   # as an OOM kill would
        wait_for_steps(run, tmp_path, 10)   # trains on, on the restarted buffer
        parts = descendants(run.pid)   # Ray, the actors, learner, buffer, environment workers
        run.send_signal(signal.SIGTERM)   # as scancel does
        # The stop's designed bound: actors that miss their stop are waited for twice
        # run.actor_timeout_s (60 s: to end their loop, then to close) before they are killed,
        # then the buffer gets 30 s to save and exit, Ray shuts down, and wandb gets 30 s.
        bound_s = 2 * 60 + 30 + 30 + 30
        try:
            out, err = run.communicate(timeout=bound_s)
        except subprocess.TimeoutExpired:   # say where the stop hung: the launcher's last words, what lives
            stuck = [Path(f"/proc/{p}/cmdline").read_bytes()[:100] for p in parts if alive(p)]
            run.kill()
            _, err = run.communicate(timeout=30)
            pytest.fail(f"the run did not stop within {bound_s} s of SIGTERM; still alive: {stuck}\n{err[-4000:]}")
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 143 and "stopped by SIGTERM" in err, err[-3000:]
    assert "the buffer process exited with code -9; restarting it (1/3)" in err
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, len(metrics) + 1)) and len(metrics) >= 10
    assert [m["weights/version"] for m in metrics] == list(range(1, len(metrics) + 1))
    time.sleep(2)   # Ray's own processes end a moment after the driver
    left = {p for p in parts if alive(p)}
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]


def test_weights_broadcast_over_gloo_reach_every_actor_engine_in_a_process_of_its_own(tmp_path):
    result = launch("async_grpo", tmp_path, "trainer.max_steps=12", "run.weight_transport=broadcast",
                    "actors.engine_process=own")
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["actors"]["engine_process"] == "own"
    metrics = read_metrics(tmp_path)
    assert [m["weights/version"] for m in metrics] == list(range(1, 13))
    bound = yaml.safe_load((tmp_path / "config.yaml").read_text())["buffer"]["table"]["max_staleness"]
    assert all(m["staleness/max"] <= bound for m in metrics)
    assert min(metrics[-1]["actor/versions"]) >= 12 - bound - 1  # both actors received new versions


def test_a_stopped_run_resumes_from_its_newest_checkpoint(tmp_path):
    first = launch("async_grpo", tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]
    second = launch("async_grpo", tmp_path, "trainer.max_steps=6", "trainer.checkpoint_every=2", "run.resume=true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step-4" in second.stdout
    assert "the buffer resumed with" in second.stdout  # its checkpoint, saved beside the learner's
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, 7))
    # Resuming publishes the restored weights as version 5; steps 5-6 publish 6-7.
    assert [m["weights/version"] for m in metrics[4:]] == [6, 7]


def test_resuming_a_run_with_no_checkpoint_fails_at_start_naming_the_key(tmp_path):
    result = launch("async_grpo", tmp_path, "run.resume=true", timeout=120)
    assert result.returncode == 2 and "'run.resume'" in result.stderr and "no checkpoint" in result.stderr
