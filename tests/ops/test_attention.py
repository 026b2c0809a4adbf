"""Attention, masks and head reshapes against float64 numpy formulas (course Chapters 5 and 12)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST

ATOL = RTOL = 2e-5


# ---- float64 references, written from the course's formulas -------------------------------------


def np_softmax(scores, valid):
    """Row softmax over the last axis; entries with valid=False get weight 0.

    A row with no valid entry gets uniform weights (the library's choice for fully masked rows:
    finite output rather than NaN)."""
    scores = np.where(valid, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    empty = ~valid.any(axis=-1, keepdims=True)
    e = np.where(valid, np.exp(scores - np.where(empty, 0.0, row_max)), 0.0)
    e = np.where(empty, 1.0, e)
    return e / e.sum(axis=-1, keepdims=True)


def np_attention_weights(q, k, valid=None):
    """q [B, T, H, D], k [B, S, H, D], valid broadcastable to [B, H, T, S] -> [B, H, T, S]."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    B, T, H, D = q.shape
    S = k.shape[1]
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
    valid = np.ones((B, H, T, S), bool) if valid is None else np.broadcast_to(np.asarray(valid), (B, H, T, S))
    return np_softmax(scores, valid)


def np_attention(q, k, v, valid=None):
    w = np_attention_weights(q, k, valid)
    return np.einsum("bhts,bshd->bthd", w, np.asarray(v, np.float64))


def np_causal(T, S, offset):
    """valid[t, s] = s <= offset + t, built with loops so it is independent of any vectorised trick."""
    out = np.zeros((T, S), bool)
    for t in range(T):
        for s in range(S):
            out[t, s] = s <= offset + t
    return out


def qkv(seed, B=2, T=5, S=5, H=2, D=4):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in [(B, T, H, D), (B, S, H, D), (B, S, H, D)])
    return q, k, v


# One compiled program per shape instead of one per primitive.
attention = jax.jit(ops.attention, static_argnames="impl", compiler_options=FAST)
attention_weights = jax.jit(ops.attention_weights, compiler_options=FAST)


# ---- masks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,S,offset", [(4, 4, 0), (1, 6, 5), (3, 7, 4), (2, 5, 0), (5, 3, 0)])
def test_causal_mask_matches_loops(T, S, offset):
    np.testing.assert_array_equal(np.asarray(ops.causal_mask(T, S, offset)), np_causal(T, S, offset))


def test_causal_mask_course_square():
    # The course's 4x4 mask: allowed on and below the diagonal.
    np.testing.assert_array_equal(np.asarray(ops.causal_mask(4)), np.tril(np.ones((4, 4), bool)))


def test_causal_mask_per_row_offsets():
    offsets = np.array([0, 2, 5])
    m = np.asarray(ops.causal_mask(2, 7, jnp.asarray(offsets)))
    assert m.shape == (3, 1, 2, 7)
    for b, off in enumerate(offsets):
        np.testing.assert_array_equal(m[b, 0], np_causal(2, 7, off))


def test_padding_and_cross_masks():
    key_valid = np.array([[True, True, False], [True, False, False]])
    query_valid = np.array([[True, False], [True, True]])
    pm = np.asarray(ops.padding_mask(jnp.asarray(key_valid)))
    assert pm.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(pm[:, 0, 0], key_valid)
    cm = np.asarray(ops.cross_attention_mask(jnp.asarray(query_valid), jnp.asarray(key_valid)))
    assert cm.shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(cm[:, 0], query_valid[:, :, None] & key_valid[:, None, :])
    assert ops.cross_attention_mask(None, jnp.asarray(key_valid)).shape == (2, 1, 1, 3)


def test_combine_masks_is_logical_and():
    a = ops.causal_mask(3)
    b = ops.padding_mask(jnp.array([[True, False, True]]))
    np.testing.assert_array_equal(np.asarray(ops.combine_masks(a, None, b)), np.asarray(a)[None, None] & np.asarray(b))
    assert ops.combine_masks(None, None) is None
    np.testing.assert_array_equal(np.asarray(ops.combine_masks(a)), np.asarray(a))


