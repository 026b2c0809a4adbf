"""XLA:CPU options against the library's training step, one fresh process per setting and round.

    python experiments/cpu_flags.py                 # the default list below
    python experiments/cpu_flags.py --setting xla_cpu_prefer_vector_width=512 \\
        --setting "xla_cpu_use_xnnpack=true xla_cpu_multi_thread_eigen=false"

Each setting's step is timed by ``bench.py --preset shakespeare-cpu --no-decode`` (batch 12 x 64, fp32)
in a process of its own, since XLA reads ``XLA_FLAGS`` once per process; the setting replaces any
``XLA_FLAGS`` of the caller's. The settings take turns round by round, so a machine that drifts
affects them alike. One JSON line per setting: the flags, the CPU model, compile plus first step,
ms per step in each round and their minimum, and the speedup against no flags at all (> 1 is
faster). A flag the installed XLA does not know is reported as an error, not a crash of the sweep.
Run it on each processor you care about: an option that pays on one CPU can cost on another.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


def time_step(flags: str, steps: int) -> dict:
    """One ``bench.py`` run of the library's CPU step under ``flags``: its train record, or an error."""
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, str(HERE / "bench.py"), "--preset", "shakespeare-cpu", "--no-decode",
           "--steps", str(steps), "--warmup", str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    records = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    train = next((r for r in records if r.get("what") == "train"), None)
    first = next((r for r in records if r.get("what") == "compile"), {})
    if proc.returncode or train is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {proc.returncode}"}
    return {"first_step_s": first.get("first_step_s"), "ms_per_step": train["ms_per_step"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", action="append", default=None, metavar="NAME=VALUE[ NAME=VALUE ...]",
                    help="XLA flags to try together, without their leading dashes; repeat for more settings "
                         "(default: a list of CPU options, one at a time)")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each setting, taking turns")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run (as many untimed first)")
    args = ap.parse_args()
    if args.setting is None:
        settings = list(DEFAULT_FLAGS)
    else:
        settings = [" ".join("--" + f.lstrip("-") for f in s.split()) for s in args.setting]
    if "" not in settings:
        settings = [""] + settings  # the baseline every speedup is measured against
    runs: dict[str, list[dict]] = {flags: [] for flags in settings}
    for _ in range(args.rounds):
        for flags in settings:
            runs[flags].append(time_step(flags, args.steps))
    base = None
    for flags in settings:
        rec = dict(what="cpu_flags", flags=flags, cpu=cpu_model(), cores=os.cpu_count())
        errors = [r["error"] for r in runs[flags] if "error" in r]
        if errors:
            rec["error"] = errors[0]
        else:
            times = [r["ms_per_step"] for r in runs[flags]]
            rec.update(first_step_s=min(r["first_step_s"] or 0.0 for r in runs[flags]) or None,
                       ms_per_step=times, ms_per_step_min=min(times))
            if flags == "":
                base = rec["ms_per_step_min"]
            if base:
                rec["speedup"] = base / rec["ms_per_step_min"]
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
