"""XLA:CPU options against the library's training step, one fresh process per setting.

    python experiments/cpu_flags.py                 # the default list below
    python experiments/cpu_flags.py --setting xla_cpu_prefer_vector_width=512 \
        --setting "xla_cpu_use_xnnpack=true xla_cpu_multi_thread_eigen=false"

Each setting is timed on the Shakespeare CPU config of ``bench.py`` (batch 12 x 64, fp32) in its own
process, since XLA reads ``XLA_FLAGS`` once per process. One JSON line per setting: the flags, the
CPU model, compile plus first step, ms per step for each round and their minimum, and the speedup
against the run with no flags (> 1 is faster). A flag the installed XLA does not know is reported
as an error, not a crash of the sweep. Run it on each processor you care about: an option that pays
on one CPU can cost on another.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

DEFAULT_FLAGS = [
    "",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_multi_thread_eigen=false",
]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def child(rounds: int, steps: int) -> None:
    """Time the library's step in this process and print one JSON line."""
    sys.path.insert(0, str(HERE))
    import bench
    import jax

    from tfd_jax.models import GPTConfig

    p = bench.PRESETS["shakespeare-cpu"]
    cfg = GPTConfig.preset(p["preset"], **p["overrides"])
    setup = dict(model=cfg.to_dict(), batch_size=p["batch_size"], seq_len=p["seq_len"], precision="fp32",
                 seed=0, optim=p["optim"], steps=rounds * steps, warmup=2 * steps)
    _, state, step, batch = bench.build_train_step(setup, cfg)
    ok = jax.numpy.float32(1.0)  # the step's fault-injection input, as bench.py passes it: no fault
    t0 = time.perf_counter()
    state, m = step(state, batch, ok)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    for _ in range(2 * steps):  # warm caches and the thread pool before timing
        state, m = step(state, batch, ok)
    jax.block_until_ready(m)
    per_round = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch, ok)
        jax.block_until_ready(m)
        per_round.append((time.perf_counter() - t) / steps * 1e3)
    print(json.dumps(dict(first_step_s=first, ms_per_step=per_round, ms_per_step_min=min(per_round))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", default=None, metavar="NAME=VALUE[ NAME=VALUE ...]",
                    help="XLA flags to try together, without their leading dashes; repeat for more settings "
                         "(default: a list of CPU options, one at a time)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.rounds, args.steps)
    if args.setting is None:
        settings = DEFAULT_FLAGS
    else:
        settings = [" ".join("--" + f.lstrip("-") for f in s.split()) for s in args.setting]
    if "" not in settings:
        settings = [""] + settings  # the baseline every speedup is measured against
    base = None
    for flags in settings:
        env = dict(os.environ, XLA_FLAGS=flags, TFD_JAX_XLA_FLAGS="0")
        proc = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds), "--steps", str(args.steps)],
                              env=env, capture_output=True, text=True)
        rec = dict(what="cpu_flags", flags=flags, cpu=cpu_model(), cores=os.cpu_count())
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            rec["error"] = tail[-1] if tail else f"exit {proc.returncode}"
        else:
            rec.update(json.loads(lines[-1]))
            if flags == "":
                base = rec["ms_per_step_min"]
            if base:
                rec["speedup"] = base / rec["ms_per_step_min"]
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
