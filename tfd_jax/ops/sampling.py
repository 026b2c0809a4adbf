"""Logit filters and samplers for decoding (Chapter 10, Part 3; Chapter 13).

Every filter maps logits ``[..., V]`` to logits of the same shape where dropped tokens are set to
``-inf``; sampling from the result with ``jax.random.categorical`` renormalises implicitly, which is
the course's "zero the rest and renormalise" step.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _concrete(x) -> bool:
    """True for a Python or NumPy number (checkable now), False for a traced value under ``jit``."""
    return x is None or not isinstance(x, jax.core.Tracer)


def apply_temperature(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """``logits / T`` in float32: T < 1 sharpens, T > 1 flattens (Chapter 10). T must be > 0."""
    return logits.astype(jnp.float32) / temperature


def top_k_filter(logits: jax.Array, k: int | jax.Array) -> jax.Array:
    """Keep the ``k`` largest logits per row (ties at the k-th value are all kept); ``[..., V]``.

    A Python ``k`` uses ``lax.top_k`` (fast, compiled per ``k``); a traced ``k`` (under ``jit``)
    sorts each row instead, so one program serves every ``k``.
    """
    V = logits.shape[-1]
    if _concrete(k) and not isinstance(k, jax.Array):
        if not 1 <= k:
            raise ValueError(f"top_k must be >= 1, got {k}")
        if k >= V:
            return logits
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
    else:
        idx = jnp.clip(jnp.asarray(k, jnp.int32), 1, V) - 1
        ranked = jnp.sort(logits, axis=-1)[..., ::-1]
        kth = jnp.take_along_axis(ranked, jnp.broadcast_to(idx, ranked.shape[:-1])[..., None], axis=-1)
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``p``.

    Tokens are added in order of probability until the running total *reaches or passes* ``p``, and
    the token that crosses the line is kept, as in the course's example (cumulative 89.45% then
    "amazing" takes it to 90.46% and stays). The most likely token is always kept.

    Args:
      logits: ``[..., V]``; p: in (0, 1].
    Returns:
      ``[..., V]`` float32.
    """
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[..., ::-1]
    # Probability mass strictly before each sorted token; keep while that mass is still below p.
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < p
    # The smallest kept probability is the threshold; everything at least that likely stays.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, NEG_INF)


def filter_logits(
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Temperature, then top-k, then top-p: the usual sampling recipe (Chapter 10).

    Jittable: each setting may be a Python number (checked here) or a traced value (then the caller
    keeps it in range).

    Args:
      logits: ``[..., V]``; temperature > 0; top_k >= 1 or None; top_p in (0, 1] or None.
    Returns:
      float32 ``[..., V]`` with filtered-out tokens at ``-inf``.
    """
    if all(_concrete(v) for v in (temperature, top_k, top_p)):
        check_sampling_args(temperature=float(temperature), top_k=top_k, top_p=top_p, allow_greedy=False)
    out = apply_temperature(logits, temperature)
    if top_k is not None:
        out = top_k_filter(out, top_k)
    if top_p is not None and not (_concrete(top_p) and top_p >= 1.0):
        out = top_p_filter(out, top_p)
    return out


def check_sampling_args(
    *, temperature: float, top_k: int | None, top_p: float | None, allow_greedy: bool = True
) -> None:
    """Raise a clear ``ValueError`` for settings that make no sense (before anything compiles)."""
    if not math.isfinite(temperature) or temperature < 0 or (temperature == 0 and not allow_greedy):
        raise ValueError(
            f"temperature must be {'>= 0 (0 means greedy)' if allow_greedy else '> 0'}, got {temperature}"
        )
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(
    rng: jax.Array,
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Draw one token id per row; ``temperature == 0`` is greedy (argmax, Chapter 10).

    The one sampler of the library: the decode loop calls it too. Jittable with traced
    ``temperature``, ``top_k`` and ``top_p`` (a traced temperature of 0 still means greedy).

    Args:
      rng: PRNG key; logits: ``[..., V]``.
    Returns:
      int32 ``[...]``.
    """
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all(_concrete(v) for v in (temperature, top_k, top_p)):
        # Validate every setting, also on the greedy path, so a bad top_k/top_p never passes silently.
        check_sampling_args(temperature=float(temperature), top_k=top_k, top_p=top_p)
        if float(temperature) == 0:  # (a Python comparison: inside a trace, == on an array is traced)
            return greedy_ids
        filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    greedy = jnp.asarray(temperature) <= 0
    safe_t = jnp.where(greedy, 1.0, temperature)
    filtered = filter_logits(logits, temperature=safe_t, top_k=top_k, top_p=top_p)
    drawn = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(greedy, greedy_ids, drawn)


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log softmax(logits)[token]`` per row, float32: how likely the model found each chosen token.

    The model's own distribution (no temperature or filter): what policy-gradient training
    (Chapter 18) compares between the sampling policy and the one being trained.

    Args:
      logits: ``[..., V]``; tokens: int ``[...]``.
    Returns:
      float32 ``[...]``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
