"""Process-wide settings that must be in place before JAX starts its backends.

:func:`set_default_xla_flags` adds the XLA flags that help transformer training on NVIDIA GPUs to
the ``XLA_FLAGS`` environment variable, each one only when the user has not set that flag
themselves. XLA reads ``XLA_FLAGS`` once, when the first backend starts (the first array or
``jax.devices()`` call), so this runs first thing in ``tfd-jax`` and in ``experiments/bench.py``;
in your own code call it before any JAX computation. Set ``TFD_JAX_XLA_FLAGS=0`` to leave
``XLA_FLAGS`` exactly as it is.

The flags are GPU-only options: other backends parse and ignore them.
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
