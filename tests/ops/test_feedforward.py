"""Feed-forward networks against float64 numpy (course Chapter 7)."""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST


feed_forward = jax.jit(ops.feed_forward, static_argnames="activation", compiler_options=FAST)
gated_feed_forward = jax.jit(ops.gated_feed_forward, static_argnames="activation", compiler_options=FAST)


def np_gelu_exact(x):
    return x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


NP_ACT = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": np_gelu_exact,
    "gelu_tanh": np_gelu_tanh,
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


def weights(M=6, F=24, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in [(3, 4, M), (M, F), (F,), (F, M), (M,)]]


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("biases", [True, False])
def test_feed_forward_matches_numpy(act, biases):
    x, w1, b1, w2, b2 = weights()
    if not biases:
        b1 = b2 = None
    y = feed_forward(*(None if a is None else jnp.asarray(a) for a in (x, w1, b1, w2, b2)), activation=act)
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    h = f64(x) @ f64(w1) + (0 if b1 is None else f64(b1))
    want = NP_ACT[act](h) @ f64(w2) + (0 if b2 is None else f64(b2))
    assert y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


def test_gelu_variants_differ_and_match_their_formulas():
    x = np.linspace(-4, 4, 81)
    exact = np.asarray(jax.jit(ops.activation_fn("gelu"), compiler_options=FAST)(jnp.asarray(x, jnp.float32)))
    approx = np.asarray(jax.jit(ops.activation_fn("gelu_tanh"), compiler_options=FAST)(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(exact, np_gelu_exact(x), atol=1e-6)
    np.testing.assert_allclose(approx, np_gelu_tanh(x), atol=1e-6)
    # The two are close but not the same function: the test above could tell them apart.
    assert 1e-5 < np.max(np.abs(np_gelu_exact(x) - np_gelu_tanh(x))) < 1e-2


def _np_slope(act, x, h=1e-5):
    """float64 central difference of the numpy formula."""
    return (NP_ACT[act](x + h) - NP_ACT[act](x - h)) / (2 * h)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_activation_derivatives_match_float64_and_every_transform_works(act):
    """The written-out derivatives (what the backward pass uses) against float64 numpy, through
    grad, jvp and a second derivative; in bf16 the gradient keeps the input's dtype."""
    f = ops.activation_fn(act)
    x = np.linspace(-6, 6, 121)
    xs = jnp.asarray(x, jnp.float32)
    grad = jax.jit(jax.vmap(jax.grad(f)), compiler_options=FAST)(xs)
    np.testing.assert_allclose(np.asarray(grad), _np_slope(act, x), atol=2e-6)
    _, tangent = jax.jvp(f, (xs,), (jnp.ones_like(xs),))
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(grad), atol=1e-7)
    curvature = jax.jit(jax.vmap(jax.grad(jax.grad(f))), compiler_options=FAST)(xs)
    want = (_np_slope(act, x + 1e-4) - _np_slope(act, x - 1e-4)) / 2e-4
    np.testing.assert_allclose(np.asarray(curvature), want, atol=1e-4)
    g16 = jax.grad(lambda v: jnp.sum(f(v).astype(jnp.float32)))(xs.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), _np_slope(act, x), atol=1e-2)


def test_gated_feed_forward_matches_numpy():
    rng = np.random.default_rng(3)
    x, wg, wu, wd = (rng.standard_normal(s).astype(np.float32) for s in [(2, 5, 8), (8, 16), (8, 16), (16, 8)])
    for act in ("silu", "gelu"):
        y = gated_feed_forward(*map(jnp.asarray, (x, wg, wu, wd)), activation=act)
        f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        want = (NP_ACT[act](f64(x) @ f64(wg)) * (f64(x) @ f64(wu))) @ f64(wd)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-4)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        ops.activation_fn("swish2")


def test_feed_forward_is_position_wise():
    x, w1, b1, w2, b2 = weights()
    full = np.asarray(feed_forward(x, w1, b1, w2, b2))
    one = feed_forward(x[:, 2:3], w1, b1, w2, b2)
    np.testing.assert_allclose(full[:, 2:3], np.asarray(one), atol=1e-6)
