"""Top-k and top-p keep exactly the tokens they should (Chapter 10), and the sampler respects them.

Logits are drawn on a half-integer grid, so ties (several tokens with the same logit) are common:
both filters keep every token tied with the last one they keep.
"""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tfd_jax import ops

# The one sampler, jitted with every setting traced (as an RLHF rollout or a server would call it).
_filter_traced = jax.jit(lambda x, t, k, p: ops.filter_logits(x, temperature=t, top_k=k, top_p=p))
_sample_traced = jax.jit(lambda key, x, t, k, p: ops.sample(key, x, temperature=t, top_k=k, top_p=p))

V = 16
logits_st = st.lists(st.integers(-8, 8), min_size=V, max_size=V).map(lambda xs: np.array(xs, np.float32) / 2)


def _softmax64(x):
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def _nucleus_reference(logits, p):
    """Add tokens from most to least likely until their total reaches p; keep ties of the last one."""
    probs = _softmax64(logits)
    total, last = 0.0, None
    for i in np.argsort(-probs, kind="stable"):
        total += probs[i]
        last = probs[i]
        if total >= p:
            break
    return probs >= last


@settings(max_examples=60, deadline=None)
@given(logits=logits_st, k=st.integers(1, V))
def test_top_k_keeps_the_k_largest_and_their_ties(logits, k):
    out = np.asarray(ops.top_k_filter(jnp.asarray(logits), k))
    traced = np.asarray(jax.jit(ops.top_k_filter)(jnp.asarray(logits), jnp.int32(k)))  # sort path
    np.testing.assert_array_equal(traced, out)
    kth = np.sort(logits)[::-1][k - 1]
    keep = logits >= kth
    np.testing.assert_array_equal(np.isfinite(out), keep)
    np.testing.assert_array_equal(out[keep], logits[keep])  # kept logits are untouched
    assert keep.sum() >= k and (keep.sum() == k or (logits == kth).sum() > 1)


@settings(max_examples=80, deadline=None)
@given(logits=logits_st, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_nucleus_reaching_p(logits, p):
    probs = _softmax64(logits)
    cum = np.cumsum(np.sort(probs)[::-1])
    assume(np.min(np.abs(cum - p)) > 1e-5)  # float32 and float64 would disagree right on the line
    keep = np.isfinite(np.asarray(ops.top_p_filter(jnp.asarray(logits), p)))
    np.testing.assert_array_equal(keep, _nucleus_reference(logits, p))
    kept = probs[keep]
    assert kept.sum() >= p - 1e-6  # the token that crosses p is kept (the course's "amazing")
    assert kept.sum() - kept.min() < p or (probs == kept.min()).sum() > 1  # and nothing beyond it
    assert keep[np.argmax(logits)]


@settings(max_examples=30, deadline=None)
@given(logits=logits_st, t=st.floats(0.2, 3.0), k=st.sampled_from([2, 5]), p=st.floats(0.3, 0.95))
def test_filter_logits_is_temperature_then_top_k_then_top_p(logits, t, k, p):
    out = np.asarray(ops.filter_logits(jnp.asarray(logits)[None], temperature=t, top_k=k, top_p=p))[0]
    traced = np.asarray(_filter_traced(jnp.asarray(logits)[None], jnp.float32(t), jnp.int32(k), jnp.float32(p)))[0]
    np.testing.assert_array_equal(np.isfinite(traced), np.isfinite(out))
    tempered = logits / np.float32(t)
    after_k = np.where(tempered >= np.sort(tempered)[::-1][k - 1], tempered, -np.inf)
    probs = _softmax64(after_k)
    assume(np.min(np.abs(np.cumsum(np.sort(probs)[::-1]) - p)) > 1e-5)
    np.testing.assert_array_equal(np.isfinite(out), _nucleus_reference(after_k, p))
    np.testing.assert_allclose(out[np.isfinite(out)], tempered[np.isfinite(out)], rtol=1e-6)


def test_sampled_tokens_come_only_from_the_kept_set():
    logits = jnp.asarray(np.linspace(-2, 2, V, dtype=np.float32)[np.random.default_rng(0).permutation(V)])
    batch = jnp.tile(logits[None], (2048, 1))
    cases = [(1.0, 4, None), (1.0, None, 0.5), (0.7, 6, 0.8)]  # top-4, nucleus 0.5, all three
    for t, k, p in cases:
        allowed = set(np.flatnonzero(np.isfinite(np.asarray(ops.filter_logits(logits[None], temperature=t,
                                                                                 top_k=k, top_p=p))[0])))
        drawn = set(np.asarray(ops.sample(jax.random.key(1), batch, temperature=t, top_k=k, top_p=p)).tolist())
        assert drawn == allowed, (t, k, p, drawn, allowed)  # never outside, and 2048 draws reach them all
        traced = _sample_traced(jax.random.key(1), batch, jnp.float32(t), jnp.int32(k or V), jnp.float32(p or 1.0))
        assert set(np.asarray(traced).tolist()) == allowed
    greedy = ops.sample(jax.random.key(0), batch[:2], temperature=0.0)
    np.testing.assert_array_equal(np.asarray(greedy), [int(jnp.argmax(logits))] * 2)
    traced_greedy = _sample_traced(jax.random.key(0), batch[:2], jnp.float32(0.0), jnp.int32(3), jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(traced_greedy), np.asarray(greedy))  # a traced 0 is greedy too


def test_token_log_probs_are_the_models_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (3, V)) * 3
    toks = jnp.array([0, 5, 15])
    want = np.log(np.stack([_softmax64(np.asarray(row)) for row in logits]))[np.arange(3), [0, 5, 15]]
    np.testing.assert_allclose(np.asarray(ops.token_log_probs(logits, toks)), want, rtol=1e-5, atol=1e-6)
