#!/usr/bin/env bash
# The GPU side of the performance checks, in one go, from the repository root (no install step):
#
#   OUT=gpu_check BUDGET_S=500 bash experiments/gpu_check.sh
#
# Writes into $OUT: gpu.txt and versions.txt (the machine), cudnn.txt (the cuDNN-vs-XLA tests),
# bench_gpt2.jsonl (GPT-2 124M, bf16, T=1024: tfd_jax and the PyTorch reference, with the ratio and
# the target checks on its last line), then, while BUDGET_S seconds last, tfd_jax-only variants
# (variant_*.jsonl) that show what each fast path is worth, and a kernel-by-kernel profile of the
# training step (kernel_profile.jsonl).
set -u
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget=${BUDGET_S:-500}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import sys, jax, flax, optax, torch
print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "torch", torch.__version__, jax.devices())
PY
JAX_PLATFORMS=cuda timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/perf/test_cudnn.py 2>&1 | tee "$OUT/cudnn.txt"
timeout $(( $(left) > 60 ? $(left) - 30 : 30 )) python3 experiments/bench.py --compare 2>&1 | tee "$OUT/bench_gpt2.jsonl"

variant() {  # name, then env assignments and bench arguments
    local name=$1; shift
    local t; t=$(left)
    if [ "$t" -lt 70 ]; then echo "skipped variant $name: $t s left" | tee -a "$OUT/skipped.txt"; return; fi
    timeout $((t - 5)) env "$@" 2>&1 | tee "$OUT/variant_$name.jsonl" | grep '"what": "train"'
}
B="python3 experiments/bench.py --no-decode --steps 10 --warmup 2"
variant scan_layers $B --scan-layers
variant batch32 $B --batch-size 32
variant no_lib_xla_flags TFD_JAX_XLA_FLAGS=0 $B
variant xla_attention $B --attention-impl xla
variant cublas_only XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $B
t=$(left)
if [ "$t" -ge 90 ]; then  # where the step's time goes now, kernel by kernel
    timeout $((t - 5)) python3 experiments/kernel_profile.py 2>&1 | tee "$OUT/kernel_profile.jsonl" | tail -c 2000
else
    echo "skipped kernel_profile: $t s left" | tee -a "$OUT/skipped.txt"
fi
echo "done in $((SECONDS - start)) s"
