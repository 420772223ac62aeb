#!/usr/bin/env bash
# Issue 16's GPU goal: a random-weight 3B llama packaged 4-bit, served on one and two stages to
# 1, 8 and 32 concurrent clients (goal: 32 clients >= 15x one client on 2 stages), with one lane
# and two (the GPU runs one stage at a time either way: the second lane shows what pipelining
# leaves on the table). Run on the device machine from the project's root after
# `source .gpuB/setup.sh` (../shared/gpu/README.md): `bash scripts/gpu/check-batching.sh`.
# LAYERS=16 for a short run.
set -x
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
KIT=$PWD/.gpuB
cd /tmp  # import the installed wheel, not the working tree's layerline/ folder
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
[ -d /tmp/p ] || {
  python3 "$KIT/random_model.py" /tmp/r --shape llama-3b ${LAYERS:+--layers "$LAYERS"}
  python3 -m layerline pkg build /tmp/r -o /tmp/p --quantize 4bit > "$OUT/build.log" 2>&1
}
for lanes in 1 2; do
  timeout 270 python3 -m layerline bench serve /tmp/p --stages 2 --clients 1,8,32 --max-batch 32 \
    --lanes "$lanes" --runs 1 --max-tokens 64 --start-timeout 120 -o "$OUT/batching-lanes$lanes" 2>&1 | tail -16
done
