"""Speed of tfd_jax's training step and decoder, alone or against a PyTorch reference.

    python experiments/bench.py                      # GPU: GPT-2 124M, T=1024, bf16; CPU: shakespeare-cpu
    python experiments/bench.py --compare            # tfd_jax, then experiments/torch_reference.py, and the ratio
    python experiments/bench.py --preset tiny --steps 5 --no-decode
    python experiments/bench.py --impl torch         # the PyTorch reference alone

Every measurement is one JSON object on its own line, with ``impl`` ("tfd_jax" or "torch") and
``what``:

* ``setup``: the resolved preset, model config, batch, sequence length, precision, attention
  implementation and optimizer settings (tfd_jax's run prints it first; ``--compare`` hands it to
  the torch run so both measure the same thing);
* ``compile``: trace, lowering and XLA compile seconds of the training step (torch: the first
  step, which includes ``torch.compile``);
* ``train``: ms per step over ``--steps`` steps run back to back after warm-up (the next step is
  dispatched while the device still runs the last one, as in training; the headline figure),
  tokens/s = B x T / that, ``ms_per_step_sync`` the median when every step is waited for (adds the
  host's dispatch time), MFU with the training loop's formula (``6 N + 6 L M T`` FLOPs per token
  over the device's peak from ``tfd_jax.train.metrics``; empty on CPUs), peak memory (device
  allocator on GPU, process RSS on CPU);
* ``decode``: greedy decoding tokens/s at batch 1 and 16 (``tfd_jax.decode.generate`` after a
  warm-up call; prefill included), the loop it ran (``loop``: ``while`` or ``fixed``, see
  ``--decode-loop``) and ``kernels_per_token``: the operations one decoding step launches, counted
  in the compiled loop's optimized HLO (the loop body and condition, fusions and library calls as
  one each, nested control flow followed, unrolled bodies divided out), so no profiler and no
  op-by-op mode is involved; on a GPU each is a kernel, on a CPU a thunk.
  ``command_buffers_per_token`` counts the groups XLA's GPU backend records as command buffers;
* ``compare`` (last line with ``--compare``): ``ratio`` = tfd_jax train tokens/s over torch's,
  ``decode_ratio`` per batch size, and ``checks`` against the performance targets.

``--compare`` runs each framework in its own child process (a clean heap and its own thread pools;
JAX's GPU memory is released before torch starts). With ``--rounds K`` the two alternate K times and
the ratios are medians, which helps on a busy machine.

The training step is the library's own: ``make_optimizer`` (clipping + AdamW), ``init_state``,
``make_train_step``, jitted with the state donated, on fixed random tokens, laid out as ``tfd-jax
train`` lays out a long run: on a CPU, data-parallel over one device per core with each device's
gradients summed in one all-reduce (``--local-rows``), and 4 steps per call (``make_multi_step``,
``--steps-per-call``; the train record's times are per step).

On a busy CPU the two frameworks suffer differently (PyTorch's OpenMP threads wait on each other
when one of them is descheduled), so compare with ``--cpus 1`` (both pinned to the same core) as well
as with all cores, and prefer ``--rounds 3``.

The GPU check (GPT-2 124M, bf16, T=1024: train ratio >= 1.15, MFU >= 42%, batch-1 decoding >= 2,500
tokens/s, batch 16 >= 40k, compile plus first step <= 10 s; the last line's ``checks``), from the
repository root, with no install step (``experiments/gpu_check.sh`` runs it and every lever's
variant in one call):

    PYTHONPATH=$PWD python3 experiments/bench.py --compare
    JAX_PLATFORMS=cuda PYTHONPATH=$PWD python3 -m pytest -q tests/perf/test_cudnn.py

On CPU the check is the Shakespeare config's train ratio >= 1.1.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Named benchmark settings. "model" starts from a GPTConfig preset plus overrides; "optim" overrides
# OptimConfig's defaults (GPT-2-style AdamW, lr 6e-4, beta2 0.95, clip 1.0).
PRESETS = {
    "gpt2": dict(preset="gpt2", overrides={}, batch_size=16, seq_len=1024, optim={}),
    "small": dict(preset="small", overrides={}, batch_size=16, seq_len=256, optim={}),
    "tiny": dict(preset="tiny", overrides={}, batch_size=8, seq_len=128, optim={}),
    # experiments/shakespeare_char.py --config cpu (nanoGPT's character-level CPU run).
    "shakespeare-cpu": dict(
        preset="tiny",
        overrides=dict(vocab_size=65, d_model=128, num_heads=4, num_layers=4, context_length=64, dropout=0.0,
                       tie_embeddings=True, qkv_bias=False, out_bias=False, ffn_bias=False),
        batch_size=12, seq_len=64,
        optim=dict(lr=1e-3, min_lr=1e-4, warmup_steps=100, b2=0.99, weight_decay=0.1),
    ),
}

# The performance targets the GPU check is held to (GPT-2 124M, bf16, T=1024), and the CPU's
# (shakespeare-cpu, all cores).
GPU_TARGETS = {"train_ratio_min": 1.15, "mfu_min": 0.42, "decode_b1_tokens_per_s_min": 2500.0,
               "decode_b16_tokens_per_s_min": 40000.0, "first_step_s_max": 10.0}
CPU_TARGETS = {"train_ratio_min": 1.1}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


def resolve_setup(args, backend: str) -> dict:
    """Fill the defaults that depend on the backend ("gpu", "tpu" or "cpu") and build the model config."""
    import dataclasses

    from tfd_jax.models import GPTConfig
    from tfd_jax.train.optim import OptimConfig

    accel = backend != "cpu"
    preset_name = args.preset or ("gpt2" if accel else "shakespeare-cpu")
    p = PRESETS[preset_name]
    precision = args.precision or ("bf16" if accel else "fp32")
    attention = args.attention_impl or ("cudnn" if backend == "gpu" and precision == "bf16" else "reference")
    T = args.seq_len or p["seq_len"]
    B = args.batch_size or p["batch_size"]
    overrides = dict(p["overrides"])
    overrides.update(dtype={"fp32": "float32", "bf16": "bfloat16"}[precision], attention_impl=attention)
    if args.vocab_pad_multiple is not None:
        overrides["vocab_pad_multiple"] = args.vocab_pad_multiple
    if args.scan_layers is not None:
        overrides["scan_layers"] = args.scan_layers
    if args.remat is not None:
        overrides["remat"] = args.remat
    if args.logits_dtype is not None:
        overrides["logits_dtype"] = args.logits_dtype
    cfg = GPTConfig.preset(p["preset"], **overrides)
    if T > cfg.context_length:
        cfg = cfg.replace(context_length=T)
    optim = dataclasses.asdict(OptimConfig(**p["optim"], flat_update=bool(args.flat_update)))
    prompt_len = min(args.prompt_len, cfg.context_length - 1)
    new_tokens = args.new_tokens or max(min(cfg.context_length - prompt_len, 256), 1)
    return dict(
        preset=preset_name, backend=backend, model=cfg.to_dict(), batch_size=B, seq_len=T, precision=precision,
        attention_impl=attention, optim=optim, steps=args.steps, warmup=args.warmup, seed=args.seed,
        train=args.train, decode=args.decode, decode_attention_impl=args.decode_attention_impl,
        decode_loop=args.decode_loop, decode_batches=[int(b) for b in args.decode_batches.split(",") if b],
        prompt_len=prompt_len, new_tokens=new_tokens, cpus=args.cpus,
    )


def _peak_memory_jax(device) -> dict:
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]), "memory_kind": "device"}
    return {"peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "memory_kind": "host_rss"}


# ------------------------------------------------------------------------------------------------
# tfd_jax
# ------------------------------------------------------------------------------------------------


def build_train_step(setup: dict, cfg=None):
    """(model, state, jitted donated step, batch) for the setup: the library's optimizer, state and
    step (``make_optimizer``, ``init_state``, ``make_train_step``) on fixed random tokens."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from tfd_jax.models import GPT, GPTConfig
    from tfd_jax.train.optim import OptimConfig, make_optimizer
    from tfd_jax.train.step import init_state, make_train_step, rng_tags, split_model
    from tfd_jax.train.tasks import lm_loss

    cfg = cfg or GPTConfig.from_dict(setup["model"])
    B, T, precision, seed = setup["batch_size"], setup["seq_len"], setup["precision"], setup["seed"]
    rows = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(B, T + 1), dtype=np.int32)
    batch = jax.device_put({"tokens": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones((B, T), bool)})
    model = GPT(cfg, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    graphdef, params, rest = split_model(model)
    optimizer, schedule = make_optimizer(OptimConfig(**setup["optim"]), setup["steps"] + setup["warmup"] + 1)
    state = jax.jit(lambda p: init_state(p, optimizer, seed, precision))(params)
    local_rows = None
    if jax.default_backend() == "cpu" and jax.device_count() > 1:  # --cpu-devices: data parallel over them
        from tfd_jax.train.loop import cpu_data_devices
        from tfd_jax.train.sharding import make_mesh

        # as the Trainer's default CPU mesh: the data axis over as many devices as split the batch
        # evenly, each device's gradients of its own rows summed in one all-reduce
        mesh = make_mesh(devices=jax.devices()[:cpu_data_devices(B, 1, jax.device_count())])
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
        local_rows = mesh if setup.get("local_rows") is not False else None
    tags = rng_tags(model) if (cfg.dropout or cfg.embed_dropout) else ()
    step = make_train_step(graphdef, rest, optimizer, schedule, lm_loss, dropout_tags=tags, fp16=precision == "fp16",
                           local_rows=local_rows)
    k = setup.get("steps_per_call") or 1
    if k > 1:  # k steps per call (make_multi_step): the same batch k times, stacked on a leading axis
        from tfd_jax.train.step import make_multi_step

        def stacked(x):
            sh = x.sharding
            return jax.device_put(np.stack([np.asarray(x)] * k), NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))
                                  if isinstance(sh, NamedSharding) else None)

        step = make_multi_step(step, k)
        batch = jax.tree.map(stacked, batch)
    return model, state, jax.jit(step, donate_argnums=0), batch


