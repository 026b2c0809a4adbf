"""The output head and its loss as parameter-free functions with hand-written backward passes (Chapters 10-11).

The logits ``x W^T`` over a vocabulary of ``V`` tokens are the largest product of a training step;
these functions keep it in float32 where the course's numbers need it (logits, softmax, loss) and
in the compute dtype where speed needs it (the two backward products). Models call them with their
own table: a tied embedding ``[V, M]`` (layout ``"vm"``) or an output kernel ``[M, V]`` (``"mv"``).

Shape letters: M model width, V vocabulary.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


#: the output head pads its vocabulary only for products with at least this many rows (training,
#: prefill); a few rows (one decode step) are a matrix-vector product that alignment does not help
PAD_MIN_ROWS = 512


def head_matmul(
    x: jax.Array, table: jax.Array, layout: str, dtype, pad_multiple: int = 1, logits_dtype=jnp.float32
) -> jax.Array:
    """``x [..., M]`` times an output table (``layout`` "vm": ``[V, M]``; "mv": ``[M, V]``) -> float32 ``[..., V]``.

    Inputs in ``dtype``, accumulation and result in float32 (Chapter 10's logits). The backward pass
    multiplies in ``dtype`` too: the float32 gradient of the logits is rounded to ``dtype`` first, as
    every other layer's backward is, instead of turning the two largest products of a training step
    into float32 ones. With ``pad_multiple > 1`` (and at least :data:`PAD_MIN_ROWS` rows) the table
    gets zero rows up to a multiple of it and the result is sliced back to ``V``.

    ``logits_dtype`` bfloat16 (an opt-in) has the product write its result rounded to bfloat16, as
    :func:`head_cross_entropy` does with it; the logits come back as float32 holding those values.
    """
    x2, w, pad = _head_operands(x, table, layout, dtype, pad_multiple)
    out = _logits_f32(x2, w, pad, _logits_dtype(logits_dtype))
    return out.reshape(*x.shape[:-1], w.shape[0])


def head_cross_entropy(
    x: jax.Array,
    table: jax.Array,
    layout: str,
    dtype,
    targets: jax.Array,
    pad_multiple: int = 1,
    logits_dtype=jnp.float32,
) -> jax.Array:
    """Token losses ``-ln softmax(x W^T)[target]``, float32 ``[...]``: the output head and the loss in one.

    The same numbers as ``ops.token_cross_entropy(head_matmul(x, table, ...), targets)``, but the
    backward pass makes the logits' gradient ``softmax - onehot`` straight from the saved float32
    logits in one pass, rounded to ``dtype`` and padded for the two products, instead of three
    passes over the ``[rows, V]`` array. Training uses this (Chapter 11); ``x`` is ``[..., M]``,
    ``targets`` int ``[...]``; ``table`` and ``pad_multiple`` as in :func:`head_matmul`.

    ``logits_dtype``: float32 (the default) keeps the logits, and the ``[rows, V]`` array saved for
    the backward pass, in float32. bfloat16 (an opt-in, ``GPTConfig.logits_dtype``) has the product
    write them rounded to bfloat16 (accumulated in float32), which halves the largest array of a
    GPT-2 step (``B T V``: 3.3 GB in float32 at batch 16 x 1024) and the memory traffic of the
    softmax that reads it; the log-sum-exp, the loss and the gradient's ``softmax - onehot`` are
    still computed in float32 from those rounded values. Each token's loss then moves by at
    most about its row's largest ``|logit|`` / 128 against float32 logits (the log-sum-exp and
    the target's logit each by up to half that).
    """
    x2, w, pad = _head_operands(x, table, layout, dtype, pad_multiple)
    flat = targets.reshape(-1).astype(jnp.int32)
    return _head_ce(x2, w, flat, pad, _logits_dtype(logits_dtype)).reshape(x.shape[:-1])


#: the dtypes the head may write its logits in (float32 is the default; bfloat16 an opt-in)
LOGITS_DTYPES = ("float32", "bfloat16")


def _logits_dtype(dtype) -> np.dtype:
    """The logits dtype as a hashable numpy dtype (a static argument of the custom derivatives)."""
    d = np.dtype(jnp.dtype(dtype))
    if d.name not in LOGITS_DTYPES:
        raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {d.name!r}")
    return d


def _head_operands(x, table, layout, dtype, pad_multiple):
    """(x as ``[rows, M]`` (2-D: see ``ops.dense``), the table as ``[V, M]``, both in ``dtype``; padding rows)."""
    w = (table if layout == "vm" else table.T).astype(dtype)
    rows = math.prod(x.shape[:-1])
    pad = -w.shape[0] % pad_multiple if pad_multiple > 1 and rows >= PAD_MIN_ROWS else 0
    return x.reshape(rows, x.shape[-1]).astype(dtype), w, pad


def _padded(w: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(w, ((0, pad), (0, 0))) if pad else w


def _padded_logits(x, w, pad, ldt):
    """``[rows, V + pad]`` in ``ldt``: the product with the padded table (zero logits in the pad),
    accumulated in float32. When the inputs are already in ``ldt`` (bfloat16 training), ``ldt`` is
    the product's own output type, so a GPU's product can write the rounded logits itself;
    otherwise the float32 product is rounded afterwards. (XLA:CPU computes the product in float32
    and rounds it in a pass of its own either way, so on a CPU the option saves no memory.)"""
    if x.dtype == ldt:
        return jnp.einsum("rm,vm->rv", x, _padded(w, pad), preferred_element_type=ldt)
    return jnp.einsum("rm,vm->rv", x, _padded(w, pad), preferred_element_type=jnp.float32).astype(ldt)


def _head_input_grads(dlogits, x, w, pad):
    """(dx, dw) from the padded logits' gradient ``[rows, V + pad]`` in the compute dtype."""
    dx = jnp.einsum("rv,vm->rm", dlogits, _padded(w, pad), preferred_element_type=jnp.float32)
    dw = jnp.einsum("rv,rm->vm", dlogits, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw[: w.shape[0]].astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _logits_f32(x: jax.Array, w: jax.Array, pad: int, ldt) -> jax.Array:
    """``x [rows, M] @ w[V, M]^T`` accumulated in float32, rounded to ``ldt``, returned as float32 ``[rows, V]``."""
    return _padded_logits(x, w, pad, ldt)[:, : w.shape[0]].astype(jnp.float32)


def _logits_fwd(x, w, pad, ldt):
    return _logits_f32(x, w, pad, ldt), (x, w)


def _logits_bwd(pad, ldt, res, g):
    x, w = res
    return _head_input_grads(jnp.pad(g.astype(x.dtype), ((0, 0), (0, pad))), x, w, pad)


_logits_f32.defvjp(_logits_fwd, _logits_bwd)


def _head_ce_forward(x, w, targets, pad, ldt):
    logits = _padded_logits(x, w, pad, ldt)  # saved for the backward pass in ldt
    real = logits[:, : w.shape[0]].astype(jnp.float32)
    lse = jax.nn.logsumexp(real, axis=-1)
    picked = jnp.take_along_axis(real, targets[:, None], axis=-1)[:, 0]
    return lse - picked, logits, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _head_ce(x, w, targets, pad, ldt):
    return _head_ce_forward(x, w, targets, pad, ldt)[0]


def _head_ce_fwd(x, w, targets, pad, ldt):
    losses, logits, lse = _head_ce_forward(x, w, targets, pad, ldt)
    return losses, (x, w, targets, logits, lse)


def _head_ce_bwd(pad, ldt, res, g):
    x, w, targets, logits, lse = res
    cols = jnp.arange(logits.shape[-1])
    probs = jnp.where(cols < w.shape[0], jnp.exp(logits.astype(jnp.float32) - lse[:, None]), 0.0)  # padded columns: 0
    dlogits = ((probs - (cols == targets[:, None])) * g[:, None]).astype(x.dtype)
    dx, dw = _head_input_grads(dlogits, x, w, pad)
    return dx, dw, np.zeros(targets.shape, jax.dtypes.float0)


_head_ce.defvjp(_head_ce_fwd, _head_ce_bwd)
