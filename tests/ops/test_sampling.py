"""Logit filters and sampling (course Chapter 10 Part 3, Chapter 13)."""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST

V = 10
# Rows of distinct logits (no ties, at least 0.1 apart), so "the k largest" and "the nucleus" are
# unambiguous: distinct multiples of 0.1 in [-8, 8].
distinct_logits = hnp.arrays(np.int32, (3, V), elements=st.integers(-80, 80), unique=True).map(
    lambda a: (a / 10).astype(np.float32)
)


def np_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_top_p_keep(probs, p):
    """Boolean keep-mask: the most likely tokens, in order, until their total reaches p (inclusive)."""
    keep = np.zeros(probs.shape, bool)
    for r, row in enumerate(probs):
        total = 0.0
        for i in np.argsort(-row):
            keep[r, i] = True
            total += row[i]
            if total >= p:
                break
    return keep


top_k = jax.jit(ops.top_k_filter, static_argnames="k", compiler_options=FAST)
top_p = jax.jit(ops.top_p_filter, compiler_options=FAST)
filter_logits = jax.jit(ops.filter_logits, static_argnames=("temperature", "top_k", "top_p"), compiler_options=FAST)


@settings(max_examples=25, deadline=None)
@given(logits=distinct_logits, k=st.integers(1, V + 2))
def test_top_k_keeps_exactly_the_k_largest(logits, k):
    out = np.asarray(top_k(jnp.asarray(logits), k=k))
    kept = np.isfinite(out)
    want = np.zeros_like(kept)
    np.put_along_axis(want, np.argsort(-logits, axis=-1)[:, : min(k, V)], True, axis=-1)
    np.testing.assert_array_equal(kept, want)
    np.testing.assert_array_equal(out[kept], logits[kept])  # kept logits are untouched
    assert np.all(out[~kept] == -np.inf)


def test_top_k_bad_k():
    with pytest.raises(ValueError, match="top_k"):
        ops.top_k_filter(jnp.zeros((1, 4)), 0)


@settings(max_examples=25, deadline=None)
@given(logits=distinct_logits, p=st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_prefix_reaching_p(logits, p):
    probs = np_softmax(logits)
    # Skip draws where a running total sits within float32 rounding of p: there "reaches p" is
    # decided by the last bit, and float32 and float64 may legitimately disagree.
    cum = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    assume(np.all(np.abs(cum - p) > 1e-5))
    out = np.asarray(top_p(jnp.asarray(logits), p))
    kept = np.isfinite(out)
    np.testing.assert_array_equal(kept, np_top_p_keep(probs, p))
    np.testing.assert_array_equal(out[kept], logits[kept])
    for r in range(len(logits)):
        mass = probs[r][kept[r]].sum()
        assert mass >= p  # the kept tokens reach p ...
        assert mass - probs[r][kept[r]].min() < p  # ... and dropping the least likely one falls short
        # The kept set is the top of the order: nothing dropped is more likely than anything kept.
        if (~kept[r]).any():
            assert probs[r][~kept[r]].max() < probs[r][kept[r]].min()
        assert kept[r, np.argmax(logits[r])]  # the argmax always survives


def test_top_p_crossing_token_is_kept():
    # Probabilities 0.5, 0.3, 0.15, 0.05: p = 0.7 needs the second token (0.5 < 0.7 <= 0.8),
    # p = 0.85 the third, p = 0.4 only the first.
    logits = np.log(np.array([[0.15, 0.5, 0.05, 0.3]])).astype(np.float32)
    for p, want in [(0.7, [0, 1, 0, 1]), (0.85, [1, 1, 0, 1]), (0.4, [0, 1, 0, 0]), (1.0, [1, 1, 1, 1])]:
        np.testing.assert_array_equal(np.isfinite(np.asarray(top_p(logits, p)))[0], np.array(want, bool))


def test_top_p_tiny_p_keeps_argmax():
    logits = np.array([[0.0, 0.1, 0.2, 5.0, 0.3]], np.float32)
    np.testing.assert_array_equal(np.isfinite(np.asarray(top_p(logits, 1e-6)))[0], [0, 0, 0, 1, 0])


def np_filter(logits, temperature, k, p):
    z = np.asarray(logits, np.float64) / temperature
    if k is not None and k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    if p is not None and p < 1:
        z = np.where(np_top_p_keep(np_softmax(z), p), z, -np.inf)
    return z


@pytest.mark.parametrize(
    "temperature,k,p", [(1.0, None, None), (0.5, 3, None), (2.0, None, 0.8), (0.7, 4, 0.6), (3.0, 6, 0.9), (1.0, 2, 1.0)]
)
def test_filter_logits_is_temperature_then_top_k_then_top_p(temperature, k, p):
    logits = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32) * 2
    out = np.asarray(filter_logits(logits, temperature=temperature, top_k=k, top_p=p))
    want = np_filter(logits, temperature, k, p)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.isfinite(out), np.isfinite(want))
    np.testing.assert_allclose(out[np.isfinite(out)], want[np.isfinite(want)], rtol=1e-6)