# Instructions that launch nothing: they name, regroup or reinterpret buffers.
_FREE_OPS = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
             "partition-id", "replica-id", "add-dependency"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = .*? ([a-z][a-z0-9\-]*)\((.*)$")


def hlo_computations(text: str) -> dict[str, list[tuple[str, str]]]:
    """Optimized HLO text -> {computation name: [(opcode, rest of the line), ...]} (ENTRY as "ENTRY")."""
    comps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            comps[name] = []
            continue
        m = _INSTR.match(line) if name else None
        if m:
            comps[name].append((m.group(2), m.group(3)))
    return comps


def _count_ops(comps, name, counts, buffers) -> None:
    """Add the operations computation ``name`` launches to ``counts`` (by opcode), following
    control flow (while, conditional, call) but not into fusions, which are one kernel each."""
    for op, rest in comps.get(name, []):
        if op in _FREE_OPS:
            continue
        called = re.findall(r"(?:body|condition|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)", rest)
        branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
        if branches:
            called += re.findall(r"%([\w.\-]+)", branches.group(1))
        if op in ("while", "conditional", "call"):
            if op == "call" and any("command_buffer" in c for c in called):
                buffers[0] += 1
            for c in called:
                _count_ops(comps, c, counts, buffers)
            continue
        counts[op] += 1


def loop_kernels_per_step(hlo_text: str, steps: int) -> dict:
    """Kernels (GPU) or thunks (CPU) per iteration of the largest top-level while loop of a compiled
    program: body plus condition, divided by how many steps one iteration covers when XLA unrolled
    the loop (its ``known_trip_count`` against ``steps``)."""
    import collections

    comps = hlo_computations(hlo_text)
    best = None
    for op, rest in comps.get("ENTRY", []):
        if op != "while":
            continue
        counts, buffers = collections.Counter(), [0]
        for key in ("body", "condition"):
            m = re.search(key + r"=%([\w.\-]+)", rest)
            if m:
                _count_ops(comps, m.group(1), counts, buffers)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        per_iter = 1 if not trip or int(trip.group(1)) == 0 else max(round(steps / int(trip.group(1))), 1)
        total = sum(counts.values())
        if best is None or total > best[0]:
            best = (total, counts, buffers[0], per_iter, trip.group(1) if trip else None)
    if best is None:
        return {"kernels_per_token": None}
    total, counts, buffers, per_iter, trip = best
    return {"kernels_per_token": total / per_iter, "command_buffers_per_token": buffers / per_iter,
            "loop_known_trip_count": None if trip is None else int(trip), "tokens_per_iteration": per_iter,
            "kernels_by_op": dict(counts.most_common(12))}


def decode_kernels(model, prompts, new_tokens: int, loop: str) -> dict:
    """:func:`loop_kernels_per_step` of the greedy decode loop ``generate`` runs for these
    prompts (the same compiled program: lowering hits jit's cache, compiling XLA's)."""
    import importlib

    import jax

    g = importlib.import_module("tfd_jax.decode.generate")  # the module (the package exports the function)
    plan = g.plan_generation(model.config, prompts, new_tokens, temperature=0.0)
    graphdef, state, dstate = g._start(model, plan, jax.random.key(0))
    compiled = g._decode_loop.lower(graphdef, state, dstate, plan.knobs.max_new, plan.knobs, spec=plan.spec,
                                    loop=loop).compile()
    text = compiled.as_text()
    # Pallas kernels (MultiHeadAttention.decode_kernel): Triton custom calls on a GPU, so a lever
    # that asked for them shows whether the loop really has them (the interpreter on a CPU has none)
    return dict(loop_kernels_per_step(text, plan.out_length),
                triton_calls_in_loop_program=len(re.findall(r'custom_call_target="[^"]*triton', text)))


def bench_tfd_jax(setup: dict) -> list[dict]:
    """Compile, time the training step and decode with tfd_jax; returns (and prints) the records."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from tfd_jax.models import GPT, GPTConfig
    from tfd_jax.train import metrics as mx

    device = jax.devices()[0]
    cfg = GPTConfig.from_dict(setup["model"])
    B, T, precision, seed = setup["batch_size"], setup["seq_len"], setup["precision"], setup["seed"]
    steps, warmup = setup["steps"], setup["warmup"]
    where = f"{len(os.sched_getaffinity(0))} cores" if device.platform == "cpu" else f"{jax.device_count()} device(s)"
    base = dict(impl="tfd_jax", backend=setup["backend"], device=f"{device.device_kind} ({where})",
                precision=precision, batch_size=B, seq_len=T)
    records = []

    durations: dict[str, float] = {}

    def listen(event, duration, **_):
        if event.startswith("/jax/core/compile/"):
            key = event.rsplit("/", 1)[-1].removesuffix("_duration")
            durations[key] = durations.get(key, 0.0) + duration

    jax.monitoring.register_event_duration_secs_listener(listen)
    poison = jnp.float32(1.0)

    def build(cfg):
        model, state, step_fn, _ = build_train_step(setup, cfg)
        return model, state, step_fn

    if setup["train"]:
        notes = []
        model, state, step_fn, batch = build_train_step(setup, cfg)
        durations.clear()
        t0 = time.perf_counter()
        try:
            state, m = step_fn(state, batch, poison)
            jax.block_until_ready(m)
        except Exception as e:
            if cfg.attention_impl != "cudnn":
                raise
            notes.append(f"attention_impl='cudnn' failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); using 'xla'")
            cfg = cfg.replace(attention_impl="xla")
            model, state, step_fn = build(cfg)
            durations.clear()
            t0 = time.perf_counter()
            state, m = step_fn(state, batch, poison)
            jax.block_until_ready(m)
        first_step_s = time.perf_counter() - t0
        first_loss = float(np.ravel(m["loss"])[0])
        k = setup.get("steps_per_call") or 1  # steps per call: every time below is per call / k
        compile_durations = dict(durations)

        for _ in range(max(warmup - 1, 0)):
            state, m = step_fn(state, batch, poison)
        jax.block_until_ready(m)
        times, cpu_times = [], []
        calls = max(steps // k, 1)
        for _ in range(calls):
            t, c = time.perf_counter(), time.process_time()
            state, m = step_fn(state, batch, poison)
            jax.block_until_ready(m)
            times.append((time.perf_counter() - t) / k)
            cpu_times.append((time.process_time() - c) / k)
        t = time.perf_counter()
        for _ in range(calls):  # back to back, as the training loop runs: the throughput figure
            state, m = step_fn(state, batch, poison)
        jax.block_until_ready(m)
        piped = (time.perf_counter() - t) / (calls * k)
        recompiled = bool(durations.keys() - compile_durations.keys()) or durations != compile_durations
        med = statistics.median(times)
        tps = B * T / piped

        n_params = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
        n_embed = cfg.vocab_size * cfg.d_model + (cfg.context_length * cfg.d_model if cfg.positions == "learned" else 0)
        fpt = mx.flops_per_token(mx.matmul_params(cfg), cfg.num_layers, cfg.d_model, T)  # the training loop's formula
        peak = mx.peak_flops_per_device(device)
        base = dict(base, attention_impl=cfg.attention_impl)
        layout = dict(scan_layers=cfg.scan_layers, remat=cfg.remat_policy)
        data_devices = len(batch["tokens"].sharding.device_set)
        layout["steps_per_call"] = k
        compile_rec = dict(
            base, what="compile", first_step_s=first_step_s,
            trace_s=compile_durations.get("jaxpr_trace"), lower_s=compile_durations.get("jaxpr_to_mlir_module"),
            compile_s=compile_durations.get("backend_compile"), **layout,
        )
        train_rec = dict(
            base, what="train", **layout, data_devices=data_devices,
            local_rows=data_devices > 1 and setup.get("local_rows") is not False, steps=calls * k,
            ms_per_step=piped * 1e3, ms_per_step_sync=med * 1e3,
            ms_per_step_sync_min=min(times) * 1e3, cpu_ms_per_step=statistics.median(cpu_times) * 1e3, tokens_per_s=tps,
            flops_per_token=fpt, peak_flops=peak,
            mfu=mx.mfu(tps, fpt, 1, peak),
            num_params=n_params, num_params_non_embedding=n_params - n_embed,
            loss_first=first_loss, loss_last=float(np.ravel(m["loss"])[-1]), recompiled_while_timing=recompiled,
            **_peak_memory_jax(device),
        )
        if notes:
            train_rec["note"] = "; ".join(notes)
        for r in (compile_rec, train_rec):
            emit(r)
            records.append(r)
        del state, step_fn, model

    if setup["decode"]:
        from tfd_jax.decode import generate

        # Inference weights in the compute dtype (bf16 on GPU), as the torch reference decodes.
        # Per-layer blocks, as load_for_inference gives them, whatever the training layout.
        dcfg = cfg.replace(param_dtype=cfg.dtype, dropout=0.0, embed_dropout=0.0, scan_layers=False,
                           attention_impl=setup.get("decode_attention_impl") or cfg.attention_impl)
        dmodel = GPT(dcfg, rngs=nnx.Rngs(seed))
        P, N = setup["prompt_len"], setup["new_tokens"]
        from tfd_jax.decode import decode_loop_kind
        from tfd_jax.decode.cache import bucket_length

        # What generate runs: no EOS here, so "auto" is the fixed loop on a GPU when N fills its bucket.
        loop = decode_loop_kind(setup.get("decode_loop") or "auto", can_stop_early=N < bucket_length(N))
        for b in setup["decode_batches"]:
            prompts = np.random.default_rng(seed + b).integers(0, cfg.vocab_size, size=(b, P), dtype=np.int32)
            note = None
            t = time.perf_counter()
            try:
                generate(dmodel, prompts, N, temperature=0.0, seed=seed, loop=loop)  # compiles
            except Exception as e:  # cuDNN takes only some shapes (one-token queries, masks)
                if dcfg.attention_impl != "cudnn":
                    raise
                note = f"decoding with attention_impl='cudnn' failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); using 'xla'"
                dcfg = dcfg.replace(attention_impl="xla")
                dmodel = GPT(dcfg, rngs=nnx.Rngs(seed))
                t = time.perf_counter()
                generate(dmodel, prompts, N, temperature=0.0, seed=seed, loop=loop)
            warm_s = time.perf_counter() - t
            t = time.perf_counter()
            tokens, lengths = generate(dmodel, prompts, N, temperature=0.0, seed=seed, loop=loop)
            dt = time.perf_counter() - t
            n = int(np.sum(lengths))
            r = dict(base, what="decode", attention_impl=dcfg.attention_impl, batch_size=b, prompt_len=P, new_tokens=N,
                     seconds=dt, tokens_per_s=n / dt, ms_per_token_step=dt / N * 1e3, first_call_s=warm_s,
                     param_dtype=dcfg.param_dtype, first_tokens=[int(x) for x in tokens[0, :8]], loop=loop)
            try:
                r.update(decode_kernels(dmodel, prompts, N, loop))
            except Exception as e:  # a figure, not the measurement: never fail the run for it
                r["kernels_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if note:
                r["note"] = note
            emit(r)
            records.append(r)
    return records


# ------------------------------------------------------------------------------------------------
# torch, in this process (--impl torch) or as a child (--compare)
# ------------------------------------------------------------------------------------------------


def torch_command(setup: dict) -> list[str]:
    cmd = [
        sys.executable, str(HERE / "torch_reference.py"),
        "--config-json", json.dumps(setup["model"]), "--optim-json", json.dumps(setup["optim"]),
        "--batch-size", str(setup["batch_size"]), "--seq-len", str(setup["seq_len"]),
        "--steps", str(setup["steps"]), "--warmup", str(setup["warmup"]), "--precision", setup["precision"],
        "--device", "cuda" if setup["backend"] == "gpu" else "cpu", "--seed", str(setup["seed"]),
        "--decode" if setup["decode"] else "--no-decode",
        "--decode-batches", ",".join(str(b) for b in setup["decode_batches"]),
        "--prompt-len", str(setup["prompt_len"]), "--new-tokens", str(setup["new_tokens"]),
    ]
    if setup.get("torch_compile"):
        cmd += ["--compile", setup["torch_compile"]]
    if setup.get("cpus"):
        cmd += ["--cpus", str(setup["cpus"])]
    return cmd


def run_child(cmd: list[str], env=None, *, check: bool = True) -> list[dict]:
    """Run a child, pass its JSON lines through (its stderr goes straight to ours), return them parsed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    records = []
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            records.append(rec)
            emit(rec)
    if proc.wait() != 0:
        message = f"benchmark child failed (exit {proc.returncode}): {' '.join(cmd[:2])} ..."
        if check:
            raise SystemExit(message)
        print(message, file=sys.stderr, flush=True)
    return records


def child_env() -> dict:
    env = dict(os.environ)
    # Faked host devices (as in the tests) would only split the CPU between idle devices.
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = flags
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pick(records, what, batch=None):
    for r in records:
        if r.get("what") == what and (batch is None or r.get("batch_size") == batch):
            return r
    return None


def compare(args, passthrough: list[str]) -> dict:
    """tfd_jax and torch in alternating child processes; prints and returns the ``compare`` record."""
    env = child_env()
    rounds = []
    setup = None
    for _ in range(args.rounds):
        jx = run_child([sys.executable, str(Path(__file__).resolve()), "--impl", "tfd_jax", *passthrough], env)
        setup = _pick(jx, "setup")
        if args.torch_compile:
            setup["torch_compile"] = args.torch_compile
        th = run_child(torch_command(setup), env, check=False)  # tfd_jax's numbers stand even if torch fails
        rounds.append((jx, th))

    def ratio(a, b):
        return a / b if a and b else None

    per_round = []
    for jx, th in rounds:
        jt, tt = _pick(jx, "train"), _pick(th, "train")
        if tt is not None and jt is not None and jt.get("peak_flops"):
            tt["mfu"] = tt["tokens_per_s"] * jt["flops_per_token"] / jt["peak_flops"]  # same formula, same device
        dec = {}
        for b in setup["decode_batches"]:
            jd, td = _pick(jx, "decode", b), _pick(th, "decode", b)
            if jd and td:
                dec[str(b)] = ratio(jd["tokens_per_s"], td["tokens_per_s"])
        per_round.append(dict(train=ratio(jt["tokens_per_s"], (tt or {}).get("tokens_per_s")), decode=dec, jt=jt,
                              tt=tt or {}, jx=jx))

    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    train_ratio = med([r["train"] for r in per_round if r["train"]])
    decode_ratio = {str(b): med([r["decode"][str(b)] for r in per_round if r["decode"].get(str(b))])
                    for b in setup["decode_batches"]}
    jt_tps = med([r["jt"]["tokens_per_s"] for r in per_round])
    tt_tps = med([r["tt"]["tokens_per_s"] for r in per_round if r["tt"]])
    jax_mfu = med([r["jt"]["mfu"] for r in per_round if r["jt"].get("mfu") is not None])
    b1 = med([d["tokens_per_s"] for r in per_round for d in [_pick(r["jx"], "decode", 1)] if d])
    out = dict(
        what="compare", preset=setup["preset"], backend=setup["backend"], device=per_round[-1]["jt"]["device"],
        precision=setup["precision"], batch_size=setup["batch_size"], seq_len=setup["seq_len"],
        tfd_jax_tokens_per_s=jt_tps, torch_tokens_per_s=tt_tps,
        tfd_jax_ms_per_step=med([r["jt"]["ms_per_step"] for r in per_round]),
        torch_ms_per_step=med([r["tt"]["ms_per_step"] for r in per_round if r["tt"]]),
        tfd_jax_mfu=jax_mfu, torch_mfu=med([r["tt"]["mfu"] for r in per_round if r["tt"].get("mfu") is not None]),
        ratio=train_ratio, train_ratio=train_ratio, decode_ratio=decode_ratio,
        rounds=len(per_round), train_ratio_per_round=[r["train"] for r in per_round],
        torch_mode=per_round[-1]["tt"].get("mode"),
    )
    b16 = med([d["tokens_per_s"] for r in per_round for d in [_pick(r["jx"], "decode", 16)] if d])
    first = med([c["first_step_s"] for r in per_round for c in [_pick(r["jx"], "compile")] if c])
    out["tfd_jax_first_step_s"] = first
    if setup["backend"] == "gpu":
        t = GPU_TARGETS
        out["checks"] = {
            f"train_ratio>={t['train_ratio_min']}": bool(train_ratio and train_ratio >= t["train_ratio_min"]),
            f"mfu>={t['mfu_min']}": bool(jax_mfu and jax_mfu >= t["mfu_min"]),
            f"decode_b1_tokens_per_s>={t['decode_b1_tokens_per_s_min']:.0f}":
                None if b1 is None else bool(b1 >= t["decode_b1_tokens_per_s_min"]),
            f"decode_b16_tokens_per_s>={t['decode_b16_tokens_per_s_min']:.0f}":
                None if b16 is None else bool(b16 >= t["decode_b16_tokens_per_s_min"]),
            f"first_step_s<={t['first_step_s_max']:.0f}": None if first is None else bool(first <= t["first_step_s_max"]),
        }
    else:
        out["checks"] = {f"train_ratio>={CPU_TARGETS['train_ratio_min']}":
                         bool(train_ratio and train_ratio >= CPU_TARGETS["train_ratio_min"])}
    emit(out)
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: gpt2 on GPU/TPU, shakespeare-cpu on CPU")
    ap.add_argument("--seq-len", type=int, default=None, help="T (default: the preset's)")
    ap.add_argument("--batch-size", type=int, default=None, help="B (default: the preset's)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU/TPU, fp32 on CPU")
    ap.add_argument("--impl", choices=["tfd_jax", "torch"], default="tfd_jax")
    ap.add_argument("--compare", action="store_true", help="run tfd_jax and torch (each in a child process) and print the ratio")
    ap.add_argument("--rounds", type=int, default=1, help="with --compare: alternate the two this many times")
    ap.add_argument("--train", action=argparse.BooleanOptionalAction, default=True, help="measure the training step")
    ap.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True, help="also measure decoding")
    ap.add_argument("--decode-attention-impl", choices=["reference", "xla", "cudnn"], default=None,
                    help="attention for decoding (default: the training one)")
    ap.add_argument("--vocab-pad-multiple", type=int, default=None,
                    help="GPTConfig.vocab_pad_multiple (default: the config's, automatic)")
    ap.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                    help="tfd_jax: run the blocks as one scan (GPTConfig.scan_layers; faster compile)")
    ap.add_argument("--remat", choices=["none", "full", "dots", "dots_no_batch"], default=None,
                    help="tfd_jax: activation checkpointing policy (GPTConfig.remat)")
    ap.add_argument("--logits-dtype", choices=["float32", "bfloat16"], default=None,
                    help="tfd_jax: the dtype the output head writes its logits in (GPTConfig.logits_dtype; "
                         "default float32; bfloat16 halves the [B, T, V] array)")
    ap.add_argument("--embed-grad", choices=["scatter", "sorted"], default=None,
                    help="tfd_jax: how the embedding lookup's gradient is formed (nn.Embed.grad_impl; "
                         "default scatter: a scatter-add; sorted: a sort, then a sorted segment sum)")
    ap.add_argument("--flat-update", action=argparse.BooleanOptionalAction, default=False,
                    help="tfd_jax: the optimizer update over two flat vectors (OptimConfig.flat_update) "
                         "instead of one update per parameter")
    ap.add_argument("--decode-kernel", choices=["xla", "pallas"], default=None,
                    help="tfd_jax: a decoding step's attention over the cache through XLA (the default) or "
                         "JAX's Pallas flash-decoding kernel (MultiHeadAttention.decode_kernel; GPU)")
    ap.add_argument("--decode-loop", choices=["auto", "while", "fixed"], default="auto",
                    help="tfd_jax's decode loop: early-exit while_loop, a loop of known trip count, or the "
                         "library's choice (tfd_jax.decode.decode_loop_kind)")
    ap.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None,
                    help="tfd_jax: self-attention's Q/K/V as one product or (--no-fuse-qkv) three; default: "
                         "the library's choice (one on GPU/TPU, three on CPU)")
    ap.add_argument("--local-rows", action=argparse.BooleanOptionalAction, default=None,
                    help="tfd_jax data-parallel over CPU devices: each device's gradients of its own rows summed "
                         "in one flat all-reduce (make_train_step's local_rows; the Trainer's CPU default), or "
                         "(--no-local-rows) the partitioner's all-reduce of one buffer per parameter")
    ap.add_argument("--steps-per-call", type=int, default=None,
                    help="tfd_jax: this many training steps per jitted call (make_multi_step, one lax.scan); "
                         "the times are per step; default: as tfd-jax train chooses for a long run "
                         "(4 on a CPU, 1 elsewhere)")
    ap.add_argument("--decode-batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: min(context - prompt, 256)")
    ap.add_argument("--attention-impl", choices=["reference", "xla", "cudnn"], default=None,
                    help="default: cudnn on GPU in bf16, else reference (the config's default)")
    ap.add_argument("--torch-compile", choices=["auto", "on", "off"], default=None,
                    help="torch.compile for the torch reference (auto: on CUDA only)")
    ap.add_argument("--cpus", type=int, default=None,
                    help="CPU runs: pin each process to this many CPUs (threads follow); default: all it may use")
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="tfd_jax on a CPU: split it into this many XLA devices and train data-parallel over "
                         "them (batch sharded, parameters replicated); default: one per usable core, as "
                         "tfd-jax does (TFD_JAX_CPU_DEVICES)")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def _pin_cpus(n: int) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if n > len(allowed):
        raise SystemExit(f"--cpus {n}: only {len(allowed)} CPUs are available")
    os.sched_setaffinity(0, allowed[:n])


