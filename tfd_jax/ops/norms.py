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
    M = x.shape[-1]
    scale = jnp.ones((M,), jnp.float32) if scale is None else _features(scale, M, "scale")
    bias = jnp.zeros((M,), jnp.float32) if bias is None else _features(bias, M, "bias")
    return _layer_norm(x, scale, bias, eps)


def _features(p: jax.Array, M: int, name: str) -> jax.Array:
    """A per-feature parameter as ``[M]`` (``[1, 1, M]`` and the like are accepted)."""
    if p.size != M or (p.ndim and p.shape[-1] != M):
        raise ValueError(f"layer_norm: {name} must have shape [{M}] (the input's last axis), got {p.shape}")
    return p.reshape(M)


# The backward pass is written out, as fused LayerNorm kernels do, with xhat = (x - mean) / std and
# gs = g * scale:
#   dx = (gs - mean(gs) - xhat * mean(gs * xhat)) / std,  dscale = sum(g * xhat),  dbias = sum(g).
# Left to autodiff, XLA recomputes the mean and variance inside several backward fusions, and the
# scale's gradient keeps the float32 xhat from the forward pass. Here the backward keeps x in its
# own dtype (half the bytes of xhat under bf16), the per-row mean and 1 / std, and rebuilds xhat.


@jax.custom_vjp
def _layer_norm(x, scale, bias, eps):
    return _affine(_standardize(x, eps)[0], scale, bias, x.dtype)


def _affine(xhat, scale, bias, dtype):
    return (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def _standardize(x, eps):
    """float32 ``(xhat, mean, 1/std)`` over the last axis of ``x`` (any float dtype)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
    return centred * rstd, mean, rstd


def _layer_norm_fwd(x, scale, bias, eps):
    xhat, mean, rstd = _standardize(x, eps)
    return _affine(xhat, scale, bias, x.dtype), (x, scale, bias, mean, rstd, jnp.zeros_like(eps))


def _layer_norm_bwd(res, g):
    x, scale, bias, mean, rstd, zero_eps = res  # eps is a constant: no gradient flows to it
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = g.astype(jnp.float32)
    gs = g * scale.astype(jnp.float32)
    dx = (gs - jnp.mean(gs, axis=-1, keepdims=True) - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)) * rstd
    rows = tuple(range(g.ndim - 1))
    dscale = jnp.sum(g * xhat, axis=rows).astype(scale.dtype)
    dbias = jnp.sum(g, axis=rows).astype(bias.dtype)
    return dx.astype(x.dtype), dscale, dbias, zero_eps


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


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
