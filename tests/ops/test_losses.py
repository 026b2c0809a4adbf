"""Cross-entropy and its read-outs against a float64 log-softmax (course Chapter 11)."""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST


token_cross_entropy = jax.jit(ops.token_cross_entropy, compiler_options=FAST)
cross_entropy = jax.jit(ops.cross_entropy, static_argnames="z_loss", compiler_options=FAST)
accuracy = jax.jit(ops.accuracy, compiler_options=FAST)


def np_log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_token_ce(logits, targets):
    return -np.take_along_axis(np_log_softmax(logits), np.asarray(targets)[..., None], axis=-1)[..., 0]


def data(B=3, T=5, V=11, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, T, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, (B, T))
    return logits, targets


def test_token_cross_entropy_matches_numpy():
    logits, targets = data()
    got = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
    assert got.dtype == jnp.float32 and got.shape == targets.shape
    np.testing.assert_allclose(np.asarray(got), np_token_ce(logits, targets), rtol=1e-5, atol=1e-5)


def test_token_cross_entropy_course_example():
    # P(pizza) = 0.012 gives a loss of -ln 0.012 = 4.423.
    probs = np.array([0.012, 0.5, 0.3, 0.188])
    loss = token_cross_entropy(np.log(probs).astype(np.float32), np.array(0))
    assert abs(float(loss) - 4.423) < 5e-4


def test_cross_entropy_unmasked_is_mean():
    logits, targets = data(seed=1)
    got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    assert math.isclose(got, np_token_ce(logits, targets).mean(), rel_tol=1e-5)


def test_cross_entropy_masked_mean_over_kept_positions():
    logits, targets = data(seed=2)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 1, 1, 1, 1]], bool)
    got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
    want = np_token_ce(logits, targets)[mask].mean()
    assert math.isclose(got, want, rel_tol=1e-5)
    # Masked positions really are ignored: garbage logits there change nothing.
    garbage = np.where(mask[..., None], logits, 1e4).astype(np.float32)
    assert math.isclose(float(cross_entropy(jnp.asarray(garbage), jnp.asarray(targets), jnp.asarray(mask))), want, rel_tol=1e-5)
    # A 0/1 float mask means the same as a bool one.
    got_f = float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask, jnp.float32)))
    assert math.isclose(got_f, want, rel_tol=1e-5)


def test_cross_entropy_all_masked_is_zero_not_nan():
    logits, targets = data(seed=3)
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), np.zeros(targets.shape, bool))
    assert float(got) == 0.0


def test_cross_entropy_bf16_logits_are_upcast():
    # Logits around 100 with differences ~1: summing exp() in bf16 (8 significant bits) would be
    # off by a few percent; the float32 path agrees with float64 on the same bf16 values.
    logits, targets = data(V=64, seed=4, scale=1.0)
    lb = jnp.asarray(logits + 100.0, jnp.bfloat16)
    exact = np_token_ce(np.asarray(lb, np.float64), targets)
    tok = token_cross_entropy(lb, jnp.asarray(targets))
    assert tok.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(tok), exact, rtol=1e-4, atol=1e-4)
    got = cross_entropy(lb, jnp.asarray(targets))
    assert got.dtype == jnp.float32
    assert math.isclose(float(got), exact.mean(), rel_tol=1e-5)


def test_z_loss_adds_squared_log_partition():
    logits, targets = data(seed=5)
    mask = np.ones(targets.shape, bool)
    mask[0] = False
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    want = ((np_token_ce(logits, targets) + 1e-2 * lse**2) * mask).sum() / mask.sum()
    got = float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), z_loss=1e-2))
    assert math.isclose(got, want, rel_tol=1e-5)


def test_accuracy_and_perplexity():
    logits, targets = data(seed=6)
    hit = logits.argmax(-1) == targets
    assert math.isclose(float(accuracy(jnp.asarray(logits), jnp.asarray(targets))), hit.mean(), rel_tol=1e-6)
    mask = np.zeros(targets.shape, bool)
    mask[1] = True
    assert math.isclose(float(accuracy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))), hit[1].mean(), rel_tol=1e-6)
    assert float(accuracy(jnp.asarray(logits), jnp.asarray(targets), np.zeros_like(mask))) == 0.0
    # Uniform logits over V tokens: loss ln V, perplexity V.
    V = 11
    loss = cross_entropy(np.zeros((2, 3, V), np.float32), np.zeros((2, 3), np.int32))
    assert math.isclose(float(ops.perplexity(loss)), V, rel_tol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_token_cross_entropy_any_leading_shape(shape):
    rng = np.random.default_rng(7)
    logits = rng.standard_normal(shape + (5,)).astype(np.float32)
    targets = rng.integers(0, 5, shape)
    np.testing.assert_allclose(
        np.asarray(token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets))), np_token_ce(logits, targets), rtol=1e-5
    )
