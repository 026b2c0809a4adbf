"""Inverted dropout (course Chapter 6): expected value kept, the right fraction dropped."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST


dropout = jax.jit(ops.dropout, static_argnames=("rate", "deterministic"), compiler_options=FAST)


def test_course_example_scaling():
    # p = 0.1: a surviving 0.25 becomes 0.25 / 0.9 = 0.278; dropped ones are exactly 0.
    y = np.asarray(dropout(np.full((1000,), 0.25, np.float32), rate=0.1, rng=jax.random.key(0)))
    assert np.all((y == 0) | (np.abs(y - 0.278) < 5e-4))
    np.testing.assert_allclose(y[y != 0], 0.25 / 0.9, rtol=1e-6)
    assert 0 < np.sum(y == 0) < 1000


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_fraction_dropped_is_rate(rate):
    # Each of N elements is dropped independently with probability `rate`, so the dropped
    # fraction has standard deviation sqrt(rate (1 - rate) / N) ~ 0.002 for N = 65536;
    # 6 standard deviations make a false failure practically impossible (~1e-9).
    N = 65536
    y = np.asarray(dropout(np.ones((N,), np.float32), rate=rate, rng=jax.random.key(1)))
    sigma = np.sqrt(rate * (1 - rate) / N)
    assert abs(np.mean(y == 0) - rate) < 6 * sigma


def test_expected_value_is_kept():
    # Average K independent draws per element. Each draw is x / (1 - r) with probability 1 - r and
    # 0 otherwise: mean x, variance x^2 r / (1 - r). So the average has standard deviation
    # |x| sqrt(r / ((1 - r) K)); with K = 4000, r = 0.3 that is 0.0104 |x|. We allow 5 standard
    # deviations per element: over 32 elements the chance of a false failure is below 2e-5.
    rate, K = 0.3, 4000
    x = jnp.asarray(np.random.default_rng(0).standard_normal(32), jnp.float32)
    draw = jax.vmap(lambda k: ops.dropout(x, rate, k))
    draws = jax.jit(lambda key: draw(jax.random.split(key, K)), compiler_options=FAST)(jax.random.key(2))
    mean = np.asarray(draws, np.float64).mean(0)
    sigma = np.abs(np.asarray(x)) * np.sqrt(rate / ((1 - rate) * K))
    assert np.all(np.abs(mean - np.asarray(x)) <= 5 * sigma + 1e-7)
    # And the draws really differ (this is not the identity).
    assert np.mean(np.asarray(draws) == 0) > 0.25


def test_identity_when_deterministic_or_rate_zero():
    x = jnp.arange(10.0)
    assert ops.dropout(x, 0.5, jax.random.key(0), deterministic=True) is x
    assert ops.dropout(x, 0.0, None) is x
    assert ops.dropout(x, 0.5, None, deterministic=True) is x


def test_keeps_dtype_and_shape():
    x = np.ones((4, 5), jnp.bfloat16)
    y = dropout(x, rate=0.5, rng=jax.random.key(0))
    assert y.dtype == jnp.bfloat16 and y.shape == (4, 5)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_bad_rate_raises(rate):
    with pytest.raises(ValueError, match="rate"):
        ops.dropout(jnp.ones(3), rate, jax.random.key(0))


def test_missing_rng_raises():
    with pytest.raises(ValueError, match="rng"):
        ops.dropout(jnp.ones(3), 0.5, None)