def _passthrough(argv: list[str]) -> list[str]:
    """The command line minus the options that only the parent of --compare understands."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--compare":
            continue
        if a in ("--rounds", "--impl", "--torch-compile"):
            skip = True
            continue
        if a.startswith(("--rounds=", "--impl=", "--torch-compile=")):
            continue
        out.append(a)
    return out


def main(argv=None) -> list[dict] | dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be >= 1")
    if args.cpus:
        _pin_cpus(args.cpus)  # before any thread pool starts
    if args.compare:
        return compare(args, _passthrough(argv))
    if args.impl == "torch":
        import importlib.util

        import torch

        spec = importlib.util.spec_from_file_location("torch_reference", HERE / "torch_reference.py")
        tr = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tr)
        setup = resolve_setup(args, "gpu" if torch.cuda.is_available() else "cpu")
        emit(dict(impl="torch", what="setup", **setup))
        records = tr.bench_torch(
            setup["model"], setup["batch_size"], setup["seq_len"], setup["steps"], setup["decode"],
            precision=setup["precision"], optim=setup["optim"], compile_mode=args.torch_compile or "auto",
            warmup=setup["warmup"], decode_batches=tuple(setup["decode_batches"]), prompt_len=setup["prompt_len"],
            new_tokens=setup["new_tokens"], seed=setup["seed"],
        )
        for r in records:
            emit(r)
        return records
    from tfd_jax.runtime import set_cpu_devices, set_default_xla_flags

    if args.cpu_devices:  # XLA reads this once, when its CPU backend starts
        if args.cpu_devices < 1:
            raise SystemExit("--cpu-devices must be >= 1")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    set_default_xla_flags()  # before JAX starts its backend, as `tfd-jax` does
    set_cpu_devices()  # and, as it does, one CPU device per core unless --cpu-devices (or XLA_FLAGS) says
    import jax

    setup = resolve_setup(args, jax.default_backend())
    setup["fuse_qkv"] = args.fuse_qkv
    setup["local_rows"] = args.local_rows
    setup["embed_grad"] = args.embed_grad
    setup["decode_kernel"] = args.decode_kernel
    if args.steps_per_call is not None and args.steps_per_call < 1:
        raise SystemExit("--steps-per-call must be >= 1")
    from tfd_jax.nn.transformer import MultiHeadAttention
    from tfd_jax.train import TrainConfig
    from tfd_jax.train.loop import steps_per_call

    # unset: what tfd-jax train picks for a long run here (4 in one CPU process, else 1)
    setup["steps_per_call"] = args.steps_per_call or steps_per_call(TrainConfig(steps=10**6))
    if args.fuse_qkv is not None:  # None: the library's choice (fused off the CPU)
        MultiHeadAttention.fuse_qkv = args.fuse_qkv
    if args.decode_kernel is not None:
        MultiHeadAttention.decode_kernel = None if args.decode_kernel == "xla" else args.decode_kernel
    if args.embed_grad is not None:
        from tfd_jax.nn.layers import Embed

        Embed.grad_impl = args.embed_grad
    import flax

    emit(dict(impl="tfd_jax", what="setup", jax=jax.__version__, flax=flax.__version__,
              xla_flags=os.environ.get("XLA_FLAGS", ""), **setup))
    return bench_tfd_jax(setup)


if __name__ == "__main__":
    main()
