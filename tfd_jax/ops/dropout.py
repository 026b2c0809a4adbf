"""Inverted dropout (Chapter 6)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, *, deterministic: bool = False) -> jax.Array:
    """Zero each element with probability ``rate`` and scale the survivors by ``1 / (1 - rate)``.

    The scaling keeps the expected value unchanged, so nothing needs rescaling at inference
    (the course's example: p = 0.1 turns 0.25 into 0.278). Identity when ``rate == 0`` or
    ``deterministic``.

    Args:
      x: any shape; rate: drop probability in [0, 1); rng: a PRNG key (unused when identity).
    Returns:
      same shape and dtype as ``x``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout with rate > 0 needs an rng key (or deterministic=True)")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))
