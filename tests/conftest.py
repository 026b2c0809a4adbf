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

# Many tests compile the same small programs again (a resumed run, a subprocess): a persistent
# compilation cache, inherited by subprocesses through the environment, compiles each once.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tfd_jax_test_xla_cache"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
