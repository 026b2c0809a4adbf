"""LayerNorm and RMSNorm against float64 formulas (course Chapter 8, Part 3)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST


layer_norm = jax.jit(ops.layer_norm, compiler_options=FAST)
rms_norm = jax.jit(ops.rms_norm, compiler_options=FAST)


def np_layer_norm(x, scale=None, bias=None, eps=1e-5):
    x = np.asarray(x, np.float64)
    M = x.shape[-1]
    mean = x.sum(-1, keepdims=True) / M
    var = ((x - mean) ** 2).sum(-1, keepdims=True) / M  # population variance
    y = (x - mean) / np.sqrt(var + eps)  # eps inside the square root
    if scale is not None:
        y = y * np.asarray(scale, np.float64)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def np_rms_norm(x, scale=None, eps=1e-6):
    x = np.asarray(x, np.float64)
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    return y if scale is None else y * np.asarray(scale, np.float64)


def test_layer_norm_course_example():
    x = jnp.array([0.66, -0.49, 0.97, 0.47, -0.16, 0.71])
    y = np.asarray(layer_norm(x, None, None))
    # The course prints 3 decimal places.
    np.testing.assert_allclose(y, [0.583, -1.651, 1.185, 0.214, -1.010, 0.680], atol=5e-4)
    # Its intermediate figures (4 decimal places): mean 0.36, variance 0.2649 (population), std 0.5147.
    xs = np.asarray(x, np.float64)
    assert abs(xs.mean() - 0.36) < 5e-5 and abs(xs.var() - 0.2649) < 5e-5 and abs(xs.std() - 0.5147) < 5e-5
    np.testing.assert_allclose(y, (xs - 0.36) / 0.5147, atol=5e-4)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_layer_norm_matches_formula(eps):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 10)) * 3 + 1
    scale, bias = rng.standard_normal(10), rng.standard_normal(10)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    y = layer_norm(f32(x), f32(scale), f32(bias), eps)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    # A large eps makes "inside the root" and "population variance" visible in the numbers.
    np.testing.assert_allclose(np.asarray(y), np_layer_norm(np.asarray(f32(x)), f32(scale), f32(bias), eps), atol=2e-5)
    plain = np.asarray(layer_norm(f32(x), None, None, eps))
    np.testing.assert_allclose(plain, np_layer_norm(np.asarray(f32(x)), eps=eps), atol=2e-5)
    if eps < 1e-3:
        np.testing.assert_allclose(plain.mean(-1), 0, atol=1e-5)
        np.testing.assert_allclose(plain.var(-1), 1, atol=1e-3)


def test_layer_norm_bf16_input_computes_in_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 16)) * 10 + 100, jnp.bfloat16)  # large mean: bf16 maths would fail
    y = layer_norm(x, None, None)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np_layer_norm(np.asarray(x, np.float32)), atol=2e-2)


def test_rms_norm_matches_formula():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    scale = rng.standard_normal(8).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(scale))), np_rms_norm(x, scale), atol=2e-5)
    y = np.asarray(rms_norm(jnp.asarray(x), None))
    np.testing.assert_allclose(y, np_rms_norm(x), atol=2e-5)
    np.testing.assert_allclose((y.astype(np.float64) ** 2).mean(-1), 1.0, atol=1e-4)
    # No centring: a constant row keeps its sign.
    assert np.all(np.asarray(rms_norm(jnp.full((1, 4), -3.0), None)) < 0)


def test_layer_norm_gradient_equals_autodiff_of_the_formula():
    """layer_norm's hand-written backward == autodiff of the textbook formula."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 5, 16)) * 2 + 0.5, jnp.float32)
    scale = jnp.asarray(rng.normal(size=16), jnp.float32)
    bias = jnp.asarray(rng.normal(size=16), jnp.float32)
    g = jnp.asarray(rng.normal(size=(3, 5, 16)), jnp.float32)

    def formula(x, scale, bias):
        mean = jnp.mean(x, -1, keepdims=True)
        var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias

    got = jax.grad(lambda *a: jnp.sum(ops.layer_norm(*a) * g), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(lambda *a: jnp.sum(formula(*a) * g), argnums=(0, 1, 2))(x, scale, bias)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # without scale and bias: the formula with 1 and 0
    bare = jax.grad(lambda x: jnp.sum(ops.layer_norm(x, None, None) * g))(x)
    ones = jax.grad(lambda x: jnp.sum(formula(x, jnp.ones(16), jnp.zeros(16)) * g))(x)
    np.testing.assert_allclose(bare, ones, rtol=1e-4, atol=1e-5)
    # per-feature parameters given as [1, 1, M] work, gradients included; a wrong width is refused
    g3 = jax.grad(lambda s: jnp.sum(ops.layer_norm(x, s, bias) * g))(scale.reshape(1, 1, 16))
    np.testing.assert_allclose(g3.reshape(16), want[1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"scale must have shape \[16\]"):
        ops.layer_norm(x, jnp.ones(8), None)
    # and in bf16 the gradient comes back in the input's dtype
    dx = jax.grad(lambda x: jnp.sum(ops.layer_norm(x, scale, bias).astype(jnp.float32) * g))(x.astype(jnp.bfloat16))
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_allclose(dx.astype(jnp.float32), want[0], rtol=0.05, atol=0.05)
