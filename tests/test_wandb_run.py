"""Weights & Biases, offline: the run folder it writes holds every metric logged and the config."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import wandb_run
from common.config import ConfigError
from launch.config import RunConfig


def test_offline_writes_its_run_folder_with_the_metrics_and_the_config(tmp_path):
    run = wandb_run.start("offline", tmp_path, {"trainer": {"lr": 3e-5}}, "asyncrl", "", ["test"], 60.0)
    for step in (1, 2, 3):
        run.log({"step": step, "reward/mean": step / 4, "kind": "step", "flag": True})
    assert run.finish([])
    assert run.folder.parent == tmp_path / "wandb" and run.folder.name.startswith("offline-run-")
    record = next(run.folder.glob("run-*.wandb")).read_bytes()
    assert b"reward/mean" in record and b"lr" in record
    assert b"flag" not in record   # only numbers are metrics


def test_disabled_starts_nothing_and_a_bad_mode_is_refused_naming_the_key(tmp_path):
    assert wandb_run.start("disabled", tmp_path, {}) is None
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ConfigError, match="wandb"):
        RunConfig(wandb="sometimes").validate()


STUCK_SERVICE = """
import os, signal, sys, time
import psutil
from common import wandb_run
run = wandb_run.start("offline", sys.argv[1], {}, "asyncrl", "", [], 60.0)
run.log({"step": 1, "reward/mean": 0.5})
service = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline())]
assert service, "no wandb service process found"
for p in service:
    os.kill(p.pid, signal.SIGSTOP)   # a service that no longer answers
t = time.monotonic()
for step in range(2, 2 + 10 * run.QUEUE_ROWS):   # more than the queue and any socket buffer hold
    run.log({"step": step, "reward/mean": 0.5})
print("logged", 10 * run.QUEUE_ROWS, "in", round(time.monotonic() - t, 2), "dropped", run.dropped, flush=True)
t = time.monotonic()
finished = run.finish([], timeout_s=3.0)
print("finished", finished, "after", round(time.monotonic() - t, 1), flush=True)
for p in service:
    os.kill(p.pid, signal.SIGKILL)
os._exit(0)
"""


def test_a_stuck_wandb_service_holds_neither_logging_nor_finishing_past_its_deadline(tmp_path):
    # in a process of its own: wandb's service address stays in the environment of the process
    # that started it, and its children would find it dead
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_SERVICE")}
    result = subprocess.run([sys.executable, "-c", STUCK_SERVICE, str(tmp_path)], capture_output=True, text=True,
                            timeout=120, env=env, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    logged, finished = result.stdout.splitlines()[-2:]
    words = logged.split()   # logged 10000 in S dropped D: the launcher's loop is never held
    assert float(words[3]) < 5 and int(words[5]) >= 1, result.stdout
    assert "wandb has not taken the last 1000 rows" in result.stderr
    words = finished.split()
    assert words[:2] == ["finished", "False"] and float(words[3]) < 10, result.stdout
    assert "wandb did not finish within 3s" in result.stderr
