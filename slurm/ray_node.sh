#!/usr/bin/env bash
# One Ray node of an asyncrl job, in the foreground until the step is stopped (srun runs it on
# every node; slurm/ray_cluster.sh says how). Usage:
#   ray_node.sh head   HEAD_IP PORT RESOURCE    the Ray head, listening on HEAD_IP:PORT
#   ray_node.sh worker HEAD_IP PORT RESOURCE    a worker joining it
# RESOURCE names the custom Ray resource this node offers (asyncrl_learner, asyncrl_actor) so
# that placement puts each part on its component's nodes. Every port Ray would otherwise take
# at a fixed default is chosen free on the node itself, so that two nodes of one host (the
# tests' virtual nodes) never collide. Ray's token (RAY_AUTH_TOKEN) comes from the job.
set -euo pipefail
role=$1 head_ip=$2 port=$3 resource=$4
py=${ASYNCRL_PYTHON:-python3}
ray_bin=$(dirname "$(command -v "$py")")/ray
[[ -x $ray_bin ]] || ray_bin=ray
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'; }
node_ip=${ASYNCRL_NODE_IP:-$head_ip}
if [[ $role == worker && -z ${ASYNCRL_NODE_IP:-} ]]; then   # this node's address on the head's network
  node_ip=$("$py" -c 'import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((sys.argv[1], int(sys.argv[2]))); print(s.getsockname()[0])' "$head_ip" "$port")
fi
cpus=${ASYNCRL_NODE_CPUS:-${SLURM_CPUS_ON_NODE:-$(nproc)}}   # the job's CPUs on this node (ray_cluster.sh)
gpus=${ASYNCRL_GPUS_PER_NODE:-0}
common=(--node-ip-address "$node_ip" --num-cpus "$cpus" --num-gpus "$gpus" --resources "{\"$resource\": 1000}"
        --dashboard-agent-listen-port "$(free_port)" --metrics-export-port "$(free_port)"
        --runtime-env-agent-port "$(free_port)" --disable-usage-stats --block)
echo "asyncrl: $(hostname) (${SLURMD_NODENAME:-no slurm}): Ray $role at $node_ip, $cpus CPU(s), $gpus GPU(s), resource $resource"
if [[ $role == head ]]; then
  args=(--head --port "$port" --include-dashboard false --temp-dir "${ASYNCRL_RAY_TMP:-/tmp/asyncrl-ray}")
else
  args=(--address "$head_ip:$port")
fi
# In a session of its own, so that stopping this node stops every process of it (raylet, GCS,
# workers, which take process groups of their own but stay in the session), and only those:
# Slurm's proctrack would lose the ones that outlive `ray start`.
setsid "$ray_bin" start "${args[@]}" "${common[@]}" &
ray_pid=$!
stop() {
  pkill -TERM -s "$ray_pid" 2>/dev/null
  for _ in $(seq 10); do pgrep -s "$ray_pid" > /dev/null || exit 0; sleep 0.5; done   # `ray start` drains for 30 s
  echo "asyncrl: Ray on $(hostname) did not stop within 5 s of SIGTERM: killed"
  pkill -KILL -s "$ray_pid" 2>/dev/null
  exit 0
}
trap stop TERM INT
wait "$ray_pid"
