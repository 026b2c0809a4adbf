"""Process-wide settings that must be in place before JAX starts its backends.

:func:`set_default_xla_flags` adds the XLA flags that help transformer training on NVIDIA GPUs to
the ``XLA_FLAGS`` environment variable, each one only when the user has not set that flag
themselves. XLA reads ``XLA_FLAGS`` once, when the first backend starts (the first array or
``jax.devices()`` call), so this runs first thing in ``tfd-jax`` and in ``experiments/bench.py``;
in your own code call it before any JAX computation. Set ``TFD_JAX_XLA_FLAGS=0`` to leave
``XLA_FLAGS`` exactly as it is.

The flags are GPU-only options: other backends parse and ignore them.

:func:`set_cpu_devices` gives the CPU backend one XLA device per core this process may use, so
that CPU training runs data-parallel over the cores (the Trainer's mesh covers every device). XLA:CPU
spreads one program's many small operations over the cores poorly: the Shakespeare CPU step takes
about 31 ms over two devices against 38 ms on one, on a 2-core Xeon (``experiments/bench.py
--cpu-devices``). A program on one device (decoding, your own code) runs as fast as before: the
devices share the process's thread pool. ``TFD_JAX_CPU_DEVICES=N`` sets the count (1: one device);
a device count already in ``XLA_FLAGS`` (``--xla_force_host_platform_device_count``) or in
``JAX_NUM_CPU_DEVICES`` is left as it is, and so is a multi-process job's.
"""
from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

#: flag name -> value, with why each one is here
GPU_XLA_FLAGS: dict[str, str] = {
    # Let the scheduler move collectives (all-reduce of gradients, FSDP all-gathers) so they run
    # while the next matmuls compute, instead of in between them. Matters with several GPUs.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
}


def _set_flags(flags: str) -> set[str]:
    """Names of the flags already in an ``XLA_FLAGS`` string (``--name`` or ``--name=value``)."""
    return set(re.findall(r"--([A-Za-z0-9_]+)", flags))


def set_default_xla_flags(env: MutableMapping[str, str] | None = None) -> list[str]:
    """Add :data:`GPU_XLA_FLAGS` to ``XLA_FLAGS`` where the user has not set them.

    Args:
      env: the environment to change (default ``os.environ``).
    Returns:
      the ``--name=value`` strings added (empty when all were set already or
      ``TFD_JAX_XLA_FLAGS=0``).
    """
    env = os.environ if env is None else env
    if env.get("TFD_JAX_XLA_FLAGS", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    current = env.get("XLA_FLAGS", "")
    have = _set_flags(current)
    added = [f"--{name}={value}" for name, value in GPU_XLA_FLAGS.items() if name not in have]
    if added:
        env["XLA_FLAGS"] = " ".join(([current.strip()] if current.strip() else []) + added)
    return added


#: the CPU device count :func:`set_cpu_devices` chose in this process (None: it chose none), so the
#: Trainer knows it may train on fewer of them when the batch does not split over all
AUTO_CPU_DEVICES: int | None = None

_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity masks (macOS)
        return max(1, os.cpu_count() or 1)


def set_cpu_devices(env: MutableMapping[str, str] | None = None) -> int | None:
    """Split the CPU backend into one XLA device per usable core, before JAX starts it.

    Args:
      env: the environment to change (default ``os.environ``).
    Returns:
      the device count set, or None when the user's (or a multi-process job's) setting stands.
    Raises:
      ValueError: ``TFD_JAX_CPU_DEVICES`` is not a positive whole number.
    """
    global AUTO_CPU_DEVICES
    env = os.environ if env is None else env
    current = env.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG in _set_flags(current) or env.get("JAX_NUM_CPU_DEVICES"):
        return None
    if any(env.get(k) for k in ("JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS")):
        return None  # each process of a multi-process job keeps what its launcher gave it
    asked = env.get("TFD_JAX_CPU_DEVICES", "").strip()
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise ValueError(f"TFD_JAX_CPU_DEVICES must be a positive whole number (1: one CPU device), got {asked!r}")
        n = int(asked)
    else:
        n = usable_cores()
    env["XLA_FLAGS"] = " ".join(([current.strip()] if current.strip() else []) + [f"--{_DEVICE_COUNT_FLAG}={n}"])
    AUTO_CPU_DEVICES = n
    return n