def test_temperature_changes_the_nucleus():
    # Temperature comes before top-p, so it changes how many tokens reach p = 0.8:
    # T=0.5 keeps 1, T=1 keeps 2, T=3 keeps 3 (probabilities of [2, 1, 0, -1] / T).
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], np.float32)
    counts = [int(np.isfinite(np.asarray(filter_logits(logits, temperature=t, top_p=0.8))).sum()) for t in (0.5, 1.0, 3.0)]
    assert counts == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1, top_k=None, top_p=None), "temperature"),
        (dict(temperature=1.0, top_k=None, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_k=None, top_p=1.5), "top_p"),
        (dict(temperature=1.0, top_k=None, top_p=-0.2), "top_p"),
        (dict(temperature=1.0, top_k=0, top_p=None), "top_k"),
        (dict(temperature=1.0, top_k=-3, top_p=None), "top_k"),
        (dict(temperature=1.0, top_k=2.5, top_p=None), "top_k"),
    ],
)
def test_check_sampling_args_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.check_sampling_args(**kwargs)
    # sample() refuses the same settings, on the greedy path too.
    with pytest.raises(ValueError, match=match):
        ops.sample(jax.random.key(0), jnp.zeros((1, 4)), **kwargs)
    if kwargs["temperature"] >= 0:
        with pytest.raises(ValueError, match=match):
            ops.sample(jax.random.key(0), jnp.zeros((1, 4)), **{**kwargs, "temperature": 0.0})


def test_check_sampling_args_accepts_valid():
    ops.check_sampling_args(temperature=0.0, top_k=1, top_p=1.0)
    ops.check_sampling_args(temperature=0.7, top_k=None, top_p=0.9)
    with pytest.raises(ValueError, match="temperature"):
        ops.check_sampling_args(temperature=0.0, top_k=None, top_p=None, allow_greedy=False)
    with pytest.raises(ValueError, match="temperature"):
        ops.filter_logits(jnp.zeros((1, 3)), temperature=0.0)


sample_greedy = jax.jit(lambda key, x: ops.sample(key, x, temperature=0.0), compiler_options=FAST)
sample_top1 = jax.jit(lambda key, x: ops.sample(key, x, temperature=1.3, top_k=1), compiler_options=FAST)


@settings(max_examples=25, deadline=None)
@given(logits=distinct_logits, seed=st.integers(0, 2**32 - 1))
def test_greedy_and_top1_are_argmax_for_any_seed(logits, seed):
    want = np.argmax(logits, -1)
    key = jax.random.key(seed)
    greedy = sample_greedy(key, jnp.asarray(logits))
    assert greedy.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(greedy), want)
    np.testing.assert_array_equal(np.asarray(sample_top1(key, jnp.asarray(logits))), want)


def test_sample_frequencies_follow_the_filtered_distribution():
    # 4000 draws from one row with top_p = 0.8. Each token's frequency has standard deviation
    # at most sqrt(0.25 / 4000) = 0.008; we allow 0.04 (5 sigma). Dropped tokens never appear.
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    draw = jax.vmap(lambda k: ops.sample(k, logits, top_p=0.8))
    draws = np.asarray(jax.jit(lambda key: draw(jax.random.split(key, 4000)), compiler_options=FAST)(jax.random.key(0)))
    freq = np.bincount(draws, minlength=5) / len(draws)
    probs = np_softmax(np.asarray(logits)[None])[0]
    keep = np_top_p_keep(probs[None], 0.8)[0]
    want = np.where(keep, probs, 0) / probs[keep].sum()
    assert np.all(freq[~keep] == 0)
    np.testing.assert_allclose(freq, want, atol=0.04)
