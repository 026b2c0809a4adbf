"""Position-wise feed-forward networks (Chapter 7).

Shape letters: M model width, F hidden width (the course uses F = 4M = 24).
"""
from __future__ import annotations

from typing import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    # GPT-2's "gelu_new": the tanh approximation.
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
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
