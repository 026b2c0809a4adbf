"""Flax NNX layers: each owns its parameters and calls one pure function from ``tfd_jax.ops``.

Parameters are stored in ``param_dtype`` (float32) and cast to the compute ``dtype`` (float32 or
bfloat16) when used; norms, softmax and logits stay in float32 whatever the compute dtype.

Shape letters: B batch, T query length, S key length, H heads, D head dim, M model width,
F hidden width, V vocabulary.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax import ops

Initializer = Callable[..., jax.Array]


def normal_init(std: float) -> Initializer:
    """N(0, std^2) initialiser (GPT-2 uses std 0.02)."""
    return nnx.initializers.normal(stddev=std)


def xavier_init() -> Initializer:
    """Xavier/Glorot normal, std = sqrt(2 / (fan_in + fan_out)) (Chapter 15, "Weight init")."""
    return nnx.initializers.glorot_normal()


def init_pair(scheme: str, num_layers: int) -> tuple[Initializer, Initializer]:
    """(kernel init, residual-output init) for ``"gpt2"`` or ``"xavier"`` (the course)."""
    if scheme == "xavier":
        return xavier_init(), xavier_init()
    if scheme == "gpt2":
        # Residual projections start smaller so the residual stream's variance does not grow with depth.
        return normal_init(0.02), normal_init(0.02 / math.sqrt(2 * num_layers))
    raise ValueError(f"unknown init scheme {scheme!r}; choose 'gpt2' or 'xavier'")


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel: [d_in, d_out]`` (the course's row-vector convention)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        use_bias: bool = True,
        kernel_init: Initializer | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel_init = kernel_init or normal_init(0.02)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (d_in, d_out), param_dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[..., d_in]`` -> ``[..., d_out]`` in the compute dtype."""
        y = ops.dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table ``[V, M]``; row ``i`` is token ``i``'s vector (Chapter 3)."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        init: Initializer | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = init or normal_init(0.02)
        self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: int ``[...]`` -> ``[..., M]`` (the course's lookup ``E[id, :]``)."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, *, pad_multiple: int = 1) -> jax.Array:
        """Tied output head, ``x @ E^T`` in float32: ``[..., M]`` -> ``[..., V]`` (Chapter 10).

        ``pad_multiple > 1`` runs the matmul on a table padded with zero rows to a multiple of it
        and cuts the logits back to ``V`` (same result; faster on matrix units for an odd ``V``).
        """
        return head_matmul(x, self.embedding[...], "vm", self.dtype, pad_multiple)


#: the output head pads its vocabulary only for products with at least this many rows (training,
#: prefill); a few rows (one decode step) are a matrix-vector product that alignment does not help
PAD_MIN_ROWS = 512


def head_matmul(x: jax.Array, table: jax.Array, layout: str, dtype, pad_multiple: int = 1) -> jax.Array:
    """``x [..., M]`` times an output table (``layout`` "vm": ``[V, M]``; "mv": ``[M, V]``) -> float32 ``[..., V]``.

    Inputs in ``dtype``, accumulation and result in float32 (Chapter 10's logits). The backward pass
    multiplies in ``dtype`` too: the float32 gradient of the logits is rounded to ``dtype`` first, as
    every other layer's backward is, instead of turning the two largest products of a training step
    into float32 ones. With ``pad_multiple > 1`` (and at least :data:`PAD_MIN_ROWS` rows) the table
    gets zero rows up to a multiple of it and the result is sliced back to ``V``.
    """
    x2, w, pad = _head_operands(x, table, layout, dtype, pad_multiple)
    return _logits_f32(x2, w, pad).reshape(*x.shape[:-1], w.shape[0])


def head_cross_entropy(
    x: jax.Array, table: jax.Array, layout: str, dtype, targets: jax.Array, pad_multiple: int = 1
) -> jax.Array:
    """Token losses ``-ln softmax(x W^T)[target]``, float32 ``[...]``: the output head and the loss in one.

    The same numbers as ``ops.token_cross_entropy(head_matmul(x, table, ...), targets)``, but the
    backward pass makes the logits' gradient ``softmax - onehot`` straight from the saved float32
    logits in one pass, rounded to ``dtype`` and padded for the two products, instead of three
    passes over the ``[rows, V]`` array. Training uses this (Chapter 11); ``x`` is ``[..., M]``,
    ``targets`` int ``[...]``; ``table`` and ``pad_multiple`` as in :func:`head_matmul`.
    """
    x2, w, pad = _head_operands(x, table, layout, dtype, pad_multiple)
    return _head_ce(x2, w, targets.reshape(-1).astype(jnp.int32), pad).reshape(x.shape[:-1])


def _head_operands(x, table, layout, dtype, pad_multiple):
    """(x as ``[rows, M]`` (2-D: see ``ops.dense``), the table as ``[V, M]``, both in ``dtype``; padding rows)."""
    w = (table if layout == "vm" else table.T).astype(dtype)
    rows = math.prod(x.shape[:-1])
    pad = -w.shape[0] % pad_multiple if pad_multiple > 1 and rows >= PAD_MIN_ROWS else 0
    return x.reshape(rows, x.shape[-1]).astype(dtype), w, pad


def _padded(w: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(w, ((0, pad), (0, 0))) if pad else w


def _padded_logits(x, w, pad):
    """float32 ``[rows, V + pad]``: the product with the padded table (zero logits in the pad)."""
    return jnp.einsum("rm,vm->rv", x, _padded(w, pad), preferred_element_type=jnp.float32)


def _head_input_grads(dlogits, x, w, pad):
    """(dx, dw) from the padded logits' gradient ``[rows, V + pad]`` in the compute dtype."""
    dx = jnp.einsum("rv,vm->rm", dlogits, _padded(w, pad), preferred_element_type=jnp.float32)
    dw = jnp.einsum("rv,rm->vm", dlogits, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw[: w.shape[0]].astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _logits_f32(x: jax.Array, w: jax.Array, pad: int) -> jax.Array:
    """``x [rows, M] @ w[V, M]^T`` accumulated in and returned as float32 ``[rows, V]``."""
    return _padded_logits(x, w, pad)[:, : w.shape[0]]


def _logits_fwd(x, w, pad):
    return _logits_f32(x, w, pad), (x, w)


def _logits_bwd(pad, res, g):
    x, w = res
    return _head_input_grads(jnp.pad(g.astype(x.dtype), ((0, 0), (0, pad))), x, w, pad)


_logits_f32.defvjp(_logits_fwd, _logits_bwd)


def _head_ce_forward(x, w, targets, pad):
    logits = _padded_logits(x, w, pad)
    real = logits[:, : w.shape[0]]
    lse = jax.nn.logsumexp(real, axis=-1)
    picked = jnp.take_along_axis(real, targets[:, None], axis=-1)[:, 0]
    return lse - picked, logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_ce(x, w, targets, pad):
    return _head_ce_forward(x, w, targets, pad)[0]


def _head_ce_fwd(x, w, targets, pad):
    losses, logits, lse = _head_ce_forward(x, w, targets, pad)
    return losses, (x, w, targets, logits, lse)


def _head_ce_bwd(pad, res, g):
    x, w, targets, logits, lse = res
    cols = jnp.arange(logits.shape[-1])
    probs = jnp.where(cols < w.shape[0], jnp.exp(logits - lse[:, None]), 0.0)  # padded columns: 0
    dlogits = ((probs - (cols == targets[:, None])) * g[:, None]).astype(x.dtype)
    dx, dw = _head_input_grads(dlogits, x, w, pad)
    return dx, dw, np.zeros(targets.shape, jax.dtypes.float0)


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)


class LayerNorm(nnx.Module):
    """LayerNorm with learned ``scale`` (starts at 1) and ``bias`` (starts at 0) (Chapter 8)."""

    def __init__(self, features: int, *, eps: float = 1e-5, use_bias: bool = True, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if use_bias else None
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return ops.layer_norm(x, self.scale[...], bias, self.eps)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned ``scale`` (starts at 1)."""

    def __init__(self, features: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.rms_norm(x, self.scale[...], self.eps)


class Dropout(nnx.Module):
    """Inverted dropout (Chapter 6) that draws keys from an NNX ``Rngs`` stream.

    ``model.eval()`` sets ``deterministic = True`` on every ``Dropout`` in the model; ``model.train()``
    sets it back. A rate of 0 needs no randomness at all.
    """

    def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs["dropout"].fork() if (rngs is not None and rate > 0) else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        if self.rngs is None:
            raise ValueError("this model was built without a 'dropout' rng stream; call model.eval() or pass rngs")
        return ops.dropout(x, self.rate, self.rngs())
