"""tfd_jax.runtime: the GPU XLA flags are added only where the user has not set them."""
import os
import subprocess
import sys

from tfd_jax.runtime import GPU_XLA_FLAGS, set_default_xla_flags


def test_adds_every_flag_to_an_empty_environment():
    env = {}
    added = set_default_xla_flags(env)
    assert len(added) == len(GPU_XLA_FLAGS) > 0
    for name, value in GPU_XLA_FLAGS.items():
        assert f"--{name}={value}" in env["XLA_FLAGS"].split()


def test_keeps_the_users_flags_and_their_values():
    name = next(iter(GPU_XLA_FLAGS))
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 --{name}=false"}
    set_default_xla_flags(env)
    words = env["XLA_FLAGS"].split()
    assert words[:2] == ["--xla_force_host_platform_device_count=8", f"--{name}=false"]
    assert f"--{name}={GPU_XLA_FLAGS[name]}" not in words  # the user's value wins
    assert set_default_xla_flags(env) == []  # and a second call adds nothing


def test_opt_out_leaves_xla_flags_alone():
    env = {"TFD_JAX_XLA_FLAGS": "0", "XLA_FLAGS": "--foo=1"}
    assert set_default_xla_flags(env) == []
    assert env == {"TFD_JAX_XLA_FLAGS": "0", "XLA_FLAGS": "--foo=1"}


def test_cpu_backend_starts_with_the_flags():
    """The GPU flags are known to every XLA build, so a CPU-only JAX starts with them set."""
    env = {}
    set_default_xla_flags(env)
    code = "import jax, jax.numpy as jnp; print(float(jnp.arange(4.0).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "6.0"
