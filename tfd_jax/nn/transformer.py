"""Attention, feed-forward, the residual sublayer and the transformer block as NNX modules (Chapters 5, 7-9).

Shape letters: B batch, T query length, S key length, H query heads, K key/value heads, D head dim,
M model width, F hidden width, S_max cache length.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.nn.cache import as_bshd, write_rows
from tfd_jax.nn.config import BlockConfig
from tfd_jax.nn.layers import Dropout, LayerNorm, Linear, RMSNorm, init_pair


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with W_Q ``[M, H*D]``, W_K and W_V ``[M, K*D]``, W_O ``[H*D, M]`` (Chapter 5).

    Self-attention when ``context`` is None; cross-attention (queries from ``x``, keys and values from
    ``context``, Chapter 19 Part 5) otherwise. ``num_kv_heads < num_heads`` is grouped-query attention
    (Chapter 19, Part 7): each key/value head serves ``H / K`` query heads, and a KV cache holds only
    ``K`` heads. The course's per-head input slicing (head j sees only dims ``[jD, (j+1)D)``) is this
    layer with block-diagonal kernels, so it needs no code of its own.

    The work is split in steps that callers can use apart: :meth:`query`, :meth:`key_value` (so an
    encoder's keys and values can be computed once for every decoding step), :meth:`attend`.
    Self-attention can compute the three projections as one product (:meth:`query_key_value`):
    ``fuse_qkv`` (a class attribute) True or False forces one path; None (the default) fuses on
    GPUs and TPUs, where one product means fewer kernel launches, and not on CPUs, where it was
    measured no faster and only adds compile time. Both paths give the same values and gradients.
    """

    fuse_qkv: bool | None = None
    #: ``"pallas"`` (an opt-in, for GPUs): a decoding step's self-attention over the KV cache runs
    #: JAX's Pallas flash-decoding kernel (``ops.decode_attention``) where it can (one new token, no
    #: score bias, a cache and head size it takes; on a CPU through Pallas's interpreter, for tests);
    #: None: XLA's attention, as training. Like ``fuse_qkv`` it is read when a program is traced,
    #: so set it before the first call (or clear JAX's caches).
    decode_kernel: str | None = None

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
        scale: float | None = None,
        impl: ops.attention.AttentionImpl = "reference",
        kernel_init=None,
        out_init=None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; give head_dim")
            head_dim = d_model // num_heads
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(d_model, num_heads * head_dim, use_bias=qkv_bias, kernel_init=kernel_init, **kw)
        self.k = Linear(d_model, num_kv_heads * head_dim, use_bias=qkv_bias, kernel_init=kernel_init, **kw)
        self.v = Linear(d_model, num_kv_heads * head_dim, use_bias=qkv_bias, kernel_init=kernel_init, **kw)
        self.o = Linear(num_heads * head_dim, d_model, use_bias=out_bias, kernel_init=out_init or kernel_init, **kw)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.rope = rope
        self.rope_base = rope_base
        self.scale = scale
        self.impl = impl
        self.record_weights = False  # True: attend() also keeps its weights, see record_attention_weights

    def query(self, x: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Q: ``x [B, T, M]`` -> ``[B, T, H, D]`` (rotated by ``positions [B, T]`` with RoPE)."""
        q = ops.split_heads(self.q(x), self.num_heads)
        return self._rotate(q, positions)

    def key_value(self, src: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """K and V from ``src [B, S, M]``: each ``[B, S, K, D]`` (K rotated with RoPE)."""
        k = self._rotate(ops.split_heads(self.k(src), self.num_kv_heads), positions)
        return k, ops.split_heads(self.v(src), self.num_kv_heads)

    def query_key_value(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention's Q, K and V from ``x [B, T, M]`` as one product: ``[B, T, H, D]``,
        ``[B, T, K, D]``, ``[B, T, K, D]`` (K rotated, and Q, with RoPE).

        The same numbers as :meth:`query` and :meth:`key_value` (each output column is the same dot
        product over ``M``), from ``x @ [W_Q | W_K | W_V]``: one ``[B*T, M] x [M, (H + 2K) D]``
        product instead of three narrow ones, which a CPU runs (and differentiates) faster, and
        one kernel launch instead of three on a GPU. The weights are concatenated per call (a
        copy of ``M (H + 2K) D`` numbers, small beside the product); each layer's LoRA update is in
        its ``weight()``, so adapters apply here as well.
        """
        layers = (self.q, self.k, self.v)
        dtype = self.q.dtype
        w = jnp.concatenate([lin.weight().astype(dtype) for lin in layers], axis=-1)
        y = ops.dense(x.astype(dtype), w)
        if self.q.bias is not None:
            y = y + jnp.concatenate([lin.bias[...].astype(dtype) for lin in layers], axis=-1)
        HD, KD = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = jnp.split(y, [HD, HD + KD], axis=-1)
        q = self._rotate(ops.split_heads(q, self.num_heads), positions)
        k = self._rotate(ops.split_heads(k, self.num_kv_heads), positions)
        return q, k, ops.split_heads(v, self.num_kv_heads)

    def _fuse_qkv(self) -> bool:
        """Whether :meth:`query_key_value` may stand in for three projections: the three layers
        share a compute dtype and either all have biases or none has."""
        layers = (self.q, self.k, self.v)
        wanted = jax.default_backend() != "cpu" if self.fuse_qkv is None else self.fuse_qkv
        return (wanted and len({lin.dtype for lin in layers}) == 1
                and len({lin.bias is None for lin in layers}) == 1)

    def _rotate(self, x: jax.Array, positions: jax.Array | None) -> jax.Array:
        if not self.rope:
            return x
        if positions is None:
            positions = ops.default_positions(*x.shape[:2])
        return ops.apply_rope(x, positions, self.rope_base)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, mask=None, is_causal=False, bias=None) -> jax.Array:
        """``ops.attention`` then W_O: q ``[B, T, H, D]``, k/v ``[B, S, K, D]`` -> ``[B, T, M]``.

        With ``record_weights`` set, the float32 weights ``[B, H, T, S]`` are also kept as an
        ``nnx.Intermediate`` named ``weights`` (read them with ``nnx.pop(model, nnx.Intermediate)``).
        """
        if self.record_weights:
            self.sow(nnx.Intermediate, "weights",
                     ops.attention_weights(q, k, ops.combine_masks(mask, ops.causal_mask(q.shape[1], k.shape[1])
                                                                   if is_causal else None),
                                           scale=self.scale, bias=bias))
        heads = ops.attention(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale, bias=bias, impl=self.impl)
        return self.o(ops.merge_heads(heads))

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        context: jax.Array | None = None,
        positions: jax.Array | None = None,
        bias: jax.Array | None = None,
    ) -> jax.Array:
        """x: ``[B, T, M]``; mask: bool broadcastable to ``[B, H, T, S]``; ``is_causal`` adds the causal
        mask (see ``ops.attention``); bias: float, added to the scores. Returns ``[B, T, M]``."""
        if context is not None and self.rope:
            raise ValueError("RoPE applies to self-attention only")
        if context is None and self._fuse_qkv():
            q, k, v = self.query_key_value(x, positions)
        else:
            q = self.query(x, positions)
            k, v = self.key_value(x if context is None else context, positions)
        return self.attend(q, k, v, mask=mask, is_causal=is_causal, bias=bias)

    def _decode_kernel(self, new_tokens: int, cache_length: int, head_dim: int, bias) -> bool:
        """Whether :meth:`cached` runs ``ops.decode_attention`` (see ``decode_kernel``)."""
        if self.decode_kernel not in (None, "pallas"):
            raise ValueError(f"MultiHeadAttention.decode_kernel must be None or 'pallas', got {self.decode_kernel!r}")
        if self.decode_kernel == "pallas" and jax.default_backend() not in ("gpu", "cpu"):
            raise ValueError(f"MultiHeadAttention.decode_kernel 'pallas' is a GPU kernel and this backend is "
                             f"{jax.default_backend()!r}; set it to None")
        return (self.decode_kernel == "pallas" and new_tokens == 1 and bias is None
                and ops.decode_attention_plan(cache_length, head_dim) is not None)

    def cached(
        self, x: jax.Array, keys: jax.Array, values: jax.Array, *, positions: jax.Array, start: jax.Array, mask: jax.Array,
        bias: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention of new tokens over a KV cache (Chapter 13).

        The new tokens' K/V (``x [B, T, M]`` at ``positions [B, T]``) are written into the cache
        buffers ``[B, K, S_max, D]`` at each row's ``start [B]``, then the queries attend to the
        whole buffer under ``mask`` (bool ``[B, 1, T, S_max]``, from cache positions: a key at or
        before the query's position), with ``bias`` (float, broadcastable to ``[B, H, T, S_max]``)
        added to the scores. With ``decode_kernel="pallas"`` a one-token step does not read
        ``mask``: the kernel attends to the slots up to the query's position, which is that mask.

        Returns:
          the output ``[B, T, M]`` and the two updated buffers.
        """
        if self._fuse_qkv():
            q, k, v = self.query_key_value(x, positions)
        else:
            q = self.query(x, positions)
            k, v = self.key_value(x, positions)
        keys, values = write_rows(keys, k, start), write_rows(values, v, start)
        qa, ka, va = q, as_bshd(keys), as_bshd(values)
        # On CPU, half precision is raised to float32: XLA:CPU cannot run some bf16 x bf16 -> f32
        # batched products in this layout, and CPUs gain nothing from bf16 arithmetic anyway.
        if jax.default_backend() == "cpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            qa, ka, va = (a.astype(jnp.float32) for a in (qa, ka, va))
        if self._decode_kernel(x.shape[1], ka.shape[1], q.shape[-1], bias):
            # the mask every cached caller builds is positional (keys at or before the query's
            # position), so a row's valid keys are the first position + 1 slots
            out = ops.decode_attention(qa[:, 0], ka, va, positions[:, 0] + 1, scale=self.scale)
            return self.o(ops.merge_heads(out[:, None].astype(q.dtype))), keys, values
        impl = "xla" if self.impl == "splash" else self.impl  # splash is a training kernel (whole blocks)
        heads = ops.attention(qa, ka, va, mask=mask, scale=self.scale, bias=bias, impl=impl).astype(q.dtype)
        return self.o(ops.merge_heads(heads)), keys, values


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
                self.w_gate.weight().astype(dtype),
                self.w_in.weight().astype(dtype),
                self.w_out.weight().astype(dtype),
                self.activation,
            )

        def b(lin):
            return None if lin.bias is None else lin.bias[...].astype(dtype)

        return ops.feed_forward(
            x,
            self.w_in.weight().astype(dtype),
            b(self.w_in),
            self.w_out.weight().astype(dtype),
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


def residual(x: jax.Array, sublayer: Callable[[jax.Array], jax.Array], norm, drop, pre_norm: bool) -> jax.Array:
    """One residual sublayer (Chapter 9): ``x + Dropout(f(LN(x)))`` (pre-LN) or ``LN(x + Dropout(f(x)))`` (post-LN).

    The same wrapper serves self-attention, cross-attention and the FFN; ``sublayer`` maps
    ``[B, T, M]`` to ``[B, T, M]``. The residual stream keeps ``x``'s dtype.
    """
    if pre_norm:
        return x + drop(sublayer(norm(x))).astype(x.dtype)
    return norm(x + drop(sublayer(x)).astype(x.dtype))


def make_attention(cfg: BlockConfig, *, rngs: nnx.Rngs, rope: bool | None = None) -> MultiHeadAttention:
    """A :class:`MultiHeadAttention` shaped by a block config (``rope`` overrides the config's)."""
    init, out_init = init_pair(cfg.init, cfg.num_layers)
    return MultiHeadAttention(
        cfg.d_model,
        cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        qkv_bias=cfg.qkv_bias,
        out_bias=cfg.out_bias,
        rope=cfg.rope if rope is None else rope,
        rope_base=cfg.rope_base,
        scale=cfg.attn_scale,
        impl=cfg.attention_impl,
        kernel_init=init,
        out_init=out_init,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        rngs=rngs,
    )


class Block(nnx.Module):
    """One transformer block (Chapter 9): a self-attention and an FFN sublayer, each with a residual.

    ``cfg.norm_position="post"`` is the course's (and BERT's) block, ``LN(x + Dropout(Sublayer(x)))``;
    ``"pre"`` is GPT-2's and Llama's, ``x + Dropout(Sublayer(LN(x)))`` (see :func:`residual`).

    ``cross_attention=True`` makes it an encoder-decoder's decoder block (Chapter 19, Part 5): between
    the two, a cross-attention sublayer whose queries come from the block's input and whose keys and
    values come from the encoder's output (``cross_kv``, from :meth:`cross_key_value`: computed once
    per source, not once per decoding step), with no causal mask.
    """

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs, cross_attention: bool = False):
        init, out_init = init_pair(cfg.init, cfg.num_layers)
        self.attn = make_attention(cfg, rngs=rngs)
        self.ln1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype)
        self.drop1 = Dropout(cfg.dropout, rngs=rngs)
        if cross_attention:
            self.cross_attn = make_attention(cfg, rngs=rngs, rope=False)
            self.ln_cross = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype)
            self.drop_cross = Dropout(cfg.dropout, rngs=rngs)
        else:
            self.cross_attn = self.ln_cross = self.drop_cross = None
        self.ffn = FeedForward(
            cfg.d_model,
            cfg.d_ff,
            activation=cfg.activation,
            use_bias=cfg.ffn_bias,
            gated=cfg.gated_ffn,
            kernel_init=init,
            out_init=out_init,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            rngs=rngs,
        )
        self.ln2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype)
        self.drop2 = Dropout(cfg.dropout, rngs=rngs)
        self.pre_norm = cfg.norm_position == "pre"

    def cross_key_value(self, memory: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This block's cross-attention keys and values from the encoder output ``memory [B, S, M]``:
        each ``[B, S, K, D]``."""
        return self.cross_attn.key_value(memory)

    def _cross(self, x, cross_kv, cross_mask):
        """The cross-attention sublayer (identity for a block without one)."""
        if self.cross_attn is None:
            if cross_kv is not None:
                raise ValueError("cross_kv given to a block built without cross_attention")
            return x
        if cross_kv is None:
            raise ValueError("a decoder block needs cross_kv (from cross_key_value of the encoder output)")

        def cross(h):
            return self.cross_attn.attend(self.cross_attn.query(h), *cross_kv, mask=cross_mask)

        return residual(x, cross, self.ln_cross, self.drop_cross, self.pre_norm)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        is_causal: bool = False,
        positions: jax.Array | None = None,
        bias: jax.Array | None = None,
        cross_kv: tuple[jax.Array, jax.Array] | None = None,
        cross_mask: jax.Array | None = None,
    ) -> jax.Array:
        """x: ``[B, T, M]`` -> ``[B, T, M]``. ``mask``, ``is_causal``, ``bias``: the self-attention's;
        ``cross_kv`` (``[B, S, K, D]`` each) and ``cross_mask`` (bool, broadcastable to
        ``[B, H, T, S]``): the cross-attention's."""

        def attn(h):
            return self.attn(h, mask=mask, is_causal=is_causal, positions=positions, bias=bias)

        x = residual(x, attn, self.ln1, self.drop1, self.pre_norm)
        x = self._cross(x, cross_kv, cross_mask)
        return residual(x, self.ffn, self.ln2, self.drop2, self.pre_norm)

    def cached(self, x, keys, values, *, positions, start, mask, bias=None, cross_kv=None,
               cross_mask=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block over a KV cache (see :meth:`MultiHeadAttention.cached`): ``(x, keys, values)``.
        An encoder-decoder's block reads its precomputed ``cross_kv`` (nothing is recomputed)."""
        new = {}

        def attn(h):
            out, new["k"], new["v"] = self.attn.cached(h, keys, values, positions=positions, start=start, mask=mask,
                                                       bias=bias)
            return out

        x = residual(x, attn, self.ln1, self.drop1, self.pre_norm)
        x = self._cross(x, cross_kv, cross_mask)
        return residual(x, self.ffn, self.ln2, self.drop2, self.pre_norm), new["k"], new["v"]


def record_attention_weights(model: nnx.Module, fn, *, which: str = "attn") -> tuple[object, list[jax.Array]]:
    """Run ``fn()`` while every attention layer named ``which`` (``"attn"``: self-attention,
    ``"cross_attn"``: an encoder-decoder's cross-attention) records its weights (for pictures).

    Returns ``(fn(), weights)``: one float32 ``[B, H, T, S]`` per layer, in layer order. The model
    must hold its blocks one by one (``with_layout(model, scan_layers=False)``).
    """
    layers = [(tuple(path), m) for path, m in nnx.iter_graph(model)
              if isinstance(m, MultiHeadAttention) and path and path[-1] == which]
    for _, m in layers:
        m.record_weights = True
    try:
        if hasattr(nnx, "capture"):  # newer Flax: intermediates are collected by a capture
            out, captured = nnx.capture(lambda _: fn(), nnx.Intermediate)(model)
            found = {tuple(k[:-1]): jax.tree.leaves(v)[0] for k, v in nnx.to_flat_state(captured)}
            weights = [found[path] for path, _ in layers]
        else:
            out = fn()
            weights = [jax.tree.leaves(nnx.pop(m, nnx.Intermediate))[0] for _, m in layers]
    finally:
        for _, m in layers:
            m.record_weights = False
    return out, weights
