"""Weights & Biases, offline: the run folder it writes holds every metric logged and the config."""
import pytest

from common import wandb_run
from common.config import ConfigError
from launch.config import RunConfig


def test_offline_writes_its_run_folder_with_the_metrics_and_the_config(tmp_path):
    run = wandb_run.start("offline", tmp_path, {"trainer": {"lr": 3e-5}}, "asyncrl", "", ["test"], 60.0)
    for step in (1, 2, 3):
        run.log({"step": step, "reward/mean": step / 4, "kind": "step", "flag": True})
    run.finish([])
    assert run.folder.parent == tmp_path / "wandb" and run.folder.name.startswith("offline-run-")
    record = next(run.folder.glob("run-*.wandb")).read_bytes()
    assert b"reward/mean" in record and b"lr" in record
    assert b"flag" not in record   # only numbers are metrics


def test_disabled_starts_nothing_and_a_bad_mode_is_refused_naming_the_key(tmp_path):
    assert wandb_run.start("disabled", tmp_path, {}) is None
    assert not (tmp_path / "wandb").exists()
    with pytest.raises(ConfigError, match="wandb"):
        RunConfig(wandb="sometimes").validate()
