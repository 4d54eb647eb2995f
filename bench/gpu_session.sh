#!/usr/bin/env bash
# One device call: the named experiments in order, each under its own deadline, results under
# $OUT (GPU machine; vLLM, Ray and the project's packages staged into /tmp/site beforehand,
# ../shared/gpu/README.md).  Usage: bash bench/gpu_session.sh job | learner | tests ...
#   job      the GPU job (configs/gpu.yaml): sync_grpo then async_grpo, wall-clock to held-out accuracy
#            (RECIPES: which of them; JOB_OVERRIDES: key=value for both, e.g. "loss.is_cap=2 run.seed=1";
#            JOB_TIMEOUT, 560 s; each run has 330 s: the first pays the model's conversion and vLLM's first
#            compile, 205 s of start-up on 2026-12-07, and at 270 s sync was cut at step 64 of 100; so run
#            the job in a call of its own, not in the one that installs)
#   job2     the same on a 2-GPU kind, actor group and learner on a GPU each (weights over NCCL)
#   learner  bench/learner_bench.py: learner tokens/s and MFU, 0.5B and 1.5B shapes
#   tests    the GPU tests (tests/test_vllm_engine.py, tests/test_gpu.py)
#   actor    bench/actor_bench.py (ACTOR_ARGS, default: the one call, both shapes; on a 2-GPU kind add
#            --transport nccl for the learner on GPU 0 and vLLM on GPU 1); its deadline is ACTOR_TIMEOUT
#            (595 s): in a call that also installs, pass ACTOR_TIMEOUT=540 (install + 595 s passed the
#            call's 600 s on 2026-12-07; the bench then prints what it measured, on SIGTERM)
#   push     bench/weight_push_bench.py --backend nccl (2 GPUs): the broadcast channel against a
#            plain NCCL broadcast of the same bytes, 0.5B and 1.5B shapes
#            (the two-GPU issue: push, actor with ACTOR_ARGS="--models 1.5b --transport nccl", job2; then,
#            here, python -m bench.two_gpu <each call's files_at> writes bench/results/two_gpu.json)
#   study    bench/staleness_study.py on the GPU job (STUDY_ARGS, STUDY_OVERRIDES: key=value for every
#            cell); cells under $OUT/study, back as study.tgz; the finished cells of
#            bench/results/$STUDY_NAME.json (default staleness_study_gpu: the grid so far, kept in the
#            repo: copy the call's $STUDY_NAME.json there) and any carried back in (STUDY_FROM, a
#            study.tgz or a folder of finished cells) are read, not run again. A learner at the GPU
#            config's micro-batch of 32,768 tokens holds about 17 GiB: three lag-8 cells beside their
#            engines ran out of the H100's memory on 2026-12-07. With STUDY_OVERRIDES=trainer.micro_batch_tokens=8192
#            (the same gradients, in more passes) three of four cells at once ran and the fourth's
#            engine failed to start (2026-12-07): run three at once. A grid with other overrides is
#            another setting, so give it a STUDY_NAME of its own.
#   buffer   bench/buffer_bench.py (BUFFER_ARGS, default --quick; BUFFER_TIMEOUT, 300 s) on the GPU machine's
#            16 CPU cores: the buffer against raw pyzmq and Ray's queue where its processes do not share
#            two cores (the 4 KiB goals are unmet on cpu2, where CPU per group bounds every system)
# job, job2 and study bring their run folders back as one .tgz each (a call returns at most 8 files)
# A part still running 30 s before its deadline gets the Python stacks of every process of the
# machine written to $OUT/stacks-<part>.txt (py-spy, when staged): a hang names where it waits.
set -u
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 VLLM_WORKER_MULTIPROC_METHOD=spawn
export RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
stacks_before() {  # stacks_before SECONDS PART: in the background, dump stacks if still running then
  ( sleep "$1"; command -v py-spy >/dev/null || exit 0
    for pid in $(ps -eo pid,comm | awk '$2 ~ /python|VLLM|pt_/ {print $1}'); do
      [[ $pid == "$$" ]] && continue
      echo "== pid $pid: $(tr '\0' ' ' < /proc/$pid/cmdline 2>/dev/null | cut -c1-200)"
      timeout 20 py-spy dump --pid "$pid" 2>&1 | head -150
    done > "$OUT/stacks-$2.txt" 2>&1 ) > /dev/null 2>&1 &   # not on $(...)'s pipe: it would wait for the sleep
  echo $!
}
export PATH=/tmp/site/bin:$PATH
bundle() {  # bundle DIR: $OUT/DIR as one $OUT/DIR.tgz (at most 8 files come back from a call, 2 folders down)
  tar czf "$OUT/$1.tgz" -C "$OUT" "$1" && rm -rf "${OUT:?}/$1"
}
# the vLLM actor issue's proof in one call on a fresh machine (engine starts of 80-130 s each
# with vLLM's compile; 15 s windows left vLLM's own path out of a 545 s budget on 2026-12-07;
# 2 pairs of 12 s took 447 s on an H200 (run T), and their windows swung by up to 40 %, so
# now 4 pairs of 8 s, about 50 s more)
ONE_CALL="--models 0.5b,1.5b --rounds 0 --prompts 512 --pairs 4 --continuous-s 8 --warm-s 3 --stop-share 0.004 --engine-process --budget-s 575"
for part in "$@"; do
  start=$(date +%s)
  case $part in
    job)
      timeout ${JOB_TIMEOUT:-560} python bench/async_vs_sync.py --config gpu --metric eval/reward --window 1 \
        --targets 0.5 0.6 0.7 0.8 0.85 --runs-dir "$OUT/runs" --timeout-s 330 \
        model.cache_dir=/tmp/asyncrl-models run.wandb=disabled ${JOB_OVERRIDES:-} --recipes ${RECIPES:-sync_grpo async_grpo} > "$OUT/job.txt" 2>&1
      for r in sync_grpo async_grpo; do
        rm -rf "$OUT/runs/$r/final" "$OUT/runs/$r/checkpoints"   # weights do not travel back
      done
      bundle runs; tail -25 "$OUT/job.txt" ;;
    job2)
      timeout 560 python bench/async_vs_sync.py --config gpu --actors 1 --metric eval/reward --window 1 \
        --targets 0.5 0.6 0.7 0.8 0.85 --runs-dir "$OUT/runs2" --timeout-s 330 \
        run.colocate=false trainer.gpus=1 actors.gpus_per_group=1 actors.gpu_memory_utilization=0.8 \
        model.cache_dir=/tmp/asyncrl-models run.wandb=disabled --recipes ${RECIPES:-sync_grpo async_grpo} > "$OUT/job2.txt" 2>&1
      for r in sync_grpo async_grpo; do
        rm -rf "$OUT/runs2/$r/final" "$OUT/runs2/$r/checkpoints"
      done
      bundle runs2; tail -25 "$OUT/job2.txt" ;;
    learner)
      watcher=$(stacks_before $(( ${LEARNER_TIMEOUT:-330} - 30 )) learner)
      timeout ${LEARNER_TIMEOUT:-330} python -m bench.learner_bench --out "$OUT/learner_bench.json" ${LEARNER_ARGS:-} \
        > "$OUT/learner.txt" 2>&1
      kill "$watcher" 2>/dev/null
      tail -8 "$OUT/learner.txt" | cut -c1-600 ;;
    tests)
      watcher=$(stacks_before $(( ${TESTS_TIMEOUT:-250} - 30 )) tests)
      timeout ${TESTS_TIMEOUT:-250} python -m pytest -q -rA -p no:cacheprovider -o faulthandler_timeout=$(( ${TESTS_TIMEOUT:-250} - 40 )) \
        ${TESTS:-tests/test_vllm_engine.py tests/test_gpu.py tests/test_telemetry.py tests/test_megatron.py} > "$OUT/tests.txt" 2>&1
      kill "$watcher" 2>/dev/null
      tail -15 "$OUT/tests.txt" ;;
    push)
      timeout ${PUSH_TIMEOUT:-300} python -m bench.weight_push_bench --backend nccl --models 0.5b 1.5b \
        --out "$OUT/weight_push.json" > "$OUT/push.txt" 2>&1
      tail -4 "$OUT/push.txt" ;;
    actor)
      watcher=$(stacks_before $(( ${ACTOR_TIMEOUT:-595} - 30 )) actor)
      timeout ${ACTOR_TIMEOUT:-595} python -m bench.actor_bench ${ACTOR_ARGS:-$ONE_CALL} \
        > "$OUT/actor.txt" 2>&1
      kill "$watcher" 2>/dev/null
      tail -25 "$OUT/actor.txt" | cut -c1-1500 ;;
    study)
      mkdir -p "$OUT/study"
      if [[ ${STUDY_FROM:-} == *.tgz ]]; then tar xzf "$STUDY_FROM" -C "$OUT"
      elif [[ -n ${STUDY_FROM:-} ]]; then cp -r "$STUDY_FROM"/. "$OUT/study/"; fi
      name=${STUDY_NAME:-staleness_study_gpu}
      resume=(); [[ -f bench/results/$name.json ]] && resume=(--resume-from "bench/results/$name.json")
      # cells take 150-200 s with 3 at once on an H100 (2026-12-07); 2 of 3 engines started at the
      # same moment failed to start there, so starts are 20 s apart
      timeout ${STUDY_TIMEOUT:-540} python -m bench.staleness_study --config gpu --runs-dir "$OUT/study" \
        --out "$OUT/$name.json" --plot "$OUT/$name.png" --budget-s $(( ${STUDY_TIMEOUT:-540} - 220 )) \
        "${resume[@]}" --stagger-s 20 \
        ${STUDY_ARGS:---lags 0 8 --corrections none truncate truncate_cap8 decoupled decoupled_cap8 --seeds 0 1 --steps 40 --parallel 3} \
        actors.gpu_memory_utilization=0.15 actors.enforce_eager=true trainer.export_final=false \
        model.cache_dir=/tmp/asyncrl-models run.wandb=disabled ${STUDY_OVERRIDES:-} > "$OUT/study.txt" 2>&1
      find "$OUT/study" -name '*.safetensors' -delete; rm -rf "$OUT"/study/*/checkpoints
      bundle study
      tail -25 "$OUT/study.txt" | cut -c1-400 ;;
    buffer)
      timeout ${BUFFER_TIMEOUT:-300} python -m bench.buffer_bench ${BUFFER_ARGS:---quick} --out "$OUT/buffer_bench.json" \
        > "$OUT/buffer.txt" 2>&1
      nproc >> "$OUT/device.txt"
      tail -6 "$OUT/buffer.txt" | cut -c1-1500 ;;
    *) echo "unknown part $part" ;;
  esac
  echo "== $part: $(( $(date +%s) - start )) s"
done
