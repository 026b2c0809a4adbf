"""What the ``colab/`` notebooks share: test mode, sizes that follow the devices, where runs go.

The notebooks run on a Colab TPU (8 devices on a v2-8, one on a v5e-1), a GPU or a CPU, unchanged:
every batch is a multiple of ``len(jax.devices())`` and training runs shard their batch over all of
them. ``TFD_NOTEBOOK_TEST=1`` shrinks models and steps so that the test suite can execute every
notebook on a CPU in seconds; ``TFD_NOTEBOOK_OUT`` says where their runs go (default
``runs/notebooks`` under the working directory).
"""
from __future__ import annotations

import os
from pathlib import Path

TEST_ENV = "TFD_NOTEBOOK_TEST"
OUT_ENV = "TFD_NOTEBOOK_OUT"


def test_mode() -> bool:
    """True when ``TFD_NOTEBOOK_TEST`` is set to anything but ``0`` or empty."""
    return os.environ.get(TEST_ENV, "") not in ("", "0")


def pick(full, test):
    """``test`` in test mode, ``full`` otherwise (a notebook's steps, sizes, sample counts)."""
    return test if test_mode() else full


def device_count() -> int:
    import jax

    return jax.device_count()


def batch_size(at_least: int) -> int:
    """The smallest multiple of the device count that is ``>= at_least``: a global batch that every
    device gets an equal share of (16 stays 16 on 1, 2, 4 or 8 devices; 2 becomes 8 on 8)."""
    if at_least < 1:
        raise ValueError(f"at_least must be >= 1, got {at_least}")
    n = device_count()
    return -(-at_least // n) * n


def run_dir(name: str) -> Path:
    """Where a notebook's training run ``name`` goes: ``$TFD_NOTEBOOK_OUT/name`` or ``runs/notebooks/name``."""
    return Path(os.environ.get(OUT_ENV) or "runs/notebooks") / name


def summary() -> str:
    """One line about where the notebook runs: devices, their kind, test mode."""
    import jax

    devices = jax.devices()
    kind = devices[0].device_kind
    mode = " - test mode (small models, few steps)" if test_mode() else ""
    return f"{len(devices)} x {jax.default_backend()} device ({kind}), JAX {jax.__version__}{mode}"


def offline_gpt2(directory: str | os.PathLike, *, num_layers: int = 2, d_model: int = 64, num_heads: int = 4,
                 seed: int = 0) -> Path:
    """A stand-in for the Hub's ``gpt2`` where there is no network (test mode): a randomly initialised
    GPT-2-shaped model written as Hugging Face files (``config.json``, ``model.safetensors``) with a
    byte-level tokenizer (``vocab.json``: the 256 byte symbols and ``<|endoftext|>``, no merges).
    Everything that reads the real ``gpt2`` reads this the same way."""
    import json

    from flax import nnx

    from tfd_jax.interop import save_hf_gpt2
    from tfd_jax.models import GPT, GPTConfig
    from tfd_jax.tokenizers.bytelevel import bytes_to_unicode

    directory = Path(directory)
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    vocab["<|endoftext|>"] = 256
    cfg = GPTConfig.preset("gpt2", vocab_size=len(vocab), context_length=256, d_model=d_model,
                           num_heads=num_heads, num_layers=num_layers)
    save_hf_gpt2(GPT(cfg, rngs=nnx.Rngs(seed)), directory, overwrite=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return directory
