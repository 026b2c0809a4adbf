"""Test setup: eight fake CPU devices, float32 matmuls at full precision.

The flag must be set before JAX initialises its backends, which is why it lives here and not in a
fixture.
"""
import os
import sys

# Shared test helpers (tests/fastjit.py) import as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
