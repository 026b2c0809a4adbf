"""Masked-language-model corruption: choose positions, hide them, and ask the model to restore them.

BERT's pre-training objective (Chapter 19 describes the encoder; the course names no objective for
it, so this follows the BERT paper): of the tokens that may be chosen (real, non-special), each is
chosen with probability ``rate`` (15%); a chosen token is replaced by ``[MASK]`` 80% of the time,
by a random token 10% of the time, and kept 10% of the time. The loss is taken only at chosen
positions, so the model cannot learn to copy its input.

Shape letters: B batch, T sequence length, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mlm_mask(
    key: jax.Array,
    tokens: jax.Array,
    eligible: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    rate: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """Corrupt ``tokens`` for masked-LM training.

    Args:
      key: a PRNG key (one per batch: the same key gives the same corruption).
      tokens: int ``[B, T]``, the original tokens (they are the targets).
      eligible: bool ``[B, T]``, positions that may be chosen (not special, not padding).
      mask_id: the ``[MASK]`` token; vocab_size: random replacements are drawn from ``[0, V)``.
      rate: chance that an eligible position is chosen; ``mask_frac`` / ``random_frac``: how a
        chosen position is corrupted (the rest keep their token).
    Returns:
      ``(inputs, chosen)``: the corrupted int ``[B, T]`` and bool ``[B, T]``, where the loss applies.
    """
    k_choose, k_how, k_random = jax.random.split(key, 3)
    chosen = eligible & jax.random.bernoulli(k_choose, rate, tokens.shape)
    how = jax.random.uniform(k_how, tokens.shape)
    random_ids = jax.random.randint(k_random, tokens.shape, 0, vocab_size, dtype=tokens.dtype)
    inputs = jnp.where(chosen & (how < mask_frac), jnp.asarray(mask_id, tokens.dtype), tokens)
    inputs = jnp.where(chosen & (how >= mask_frac) & (how < mask_frac + random_frac), random_ids, inputs)
    return inputs, chosen


def span_corruption_lengths(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int, int, int]:
    """The static sizes of :func:`span_corruption` for windows of ``length`` tokens:
    ``(noise tokens, spans, input length, target length)`` (both lengths count the closing eos)."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span)), 1)
    return num_noise, num_spans, length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption(
    key: jax.Array,
    tokens: jax.Array,
    *,
    sentinel_ids: jax.Array,
    eos_id: int,
    noise_density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[jax.Array, jax.Array]:
    """T5's denoising objective (beyond the course): hide random spans of each window behind sentinel
    tokens and ask the decoder to write the hidden spans.

    Exactly ``round(T * noise_density)`` tokens of each row are hidden, in ``round(noise / mean_span)``
    spans of random lengths (at least one token each), placed at random between kept stretches (the
    row starts with a kept stretch, as in T5). Span ``i`` becomes ``sentinel_ids[i]`` in the input,
    and the target is ``sentinel_0, span 0, sentinel_1, span 1, ...``; both end with ``eos_id``:

        tokens  a b c d e f g h      (c d and g hidden)
        input   a b <X0> e f <X1> h </s>
        target  <X0> c d <X1> g </s>

    The sizes are fixed by ``T`` (:func:`span_corruption_lengths`), so this runs inside ``jit``.

    Args:
      key: a PRNG key; tokens: int ``[B, T]``; sentinel_ids: int ``[>= spans]``.
    Returns:
      ``(inputs [B, S_in], targets [B, S_out])``, int like ``tokens``.
    """
    B, T = tokens.shape
    num_noise, num_spans, in_len, out_len = span_corruption_lengths(T, noise_density, mean_span)
    if sentinel_ids.shape[0] < num_spans:
        raise ValueError(f"span corruption of {T}-token windows makes {num_spans} spans but only "
                         f"{sentinel_ids.shape[0]} sentinel tokens were given")

    def segment(k, items, segments):  # random lengths >= 1 of `segments` parts summing to `items`
        cuts = jax.random.permutation(k, items - 1) < segments - 1
        seg = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), jnp.int32), cuts.astype(jnp.int32)]))
        return jax.ops.segment_sum(jnp.ones((items,), jnp.int32), seg, num_segments=segments)

    def noise_mask(k):
        k1, k2 = jax.random.split(k)
        lengths = jnp.stack([segment(k1, T - num_noise, num_spans), segment(k2, num_noise, num_spans)], 1).reshape(-1)
        starts = jnp.cumsum(lengths)[:-1]
        span = jnp.cumsum(jnp.zeros((T,), jnp.int32).at[starts].set(1))
        return span % 2 == 1

    def squeeze(row, hidden, size):  # each run of `hidden` -> its sentinel; other tokens kept
        first = hidden & ~jnp.concatenate([jnp.zeros((1,), bool), hidden[:-1]])
        run = jnp.cumsum(first) - 1
        values = jnp.where(first, sentinel_ids[jnp.maximum(run, 0)].astype(row.dtype), row)
        keep = ~hidden | first
        where = jnp.where(keep, jnp.cumsum(keep) - 1, size)  # dropped tokens go out of range
        out = jnp.full((size,), eos_id, row.dtype)
        return out.at[where].set(values, mode="drop")

    hidden = jax.vmap(noise_mask)(jax.random.split(key, B))
    inputs = jax.vmap(lambda r, h: squeeze(r, h, in_len))(tokens, hidden)
    targets = jax.vmap(lambda r, h: squeeze(r, ~h, out_len))(tokens, hidden)
    return inputs, targets
