"""What machine a measurement ran on, for the JSON the experiments print: the accelerator's kind, or
the CPU model from ``lscpu`` (CPU speed ratios differ between processors)."""
from __future__ import annotations

import platform
import subprocess


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform != "cpu":
        return d.device_kind
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"
