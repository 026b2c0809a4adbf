"""The preallocated key/value cache for incremental decoding (Chapter 13, "KV cache").

Chapter 13's observation: when the model produces token ``n + 1`` it would recompute the keys and
values of tokens ``0..n`` that it already computed for token ``n``. The cache keeps them instead. Only
K and V are kept, never Q: a past token's query is never needed again, while every new query must look
at all past keys and values.

Here the cache is allocated **once** for the whole generation, at its final size, and filled in place:
for every layer a K and a V buffer of shape ``[B, K, S_max, D]`` (``K`` key/value heads) in the model's compute dtype, plus
``lengths [B]``, how many positions of each row are filled (which is also the position where the row's
next token goes).

The buffers are stored heads-major, ``[B, H, S_max, D]``, not in the ``[B, S, H, D]`` order the
attention layer produces. Attention is a batched matrix product over ``(B, H)``; with ``S`` between
``B`` and ``H`` in memory XLA has to transpose the whole cache of every layer at every step before
multiplying, which on CPU doubled the time per token at ``S_max = 256`` (``experiments/decode_bench.py``).
New keys and values are transposed on the way in instead (``T`` positions, not ``S_max``). Rows may have different lengths (ragged prompts); attention masks are built from
``lengths``, so unfilled or stale slots are never attended to.

``S_max`` is rounded up to a *bucket* (:func:`bucket_length`) so that generations with slightly
different prompt or output lengths share one shape, and therefore one compiled program.

Memory (Chapter 13): each token costs ``2 x L x H x D`` numbers (K and V, every layer, every head),
so the cache holds ``B x S_max x 2 x L x H x D`` numbers; :func:`bytes_per_token` and
:attr:`KVCache.nbytes` report it. For GPT-3 (L=96, H=96, D=128) that is 2,359,296 numbers, about
9.4 MB per token in float32, as the course computes.

Shape letters: B batch, S_max cache length, H heads, D head dim, L layers.
"""
from __future__ import annotations

from tfd_jax.nn.cache import KVCache, allocate_cache, as_bshd, write_rows

__all__ = ["KVCache", "MIN_BUCKET", "as_bshd", "bucket_length", "bytes_per_token", "init_cache", "write_rows"]

#: the smallest bucket; shorter lengths round up to it
MIN_BUCKET = 16


def bucket_length(n: int, *, minimum: int = MIN_BUCKET, maximum: int | None = None) -> int:
    """Round ``n`` up to the next power of two (at least ``minimum``), capped at ``maximum``.

    Lengths that land in the same bucket give arrays of the same shape, so jitted functions that take
    them compile once. Powers of two waste at most half the slots while keeping the number of distinct
    programs logarithmic in the context length.
    """
    if n < 1:
        raise ValueError(f"length must be >= 1, got {n}")
    b = max(int(minimum), 1 << (int(n) - 1).bit_length())
    if maximum is not None:
        if n > maximum:
            raise ValueError(f"length {n} exceeds the maximum {maximum}")
        b = min(b, int(maximum))
    return b


def bytes_per_token(config, dtype=None) -> int:
    """Cache bytes one token costs: ``2 x L x K x D`` numbers times the dtype's size (Chapter 13).

    ``K`` is the number of key/value heads: ``H`` for multi-head attention, fewer with grouped-query
    attention, which is what makes a Llama-style cache smaller.

    Args:
      config: a ``GPTConfig`` (``num_layers``, ``num_kv_heads``, ``head_dim``, ``compute_dtype``).
      dtype: the cache dtype; defaults to the model's compute dtype.
    """
    import numpy as np

    dtype = np.dtype(dtype or config.compute_dtype)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize


def init_cache(config, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """Allocate an empty cache: zeros ``[B, K, S_max, D]`` for each layer's K and V, lengths 0.

    The same as ``model.init_cache(batch_size, max_length, dtype)`` for a model with this config.

    Args:
      config: a ``GPTConfig``.
      batch_size: ``B``.
      max_length: ``S_max`` (taken as given; round it with :func:`bucket_length` first to share
        compiled programs). Must not exceed ``config.context_length``: positions past it have no
        position embedding.
      dtype: defaults to the model's compute dtype.
    """
    if not 1 <= max_length <= config.context_length:
        raise ValueError(f"cache length must be in [1, context_length={config.context_length}], got {max_length}")
    return allocate_cache(config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim,
                          dtype or config.compute_dtype)
