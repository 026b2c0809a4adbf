"""Scaled dot-product attention, its masks, and the multi-head reshapes (course Chapters 5 and 12).

Shape letters: B batch, T query length, S key length, H heads, D head dim, M model width.

Masks are boolean and read "True = this query may look at this key". They broadcast to
``[B, H, T, S]``, so a causal mask ``[T, S]``, a padding mask ``[B, 1, 1, S]`` and their
combination all work. Combining two masks is a logical AND (:func:`combine_masks`).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal

import jax
import jax.numpy as jnp

AttentionImpl = Literal["reference", "xla", "cudnn", "splash", "auto"]

# A large negative number rather than -inf: a fully masked row then gives a uniform softmax instead
# of NaN, and bf16 can still represent it.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def causal_mask(T: int, S: int | None = None, offset: int | jax.Array = 0) -> jax.Array:
    """Lower-triangular "may attend" mask (Chapter 12).

    Query ``t`` sits at absolute position ``offset + t`` and may attend to keys ``s <= offset + t``.
    With ``offset=0`` and ``T == S`` this is the course's mask (0 on and below the diagonal,
    -inf above it, here as booleans). During cached decoding the queries are the newest ``T``
    tokens, so ``offset = S_filled - T``.

    Args:
      T: number of queries.
      S: number of keys (defaults to ``T``).
      offset: absolute position of the first query; an int or a scalar/``[B]`` array.
    Returns:
      bool ``[T, S]``, or ``[B, 1, T, S]`` if ``offset`` has shape ``[B]``.
    """
    S = T if S is None else S
    q_pos = jnp.arange(T)[:, None]
    k_pos = jnp.arange(S)[None, :]
    offset = jnp.asarray(offset)
    if offset.ndim == 1:
        return (k_pos[None] <= q_pos[None] + offset[:, None, None])[:, None]
    return k_pos <= q_pos + offset


def padding_mask(key_valid: jax.Array) -> jax.Array:
    """Mask out padded keys (e.g. BERT-style padding, ragged prompts).

    Args:
      key_valid: bool ``[B, S]``, True where the key is a real token.
    Returns:
      bool ``[B, 1, 1, S]``, broadcastable against ``[B, H, T, S]``.
    """
    return key_valid[:, None, None, :].astype(bool)


def cross_attention_mask(query_valid: jax.Array | None, key_valid: jax.Array) -> jax.Array:
    """Mask for cross-attention (Chapter 19, Part 5): decoder queries over encoder keys, no causality.

    Args:
      query_valid: bool ``[B, T]`` or None (all queries valid). Padded queries attend nowhere useful,
        but keeping them finite is enough since their outputs are ignored downstream.
      key_valid: bool ``[B, S]``, True for real encoder tokens.
    Returns:
      bool ``[B, 1, T, S]`` (``T`` is 1 when ``query_valid`` is None, and broadcasts).
    """
    mask = key_valid[:, None, None, :].astype(bool)
    if query_valid is not None:
        mask = mask & query_valid[:, None, :, None].astype(bool)
    return mask


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """Logical AND of the masks that are not None (None if all are)."""
    out = None
    for m in masks:
        if m is None:
            continue
        out = m if out is None else jnp.logical_and(out, m)
    return out


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, T, M]`` -> ``[B, T, H, D]`` with ``D = M // H`` (Chapter 5, Part 2)."""
    B, T, M = x.shape
    if M % num_heads:
        raise ValueError(f"width {M} is not divisible by {num_heads} heads")
    return x.reshape(B, T, num_heads, M // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """``[B, T, H, D]`` -> ``[B, T, H*D]``: the "concatenate the heads" step before W_O."""
    B, T, H, D = x.shape
    return x.reshape(B, T, H * D)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """softmax(Q K^T / sqrt(D)) over keys, in float32 (Chapter 5, Parts 4-5).

    Args:
      q: ``[B, T, H, D]``; k: ``[B, S, H, D]``; mask: bool, broadcastable to ``[B, H, T, S]``.
    Returns:
      float32 ``[B, H, T, S]``; each row sums to 1.
    """
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, _MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def _check_shapes(q, k, v, mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q [B, T, H, D] and k, v [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape}")
    if mask is not None:
        B, T, H, _ = q.shape
        S = k.shape[1]
        try:
            jnp.broadcast_shapes(mask.shape, (B, H, T, S))
        except ValueError:
            raise ValueError(f"mask of shape {mask.shape} does not broadcast to [B, H, T, S] = {(B, H, T, S)}") from None


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    impl: AttentionImpl = "reference",
) -> jax.Array:
    """Scaled dot-product attention, ``softmax(Q K^T / sqrt(D)) V`` (Chapter 5; mask from Chapter 12).

    Args:
      q: ``[B, T, H, D]`` queries.
      k, v: ``[B, S, H, D]`` keys and values (``S`` may differ from ``T``: cross-attention, KV cache).
      mask: optional bool, broadcastable to ``[B, H, T, S]``; True = may attend.
      is_causal: also apply the causal mask ``causal_mask(T, S)`` (query t sees keys <= t). Saying
        so, rather than passing that mask, lets fused kernels (cuDNN) skip the masked half of the
        work instead of reading a ``[B, H, T, S]`` mask.
      impl: ``"reference"`` is the readable einsum version (softmax in float32);
        ``"xla"`` calls ``jax.nn.dot_product_attention``; ``"cudnn"`` asks it for cuDNN's fused
        flash attention (NVIDIA GPUs, bf16/fp16) and falls back to ``"xla"`` with a warning where
        cuDNN cannot run this call (no GPU, float32, an unsupported head size ...); ``"auto"``
        picks cuDNN for bf16/fp16 on a GPU and XLA otherwise. ``"splash"`` (opt-in, TPU only) runs
        the Pallas splash-attention kernel (:func:`splash_attention`): self-attention with
        ``is_causal`` or no mask, ``T`` a multiple of 128.
    Returns:
      ``[B, T, H, D]`` in the dtype of ``q``.
    """
    _check_shapes(q, k, v, mask)
    if is_causal and impl == "reference":
        mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1]))
    if impl == "reference":
        w = attention_weights(q, k, mask)
        out = jnp.einsum("bhts,bshd->bthd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.astype(q.dtype)
    if impl == "splash":
        if jax.default_backend() != "tpu":
            raise ValueError(
                f"attention impl 'splash' is a TPU kernel and this backend is {jax.default_backend()!r}; "
                "use 'cudnn' on NVIDIA GPUs or 'xla' elsewhere"
            )
        if mask is not None:
            raise ValueError("attention impl 'splash' takes is_causal or no mask, not a mask array; use 'xla' for masks")
        return splash_attention(q, k, v, is_causal=is_causal)
    if impl not in ("xla", "cudnn", "auto"):
        raise ValueError(f"unknown attention impl {impl!r}; choose 'reference', 'xla', 'cudnn', 'splash' or 'auto'")
    if mask is not None:
        B, T, H, _ = q.shape
        mask = jnp.broadcast_to(mask, (B, H, T, k.shape[1]))
    if is_causal and q.shape[1] != k.shape[1]:
        # jax.nn.dot_product_attention aligns its causal mask differently when T != S; be explicit.
        mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1]))
        is_causal = False
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        impl = "cudnn" if (half and jax.default_backend() == "gpu") else "xla"
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn")
        except Exception as e:  # cuDNN refuses at trace time: unsupported device, dtype or shape
            _warn_fallback(e)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                     block: int = 512, interpret: bool = False) -> jax.Array:
    """Attention through the Pallas splash-attention kernel (TPU; flash attention with block skipping).

    Args:
      q, k, v: ``[B, T, H, D]`` (self-attention: the same ``T``), ``T`` a multiple of 128.
      is_causal: the causal mask, which the kernel applies block by block (fully masked blocks are
        skipped, not computed).
      block: query/key block size; halved until it divides ``T``.
      interpret: run the kernel in Pallas's interpreter (any backend, slow): for tests.
    Returns:
      ``[B, T, H, D]`` in the dtype of ``q``.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, H, D = q.shape
    if k.shape[1] != T:
        raise ValueError(f"splash attention here is self-attention: T={T} queries but S={k.shape[1]} keys; use 'xla'")
    if T % 128:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {T}; use 'xla'")
    while T % block:
        block //= 2
    masks = [sa.CausalMask((T, T)) if is_causal else sa.FullMask((T, T)) for _ in range(H)]
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sa.make_splash_mha(sa.MultiHeadMask(masks), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    to_bhtd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = jax.vmap(kernel)(to_bhtd(q) * jnp.asarray(D**-0.5, q.dtype), to_bhtd(k), to_bhtd(v))  # kernel does not scale
    return to_bhtd(out).astype(q.dtype)


_warned: set[str] = set()


def _warn_fallback(err: Exception) -> None:
    msg = f"cuDNN attention unavailable here ({type(err).__name__}: {str(err).splitlines()[0][:160]}); using XLA attention"
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
