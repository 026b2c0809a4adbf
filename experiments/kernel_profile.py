"""Where a training step's (and a decode call's) GPU time goes, kernel by kernel.

    python experiments/kernel_profile.py                    # GPT-2 124M, bf16, T=1024 on a GPU
    python experiments/kernel_profile.py --decode-batch 1   # also one greedy decode call
    python experiments/kernel_profile.py --trace-dir /tmp/trace   # keep the trace (TensorBoard / Perfetto)

Takes ``experiments/bench.py``'s settings (``--preset``, ``--batch-size``, ``--seq-len``,
``--attention-impl``, ...), runs a few steps under ``jax.profiler.trace`` and reads the Perfetto
trace it writes. Prints one JSON object per profiled call: wall time per step, summed kernel
time per step (the gap is launch and host overhead), kernel launches per step, and the kernels
that take the most time, grouped by name.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def kernel_events(trace_dir: str) -> tuple[list[dict], list[str]]:
    """Complete ('X') events on the device's stream threads of the newest Perfetto trace."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pnames, tnames = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pnames[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            tnames[(e["pid"], e["tid"])] = e["args"]["name"]
    out, seen = [], sorted({f"{pnames.get(p, p)} / {t}" for (p, _), t in tnames.items()})
    for e in events:
        if e.get("ph") != "X":
            continue
        pname, tname = pnames.get(e["pid"], ""), tnames.get((e["pid"], e.get("tid")), "")
        if "GPU" in pname.upper() and tname.lower().startswith("stream"):
            out.append(e)
    return out, seen


def summarize(events: list[dict], calls: int, wall_s: float, label: str, top: int) -> dict:
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        rec = by_name[e["name"]]
        rec[0] += e.get("dur", 0.0)
        rec[1] += 1
    total_us = sum(v[0] for v in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "what": label,
        "calls": calls,
        "wall_ms_per_call": wall_s / calls * 1e3,
        "kernel_ms_per_call": total_us / calls / 1e3,
        "launches_per_call": len(events) / calls,
        "top": [
            {"name": name[:120], "ms_per_call": us / calls / 1e3, "share": us / max(total_us, 1e-9), "count_per_call": n / calls}
            for name, (us, n) in rows
        ],
    }


def profile(fn, calls: int, trace_dir: str, label: str, top: int) -> dict:
    import jax

    jax.block_until_ready(fn())  # compile and warm up outside the trace
    jax.block_until_ready(fn())
    sub = os.path.join(trace_dir, label)
    with jax.profiler.trace(sub, create_perfetto_trace=True):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        wall = time.perf_counter() - t
    events, seen = kernel_events(sub)
    rec = summarize(events, calls, wall, label, top)
    if not events:
        rec["no_kernels_found_in"] = seen[:40]
    return rec


def main(argv=None) -> None:
    ap = bench.parser()
    ap.description = __doc__
    ap.add_argument("--calls", type=int, default=5, help="profiled training steps")
    ap.add_argument("--decode-batch", type=int, default=None, help="also profile one greedy decode call at this batch")
    ap.add_argument("--trace-dir", default=None, help="keep the traces here (default: a temporary directory)")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    from tfd_jax.runtime import set_default_xla_flags

    set_default_xla_flags()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    setup = bench.resolve_setup(args, jax.default_backend())
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="tfd_profile_")
    _, state, step_fn, batch = bench.build_train_step(setup)
    holder = {"state": state}
    poison = jnp.float32(1.0)

    def train_call():
        holder["state"], m = step_fn(holder["state"], batch, poison)
        return m

    info = dict(preset=setup["preset"], batch_size=setup["batch_size"], seq_len=setup["seq_len"],
                precision=setup["precision"], attention_impl=setup["attention_impl"], device=str(jax.devices()[0].device_kind))
    print(json.dumps(dict(info, **profile(train_call, args.calls, trace_dir, "train_step", args.top))), flush=True)
    del holder, state

    if args.decode_batch:
        from tfd_jax.decode import generate
        from tfd_jax.models import GPT, GPTConfig

        cfg = GPTConfig.from_dict(setup["model"])
        dmodel = GPT(cfg.replace(param_dtype=cfg.dtype, dropout=0.0, embed_dropout=0.0), rngs=nnx.Rngs(0))
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(args.decode_batch, setup["prompt_len"]), dtype=np.int32)
        n = setup["new_tokens"]

        def decode_call():
            return generate(dmodel, prompts, n, temperature=0.0, seed=0)[0]

        rec = profile(decode_call, 1, trace_dir, f"decode_b{args.decode_batch}", args.top)
        rec["new_tokens"] = n
        rec["kernel_ms_per_token"] = rec["kernel_ms_per_call"] / n
        rec["wall_ms_per_token"] = rec["wall_ms_per_call"] / n
        rec["launches_per_token"] = rec["launches_per_call"] / n
        print(json.dumps(dict(info, **rec)), flush=True)
    print(json.dumps({"trace_dir": trace_dir}), flush=True)


if __name__ == "__main__":
    main()
