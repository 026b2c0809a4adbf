"""Shared pieces of the training-run tests: a tiny corpus, a tiny run's settings, its command line."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tfd_jax.train import TrainConfig
from tfd_jax.train.metrics import read_metrics

# A two-layer model on a character tokenizer: each run compiles in seconds.
TINY = dict(
    tokenizer="char",
    preset="tiny",
    model_overrides={"d_model": 32, "num_heads": 2, "num_layers": 2, "context_length": 32},
    batch_size=8,
    seq_len=16,
    max_bytes=None,
    log_every=1,
    eval_every=5,
    eval_batches=2,
    ckpt_every=5,
    samples=0,
    progress=False,
)

MODEL_FLAGS = [f for k, v in TINY["model_overrides"].items() for f in ("--model", f"{k}={v}")]


def write_corpus(path, words=6000, seed=0) -> str:
    rng = np.random.default_rng(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", ":", "\n"]
    path.write_text(" ".join(rng.choice(vocab, size=words)))
    return str(path)


def cfg(corpus, out, **kw) -> TrainConfig:
    return TrainConfig(**{"data": corpus, "out": str(out), **TINY, **kw})


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def cli_args(corpus, out, *, steps, **flags) -> list[str]:
    """``python -m tfd_jax.cli train ...`` for the TINY run; ``flags`` override (``log_every=1``)."""
    base = {"log_every": 1, "eval_every": 5, "eval_batches": 2, "ckpt_every": 5}
    base.update(flags)
    args = [sys.executable, "-m", "tfd_jax.cli", "train", "--data", str(corpus), "--out", str(out),
            "--tokenizer", "char", "--preset", "tiny", "--batch-size", "8", "--seq-len", "16", "--max-bytes", "0",
            "--samples", "0", "--no-progress", "--steps", str(steps), *MODEL_FLAGS]
    for k, v in base.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def one_device_env() -> dict:
    """A subprocess with one CPU device (compiles and starts faster than eight), caching every
    compiled program so the next process of a test skips compilation."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def run_cli(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env or one_device_env(), capture_output=True, text=True, timeout=timeout)


def truncate_biggest_tensor_file(step_dir: Path, keep: float = 0.5) -> Path:
    """Cut the largest tensor file of a checkpoint step directory to ``keep`` of its size."""
    biggest = max((p for p in Path(step_dir).rglob("*") if p.is_file() and "ocdbt" in str(p)),
                  key=lambda p: p.stat().st_size)
    os.truncate(biggest, int(biggest.stat().st_size * keep))
    return biggest


def finished_checkpoints(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoints in ``ckpt_dir`` that finished writing."""
    return sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / "files.json").exists())


def reference_and_killed_run(reference_args: list[str], killed_args: list[str], run_dir: Path, *,
                             checkpoints: int = 2, timeout: float = 300) -> tuple[str, str]:
    """Run ``reference_args`` to the end while ``killed_args`` (training into ``run_dir``) runs beside
    it until ``checkpoints`` checkpoints have finished, is killed with SIGKILL and is resumed with
    ``--resume``. Returns the reference's and the resumed run's output; fails on any other ending."""
    import signal
    import time

    env = one_device_env()
    reference = subprocess.Popen(reference_args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = subprocess.Popen(killed_args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while killed.poll() is None and time.time() < deadline:
        if (run_dir / "checkpoints").exists() and len(finished_checkpoints(run_dir / "checkpoints")) >= checkpoints:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    out = killed.communicate(timeout=timeout)[0]
    assert killed.returncode == -signal.SIGKILL, out
    resumed = subprocess.run([*killed_args, "--resume"], env=env, capture_output=True, text=True, timeout=timeout)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stdout
    ref_out = reference.communicate(timeout=timeout)[0]
    assert reference.returncode == 0, ref_out
    return ref_out, resumed.stdout


def resumed_equals_reference(reference_args: list[str], killed_args: list[str], ref_dir: Path, run_dir: Path,
                             steps: int, metrics: tuple[str, ...] = ()) -> tuple[list[dict], str]:
    """:func:`reference_and_killed_run`, then check that the resumed run logged every step
    ``1..steps`` with the reference's loss (and ``metrics``) exactly; returns the reference's records
    and the resumed run's output."""
    import pytest

    _, resumed = reference_and_killed_run(reference_args, killed_args, run_dir)
    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for a, b in zip(ref[:steps], got):
        for name in ("loss", *metrics):
            assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), (name, a["step"])
    return ref, resumed
