"""Attention, feed-forward and the transformer block as NNX modules (Chapters 5, 7, 8, 9).

Shape letters: B batch, T query length, S key length, H heads, D head dim, M model width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.nn.layers import Dropout, LayerNorm, Linear, RMSNorm, init_pair


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with W_Q, W_K, W_V, W_O as ``[M, M]`` kernels (Chapter 5).

    Self-attention when ``context`` is None; cross-attention (queries from ``x``, keys and values from
    ``context``, Chapter 19 Part 5) otherwise. The course's per-head input slicing (head j sees only
    dims ``[jD, (j+1)D)``) is this layer with block-diagonal kernels, so it needs no code of its own.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        impl: ops.attention.AttentionImpl = "reference",
        kernel_init=None,
        out_init=None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(d_model, d_model, use_bias=qkv_bias, kernel_init=kernel_init, **kw)
        self.k = Linear(d_model, d_model, use_bias=qkv_bias, kernel_init=kernel_init, **kw)
        self.v = Linear(d_model, d_model, use_bias=qkv_bias, kernel_init=kernel_init, **kw)
        self.o = Linear(d_model, d_model, use_bias=out_bias, kernel_init=out_init or kernel_init, **kw)
        self.num_heads = num_heads
        self.rope = rope
        self.rope_base = rope_base
        self.impl = impl

    def project(
        self, x: jax.Array, context: jax.Array | None = None, positions: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Q from ``x [B, T, M]``, K and V from ``context [B, S, M]`` (or ``x``): each ``[B, ., H, D]``."""
        src = x if context is None else context
        q = ops.split_heads(self.q(x), self.num_heads)
        k = ops.split_heads(self.k(src), self.num_heads)
        v = ops.split_heads(self.v(src), self.num_heads)
        if self.rope:
            if context is not None:
                raise ValueError("RoPE applies to self-attention only")
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            q = ops.apply_rope(q, positions, self.rope_base)
            k = ops.apply_rope(k, positions, self.rope_base)
        return q, k, v

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        context: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """x: ``[B, T, M]``; mask: bool broadcastable to ``[B, H, T, S]``; ``is_causal`` adds the causal
        mask (see ``ops.attention``). Returns ``[B, T, M]``."""
        q, k, v = self.project(x, context, positions)
        return self.output(ops.attention(q, k, v, mask=mask, is_causal=is_causal, impl=self.impl))

    def output(self, heads: jax.Array) -> jax.Array:
        """Concatenate the heads and apply W_O: ``[B, T, H, D]`` -> ``[B, T, M]``."""
        return self.o(ops.merge_heads(heads))


class FeedForward(nnx.Module):
    """Position-wise FFN, ``act(x W_in + b_in) W_out + b_out`` (Chapter 7), or gated (SwiGLU)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "relu",
        use_bias: bool = True,
        gated: bool = False,
        kernel_init=None,
        out_init=None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        ops.activation_fn(activation)  # fail early on a bad name
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w_in = Linear(d_model, d_ff, use_bias=use_bias and not gated, kernel_init=kernel_init, **kw)
        self.w_gate = Linear(d_model, d_ff, use_bias=False, kernel_init=kernel_init, **kw) if gated else None
        self.w_out = Linear(d_ff, d_model, use_bias=use_bias and not gated, kernel_init=out_init or kernel_init, **kw)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., M]`` -> ``[..., M]``."""
        dtype = self.w_in.dtype
        x = x.astype(dtype)
        if self.w_gate is not None:
            return ops.gated_feed_forward(
                x,
                self.w_gate.kernel[...].astype(dtype),
                self.w_in.kernel[...].astype(dtype),
                self.w_out.kernel[...].astype(dtype),
                self.activation,
            )

        def b(lin):
            return None if lin.bias is None else lin.bias[...].astype(dtype)

        return ops.feed_forward(
            x,
            self.w_in.kernel[...].astype(dtype),
            b(self.w_in),
            self.w_out.kernel[...].astype(dtype),
            b(self.w_out),
            self.activation,
        )


def make_norm(kind: str, features: int, eps: float, use_bias: bool = True, param_dtype=jnp.float32) -> nnx.Module:
    """``"layernorm"`` or ``"rmsnorm"``."""
    if kind == "layernorm":
        return LayerNorm(features, eps=eps, use_bias=use_bias, param_dtype=param_dtype)
    if kind == "rmsnorm":
        return RMSNorm(features, eps=eps, param_dtype=param_dtype)
    raise ValueError(f"unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'")


class Block(nnx.Module):
    """One transformer block (Chapter 9): attention and FFN sub-layers, each with a residual.

    ``norm_position="post"`` is the course's block, ``LN(x + Dropout(Sublayer(x)))``;
    ``"pre"`` is GPT-2's, ``x + Dropout(Sublayer(LN(x)))``.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """cfg: a ``tfd_jax.models.GPTConfig`` (or anything with the same fields)."""
        init, out_init = init_pair(cfg.init, cfg.num_layers)
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.attn = MultiHeadAttention(
            cfg.d_model,
            cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            rope=cfg.positions == "rope",
            rope_base=cfg.rope_base,
            impl=cfg.attention_impl,
            kernel_init=init,
            out_init=out_init,
            rngs=rngs,
            **dt,
        )
        self.ffn = FeedForward(
            cfg.d_model,
            cfg.d_ff,
            activation=cfg.activation,
            use_bias=cfg.ffn_bias,
            gated=cfg.gated_ffn,
            kernel_init=init,
            out_init=out_init,
            rngs=rngs,
            **dt,
        )
        self.ln1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype)
        self.ln2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype)
        self.drop1 = Dropout(cfg.dropout, rngs=rngs)
        self.drop2 = Dropout(cfg.dropout, rngs=rngs)
        self.pre_norm = cfg.norm_position == "pre"

    def __call__(
        self, x: jax.Array, *, mask: jax.Array | None = None, is_causal: bool = False, positions: jax.Array | None = None
    ) -> jax.Array:
        """x: ``[B, T, M]`` -> ``[B, T, M]``."""
        return self.feed_forward(self.attend(x, mask=mask, is_causal=is_causal, positions=positions))

    def attend(self, x: jax.Array, *, mask=None, is_causal=False, positions=None, attn_fn=None) -> jax.Array:
        """The attention sub-layer with its residual (and norm). ``attn_fn`` replaces the attention
        call (the KV-cache decoder passes one); it takes the normalised input."""
        attn_fn = attn_fn or (lambda h: self.attn(h, mask=mask, is_causal=is_causal, positions=positions))
        if self.pre_norm:
            return x + self.drop1(attn_fn(self.ln1(x))).astype(x.dtype)
        return self.ln1(x + self.drop1(attn_fn(x)).astype(x.dtype))

    def feed_forward(self, x: jax.Array) -> jax.Array:
        """The FFN sub-layer with its residual (and norm)."""
        if self.pre_norm:
            return x + self.drop2(self.ffn(self.ln2(x))).astype(x.dtype)
        return self.ln2(x + self.drop2(self.ffn(x)).astype(x.dtype))
