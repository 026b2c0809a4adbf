"""General attention against float64 numpy formulas: a score scale, an additive bias, grouped-query
K/V heads, and every mask ``ops.attention_mask`` builds (course Chapters 5, 12, 13 and 19 Part 7)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tfd_jax import ops
from fastjit import FAST

ATOL = RTOL = 2e-5
IMPLS = ["reference", "xla"]

# One compiled program per shape and setting instead of one per primitive.
attention = jax.jit(ops.attention, static_argnames=("impl", "is_causal", "scale"), compiler_options=FAST)


def _every_impl(q, k, v, mask, bias, *, is_causal, scale):
    return {impl: ops.attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, bias=bias, impl=impl)
            for impl in IMPLS}


_both = jax.jit(_every_impl, static_argnames=("is_causal", "scale"), compiler_options=FAST)


def both_impls(q, k, v, *, mask=None, bias=None, is_causal=False, scale=None):
    """``{impl: attention(...)}`` for every impl, as numpy, from one compiled program."""
    return {impl: np.asarray(x) for impl, x in _both(q, k, v, mask, bias, is_causal=is_causal, scale=scale).items()}
attention_weights = jax.jit(ops.attention_weights, static_argnames="scale", compiler_options=FAST)
attention_mask = jax.jit(ops.attention_mask, static_argnames="causal", compiler_options=FAST)


# ---- float64 references ----------------------------------------------------------------------------


def np_weights(q, k, *, scale=None, bias=None, valid=None):
    """softmax(Q K^T * scale + bias) over keys, masked entries weight 0. q [B,T,H,D], k [B,S,H,D]."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    B, T, H, D = q.shape
    S = k.shape[1]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    scores = np.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        scores = scores + np.broadcast_to(np.asarray(bias, np.float64), (B, H, T, S))
    valid = np.ones((B, H, T, S), bool) if valid is None else np.broadcast_to(np.asarray(valid), (B, H, T, S))
    scores = np.where(valid, scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))  # every row below keeps at least one key
    return e / e.sum(-1, keepdims=True)


def np_attention(q, k, v, **kw):
    return np.einsum("bhts,bshd->bthd", np_weights(q, k, **kw), np.asarray(v, np.float64))