# ---- heads ---------------------------------------------------------------------------------------


def test_split_merge_round_trip_and_layout():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 12)), jnp.float32)
    h = ops.split_heads(x, 4)
    assert h.shape == (2, 3, 4, 3)
    # Head j holds dims [jD, (j+1)D): the course's per-head slicing.
    for j in range(4):
        np.testing.assert_array_equal(np.asarray(h[:, :, j]), np.asarray(x[..., 3 * j : 3 * j + 3]))
    np.testing.assert_array_equal(np.asarray(ops.merge_heads(h)), np.asarray(x))


def test_split_heads_rejects_indivisible_width():
    with pytest.raises(ValueError, match="not divisible"):
        ops.split_heads(jnp.zeros((1, 2, 6)), 4)


# ---- attention weights and outputs ---------------------------------------------------------------


def test_attention_weights_rows_sum_to_one_and_masked_are_zero():
    q, k, _ = qkv(1, T=6, S=6)
    mask = ops.combine_masks(ops.causal_mask(6), ops.padding_mask(jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6], bool)))
    w = np.asarray(attention_weights(q, k, mask))
    assert w.dtype == np.float32 and w.shape == (2, 2, 6, 6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    full = np.broadcast_to(np.asarray(mask), w.shape)
    assert np.all(np.abs(w[~full]) < 1e-30)
    assert np.all(w[full] > 0)
    np.testing.assert_allclose(w, np_attention_weights(q, k, mask), atol=ATOL, rtol=RTOL)


def _cases():
    T = 5
    yield "none", dict(T=T, S=T), None
    yield "causal", dict(T=T, S=T), ops.causal_mask(T)
    yield "padding", dict(T=T, S=T), ops.padding_mask(jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool))
    yield "causal+padding", dict(T=T, S=T), ops.combine_masks(
        ops.causal_mask(T), ops.padding_mask(jnp.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool))
    )
    yield "cross", dict(T=3, S=7), ops.cross_attention_mask(
        jnp.array([[1, 1, 0], [1, 1, 1]], bool), jnp.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], bool)
    )
    yield "cached-offset", dict(T=2, S=6), ops.causal_mask(2, 6, offset=4)
    yield "per-row-offsets", dict(T=2, S=6), ops.causal_mask(2, 6, offset=jnp.array([1, 4]))


CASES = list(_cases())


@pytest.mark.parametrize("name,shape,mask", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_attention_matches_float64(name, shape, mask, impl):
    q, k, v = qkv(sum(map(ord, name)), **shape)
    out = attention(q, k, v, mask=mask, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, mask), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name,shape,mask", CASES, ids=[c[0] for c in CASES])
def test_reference_equals_xla(name, shape, mask):
    q, k, v = qkv(7, **shape)
    ref = attention(q, k, v, mask=mask, impl="reference")
    xla = attention(q, k, v, mask=mask, impl="xla")
    np.testing.assert_allclose(np.asarray(ref), np.asarray(xla), atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:cuDNN attention unavailable")
@pytest.mark.parametrize("impl", ["auto", "cudnn"])
def test_auto_and_cudnn_agree_with_reference(impl):
    # Where cuDNN cannot run (here: float32, possibly no GPU) both end up on a working kernel.
    q, k, v = qkv(8, T=5, S=5)
    mask = ops.combine_masks(ops.causal_mask(5), ops.padding_mask(jnp.array([[1, 1, 1, 1, 0], [1] * 5], bool)))
    want = np_attention(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask=mask, impl=impl)), want, atol=ATOL, rtol=RTOL)


def test_fully_masked_row_is_finite_mean_of_values():
    # Query 1 of batch 0 may attend nowhere (a padded query in cross-attention): finite, uniform average.
    q, k, v = qkv(3, T=3, S=4)
    mask = jnp.ones((2, 1, 3, 4), bool).at[0, 0, 1].set(False)
    out = np.asarray(attention(q, k, v, mask=mask))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 1], np.asarray(v[0]).mean(0), atol=1e-5)


