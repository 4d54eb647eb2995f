"""A real Slurm on this one machine for the slurm tests: Debian's slurmctld, slurmd and munge
(installed when missing), a controller and two slurmd daemons as two virtual nodes (n1, n2),
each on a port of its own, so that a heterogeneous job gets one node per component. Everything
lives under one folder; the daemons it started are stopped on close()."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from common.net import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo", "scancel", "squeue", "srun")


def install() -> None:
    """apt-get the daemons when one is missing (root on Debian, as here and in CI)."""
    if all(shutil.which(d) for d in DAEMONS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True,
                   timeout=900)


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started: list = []
        host = socket.gethostname()
        r = self.root
        # Heterogeneous jobs are started by the backfill scheduler alone: every second here, not 30.
        self.conf.write_text(f"""\
ClusterName=asyncrl-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port("")}
SlurmdPort={free_port("")}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=30
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port("")} CPUs={cpus_per_node}
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port("")} CPUs={cpus_per_node}
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (r / "state").mkdir(exist_ok=True)

    def start(self, timeout_s: float = 60.0) -> "SlurmCluster":
        install()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            for folder in ("/run/munge", "/var/log/munge", "/var/lib/munge"):   # /run is new after a boot
                Path(folder).mkdir(parents=True, exist_ok=True)
            if not Path("/etc/munge/munge.key").exists():
                subprocess.run(["mungekey", "--create"], check=True, timeout=30)
            subprocess.run(["munged", "--force"], check=True, timeout=30)
        self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid")
        for node in ("n1", "n2"):
            self._daemon(["slurmd", "-f", str(self.conf), "-N", node], self.root / f"slurmd-{node}.pid")
        deadline = time.monotonic() + timeout_s
        while True:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            if out.count("idle") == 2:
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test's Slurm did not come up within {timeout_s}s: sinfo says {out!r}; "
                                   f"logs in {self.root}")
            time.sleep(0.5)

    def _daemon(self, argv: list, pid_file: Path) -> None:
        subprocess.run(argv, check=True, env=self.env, timeout=60)   # each forks itself into the background
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} wrote no pid file {pid_file}; logs in {self.root}")
            time.sleep(0.1)
        self.started.append(int(pid_file.read_text().strip()))

    def run(self, *argv, check: bool = True, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=check, timeout=timeout_s)

    def job(self, job_id: str) -> dict:
        """JobState and ExitCode of a job (component 0 of a heterogeneous one)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        state = re.search(r"JobState=(\w+)", out)
        code = re.search(r"ExitCode=(\d+):(\d+)", out)
        return {"state": state.group(1) if state else "UNKNOWN", "exit_code": int(code.group(1)) if code else None,
                "signal": int(code.group(2)) if code else None, "text": out}

    def wait(self, job_id: str, timeout_s: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "NODE_FAIL", "OUT_OF_MEMORY")) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info["state"] in done:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {job_id} still {info['state']} after {timeout_s}s")
            time.sleep(1)

    def close(self) -> None:
        """Cancel what is still queued or running (its steps get Slurm's SIGTERM), then stop
        the daemons this cluster started."""
        self.run("scancel", "--quiet", "--user=root", check=False)
        deadline = time.monotonic() + 90
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(1)
        for pid in reversed(self.started):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 20
        for pid in self.started:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
