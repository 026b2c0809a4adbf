"""Position-wise feed-forward networks (Chapter 7).

Shape letters: M model width, F hidden width (the course uses F = 4M = 24).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def _gelu_tanh_slope(x: jax.Array) -> jax.Array:
    """d/dx of ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``.

    Written with ``s = sigmoid(2u) = (1 + tanh(u)) / 2``: ``s + 2 x s (1 - s) u'``. The tanh form
    loses ``1 - tanh(u)^2`` to cancellation in float32 for large ``|x|``; this one does not.
    """
    s = jax.nn.sigmoid(2.0 * _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x**3))
    return s + 2.0 * x * s * (1.0 - s) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)


def _gelu_slope(x: jax.Array) -> jax.Array:
    """d/dx of ``x Phi(x)``: ``Phi(x) + x phi(x)``."""
    return 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0))) + x * jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _silu_slope(x: jax.Array) -> jax.Array:
    """d/dx of ``x sigmoid(x)``: ``s (1 + x (1 - s))``."""
    s = jax.nn.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _with_slope(f: Callable[[jax.Array], jax.Array], slope: Callable[[jax.Array], jax.Array]):
    """``f`` whose derivative is ``slope``, computed in float32 (or wider) and kept in the input's dtype.

    Left to autodiff, a formula like GELU's keeps several of its intermediates (``x^3``, ``tanh``,
    ...) from the forward pass for the backward one, each as large as the FFN's hidden layer
    ``[B, T, F]``. With the derivative written out, the backward pass needs one such tensor, the
    slope, and every transformation (grad, jvp, vmap) still works.
    """

    @jax.custom_jvp
    def act(x):
        return f(x)

    @act.defjvp
    def act_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return f(x), t * slope(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(t.dtype)

    return act


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": _with_slope(lambda x: jax.nn.gelu(x, approximate=False), _gelu_slope),
    # GPT-2's "gelu_new": the tanh approximation.
    "gelu_tanh": _with_slope(lambda x: jax.nn.gelu(x, approximate=True), _gelu_tanh_slope),
    "silu": _with_slope(jax.nn.silu, _silu_slope),
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by name (``relu``, ``gelu``, ``gelu_tanh``, ``silu``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w [K, N]`` -> ``[..., N]``, as one 2-D product over the flattened leading dims.

    The same numbers as ``x @ w``. Handing XLA a plain ``[rows, K] x [K, N]`` product makes its CPU
    backend run the product and its weight gradient ``x^T g`` without transposing copies: about 7%
    off a training step of the Shakespeare CPU model (measured on CPU only). The reshapes merge
    contiguous leading dims, so they move no data on any backend.
    """
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def feed_forward(
    x: jax.Array,
    w_in: jax.Array,
    b_in: jax.Array | None,
    w_out: jax.Array,
    b_out: jax.Array | None,
    activation: str = "relu",
) -> jax.Array:
    """``act(x W_in + b_in) W_out + b_out``, applied to every position independently.

    Args:
      x: ``[..., M]``; w_in: ``[M, F]``; b_in: ``[F]`` or None; w_out: ``[F, M]``; b_out: ``[M]`` or None.
      activation: ``relu`` (the course), ``gelu``, ``gelu_tanh`` (GPT-2) or ``silu``.
    Returns:
      ``[..., M]``.
    """
    h = dense(x, w_in)
    if b_in is not None:
        h = h + b_in
    h = activation_fn(activation)(h)
    y = dense(h, w_out)
    if b_out is not None:
        y = y + b_out
    return y


def gated_feed_forward(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    activation: str = "silu",
) -> jax.Array:
    """Gated FFN, ``(act(x W_gate) * (x W_up)) W_down``; with ``silu`` this is SwiGLU.

    A "modern variation" the course names at the end of Chapter 7. No biases, as in LLaMA.

    Args:
      x: ``[..., M]``; w_gate, w_up: ``[M, F]``; w_down: ``[F, M]``.
    Returns:
      ``[..., M]``.
    """
    return dense(activation_fn(activation)(dense(x, w_gate)) * dense(x, w_up), w_down)