def np_repeat_heads(x, H):
    """[B, S, K, D] -> [B, S, H, D]: query head h reads K/V head h // (H / K), written as a loop."""
    x = np.asarray(x)
    K = x.shape[2]
    return np.stack([x[:, :, h // (H // K)] for h in range(H)], axis=2)


def np_causal_valid(T, S, offsets):
    """valid[b, t, s] = s <= offsets[b] + t, by loops."""
    out = np.zeros((len(offsets), T, S), bool)
    for b, off in enumerate(offsets):
        for t in range(T):
            for s in range(S):
                out[b, t, s] = s <= off + t
    return out


def arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


# ---- scale and bias ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [None, 0.3])
def test_scale_and_bias_match_numpy(scale):
    B, T, S, H, D = 2, 3, 5, 2, 4
    q, k, v, bias = arrays(1, (B, T, H, D), (B, S, H, D), (B, S, H, D), (B, H, T, S))
    ref = np_attention(q, k, v, scale=scale, bias=2.0 * np.asarray(bias))
    for impl, out in both_impls(q, k, v, scale=scale, bias=2.0 * bias).items():
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL, err_msg=impl)


def test_broadcast_bias_with_mask_and_causal():
    # A per-head bias [1, H, T, S] (T5's relative position bias is shared across the batch), a
    # padding mask, and the causal rule together.
    B, T, H, D = 2, 4, 2, 3
    q, k, v, bias = arrays(2, (B, T, H, D), (B, T, H, D), (B, T, H, D), (1, H, T, T))
    key_valid = np.array([[True] * 4, [True, True, True, False]])
    mask = jnp.asarray(key_valid)[:, None, None, :]
    valid = key_valid[:, None, None, :] & np.tril(np.ones((T, T), bool))[None, None]
    ref = np_attention(q, k, v, scale=0.5, bias=bias, valid=valid)
    for impl, out in both_impls(q, k, v, mask=mask, is_causal=True, scale=0.5, bias=bias).items():
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL, err_msg=impl)


def test_attention_weights_scale_bias_and_grouped_keys():
    B, T, S, H, K, D = 1, 3, 4, 4, 2, 2
    q, k, bias = arrays(3, (B, T, H, D), (B, S, K, D), (B, 1, T, S))
    w = np.asarray(attention_weights(q, k, None, scale=0.7, bias=bias))
    assert w.shape == (B, H, T, S) and w.dtype == np.float32
    np.testing.assert_allclose(w, np_weights(q, np_repeat_heads(k, H), scale=0.7, bias=bias), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


def test_scale_none_is_inverse_sqrt_head_dim():
    # An independent construction: scale=None equals scale=1/sqrt(D) given explicitly, and differs
    # from scale=1 (so the default really is the course's 1/sqrt(D)).
    q, k, v = arrays(4, (1, 3, 2, 9), (1, 3, 2, 9), (1, 3, 2, 9))
    default = np.asarray(attention(q, k, v, impl="reference"))
    np.testing.assert_allclose(default, np.asarray(attention(q, k, v, scale=1 / 3, impl="reference")), rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(default - np.asarray(attention(q, k, v, scale=1.0, impl="reference")))) > 1e-3


# ---- grouped-query attention ---------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 1])
@pytest.mark.parametrize("is_causal,T,S", [(False, 3, 5), (True, 4, 4), (True, 2, 5)])
def test_grouped_query_equals_repeated_heads(K, is_causal, T, S):
    B, H, D = 2, 4, 3
    q, k, v = arrays(10 + K, (B, T, H, D), (B, S, K, D), (B, S, K, D))
    # Reference: ordinary multi-head attention with each K/V head copied to the H/K query heads it serves.
    valid = np_causal_valid(T, S, [0] * B)[:, None] if is_causal else None
    ref = np_attention(q, np_repeat_heads(k, H), np_repeat_heads(v, H), valid=valid)
    for impl, out in both_impls(q, k, v, is_causal=is_causal).items():
        assert out.shape == (B, T, H, D)
        np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL, err_msg=impl)


def test_grouped_query_query_heads_share_kv_head():
    # Query heads of one group that ask the same question get the same answer; different groups differ.
    B, T, S, H, K, D = 1, 2, 3, 4, 2, 3
    q1, k, v = arrays(20, (B, T, 1, D), (B, S, K, D), (B, S, K, D))
    q = jnp.repeat(q1, H, axis=2)  # every query head identical
    out = np.asarray(attention(q, k, v, impl="reference"))
    np.testing.assert_allclose(out[:, :, 0], out[:, :, 1], rtol=1e-6, atol=1e-6)  # group 0 = heads 0, 1
    np.testing.assert_allclose(out[:, :, 2], out[:, :, 3], rtol=1e-6, atol=1e-6)  # group 1 = heads 2, 3
    assert np.max(np.abs(out[:, :, 0] - out[:, :, 2])) > 1e-3


def test_repeat_kv_layout():
    x = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 3, 2, 4)
    np.testing.assert_array_equal(np.asarray(ops.repeat_kv(jnp.asarray(x), 6)), np_repeat_heads(x, 6))
    np.testing.assert_array_equal(np.asarray(ops.repeat_kv(jnp.asarray(x), 2)), x)


@pytest.mark.parametrize("H,K", [(4, 3), (3, 2), (2, 4)])
def test_kv_heads_that_do_not_divide_query_heads_fail_clearly(H, K):
    q = jnp.zeros((1, 2, H, 4))
    kv = jnp.zeros((1, 2, K, 4))
    with pytest.raises(ValueError, match="divides"):
        ops.attention(q, kv, kv)


def test_mismatched_k_and_v_heads_fail_clearly():
    q = jnp.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match="k and v must match"):
        ops.attention(q, jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 1, 4)))


