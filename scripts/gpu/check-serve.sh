#!/usr/bin/env bash
# The GPU figures in docs/benchmarks.md: a random-weight 3B llama packaged 4-bit, bare mlx-lm beside
# layerline's loop, then served on one and two stages and with a draft of the same package at w=4.
# Run on the device machine from the project's root after `source .gpuB/setup.sh`
# (../shared/gpu/README.md): `bash scripts/gpu/check-serve.sh`. LAYERS=16 for a short run.
set -x
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
KIT=$PWD/.gpuB
cd /tmp  # import the installed wheel, not the working tree's layerline/ folder
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())" | tee -a "$OUT/gpu.txt"
[ -d /tmp/p ] || {
  python3 "$KIT/random_model.py" /tmp/r --shape llama-3b ${LAYERS:+--layers "$LAYERS"}
  python3 -m layerline pkg build /tmp/r -o /tmp/p --quantize 4bit > "$OUT/build.log" 2>&1
}
timeout 150 python3 -m layerline bench decode /tmp/p --weights packed --weights bf16 --tokens 128 \
  2>&1 | tee "$OUT/decode.txt" | tail -8
timeout 330 python3 -m layerline bench serve /tmp/p --stages 2 --draft /tmp/p --draft-stages 2 \
  --window 4 --no-adaptive --runs 2 --max-tokens 128 --start-timeout 120 -o "$OUT/serve" 2>&1 | tail -40
