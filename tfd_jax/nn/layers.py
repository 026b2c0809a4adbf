"""Flax NNX layers: each owns its parameters and calls one pure function from ``tfd_jax.ops``.

Parameters are stored in ``param_dtype`` (float32) and cast to the compute ``dtype`` (float32 or
bfloat16) when used; norms, softmax and logits stay in float32 whatever the compute dtype.

Shape letters: B batch, T query length, S key length, H heads, D head dim, M model width,
F hidden width, V vocabulary.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.ops.embedding import embedding_lookup
from tfd_jax.ops.head import head_matmul

Initializer = Callable[..., jax.Array]


def normal_init(std: float) -> Initializer:
    """N(0, std^2) initialiser (GPT-2 uses std 0.02)."""
    return nnx.initializers.normal(stddev=std)


def xavier_init() -> Initializer:
    """Xavier/Glorot normal, std = sqrt(2 / (fan_in + fan_out)) (Chapter 15, "Weight init")."""
    return nnx.initializers.glorot_normal()


def init_pair(scheme: str, num_layers: int) -> tuple[Initializer, Initializer]:
    """(kernel init, residual-output init) for ``"gpt2"``, ``"bert"`` (N(0, 0.02) everywhere) or
    ``"xavier"`` (the course)."""
    if scheme == "xavier":
        return xavier_init(), xavier_init()
    if scheme == "bert":
        return normal_init(0.02), normal_init(0.02)
    if scheme == "gpt2":
        # Residual projections start smaller so the residual stream's variance does not grow with depth.
        return normal_init(0.02), normal_init(0.02 / math.sqrt(2 * num_layers))
    raise ValueError(f"unknown init scheme {scheme!r}; choose 'gpt2', 'bert' or 'xavier'")


class LoRAParam(nnx.Param):
    """A LoRA factor (Chapter 18, beyond the course): a parameter of its own type, so a filter can
    train these alone and keep every other parameter frozen (see ``tfd_jax.nn.lora``)."""


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel: [d_in, d_out]`` (the course's row-vector convention).

    Optionally with LoRA factors (Chapter 18, beyond the course; attach them with
    ``tfd_jax.nn.lora.add_lora``): ``lora_a [d_in, r]``, ``lora_b [r, d_out]`` and ``lora_scale``
    ``alpha / r``; then the layer computes with :meth:`weight`, ``kernel + lora_scale * lora_a @ lora_b``,
    while ``lora_enabled`` is True. A plain layer has ``lora_a = lora_b = None`` (no extra parameters).
    """

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
        self._clear_lora()

    def _clear_lora(self) -> None:
        # Declared as data, so LoRA factors can take these places later; None holds no parameter.
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 1.0
        self.lora_enabled = True

    def attach_lora(self, rank: int, alpha: float, *, rngs: nnx.Rngs) -> None:
        """Give the layer LoRA factors of rank ``r = rank``, with the kernel's leading axes (a
        stacked ``[L, d_in, d_out]`` kernel gets ``[L, d_in, r]`` and ``[L, r, d_out]``).

        ``lora_a`` is drawn from ``N(0, 1/d_in)`` (fan-in scaling, as Kaiming's init: ``x @ lora_a``
        keeps the scale of ``x``) and ``lora_b`` starts at zero, so the layer's output does not
        change until ``lora_b`` is trained; ``lora_scale = alpha / r`` keeps the update's size
        roughly independent of ``r``.
        """
        if self.lora_a is not None:
            raise ValueError("this Linear already has LoRA factors")
        w = self.kernel[...]
        *lead, d_in, d_out = w.shape
        init = nnx.initializers.normal(stddev=d_in**-0.5)
        self.lora_a = LoRAParam(init(rngs.params(), (*lead, d_in, rank), w.dtype))
        self.lora_b = LoRAParam(jnp.zeros((*lead, rank, d_out), w.dtype))
        self.lora_scale = float(alpha) / rank
        self.lora_enabled = True

    def lora_delta(self) -> jax.Array:
        """``lora_scale * lora_a @ lora_b``: ``[..., d_in, d_out]`` in the parameter dtype (full-precision matmul)."""
        ab = jnp.matmul(self.lora_a[...], self.lora_b[...], precision=jax.lax.Precision.HIGHEST)
        return jnp.asarray(self.lora_scale, ab.dtype) * ab

    def weight(self) -> jax.Array:
        """The effective kernel ``[..., d_in, d_out]`` in the parameter dtype: ``kernel``, plus the
        LoRA update when the layer has one and it is enabled. Everything that computes with this
        layer's kernel reads it here, so an adapter applies wherever the layer is used.

        The update is folded into the kernel on every call (``r * d_in * d_out`` multiply-adds)
        rather than run as a second path ``(x @ lora_a) @ lora_b``: the fused head and FFN
        operations take one kernel, and for N tokens folding is the cheaper of the two once
        ``N > d_in * d_out / (d_in + d_out)`` (half the width for a square kernel), as in training.
        To decode with an adapter that no longer trains, fold it once with ``merge_lora``.
        """
        if self.lora_a is None or not self.lora_enabled:
            return self.kernel[...]
        return self.kernel[...] + self.lora_delta()

    def fold_lora(self) -> None:
        """Write the LoRA update into ``kernel`` and drop the factors (a plain layer again)."""
        if self.lora_a is not None:
            self.kernel[...] = (self.kernel[...] + self.lora_delta()).astype(self.kernel.dtype)
        self._clear_lora()

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[..., d_in]`` -> ``[..., d_out]`` in the compute dtype."""
        y = ops.dense(x.astype(self.dtype), self.weight().astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token (or position) embedding table ``[V, M]``; row ``i`` is token ``i``'s vector (Chapter 3).

    ``grad_impl`` (a class attribute) is how the lookup's gradient is formed: ``"scatter"`` (the
    default) or ``"sorted"`` (``ops.embedding_lookup``); the sums are the same up to their order.
    It is read when a program is traced, so set it before the first call.
    """

    grad_impl: str = "scatter"

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
        return embedding_lookup(self.embedding[...], ids, self.grad_impl).astype(self.dtype)

    def attend(self, x: jax.Array, *, pad_multiple: int = 1, logits_dtype=jnp.float32) -> jax.Array:
        """Tied output head, ``x @ E^T`` in float32: ``[..., M]`` -> ``[..., V]`` (Chapter 10).

        ``pad_multiple > 1`` runs the matmul on a table padded with zero rows to a multiple of it
        and cuts the logits back to ``V`` (same result; faster on matrix units for an odd ``V``).
        ``logits_dtype`` bfloat16 rounds the logits to it (``ops.head_matmul``).
        """
        return head_matmul(x, self.embedding[...], "vm", self.dtype, pad_multiple, logits_dtype)


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
