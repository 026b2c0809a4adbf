"""The key/value cache as data: per-layer buffers allocated once, written in place (Chapter 13).

Attention layers read and write it (:meth:`tfd_jax.nn.MultiHeadAttention.cached`); models allocate it
(``model.init_cache``); ``tfd_jax.decode`` carries it through the decode loop. See
``tfd_jax.decode.cache`` for why the buffers are heads-major and how their lengths are bucketed.

Shape letters: B batch, S_max cache length, K key/value heads, D head dim, T new tokens.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, plus how much of each row is filled.

    Attributes:
      k, v: tuples with one ``[B, K, S_max, D]`` array per layer (heads-major; ``K`` key/value heads).
      lengths: int32 ``[B]``; row ``b`` holds valid K/V at positions ``0..lengths[b]-1`` and writes
        its next token at ``lengths[b]``.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_length(self) -> int:
        """``S_max``: the number of positions each row can hold."""
        return self.k[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        """Bytes held by the K and V buffers (``B x S_max x 2 x L x K x D x itemsize``)."""
        return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (*self.k, *self.v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncoderDecoderCache:
    """What an encoder-decoder's decoder needs at each step (Chapter 19, Part 5): its own growing
    self-attention cache, and every layer's cross-attention keys and values, computed once from the
    encoder's output when the cache is made and only read afterwards.

    Attributes:
      self_attn: the decoder's :class:`KVCache`.
      cross_k, cross_v: tuples with one ``[B, K, S_src, D]`` array per decoder layer (heads-major,
        like the self-attention buffers).
      source_valid: bool ``[B, S_src]``, False on source padding (no query attends there).

    ``lengths``, ``max_length`` and ``batch_size`` are those of ``self_attn``, so a decode loop
    treats both kinds of cache alike.
    """

    self_attn: KVCache
    cross_k: tuple[jax.Array, ...]
    cross_v: tuple[jax.Array, ...]
    source_valid: jax.Array

    @property
    def lengths(self) -> jax.Array:
        return self.self_attn.lengths

    @property
    def batch_size(self) -> int:
        return self.self_attn.batch_size

    @property
    def max_length(self) -> int:
        return self.self_attn.max_length

    @property
    def nbytes(self) -> int:
        """Bytes of the self-attention buffers plus the cross-attention keys and values."""
        cross = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in (*self.cross_k, *self.cross_v))
        return self.self_attn.nbytes + cross


def allocate_cache(num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                   dtype) -> KVCache:
    """Zeros ``[B, K, S_max, D]`` for each layer's K and V, lengths 0."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shape = (batch_size, num_kv_heads, max_length, head_dim)
    k = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch_size,), jnp.int32))


def write_rows(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write ``new [B, T, K, D]`` into ``buffer [B, K, S_max, D]`` at a per-row position ``start [B]``.

    One ``dynamic_update_slice`` per row (vmapped), which XLA performs in place when the buffer is a
    loop carry or donated. The caller keeps ``start + T <= S_max``: out-of-range starts are clamped by
    ``dynamic_update_slice``, which would shift the write.
    """

    def one(buf, x, s):  # buf [K, S_max, D], x [K, T, D]
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), (0, s, 0))

    return jax.vmap(one)(buffer, jnp.swapaxes(new, 1, 2), start.astype(jnp.int32))


def as_bshd(buffer: jax.Array) -> jax.Array:
    """A cache buffer ``[B, K, S_max, D]`` in the attention layer's order ``[B, S_max, K, D]``.

    Inside ``jit`` this is free: XLA folds it into the attention's matrix products.
    """
    return jnp.swapaxes(buffer, 1, 2)