def test_cached_decoding_equals_full_causal_attention():
    # The last 2 queries over all 6 keys with offset 4 equal rows 4..5 of full causal attention.
    q, k, v = qkv(11, T=6, S=6)
    full = attention(q, k, v, mask=ops.causal_mask(6))
    tail = attention(q[:, 4:], k, v, mask=ops.causal_mask(2, 6, offset=4))
    np.testing.assert_allclose(np.asarray(tail), np.asarray(full[:, 4:]), atol=1e-6)


def test_attention_bf16_inputs_keep_dtype_and_stay_close():
    q, k, v = qkv(5, T=4, S=4)
    out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), mask=ops.causal_mask(4))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np_attention(q, k, v, ops.causal_mask(4)), atol=5e-2)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(0.1, 4.0),
    offsets=st.lists(st.integers(-1, 5), min_size=2, max_size=2),
)
def test_attention_random_inputs_and_offsets(seed, scale, offsets):
    # One shape (T=3 queries over S=5 keys, so compiles are cached), many values; the shapes vary in
    # the cases above. Per-row offsets include -1 (a query that may attend nowhere) and values past
    # the last key.
    T, extra = 3, 2
    S = T + extra
    q, k, v = qkv(seed, B=2, T=T, S=S, H=2, D=4)
    q = q * scale
    for mask in (ops.causal_mask(T, S, offset=extra), ops.causal_mask(T, S, offset=jnp.asarray(offsets))):
        want = np_attention(q, k, v, mask)
        np.testing.assert_allclose(np.asarray(attention(q, k, v, mask=mask)), want, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(np.asarray(attention(q, k, v, mask=mask, impl="xla")), want, atol=ATOL, rtol=RTOL)


def test_attention_shape_errors():
    q, k, v = qkv(0)
    with pytest.raises(ValueError, match="expects q"):
        ops.attention(q[0], k, v)
    with pytest.raises(ValueError, match="incompatible"):
        ops.attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.attention(q, k, v, mask=jnp.ones((3, 3), bool))
    with pytest.raises(ValueError, match="unknown attention impl"):
        ops.attention(q, k, v, impl="flash")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_is_causal_flag_equals_the_explicit_causal_mask(impl):
    q, k, v = qkv(11, T=6, S=6)
    pad = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])
    explicit = ops.attention(q, k, v, mask=ops.combine_masks(ops.causal_mask(6), ops.padding_mask(pad)), impl="reference")
    flagged = ops.attention(q, k, v, mask=ops.padding_mask(pad), is_causal=True, impl=impl)
    np.testing.assert_allclose(np.asarray(flagged), np.asarray(explicit), rtol=1e-5, atol=1e-6)
    q2, k2, v2 = qkv(12, T=3, S=6)  # T != S: the flag means causal_mask(T, S), as documented
    np.testing.assert_allclose(
        np.asarray(ops.attention(q2, k2, v2, is_causal=True, impl=impl)),
        np.asarray(ops.attention(q2, k2, v2, mask=ops.causal_mask(3, 6), impl="reference")),
        rtol=1e-5, atol=1e-6,
    )


@pytest.mark.parametrize("causal", [True, False])
def test_splash_kernel_matches_float64_with_gradients(causal):
    """The TPU splash kernel, run in Pallas's interpreter here: values and gradients."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(7), 4)
    shape = (2, 256, 2, 64)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32) for key in (kq, kk, kv, kg))
    valid = np_causal(256, 256, 0) if causal else None
    splash = lambda q, k, v: ops.splash_attention(q, k, v, is_causal=causal, block=128, interpret=True)  # noqa: E731
    out = splash(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, valid), atol=2e-5)
    grads = jax.grad(lambda *a: jnp.sum(splash(*a) * g), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(ops.attention(*a, is_causal=causal) * g), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-3, atol=1e-4)


def test_splash_is_tpu_only_and_says_what_it_takes():
    q = jnp.ones((1, 128, 2, 64))
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="TPU kernel"):
            ops.attention(q, q, q, is_causal=True, impl="splash")
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.splash_attention(q[:, :100], q[:, :100], q[:, :100], interpret=True)
    with pytest.raises(ValueError, match="self-attention"):
        ops.splash_attention(q, q[:, :64], q[:, :64], interpret=True)
