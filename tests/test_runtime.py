"""tfd_jax.runtime: the GPU XLA flags are added only where the user has not set them, and the CPU
backend gets one device per core unless a count was chosen already."""
import os
import subprocess
import sys

import pytest

from tfd_jax import runtime
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


# -- one CPU device per core ----------------------------------------------------------------------


@pytest.fixture
def no_auto(monkeypatch):
    monkeypatch.setattr(runtime, "AUTO_CPU_DEVICES", None)


def test_cpu_devices_one_per_usable_core(no_auto):
    env = {"XLA_FLAGS": "--foo=1"}
    assert runtime.set_cpu_devices(env) == runtime.usable_cores() == runtime.AUTO_CPU_DEVICES
    assert env["XLA_FLAGS"].split() == ["--foo=1", f"--xla_force_host_platform_device_count={runtime.usable_cores()}"]
    env = {"TFD_JAX_CPU_DEVICES": "3"}
    assert runtime.set_cpu_devices(env) == 3 and env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=3"


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},  # the user's count
    {"JAX_NUM_CPU_DEVICES": "4"},
    {"JAX_NUM_PROCESSES": "2", "TFD_JAX_CPU_DEVICES": "2"},  # a multi-process job's launcher decides
], ids=["xla-flags", "jax-num-cpu-devices", "multi-process"])
def test_cpu_devices_leave_a_count_already_chosen(no_auto, env):
    before = dict(env)
    assert runtime.set_cpu_devices(env) is None and env == before and runtime.AUTO_CPU_DEVICES is None


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_cpu_devices_bad_setting_says_what_to_write(no_auto, bad):
    with pytest.raises(ValueError, match="TFD_JAX_CPU_DEVICES must be a positive whole number"):
        runtime.set_cpu_devices({"TFD_JAX_CPU_DEVICES": bad})


def test_cpu_backend_starts_with_one_device_per_core():
    code = ("from tfd_jax.runtime import set_cpu_devices, usable_cores; n = set_cpu_devices(); import jax; "
            "print(n, usable_cores(), jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TFD_JAX_CPU_DEVICES")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n, cores, devices = map(int, out.stdout.split())
    assert n == cores == devices


def test_cli_reports_a_bad_cpu_device_count(monkeypatch, capsys, no_auto):
    from tfd_jax.cli import main

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("TFD_JAX_CPU_DEVICES", "lots")
    assert main(["train", "--help"]) == 2
    assert "TFD_JAX_CPU_DEVICES must be a positive whole number" in capsys.readouterr().err
