"""Sinusoidal, learned and rotary positions against float64 formulas (course Chapter 4)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST


sinusoidal_positions = jax.jit(ops.sinusoidal_positions, static_argnums=(0, 1), compiler_options=FAST)
rope = jax.jit(ops.apply_rope, compiler_options=FAST)


def np_sinusoidal(P, M, base=10000.0):
    """PE[pos, 2i] = sin(pos / base^(2i/M)), PE[pos, 2i+1] = cos(same), element by element."""
    pe = np.zeros((P, M))
    for pos in range(P):
        for j in range(M):
            two_i = j - (j % 2)
            angle = pos / base ** (two_i / M)
            pe[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return pe


def np_rope(x, positions, base=10000.0):
    """Rotate the pair (x[i], x[i + D/2]) by angle pos * base^(-2i/D), written as a 2x2 rotation."""
    x = np.asarray(x, np.float64)
    B, T, H, D = x.shape
    half = D // 2
    out = np.empty_like(x)
    for b in range(B):
        for t in range(T):
            for i in range(half):
                theta = positions[b, t] * base ** (-2 * i / D)
                rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
                pair = np.stack([x[b, t, :, i], x[b, t, :, i + half]])  # [2, H]
                new = rot @ pair
                out[b, t, :, i], out[b, t, :, i + half] = new[0], new[1]
    return out


@pytest.mark.parametrize("P,M", [(10, 6), (7, 16), (5, 7), (3, 1)])
def test_sinusoidal_matches_formula(P, M):
    pe = sinusoidal_positions(P, M)
    assert pe.shape == (P, M) and pe.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(pe), np_sinusoidal(P, M), atol=2e-6)


def test_sinusoidal_course_rows():
    pe = np.asarray(sinusoidal_positions(4, 6))
    # Printed to 4 decimal places, so agreement within half a unit of the last place.
    np.testing.assert_allclose(pe[0], [0, 1, 0, 1, 0, 1], atol=5e-5)
    np.testing.assert_allclose(pe[1], [0.8415, 0.5403, 0.0464, 0.9989, 0.0022, 1.0000], atol=5e-5)
    # The course's divisors for d=6: 10000^(2i/6) = 1, 21.544, 464.159.
    np.testing.assert_allclose(1.0 / np.arcsin(pe[1, [2, 4]]), [21.544, 464.159], rtol=2e-4)


def test_sinusoidal_bad_args():
    with pytest.raises(ValueError):
        ops.sinusoidal_positions(4, 0)
    with pytest.raises(ValueError):
        ops.sinusoidal_positions(-1, 6)


def test_learned_positions_is_a_row_lookup():
    table = np.arange(20.0, dtype=np.float32).reshape(5, 4)
    pos = np.array([[0, 3], [4, 4]])
    got = jax.jit(ops.learned_positions, compiler_options=FAST)(table, pos)
    np.testing.assert_array_equal(np.asarray(got), table[pos])


def test_rope_frequencies():
    np.testing.assert_allclose(np.asarray(ops.rope_frequencies(8)), [10000 ** (-i / 8) for i in (0, 2, 4, 6)], rtol=1e-6)
    with pytest.raises(ValueError, match="even"):
        ops.rope_frequencies(5)


def test_apply_rope_matches_rotation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 50, 300]])
    out = rope(jnp.asarray(x), jnp.asarray(pos))
    assert out.shape == x.shape and out.dtype == jnp.float32
    # Angles up to 300 rad: float32 rounding of the angle costs ~300 * 6e-8 in absolute terms.
    np.testing.assert_allclose(np.asarray(out), np_rope(x, pos), atol=1e-4)
    # Position 0 is the identity, and rotations keep each pair's length.
    np.testing.assert_allclose(np.asarray(out)[0, 0], x[0, 0], atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_apply_rope_keeps_bf16():
    x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    assert rope(x, jnp.array([[0, 1]])).dtype == jnp.bfloat16


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shift=st.integers(-40, 40))
def test_rope_dot_product_depends_only_on_offset(seed, shift):
    # q_t . k_s after RoPE is a function of t - s: shifting every position by the same amount
    # leaves all dot products unchanged, while the unshifted products do vary with t - s.
    rng = np.random.default_rng(seed)
    T, H, D = 6, 2, 8
    q0 = rng.standard_normal((1, 1, H, D)).astype(np.float32)
    k0 = rng.standard_normal((1, 1, H, D)).astype(np.float32)
    q = jnp.asarray(np.broadcast_to(q0, (1, T, H, D)))
    k = jnp.asarray(np.broadcast_to(k0, (1, T, H, D)))
    base_pos = np.arange(T)[None] + 50
    dots = []
    for pos in (base_pos, base_pos + shift):
        qr, kr = rope(q, jnp.asarray(pos)), rope(k, jnp.asarray(pos))
        dots.append(np.einsum("thd,shd->hts", np.asarray(qr[0], np.float64), np.asarray(kr[0], np.float64)))
    np.testing.assert_allclose(dots[0], dots[1], atol=1e-4)
    # Toeplitz: entries with the same t - s are equal.
    for d in range(-(T - 1), T):
        diag = np.diagonal(dots[0], offset=d, axis1=1, axis2=2)
        np.testing.assert_allclose(diag, diag[:, :1] * np.ones_like(diag), atol=1e-4)
