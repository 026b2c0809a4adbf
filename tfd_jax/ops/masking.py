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
