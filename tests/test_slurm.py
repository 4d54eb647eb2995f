"""The cluster launch under a real Slurm (tests/slurm_cluster.py: a controller and two slurmd
daemons as two virtual nodes of this machine): `python -m launch slurm` renders and submits a
heterogeneous job, whose component 0 holds the Ray head and the learner and component 1 the
actors, and which stops every Ray process it started, on success and on scancel."""
import subprocess
import sys
import time

import pytest
import yaml

from common.metrics import read_metrics
from tests.slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(sys.platform != "linux", reason="Slurm's daemons: Linux")]

RAY_PROCESSES = ("raylet", "gcs_server")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.close()


def ray_pids() -> set:
    found = set()
    for name in RAY_PROCESSES:
        out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout
        found |= {int(p) for p in out.split()}
    return found


def submit(slurm, run_dir, *overrides) -> str:
    result = slurm.run(sys.executable, "-m", "launch", "slurm", "async_grpo", "--config", "tiny",
                       "--learner-nodes", "1", "--actor-nodes", "1", "--cpus-per-node", "2", "--join-timeout-s", "120",
                       f"run.dir={run_dir}", "run.wandb=disabled", *overrides, check=False, timeout_s=120)
    assert result.returncode == 0, result.stdout + result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("asyncrl: submitted Slurm job"), result.stdout + result.stderr
    return line.split()[4]


def wait_gone(pids_before: set, timeout_s: float) -> set:
    deadline = time.monotonic() + timeout_s
    while (left := ray_pids() - pids_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def render(capsys, tmp_path, *args) -> subprocess.CompletedProcess:
    """`python -m launch slurm ... --dry-run`, in this process (its argument parsing and config
    checks are the command's own)."""
    from launch.__main__ import main
    code = main(["slurm", "async_grpo", "--config", "tiny", "--dry-run", f"run.dir={tmp_path}", *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_the_rendered_job_has_a_learner_and_an_actor_component_and_a_bad_config_fails_before_sbatch(capsys, tmp_path):
    result = render(capsys, tmp_path, "--learner-nodes", "2", "--actor-nodes", "3", "--gpus-per-node", "4",
                    "--partition", "gpu", "--time", "01:00:00", "--learner-gpus", "8", "trainer.max_steps=5",
                    "trainer.batch_groups=8")
    assert result.returncode == 0, result.stderr
    header = [line for line in result.stdout.splitlines() if line.startswith("#SBATCH")]
    split = header.index("#SBATCH hetjob")
    learner, actor = header[:split], header[split + 1:]
    assert "#SBATCH --nodes=2" in learner and "#SBATCH --nodes=3" in actor
    for part in (learner, actor):
        assert {"#SBATCH --gres=gpu:4", "#SBATCH --partition=gpu", "#SBATCH --time=01:00:00"} <= set(part)
    launch_args = next(line for line in result.stdout.splitlines() if line.startswith("launch_args="))
    assert f"run.dir={tmp_path}" in launch_args and "trainer.max_steps=5" in launch_args
    assert "trainer.gpus=8" in launch_args
    script = tmp_path / "job.sbatch"
    script.write_text(result.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert not (tmp_path / "slurm").exists()   # a dry run submits and writes nothing

    too_big = render(capsys, tmp_path, "--learner-nodes", "1", "--actor-nodes", "1", "--gpus-per-node", "8",
                     "--learner-gpus", "16", "trainer.batch_groups=16")
    assert too_big.returncode == 2 and "trainer.gpus" in too_big.stderr and "give 8" in too_big.stderr
    unknown = render(capsys, tmp_path, "--learner-nodes", "1", "--actor-nodes", "1", "trainer.no_such_key=1")
    assert unknown.returncode == 2 and "trainer.no_such_key" in unknown.stderr


def test_a_heterogeneous_job_trains_on_ray_across_both_components_and_leaves_no_ray_behind(slurm, tmp_path):
    before = ray_pids()
    job = submit(slurm, tmp_path, "trainer.max_steps=8", "buffer.curve=true")
    info = slurm.wait(job, timeout_s=420)
    logs = {p.name: p.read_text() for p in (tmp_path / "slurm").glob(f"{job}-*.log")}
    assert info["state"] == "COMPLETED" and info["exit_code"] == 0, (info["text"], logs)
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 8 and metrics[-1]["weights/version"] == 8
    # the learner's node and the actors' node each ran their Ray node; the launcher ran on the head
    assert {f"{job}-batch.log", f"{job}-launcher.log", f"{job}-learner-n1.log", f"{job}-actor-n2.log"} <= set(logs)
    assert "Ray head" in logs[f"{job}-learner-n1.log"] and "Ray worker" in logs[f"{job}-actor-n2.log"]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())   # the addresses actually used
    head = config["run"]["ray_address"]
    assert head and config["buffer"]["host"] == head.rsplit(":", 1)[0] and config["buffer"]["port"] > 0
    assert config["run"]["learner_resource"] == "asyncrl_learner" and config["run"]["actor_resource"] == "asyncrl_actor"
    assert not wait_gone(before, 30), "Ray processes outlived the job"


def test_scancel_of_a_running_job_stops_it_and_every_ray_process(slurm, tmp_path):
    before = ray_pids()
    job = submit(slurm, tmp_path, "trainer.max_steps=100000")
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").exists() or len(read_metrics(tmp_path)) < 2:   # training, on Ray
        assert slurm.job(job)["state"] in ("PENDING", "RUNNING", "CONFIGURING"), slurm.job(job)["text"]
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(1)
    assert ray_pids() - before
    slurm.run("scancel", job)
    info = slurm.wait(job, timeout_s=120)
    assert info["state"] == "CANCELLED", info["text"]
    assert not wait_gone(before, 60), "Ray processes outlived the cancelled job"
    launcher = subprocess.run(["pgrep", "-f", f"run.dir={tmp_path}"], capture_output=True, text=True).stdout
    assert not launcher.strip(), f"the job's launcher outlived it: {launcher}"
