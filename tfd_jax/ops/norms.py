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
    y = standardize(x.astype(jnp.float32), eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


@jax.custom_vjp
def standardize(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``(x - mean) / sqrt(var + eps)`` over the last axis: LayerNorm without scale and bias.

    Its backward pass is written out, ``dx = (g - mean(g) - xhat * mean(g * xhat)) / std``, from
    the saved ``xhat`` and ``1 / std``, as fused LayerNorm kernels do; left to autodiff, XLA
    recomputes the mean and variance inside several backward fusions.
    """
    return _standardize(x, eps)[0]


def _standardize(x, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred * rstd, rstd


def _standardize_fwd(x, eps):
    xhat, rstd = _standardize(x, eps)
    return xhat, (xhat, rstd, jnp.zeros_like(eps))


def _standardize_bwd(res, g):
    xhat, rstd, zero_eps = res  # eps is a constant: no gradient flows to it
    g = g.astype(xhat.dtype)
    dx = (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)) * rstd
    return dx, zero_eps


standardize.defvjp(_standardize_fwd, _standardize_bwd)


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
