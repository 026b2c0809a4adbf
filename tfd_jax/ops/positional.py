"""Position information: sinusoidal (Chapter 4), learned (GPT-2), and rotary (RoPE).

Shape letters: T positions, M model width, H heads, D head dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sinusoidal_positions(num_positions: int, d_model: int, base: float = 10000.0) -> jax.Array:
    """The fixed sine/cosine table of Chapter 4, Part 4.

    ``PE[pos, 2i] = sin(pos / base^(2i/M))`` and ``PE[pos, 2i+1] = cos(pos / base^(2i/M))``, with
    ``pos`` counted from 0. Each sin/cos pair shares one frequency; the course's d=6 divisors are
    1, 21.544 and 464.159.

    Returns:
      float32 ``[num_positions, d_model]`` (an odd ``d_model`` drops the last cosine column).
    """
    if num_positions < 0 or d_model <= 0:
        raise ValueError(f"need num_positions >= 0 and d_model > 0, got {num_positions}, {d_model}")
    pos = jnp.arange(num_positions, dtype=jnp.float32)[:, None]
    two_i = jnp.arange(0, d_model, 2, dtype=jnp.float32)[None, :]
    angle = pos / jnp.power(base, two_i / d_model)
    pe = jnp.zeros((num_positions, d_model), jnp.float32)
    pe = pe.at[:, 0::2].set(jnp.sin(angle))
    pe = pe.at[:, 1::2].set(jnp.cos(angle[:, : d_model // 2]))
    return pe


def default_positions(batch: int, length: int, offset: int | jax.Array = 0) -> jax.Array:
    """The positions a sequence has when nobody says otherwise: ``offset + 0..T-1`` in every row.

    Args:
      batch: ``B``; length: ``T``; offset: an int, or int ``[B]`` (each row's first position, e.g.
        how much of a KV cache row is already filled).
    Returns:
      int32 ``[B, T]``.
    """
    offset = jnp.asarray(offset, jnp.int32)
    if offset.ndim == 1:
        offset = offset[:, None]
    return jnp.broadcast_to(offset + jnp.arange(length, dtype=jnp.int32), (batch, length))


def learned_positions(table: jax.Array, positions: jax.Array) -> jax.Array:
    """Look up rows of a trained position table (GPT-2's ``wpe``).

    Args:
      table: ``[max_positions, M]``; positions: int ``[B, T]`` or ``[T]``.
    Returns:
      ``[..., T, M]``.
    """
    return jnp.take(table, positions, axis=0)


def rope_frequencies(head_dim: int, base: float = 10000.0) -> jax.Array:
    """Inverse frequencies ``base^(-2i/D)`` for ``i < D/2``: float32 ``[D/2]``."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    return 1.0 / jnp.power(base, jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotate query/key feature pairs by an angle proportional to the position (RoPE).

    Chapter 4, Part 8 shows that ``PE(pos + k)`` is a rotation of ``PE(pos)``; RoPE applies that
    rotation to q and k directly, so ``q_t . k_s`` depends only on ``t - s``. Pairs are the two
    halves of the head dim (the GPT-NeoX / LLaMA layout).

    Args:
      x: ``[B, T, H, D]``; positions: int ``[B, T]`` (absolute positions).
    Returns:
      ``[B, T, H, D]`` in ``x``'s dtype.
    """
    D = x.shape[-1]
    inv = rope_frequencies(D, base)
    angle = positions.astype(jnp.float32)[..., None] * inv  # [B, T, D/2]
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def relative_position_buckets(
    q_positions: jax.Array,
    k_positions: jax.Array,
    *,
    num_buckets: int = 32,
    max_distance: int = 128,
    bidirectional: bool = True,
) -> jax.Array:
    """T5's relative positions: the bucket of each (query, key) offset ``k - q`` (beyond the course,
    which has only absolute positions; Chapter 19 names T5).

    Small offsets get a bucket each; larger ones share logarithmically wider buckets up to
    ``max_distance``, beyond which all fall in the last bucket. ``bidirectional`` (the encoder)
    spends half the buckets on keys after the query; a decoder (causal) uses all of them for keys
    at or before it. A model learns one scalar per bucket and head, added to the attention scores.

    Args:
      q_positions: int ``[..., T]``; k_positions: int ``[..., S]`` (broadcastable batch dims).
    Returns:
      int32 ``[..., T, S]`` in ``[0, num_buckets)``.
    """
    rel = k_positions[..., None, :].astype(jnp.int32) - q_positions[..., :, None].astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        dist = jnp.abs(rel)
    else:
        dist = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    # log-spaced beyond max_exact; the max() keeps log's argument >= 1 where the small branch wins
    far = max_exact + (
        jnp.log(jnp.maximum(dist, max_exact).astype(jnp.float32) / max_exact)
        / jnp.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(jnp.int32)
    far = jnp.minimum(far, num_buckets - 1)
    return buckets + jnp.where(dist < max_exact, dist, far)
