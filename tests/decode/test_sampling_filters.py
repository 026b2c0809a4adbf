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
from tfd_jax.decode import SamplingSpec, choose_tokens, filtered_logits

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
def test_filtered_logits_is_temperature_then_top_k_then_top_p(logits, t, k, p):
    spec = SamplingSpec(greedy=False, top_k=k, use_top_p=True)
    out = np.asarray(filtered_logits(jnp.asarray(logits)[None], t, p, spec))[0]
    tempered = logits / np.float32(t)
    after_k = np.where(tempered >= np.sort(tempered)[::-1][k - 1], tempered, -np.inf)
    probs = _softmax64(after_k)
    assume(np.min(np.abs(np.cumsum(np.sort(probs)[::-1]) - p)) > 1e-5)
    np.testing.assert_array_equal(np.isfinite(out), _nucleus_reference(after_k, p))
    np.testing.assert_allclose(out[np.isfinite(out)], tempered[np.isfinite(out)], rtol=1e-6)


def test_sampled_tokens_come_only_from_the_kept_set():
    logits = jnp.asarray(np.linspace(-2, 2, V, dtype=np.float32)[np.random.default_rng(0).permutation(V)])
    batch = jnp.tile(logits[None], (2048, 1))
    cases = [
        (SamplingSpec(False, 4, False), 1.0, 1.0),  # top-4
        (SamplingSpec(False, None, True), 1.0, 0.5),  # nucleus 0.5
        (SamplingSpec(False, 6, True), 0.7, 0.8),  # all three
    ]
    for spec, t, p in cases:
        allowed = set(np.flatnonzero(np.isfinite(np.asarray(filtered_logits(logits[None], t, p, spec))[0])))
        drawn = set(np.asarray(choose_tokens(batch, jax.random.key(1), t, p, spec)).tolist())
        assert drawn == allowed, (spec, drawn, allowed)  # never outside, and 2048 draws reach them all
    greedy = choose_tokens(batch[:2], jax.random.key(0), 1.0, 1.0, SamplingSpec(True, None, False))
    np.testing.assert_array_equal(np.asarray(greedy), [int(jnp.argmax(logits))] * 2)
