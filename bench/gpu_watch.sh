#!/usr/bin/env bash
# Runs a command on the GPU machine while recording, every PERIOD seconds, what each process is
# doing (state, kernel wait channel, elapsed) from /proc/PID/stat alone (reading cmdline can
# block behind a process stuck in the kernel), GPU memory, and, past STACKS_AFTER seconds, the
# Python stacks of the processes not stuck in the kernel (py-spy, when staged).
#   PERIOD=15 STACKS_AFTER=200 LIMIT=500 bash bench/gpu_watch.sh NAME command args...
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
name=$1; shift
export PATH=/tmp/site/bin:$PATH
start=$(date +%s)
timeout -k 5 "${LIMIT:-500}" "$@" > "$OUT/$name.txt" 2>&1 &
cmd=$!
stacks_done=0
while kill -0 "$cmd" 2>/dev/null; do
  sleep "${PERIOD:-15}"
  now=$(( $(date +%s) - start ))
  { echo "== t=${now}s"; ps -eo pid,ppid,stat,wchan:28,etime,rss,comm --sort=pid | awk 'NR==1 || $7 ~ /python|pt_|VLLM|ray|py-spy|pytest/'
    timeout -s KILL 5 nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader; } >> "$OUT/$name-ps.txt" 2>&1
  if (( now >= ${STACKS_AFTER:-200} && stacks_done < 2 )) && command -v py-spy > /dev/null; then
    stacks_done=$(( stacks_done + 1 ))
    for pid in $(ps -eo pid,stat,comm | awk '$2 !~ /D/ && $3 ~ /python|VLLM|pt_/ {print $1}'); do
      echo "== t=${now}s pid $pid"; timeout -s KILL 15 py-spy dump --pid "$pid" 2>&1 | head -120
    done >> "$OUT/$name-stacks.txt" 2>&1
  fi
done
wait "$cmd"; echo "== $name: rc $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.txt"
tail -20 "$OUT/$name.txt" | cut -c1-400