def test_layers_and_block_config_reject_kv_heads_that_do_not_divide():
    from flax import nnx

    from tfd_jax.nn import BlockConfig, MultiHeadAttention

    with pytest.raises(ValueError, match="num_kv_heads"):
        BlockConfig(d_model=12, num_heads=4, head_dim=3, d_ff=8, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        nnx.eval_shape(lambda: MultiHeadAttention(12, 4, num_kv_heads=3, rngs=nnx.Rngs(0)))


# ---- attention_mask ------------------------------------------------------------------------------------


def test_attention_mask_none_when_nothing_given():
    assert ops.attention_mask() is None
    # Positions alone are no condition either.
    assert ops.attention_mask(q_positions=jnp.arange(3), k_positions=jnp.arange(3)) is None


def test_causal_mask_needs_positions():
    with pytest.raises(ValueError, match="positions"):
        ops.attention_mask(causal=True, q_positions=jnp.arange(3))


def test_causal_equal_positions():
    T = 5
    m = np.asarray(attention_mask(q_positions=jnp.arange(T), k_positions=jnp.arange(T), causal=True))
    assert m.shape == (1, 1, T, T) and m.dtype == bool
    np.testing.assert_array_equal(m[0, 0], np_causal_valid(T, T, [0])[0])
    # Batched positions [B, T] give one mask per row.
    pos = ops.default_positions(3, T)
    m = np.asarray(attention_mask(q_positions=pos, k_positions=pos, causal=True))
    assert m.shape == (3, 1, T, T)
    np.testing.assert_array_equal(m[:, 0], np_causal_valid(T, T, [0, 0, 0]))


def test_causal_per_row_offsets_over_longer_key_axis():
    # The KV-cache case: row b's T new queries sit at offsets[b] + 0..T-1; keys are cache slots 0..S-1.
    T, S = 2, 9
    offsets = np.array([0, 3, 7])
    qp = ops.default_positions(3, T, jnp.asarray(offsets))
    np.testing.assert_array_equal(np.asarray(qp), offsets[:, None] + np.arange(T)[None])
    m = np.asarray(attention_mask(q_positions=qp, k_positions=jnp.arange(S), causal=True))
    assert m.shape == (3, 1, T, S)
    np.testing.assert_array_equal(m[:, 0], np_causal_valid(T, S, offsets))
    # It is also what causal_mask builds from the same offsets.
    np.testing.assert_array_equal(m, np.asarray(ops.causal_mask(T, S, jnp.asarray(offsets))))


def np_segments_valid(qs, ks):
    B, T = qs.shape
    S = ks.shape[1]
    out = np.zeros((B, T, S), bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                out[b, t, s] = qs[b, t] == ks[b, s]
    return out


def test_segments():
    qs = np.array([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 7, 7]])
    m = np.asarray(attention_mask(q_segments=jnp.asarray(qs)))
    assert m.shape == (2, 1, 6, 6)
    np.testing.assert_array_equal(m[:, 0], np_segments_valid(qs, qs))
    # Separate key segments (a different key length).
    ks = np.array([[0, 1, 1, 3], [7, 5, 5, 0]])
    m = np.asarray(attention_mask(q_segments=jnp.asarray(qs), k_segments=jnp.asarray(ks)))
    assert m.shape == (2, 1, 6, 4)
    np.testing.assert_array_equal(m[:, 0], np_segments_valid(qs, ks))


def test_k_valid():
    kv = np.array([[True, True, False, True], [False, False, True, True]])
    m = np.asarray(attention_mask(k_valid=jnp.asarray(kv)))
    assert m.shape == (2, 1, 1, 4)
    ref = np.zeros((2, 1, 4), bool)
    for b in range(2):
        for s in range(4):
            ref[b, 0, s] = kv[b, s]
    np.testing.assert_array_equal(m[:, 0], ref)


def test_combination_and_its_effect_on_attention():
    B, T = 2, 6
    qs = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    kv = np.array([[True] * 6, [True, True, True, True, False, False]])
    pos = np.array([[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 4]])  # packed rows restart positions
    m = np.asarray(attention_mask(q_positions=jnp.asarray(pos), k_positions=jnp.asarray(pos), causal=True,
                                      q_segments=jnp.asarray(qs), k_valid=jnp.asarray(kv)))
    assert m.shape == (B, 1, T, T)
    ref = np.zeros((B, T, T), bool)
    for b in range(B):
        for t in range(T):
            for s in range(T):
                ref[b, t, s] = pos[b, s] <= pos[b, t] and qs[b, s] == qs[b, t] and kv[b, s]
    np.testing.assert_array_equal(m[:, 0], ref)
    # Every row keeps at least one key here, so attention under the mask matches numpy exactly.
    H, D = 2, 3
    q, k, v = arrays(30, (B, T, H, D), (B, T, H, D), (B, T, H, D))
    for impl, out in both_impls(q, k, v, mask=jnp.asarray(m)).items():
        np.testing.assert_allclose(out, np_attention(q, k, v, valid=ref[:, None]), rtol=RTOL, atol=ATOL, err_msg=impl)


def test_default_positions():
    np.testing.assert_array_equal(np.asarray(ops.default_positions(2, 4)), np.tile(np.arange(4), (2, 1)))
    np.testing.assert_array_equal(np.asarray(ops.default_positions(2, 3, 5)), np.tile(5 + np.arange(3), (2, 1)))
    p = ops.default_positions(2, 3, jnp.array([1, 4]))
    assert p.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(p), np.array([[1, 2, 3], [4, 5, 6]]))
