#!/usr/bin/env bash
# The body of an asyncrl heterogeneous Slurm job, sourced by the script `python -m launch slurm`
# renders (which sets ASYNCRL_* and launch_args). It runs on the first node of component 0:
#   1. the Ray head there, a Ray worker on every other node of both components (srun
#      --het-group), each offering asyncrl_learner (component 0) or asyncrl_actor (component 1)
#      so that placement keeps the learner and the actors on their own component's nodes;
#   2. waits, with a deadline, until every node has joined;
#   3. runs `python -m launch RECIPE ...` against that cluster;
#   4. stops every Ray node on exit, failure or scancel (SIGTERM), and exits with the recipe's
#      status. The head's address and every port are found at start, none is fixed.
# Logs: $ASYNCRL_LOG_DIR/<job>-launcher.log, <job>-learner-<node>.log, <job>-actor-<node>.log.
set -uo pipefail
py=${ASYNCRL_PYTHON:-python3}
cd "$ASYNCRL_ROOT" || exit 1
log_dir=$ASYNCRL_LOG_DIR job=$SLURM_JOB_ID
mkdir -p "$log_dir"
say() { echo "asyncrl slurm: $*"; }
learner_nodes=($(scontrol show hostnames "${SLURM_JOB_NODELIST_HET_GROUP_0:?not a heterogeneous job: #SBATCH hetjob}"))
actor_nodes=($(scontrol show hostnames "${SLURM_JOB_NODELIST_HET_GROUP_1:?no component 1 (the actor nodes)}"))
head=${learner_nodes[0]}
head_ip=${ASYNCRL_HEAD_IP:-$("$py" -c 'import ray.util; print(ray.util.get_node_ip_address())')}
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
# Ray's token authentication: one token for this job, in every step's environment
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$("$py" -c 'import secrets; print(secrets.token_hex(32))')}
export ASYNCRL_RAY_TMP=${ASYNCRL_RAY_TMP:-/tmp/asyncrl-ray-$job}
steps=() launcher=""

node_cpus() {  # the job's CPUs per node in component $1: "4" of SLURM_JOB_CPUS_PER_NODE_HET_GROUP_1="4(x2)"
  local var=SLURM_JOB_CPUS_PER_NODE_HET_GROUP_$1
  echo "${!var:-${SLURM_JOB_CPUS_PER_NODE:-1}}" | grep -o '^[0-9]*'
}

start_node() {  # start_node HET_GROUP NODE ROLE RESOURCE COMPONENT
  ASYNCRL_NODE_CPUS=$(node_cpus "$1") srun --het-group="$1" --nodes=1 --ntasks=1 -w "$2" --overlap \
    --output="$log_dir/$job-$5-$2.log" bash slurm/ray_node.sh "$3" "$head_ip" "$port" "$4" &
  steps+=($!)
}

alive() { local n=0 pid; for pid in "$@"; do kill -0 "$pid" 2>/dev/null && n=$((n + 1)); done; echo $n; }

stop_all() {  # the launcher first (it stops its parts), then every Ray node; each with a deadline
  trap - TERM INT
  if [[ -n $launcher ]] && kill -0 "$launcher" 2>/dev/null; then
    kill -TERM "$launcher"
    for _ in $(seq 60); do kill -0 "$launcher" 2>/dev/null || break; sleep 1; done
    kill -KILL "$launcher" 2>/dev/null
  fi
  ((${#steps[@]})) || return 0
  say "stopping ${#steps[@]} Ray node(s)"
  kill -TERM "${steps[@]}" 2>/dev/null   # srun passes it on to `ray start --block`, which stops its node
  for _ in $(seq 60); do (( $(alive "${steps[@]}") == 0 )) && break; sleep 1; done
  if (( $(alive "${steps[@]}") )); then
    say "Ray node(s) still up after 60 s: killing their steps"
    kill -KILL "${steps[@]}" 2>/dev/null   # slurmctld then ends the steps, and slurmd every process of theirs
    scancel --quiet "$job" 2>/dev/null
  fi
  rm -rf "$ASYNCRL_RAY_TMP"
}
trap 'say "SIGTERM: stopping"; stop_all; exit 143' TERM INT

say "job $job: learner nodes ${learner_nodes[*]}, actor nodes ${actor_nodes[*]}; Ray head $head_ip:$port on $head"
start_node 0 "$head" head asyncrl_learner learner
for node in "${learner_nodes[@]:1}"; do start_node 0 "$node" worker asyncrl_learner learner; done
for node in "${actor_nodes[@]}"; do start_node 1 "$node" worker asyncrl_actor actor; done
"$py" -c 'import sys; from launch.slurm import wait_for_nodes; sys.exit(wait_for_nodes(*sys.argv[1:]))' \
  "$head_ip:$port" "${#learner_nodes[@]}" "${#actor_nodes[@]}" "${ASYNCRL_JOIN_TIMEOUT_S:-300}" "$log_dir/$job-*.log" &
wait $!; rc=$?
if (( rc == 0 )); then
  RAY_ADDRESS="$head_ip:$port" "$py" -m launch "${launch_args[@]}" run.learner_resource=asyncrl_learner \
    run.actor_resource=asyncrl_actor buffer.host="$head_ip" > "$log_dir/$job-launcher.log" 2>&1 &
  launcher=$!
  say "launcher (pid $launcher): python -m launch ${launch_args[*]}; log $log_dir/$job-launcher.log"
  wait "$launcher"; rc=$?
  launcher=""
  say "launcher exited with $rc"
fi
stop_all
exit "$rc"
