"""Normalisation layers as pure functions (Chapter 8, Part 3).

Both normalise over the last (feature) axis and compute in float32, whatever the input dtype, then
cast back: this is where bf16 training keeps full precision.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float = 1e-5) -> jax.Array:
    """``scale * (x - mean) / sqrt(var + eps) + bias`` over the last axis.

    As in the course: population variance (divide by M, not M - 1) and ``eps`` inside the square
    root. The course's example: mean 0.36, variance 0.2649, std 0.5147.

    Args:
      x: ``[..., M]``; scale, bias: ``[M]`` or None (1 and 0).
    Returns:
      ``[..., M]`` in ``x``'s dtype.
    """
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float = 1e-6) -> jax.Array:
    """``scale * x / sqrt(mean(x^2) + eps)`` over the last axis (no centring, no bias).

    Args:
      x: ``[..., M]``; scale: ``[M]`` or None.
    Returns:
      ``[..., M]`` in ``x``'s dtype.
    """
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)
