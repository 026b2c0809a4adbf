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


def attention_mask(
    *,
    q_positions: jax.Array | None = None,
    k_positions: jax.Array | None = None,
    causal: bool = False,
    q_segments: jax.Array | None = None,
    k_segments: jax.Array | None = None,
    k_valid: jax.Array | None = None,
) -> jax.Array | None:
    """Every attention mask the models need, from what each query and key *is* (Chapters 12 and 19).

    A query may look at a key when all of the given conditions hold:

    - ``causal``: the key's position is not after the query's (``k_pos <= q_pos``). Positions are
      absolute, so the same rule serves training (``0..T-1`` both sides) and cached decoding
      (queries at ``lengths + 0..T-1`` over cache slots ``0..S_max-1``).
    - segments: query and key belong to the same packed document (``q_segments == k_segments``).
    - ``k_valid``: the key is a real token, not padding (BERT's ``attention_mask``; encoder keys in
      cross-attention).

    Args:
      q_positions: int ``[B, T]`` or ``[T]``; k_positions: int ``[B, S]`` or ``[S]`` (needed with ``causal``).
      causal: apply the causal rule.
      q_segments: int ``[B, T]``; k_segments: int ``[B, S]`` (defaults to ``q_segments``).
      k_valid: bool ``[B, S]``.
    Returns:
      bool ``[B, 1, T, S]`` (``[1, 1, T, S]`` when nothing has a batch axis), or None when no condition
      was given (everything may attend).
    """
    masks = []
    if causal:
        if q_positions is None or k_positions is None:
            raise ValueError("a causal mask needs q_positions and k_positions")
        qp = jnp.asarray(q_positions)
        kp = jnp.asarray(k_positions)
        qp = qp[None] if qp.ndim == 1 else qp
        kp = kp[None] if kp.ndim == 1 else kp
        masks.append(kp[:, None, None, :] <= qp[:, None, :, None])
    if q_segments is not None:
        ks = q_segments if k_segments is None else k_segments
        masks.append(q_segments[:, None, :, None] == ks[:, None, None, :])
    if k_valid is not None:
        masks.append(padding_mask(k_valid))
    return combine_masks(*masks)


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


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
    """Grouped-query attention's sharing, made explicit: ``[B, S, K, D]`` -> ``[B, S, H, D]``.

    With ``K`` key/value heads for ``H`` query heads (``H`` a multiple of ``K``), query head ``h``
    uses key/value head ``h // (H / K)``; ``K == H`` is ordinary multi-head attention, ``K == 1``
    multi-query attention (Chapter 19, Part 7).
    """
    K = x.shape[2]
    return x if K == num_heads else jnp.repeat(x, num_heads // K, axis=2)


def attention_scores(
    q: jax.Array,
    k: jax.Array,
    *,
    scale: float | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """The scores before the softmax, ``Q K^T * scale + bias``, in float32 (Chapter 5, Part 4).

    Args:
      q: ``[B, T, H, D]``; k: ``[B, S, K, D]`` (``K`` divides ``H``; see :func:`repeat_kv`).
      scale: None is the course's ``1 / sqrt(D)``: for q and k with unit-variance entries it keeps
        the scores' variance near 1 whatever ``D`` is, so the softmax does not saturate (T5 uses 1).
      bias: float, broadcastable to ``[B, H, T, S]`` (T5's relative position bias).
    Returns:
      float32 ``[B, H, T, S]``.
    """
    k = repeat_kv(k, q.shape[2])
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    return scores


def attention_weights(
    q: jax.Array,
    k: jax.Array,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """softmax(Q K^T * scale + bias) over keys, in float32 (Chapter 5, Parts 4-5).

    Args:
      q: ``[B, T, H, D]``; k: ``[B, S, K, D]`` (``K`` divides ``H``; see :func:`repeat_kv`);
      mask: bool, broadcastable to ``[B, H, T, S]``.
      scale: multiplies the scores; None is the course's ``1 / sqrt(D)`` (T5 uses 1).
      bias: float, broadcastable to ``[B, H, T, S]``, added to the scaled scores (T5's relative
        position bias).
    Returns:
      float32 ``[B, H, T, S]``; each row sums to 1.
    """
    scores = attention_scores(q, k, scale=scale, bias=bias)
    if mask is not None:
        scores = jnp.where(mask, scores, _MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def _check_shapes(q, k, v, mask):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention expects q [B, T, H, D] and k, v [B, S, H, D]; got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"incompatible q {q.shape}, k {k.shape}, v {v.shape}: k and v must match, share q's batch and "
            "head dim, and have a number of heads that divides q's"
        )
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
    scale: float | None = None,
    bias: jax.Array | None = None,
    impl: AttentionImpl = "reference",
) -> jax.Array:
    """Scaled dot-product attention, ``softmax(Q K^T / sqrt(D)) V`` (Chapter 5; mask from Chapter 12).

    Args:
      q: ``[B, T, H, D]`` queries.
      k, v: ``[B, S, K, D]`` keys and values (``S`` may differ from ``T``: cross-attention, KV cache;
        ``K`` key/value heads, a divisor of ``H``: grouped-query attention, :func:`repeat_kv`).
      mask: optional bool, broadcastable to ``[B, H, T, S]``; True = may attend.
      is_causal: also apply the causal mask ``causal_mask(T, S)`` (query t sees keys <= t). Saying
        so, rather than passing that mask, lets fused kernels (cuDNN) skip the masked half of the
        work instead of reading a ``[B, H, T, S]`` mask.
      scale: multiplies ``Q K^T``; None means ``1 / sqrt(D)``.
      bias: optional float, broadcastable to ``[B, H, T, S]``, added to the scaled scores before the
        mask and softmax (T5's relative position bias).
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
        w = attention_weights(q, k, mask, scale=scale, bias=bias)
        v = repeat_kv(v, q.shape[2])
        out = jnp.einsum("bhts,bshd->bthd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.astype(q.dtype)
    if impl == "splash":
        if jax.default_backend() != "tpu":
            raise ValueError(
                f"attention impl 'splash' is a TPU kernel and this backend is {jax.default_backend()!r}; "
                "use 'cudnn' on NVIDIA GPUs or 'xla' elsewhere"
            )
        if mask is not None or bias is not None:
            raise ValueError("attention impl 'splash' takes is_causal or no mask, not a mask or bias array; use 'xla'")
        if scale is not None:
            q = q * jnp.asarray(scale * math.sqrt(q.shape[-1]), q.dtype)  # the kernel applies 1/sqrt(D)
        H = q.shape[2]
        return splash_attention(q, repeat_kv(k, H), repeat_kv(v, H), is_causal=is_causal)
    if impl not in ("xla", "cudnn", "auto"):
        raise ValueError(f"unknown attention impl {impl!r}; choose 'reference', 'xla', 'cudnn', 'splash' or 'auto'")
    if mask is not None:
        B, T, H, _ = q.shape
        mask = jnp.broadcast_to(mask, (B, H, T, k.shape[1]))
    if bias is not None:
        B, T, H, _ = q.shape
        bias = jnp.broadcast_to(bias, (B, H, T, k.shape[1])).astype(q.dtype)
    if is_causal and q.shape[1] != k.shape[1]:
        # jax.nn.dot_product_attention aligns its causal mask differently when T != S; be explicit.
        mask = combine_masks(mask, causal_mask(q.shape[1], k.shape[1]))
        is_causal = False
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if impl == "auto":
        impl = "cudnn" if (half and jax.default_backend() == "gpu") else "xla"
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                                implementation="cudnn")
        except Exception as e:  # cuDNN refuses at trace time: unsupported device, dtype or shape
            _warn_fallback(e)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, is_causal=is_causal,
                                        implementation="xla")


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


def decode_attention_plan(cache_length: int, head_dim: int) -> tuple[int, int] | None:
    """``(k_splits, block_k)`` for :func:`decode_attention` over a cache of ``cache_length`` slots,
    or None where the kernel cannot run it (then callers use XLA's attention).

    The kernel splits the cache into ``k_splits`` parts of at least 16 slots, each read in blocks of
    ``block_k`` (a power of two, 16 to 128, dividing the part); Triton needs a power-of-two head dim.
    """
    if head_dim < 16 or head_dim & (head_dim - 1):
        return None
    for splits in (16, 8, 4, 2, 1):
        part = cache_length // splits
        if cache_length % splits or part < 16:
            continue
        block = 128
        while block >= 16 and part % block:
            block //= 2
        if block >= 16:
            return splits, block
    return None


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, scale: float | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """One new query per row over a KV cache, with JAX's Pallas flash-decoding kernel (Chapter 13).

    The GPU kernel (``jax.experimental.pallas.ops.gpu.decode_attention``, Triton) splits the cache
    into parts that run in parallel and combines their softmaxes, and reads only the blocks of slots
    below each row's length (XLA's attention reads the whole buffer): the scores, the softmax and
    the weighted sum of one layer's decoding step are the kernel and a short combine. An opt-in
    (``MultiHeadAttention.decode_kernel = "pallas"``) measured by ``experiments/gpu_check.sh``; equal
    to :func:`attention` with the positional mask in float32 tests.

    Args:
      q: ``[B, H, D]``, the new token's queries.
      k, v: ``[B, S, K, D]`` cache buffers (``K`` divides ``H``: grouped-query attention).
      lengths: int ``[B]``: row ``b`` attends to slots ``0 .. lengths[b] - 1``.
      scale: multiplies ``q k``; None means ``1 / sqrt(D)``.
      interpret: run in Pallas's interpreter (slow; any backend). None: on anything but a GPU.
    Returns:
      ``[B, H, D]`` in the dtype of ``q``.
    """
    from jax.experimental.pallas.ops.gpu import decode_attention as kernel

    plan = decode_attention_plan(k.shape[1], q.shape[-1])
    if plan is None:
        raise ValueError(f"the decode kernel needs a cache length that is a multiple of 16 and a power-of-two head "
                         f"dim of at least 16; got S={k.shape[1]}, D={q.shape[-1]} (use ops.attention)")
    splits, block = plan
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = kernel.gqa(q, k, v, kv_seq_len=lengths.astype(jnp.int32), sm_scale=float(scale), k_splits=splits,
                     block_k=block, interpret=interpret)
    return out.astype(q.dtype)


_warned: set[str] = set()


def _warn_fallback(err: Exception) -> None:
    msg = f"cuDNN attention unavailable here ({type(err).__name__}: {str(err).splitlines()[0][:160]}); using XLA attention"
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
