"""Language-model losses and their read-outs (Chapter 11).

Shape letters: B batch, T positions, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-ln softmax(logits)[target]`` at every position, in float32.

    Args:
      logits: ``[..., V]`` (any float dtype; upcast to float32); targets: int ``[...]``.
    Returns:
      float32 ``[...]``. The course's example: P(pizza) = 0.012 gives 4.423.
    """
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - picked


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    z_loss: float = 0.0,
) -> jax.Array:
    """Mean next-token cross-entropy over the positions where ``mask`` is True.

    Args:
      logits: ``[B, T, V]`` (or any ``[..., V]``); targets: int ``[B, T]``.
      mask: bool/0-1 ``[B, T]``; False marks positions to ignore (padding, prompts). None = all.
      z_loss: optional weight of ``logsumexp(logits)^2`` (keeps logits from drifting; PaLM).
    Returns:
      float32 scalar. With every position masked out the result is 0, not NaN.
    """
    losses = token_cross_entropy(logits, targets)
    if z_loss:
        losses = losses + z_loss * jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of (unmasked) positions where the argmax equals the target: float32 scalar."""
    hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    if mask is None:
        return jnp.mean(hit)
    mask = mask.astype(jnp.float32)
    return jnp.sum(hit * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def perplexity(mean_loss: jax.Array) -> jax.Array:
    """``exp(loss)``: the effective number of equally likely choices per token."""
    return jnp.exp(mean_loss)
