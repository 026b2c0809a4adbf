"""Mixed precision (Chapter 15): which dtype computes, and dynamic loss scaling for float16.

- ``fp32``: everything in float32.
- ``bf16``: float32 parameters and optimizer state, bfloat16 matmuls, float32 norms, softmax, logits
  and loss. bfloat16 has float32's exponent range, so no loss scaling is needed. The default on GPU/TPU.
- ``fp16``: as bf16 but float16, whose small range (max 65,504; smallest normal 6.1e-5) needs the
  loss multiplied up before differentiation and the gradients divided back. The scale is dynamic:
  halved whenever gradients overflow (that step is skipped) and doubled after ``growth_interval``
  clean steps. The course's Chapter 15 uses a fixed x1024.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def compute_dtype(precision: str) -> str:
    """The model's compute dtype name for a precision policy."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}") from None


def default_precision() -> str:
    """bf16 on GPU/TPU, fp32 on CPU (where bf16 matmuls are emulated and slow)."""
    return "fp32" if jax.default_backend() == "cpu" else "bf16"


def initial_loss_scale(precision: str) -> jax.Array:
    return jnp.asarray(2.0**15 if precision == "fp16" else 1.0, jnp.float32)


def update_loss_scale(
    scale: jax.Array, good_steps: jax.Array, finite: jax.Array, *, growth_interval: int = 2000
) -> tuple[jax.Array, jax.Array]:
    """Dynamic loss scaling: halve on overflow, double after ``growth_interval`` finite steps."""
    grow = good_steps + 1 >= growth_interval
    new_scale = jnp.where(finite, jnp.where(grow, scale * 2.0, scale), jnp.maximum(scale / 2.0, 1.0))
    new_good = jnp.where(finite & ~grow, good_steps + 1, 0)
    return new_scale, new_good.astype(jnp.int32)


def all_finite(tree) -> jax.Array:
    """True if every element of every leaf is finite: a scalar bool array."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)
