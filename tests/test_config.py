"""Config errors fail at start, naming the key; the CLI exits non-zero with the message."""
import re
import subprocess
import sys

import pytest
import zmq

from common.config import ConfigError
from launch.config import Config, build_config


def test_defaults_then_yaml_then_overrides():
    config = build_config("async_grpo", "tiny", ["trainer.max_steps=7", "loss.is_cap=3"], ["async_grpo"])
    assert isinstance(config, Config)
    assert config.model.name == "tiny" and config.env.name == "token_match"  # from tiny.yaml
    assert config.trainer.max_steps == 7 and config.loss.is_cap == 3.0           # overrides win
    assert config.run.dir.startswith("runs/async_grpo-")


@pytest.mark.parametrize("override, key, words", [
    ("trainer.max_stepz=3", "trainer.max_stepz", "not in"),
    ("trainer.max_steps=many", "trainer.max_steps", "could not be converted"),
    ("rollout.group_size=1", "rollout.group_size", "GRPO needs >= 2"),
    ("buffer.table.selector=random", "buffer.table.selector", "must be one of"),
    ("trainer.batch_groups=3", "trainer.batch_groups", "multiple"),
    ("loss.objective=ppo2", "loss.objective", "must be one of"),
    ("actors.weight_staging=bucket", "actors.weight_staging", "must be one of"),
    ("nonsense", "nonsense", "not of the form key=value"),
])
def test_bad_values_name_their_key(override, key, words):
    overrides = [override] + (["trainer.cpu_workers=2"] if "batch_groups" in override else [])
    with pytest.raises(ConfigError, match=words) as info:
        build_config("async_grpo", "tiny", overrides)
    assert info.value.key == key and repr(key) in str(info.value)


def test_a_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        build_config("async_grpo", "nope")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "launch", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["async_grpo", "--actors", "0"], "--actors: must be >= 1, got 0"),
    (["async_grpo", "--actors", "two"], "--actors: must be an integer, got 'two'"),
    (["async_grpo", "--config", "tiny", "trainer.lr=fast"], "'trainer.lr'"),
    (["async_grpo", "--config", "tiny", "model.name=/no/such/model"], "'model.name'"),
    (["async_grpo", "--config", "tiny", "env.name=nowhere:Env"], "'env.name'"),
    (["async_grpo", "--config", "tiny", "env.args.words=2"], "'env.args'"),
    (["sync_everything"], "invalid choice"),
])
def test_cli_rejects_bad_input_before_starting_anything(args, message, tmp_path):
    result = run_cli(*args, *([f"run.dir={tmp_path}/r"] if len(args) > 1 else []))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Ray" not in result.stdout + result.stderr  # nothing was started


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_gpus_a_machine_lacks_fails_at_start(tmp_path):
    result = run_cli("async_grpo", "--config", "tiny", "--learner-gpus", "2", f"run.dir={tmp_path}/r")
    assert result.returncode == 2 and "'trainer.gpus'" in result.stderr and "this machine has 0" in result.stderr


def test_help_explains_every_flag():
    out = run_cli("--help").stdout
    for flag in ("--actors", "--learner-gpus", "--config", "key=value", "async_grpo:", "sync_grpo:"):
        assert flag in out


@pytest.mark.parametrize("override, key", [
    ("trainer.sample_timeout_s=inf", "trainer.sample_timeout_s"),
    ("loss.is_cap=nan", "loss.is_cap"),
    ("buffer.timeout_s=-inf", "buffer.timeout_s"),
])
def test_a_float_that_is_nan_or_inf_is_refused_naming_its_key(override, key):
    with pytest.raises(ConfigError, match="must be a finite number") as info:
        build_config("async_grpo", "tiny", [override])
    assert info.value.key == key


def test_a_buffer_port_in_use_fails_at_start_naming_the_key(tmp_path):
    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        result = run_cli("async_grpo", "--config", "tiny", f"buffer.port={port}", f"run.dir={tmp_path}/r")
    finally:
        taken.close(linger=0)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"'buffer.port': cannot bind tcp://127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_stopping_a_run_takes_every_step_even_after_one_fails_and_raises_nothing(caplog):
    from launch.async_grpo import shut_down
    done = []

    def stop_buffer():
        done.append("buffer")
        raise TimeoutError("buffer server did not stop within 5s")

    failure = shut_down(("actors", lambda: done.append("actors")), ("buffer server", stop_buffer),
                        ("ray", lambda: done.append("ray")))
    assert done == ["actors", "buffer", "ray"]  # Ray is shut down although the buffer failed to stop
    assert isinstance(failure, TimeoutError)  # for a run that succeeded, the caller raises it
    assert "buffer server" in caplog.text and "did not stop within 5s" in caplog.text


@pytest.mark.parametrize("overrides, key, words", [
    (["actors.engine=vllm"], "actors.gpus_per_group", "the vllm engine needs >= 1 GPU"),
    (["actors.gpus_per_group=2"], "actors.gpus_per_group", "the hf engine runs on one device"),
    (["run.colocate=true"], "trainer.gpus", "must be 1 with run.colocate"),
    (["run.colocate=true", "trainer.gpus=1", "actors.gpus_per_group=1", "actors.count=2"], "actors.count",
     "must be 1 with run.colocate"),
    (["run.weight_transport=ipc"], "run.weight_transport", "needs the learner and the actors on one GPU"),
    (["actors.gpu_memory_utilization=1.5"], "actors.gpu_memory_utilization", "must lie in (0, 1]"),
    (["actors.engine_process=own"], "actors.engine_process", "own needs run.weight_transport broadcast or ipc"),
    (["actors.engine_process=remote"], "actors.engine_process", "must be one of"),
])
def test_placements_that_cannot_work_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        build_config("async_grpo", "tiny", overrides)
    assert info.value.key == key


@pytest.mark.parametrize("overrides, transport", [
    ([], "object_store"),
    (["trainer.gpus=1", "actors.gpus_per_group=1", "actors.engine=vllm"], "broadcast"),
    (["run.colocate=true", "trainer.gpus=1", "actors.gpus_per_group=1", "actors.engine=vllm"], "ipc"),
    (["run.weight_transport=broadcast"], "broadcast"),
])
def test_the_weight_transport_follows_the_placement_and_the_saved_config_names_it(overrides, transport):
    config = build_config("async_grpo", "tiny", overrides)
    assert config.run.weight_transport == transport
    # a vLLM engine gets a process of its own where its weights need no Ray connection
    own = config.actors.engine == "vllm" and transport != "object_store"
    assert config.actors.engine_process == ("own" if own else "actor")
