#!/usr/bin/env bash
# The GPU side of the performance checks, in one call, from the repository root (no install step):
#
#   OUT=gpu_check BUDGET_S=470 bash experiments/gpu_check.sh
#
# Everything lands in $OUT as JSON lines (one object per measurement, see experiments/bench.py):
#
#   gpu.txt, versions.txt      the machine and the library versions
#   bench_gpt2.jsonl           GPT-2 124M, bf16, T=1024, batch 16: tfd_jax against the PyTorch peer
#                              (torch.compile, CUDA-graph decoding), the ratios and the target checks
#                              on its last line; decoding with the library's own choice of loop
#   lever_<name>.jsonl         tfd_jax alone with one lever changed (below), while BUDGET_S lasts
#   summary.jsonl              one line per file: the train / decode figures side by side
#   cudnn.txt, kernel_profile.jsonl   the cuDNN-vs-XLA tests and a kernel-by-kernel training profile,
#                              if time is left
#
# The levers, most informative first (each line says what it changes against bench_gpt2; the
# headline decodes with the library's choice on a GPU, the fixed loop). Those the budget leaves no
# time for are listed in skipped.txt.
#   decode_cmdbuf      the fixed loop as one command buffer: every command type, WHILE and
#                      CONDITIONAL included, and no minimum graph size
#   decode_pallas      the cache attention through JAX's Pallas flash-decoding kernel (--decode-kernel pallas)
#   decode_pallas_cmdbuf  both of those
#   train_bf16_logits  the output head writes bfloat16 logits (GPTConfig.logits_dtype; peak memory too)
#   train_scan_layers  the blocks as one lax.scan (compile time against step time)
#   train_cmdbuf       the training step under the full command-buffer list (host dispatch per step)
#   train_4_steps_per_call  four steps per jitted call (host dispatch per step)
#   train_sorted_embed_grad  the embedding gradient as a sort and a sorted segment sum, not a scatter-add
#   train_flat_update  the optimizer update over two flat vectors (OptimConfig.flat_update), not per parameter
#   train_cublaslt     --xla_gpu_enable_cublaslt=true
#   train_no_triton    --xla_gpu_enable_triton_gemm=false (cuBLAS for every matmul)
#   train_cudnn_ln     --xla_gpu_enable_cudnn_layer_norm=true
#   decode_while       the early-exit while_loop (its condition goes to the host every token)
#   decode_no_fuse_qkv three Q/K/V products instead of one (kernels per token, tokens/s)
#   train_no_fuse_qkv  three Q/K/V products in the training step
# Each lever prints its train or decode line to the terminal as it finishes.
set -u
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
budget=${BUDGET_S:-470}
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }

# Every command-buffer command type this XLA knows (the default list leaves out WHILE and
# CONDITIONAL, which are what turn a whole decode loop into one CUDA graph with device-side control).
CMDBUF="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES,DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import sys, jax, flax, optax, torch
print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "torch", torch.__version__, jax.devices())
PY

# The headline: both frameworks, training and decoding (about 2.5 minutes on an H200).
timeout $(( $(left) > 60 ? $(left) - 30 : 30 )) python3 experiments/bench.py --compare 2>&1 | tee "$OUT/bench_gpt2.jsonl"

lever() {  # name, what to grep for (train|decode), then env assignments and the bench command
    local name=$1 what=$2; shift 2
    local t; t=$(left)
    if [ "$t" -lt 50 ]; then echo "skipped lever $name: $t s left" | tee -a "$OUT/skipped.txt"; return; fi
    timeout $((t - 5)) env "$@" 2>&1 | tee "$OUT/lever_$name.jsonl" | grep "\"what\": \"$what\"" | cut -c1-400
}
D="python3 experiments/bench.py --no-train --new-tokens 256"
T="python3 experiments/bench.py --no-decode --steps 10 --warmup 2"
lever decode_cmdbuf decode XLA_FLAGS="$CMDBUF" $D --decode-loop fixed
lever decode_pallas decode $D --decode-kernel pallas
lever decode_pallas_cmdbuf decode XLA_FLAGS="$CMDBUF" $D --decode-loop fixed --decode-kernel pallas
lever train_bf16_logits train $T --logits-dtype bfloat16
lever train_scan_layers train $T --scan-layers
lever train_cmdbuf train XLA_FLAGS="$CMDBUF" $T
lever train_4_steps_per_call train $T --steps-per-call 4
lever train_sorted_embed_grad train $T --embed-grad sorted
lever train_flat_update train $T --flat-update
lever train_cublaslt train XLA_FLAGS=--xla_gpu_enable_cublaslt=true $T
lever train_no_triton train XLA_FLAGS=--xla_gpu_enable_triton_gemm=false $T
lever train_cudnn_ln train XLA_FLAGS=--xla_gpu_enable_cudnn_layer_norm=true $T
lever decode_while decode $D --decode-loop while
lever decode_no_fuse_qkv decode $D --no-fuse-qkv
lever train_no_fuse_qkv train $T --no-fuse-qkv

# One line per file: the figures to compare, side by side.
python3 - "$OUT" <<'PY' | tee "$OUT/summary.jsonl"
import json, pathlib, sys
keep = ("impl", "what", "batch_size", "steps_per_call", "ms_per_step", "tokens_per_s", "mfu", "peak_memory_bytes", "first_step_s", "loop",
        "kernels_per_token", "command_buffers_per_token", "triton_calls_in_loop_program", "first_tokens",
        "attention_impl", "ratio", "decode_ratio", "checks")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
    if f.name == "summary.jsonl":
        continue
    for line in f.read_text().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if r.get("what") in ("train", "decode", "compile", "compare"):
                print(json.dumps({"file": f.name, **{k: r[k] for k in keep if k in r}}))
PY

t=$(left)
if [ "$t" -ge 60 ]; then
    JAX_PLATFORMS=cuda timeout $((t - 5)) python3 -m pytest -q -rs -p no:cacheprovider tests/perf/test_cudnn.py 2>&1 | tee "$OUT/cudnn.txt" | tail -3
else
    echo "skipped cudnn tests: $t s left" | tee -a "$OUT/skipped.txt"
fi
t=$(left)
if [ "$t" -ge 90 ]; then  # where the step's time goes now, kernel by kernel
    timeout $((t - 5)) python3 experiments/kernel_profile.py 2>&1 | tee "$OUT/kernel_profile.jsonl" | tail -c 2000
else
    echo "skipped kernel_profile: $t s left" | tee -a "$OUT/skipped.txt"
fi
echo "done in $((SECONDS - start)) s"
