"""python -m launch slurm RECIPE --learner-nodes L --actor-nodes A [--gpus-per-node G]
[--partition P] [--time T] [--account A] [--dry-run] [--config NAME] [key=value ...]

Renders a heterogeneous Slurm job for a recipe (component 0: the learner's L nodes, component
1: the actors' A nodes; slurm/ray_cluster.sh is its body) and submits it with sbatch, or prints
it (--dry-run). The recipe's config is built and checked here first, so that a bad key fails
now and not after the job has waited in the queue. The run folder must be on a file system
every node sees (the job's logs go to RUN_DIR/slurm/).
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = {"learner": "asyncrl_learner", "actor": "asyncrl_actor"}   # the custom Ray resource of each component


def parser() -> argparse.ArgumentParser:
    from launch.__main__ import add_recipe_arguments, count
    p = argparse.ArgumentParser(prog="python -m launch slurm",
                                description="Submit a recipe as a heterogeneous Slurm job (component 0: the "
                                            "learner's nodes, component 1: the actors'), or print it (--dry-run); "
                                            "docs/cluster.md.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example: python -m launch slurm async_grpo --learner-nodes 2 --actor-nodes 4 "
                                       "--gpus-per-node 8 --partition gpu --learner-gpus 16 --actors 32 "
                                       "actors.gpus_per_group=1")
    add_recipe_arguments(p)
    p.add_argument("--learner-nodes", type=count(1), required=True, metavar="L", help="nodes of component 0")
    p.add_argument("--actor-nodes", type=count(1), required=True, metavar="A", help="nodes of component 1")
    p.add_argument("--gpus-per-node", type=count(0), default=0, metavar="G", help="GPUs of every node (0: CPU only)")
    p.add_argument("--cpus-per-node", type=count(1), metavar="C", help="CPUs to ask per node (default: Slurm's)")
    p.add_argument("--partition", metavar="P", help="one partition for both components")
    p.add_argument("--learner-partition", metavar="P", help="component 0's partition (default --partition)")
    p.add_argument("--actor-partition", metavar="P", help="component 1's partition (default --partition)")
    p.add_argument("--time", metavar="T", help="wall-clock limit, Slurm's format (e.g. 04:00:00)")
    p.add_argument("--account", metavar="A")
    p.add_argument("--job-name", default="asyncrl")
    p.add_argument("--join-timeout-s", type=float, default=300.0, help="deadline for every node to join Ray")
    p.add_argument("--python", default=sys.executable, help="the Python on the nodes (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the job script instead of submitting it")
    return p


def check_fits(config, args) -> None:
    """What the allocation cannot hold fails now, naming the key."""
    g, t, a = args.gpus_per_node, config.trainer, config.actors
    if t.gpus > args.learner_nodes * g:
        raise ConfigError("trainer.gpus", f"the learner asks for {t.gpus} GPU(s); --learner-nodes "
                          f"{args.learner_nodes} x --gpus-per-node {g} give {args.learner_nodes * g}")
    if a.gpus_per_group > g and a.gpus_per_group:
        raise ConfigError("actors.gpus_per_group", f"an actor group of {a.gpus_per_group} GPU(s) does not fit on "
                          f"one node of --gpus-per-node {g}")
    if a.gpus_per_group and (g // a.gpus_per_group) * args.actor_nodes < a.count:
        raise ConfigError("actors.count", f"{a.count} actor group(s) of {a.gpus_per_group} GPU(s) do not fit on "
                          f"--actor-nodes {args.actor_nodes} x --gpus-per-node {g}")
    if config.run.colocate:
        raise ConfigError("run.colocate", "a Slurm job keeps the learner and the actors on separate components")


def component(nodes: int, partition: str | None, args) -> list:
    lines = [f"--nodes={nodes}", "--ntasks-per-node=1"]
    if partition:
        lines.append(f"--partition={partition}")
    if args.gpus_per_node:
        lines.append(f"--gres=gpu:{args.gpus_per_node}")
    if args.cpus_per_node:
        lines.append(f"--cpus-per-task={args.cpus_per_node}")
    if args.time:
        lines.append(f"--time={args.time}")
    if args.account:
        lines.append(f"--account={args.account}")
    return [f"#SBATCH {line}" for line in lines]


def render(args, argv: list, launch_args: list, log_dir: Path) -> str:
    """The sbatch script: the two components' headers, the job's settings, then the body."""
    env = {"ASYNCRL_ROOT": str(ROOT), "ASYNCRL_PYTHON": args.python, "ASYNCRL_LOG_DIR": str(log_dir),
           "ASYNCRL_JOIN_TIMEOUT_S": str(args.join_timeout_s), "ASYNCRL_GPUS_PER_NODE": str(args.gpus_per_node)}
    lines = ["#!/usr/bin/env bash",
             f"#SBATCH --job-name={args.job_name}",
             f"#SBATCH --output={log_dir}/%j-batch.log",
             *component(args.learner_nodes, args.learner_partition or args.partition, args),
             "#SBATCH hetjob",
             *component(args.actor_nodes, args.actor_partition or args.partition, args),
             f"# rendered by: python -m launch slurm {shlex.join(argv)}",
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             f"launch_args=({shlex.join(launch_args)})",
             'source "$ASYNCRL_ROOT/slurm/ray_cluster.sh"', ""]
    return "\n".join(lines)


def main(argv) -> None:
    from launch.__main__ import recipe_overrides
    from launch.config import build_config

    args = parser().parse_intermixed_args(argv)
    overrides = recipe_overrides(args)
    recipe = importlib.import_module(f"launch.{args.recipe}")
    config = build_config(args.recipe, args.config, overrides, recipe.CONFIG_FILES)
    check_fits(config, args)
    run_dir = Path(config.run.dir).resolve()
    launch_args = [args.recipe, *(["--config", args.config] if args.config else []),
                   *(o for o in overrides if not o.startswith("run.dir=")), f"run.dir={run_dir}"]   # the job writes where this command said, whatever its working folder
    log_dir = run_dir / "slurm"
    script = render(args, list(argv), launch_args, log_dir)
    if args.dry_run:
        print(script, end="")
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "job.sbatch"
    path.write_text(script)
    try:
        result = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError("slurm", "sbatch is not on PATH: run this on a Slurm login node "
                          "(or use --dry-run to see the script)") from None
    except subprocess.TimeoutExpired:
        raise ConfigError("slurm", "sbatch did not answer within 120 s: is slurmctld up? (scontrol ping)") from None
    if result.returncode != 0:
        raise ConfigError("slurm", f"sbatch refused {path}: {result.stderr.strip() or result.stdout.strip()}")
    job = result.stdout.strip().split(";")[0]
    print(f"asyncrl: submitted Slurm job {job} ({path}); logs in {log_dir}/{job}-*.log, metrics in "
          f"{run_dir / 'metrics.jsonl'}", flush=True)


# -- inside the job ------------------------------------------------------------------------------
def wait_for_head(address: str, timeout_s: float) -> str:
    """Wait until host:port accepts a connection: "" once it does, else, past the deadline,
    why the last try failed. Addresses Ray resolves itself ("auto", ray://...) pass at once."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return ""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return ""
        except OSError as e:
            if time.monotonic() > deadline:
                return str(e)
            time.sleep(1)


def wait_for_nodes(address: str, learner_nodes, actor_nodes, timeout_s, logs: str = "") -> int:
    """Until the Ray head at `address` answers and every node of both components has joined
    (counted by their custom resources), or `timeout_s` passes: then say what is missing and
    return 1. slurm/ray_cluster.sh calls it between starting the nodes and the recipe."""
    want = {RESOURCES["learner"]: int(learner_nodes), RESOURCES["actor"]: int(actor_nodes)}
    deadline, started = time.monotonic() + float(timeout_s), time.monotonic()
    unreachable = wait_for_head(address, float(timeout_s))   # the head first: ray.init would retry it for ever
    if unreachable:
        print(f"asyncrl slurm: the Ray head at {address} is not reachable after {timeout_s}s ({unreachable}); "
              f"see the head's log ({logs})", file=sys.stderr)
        return 1
    import ray
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        while True:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            have = {r: sum(1 for n in nodes if n["Resources"].get(r)) for r in want}
            if all(have[r] >= want[r] for r in want):
                print(f"asyncrl slurm: {len(nodes)} Ray node(s) joined in {time.monotonic() - started:.0f}s "
                      f"({have})", flush=True)
                return 0
            if time.monotonic() > deadline:
                missing = ", ".join(f"{want[r] - have[r]} of {want[r]} {r}" for r in want if have[r] < want[r])
                print(f"asyncrl slurm: Ray nodes missing after {timeout_s}s: {missing} never joined the head at "
                      f"{address}; see their logs ({logs})", file=sys.stderr)
                return 1
            time.sleep(1)
    finally:
        ray.shutdown()
