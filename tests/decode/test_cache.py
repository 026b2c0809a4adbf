"""The preallocated KV cache: buckets, size in bytes (Chapter 13's formula), per-row writes."""
import jax.numpy as jnp
import numpy as np
import pytest

from tfd_jax.decode import bucket_length, bytes_per_token, init_cache
from tfd_jax.decode.cache import as_bshd, write_rows
from tfd_jax.models import GPTConfig


def test_bucket_length_rounds_up_to_powers_of_two_and_caps():
    assert [bucket_length(n) for n in (1, 16, 17, 31, 32, 33, 100)] == [16, 16, 32, 32, 32, 64, 128]
    assert bucket_length(100, maximum=64 + 40) == 104
    assert bucket_length(3, minimum=1) == 4
    with pytest.raises(ValueError):
        bucket_length(0)
    with pytest.raises(ValueError):
        bucket_length(65, maximum=64)


def test_bytes_per_token_is_the_course_gpt3_figure():
    # Chapter 13: 2 x 96 layers x 96 heads x 128 dims = 2,359,296 numbers, ~9.4 MB per token in fp32.
    gpt3 = GPTConfig(vocab_size=8, context_length=2048, d_model=96 * 128, num_heads=96, num_layers=96)
    assert bytes_per_token(gpt3) == 2_359_296 * 4
    assert bytes_per_token(gpt3) * 2048 == pytest.approx(19.3e9, rel=0.01)
    assert bytes_per_token(gpt3, jnp.bfloat16) == 2_359_296 * 2


def test_cache_shapes_dtype_and_nbytes(tiny_cfg):
    cache = init_cache(tiny_cfg, batch_size=3, max_length=32)
    H, D = tiny_cfg.num_heads, tiny_cfg.head_dim
    assert cache.num_layers == tiny_cfg.num_layers and cache.max_length == 32 and cache.batch_size == 3
    assert all(a.shape == (3, H, 32, D) and a.dtype == jnp.float32 for a in (*cache.k, *cache.v))  # heads-major
    assert cache.nbytes == 3 * 32 * bytes_per_token(tiny_cfg)
    bf16 = init_cache(tiny_cfg.replace(dtype="bfloat16"), 3, 32)
    assert bf16.k[0].dtype == jnp.bfloat16 and bf16.nbytes == cache.nbytes // 2
    with pytest.raises(ValueError, match="context_length"):
        init_cache(tiny_cfg, 1, tiny_cfg.context_length + 1)


def test_write_rows_puts_each_row_at_its_own_position():
    B, S, H, D = 3, 8, 2, 1
    new = jnp.arange(1, B * 2 * H + 1, dtype=jnp.float32).reshape(B, 2, H, D)  # [B, T=2, H, D]
    out = np.asarray(as_bshd(write_rows(jnp.zeros((B, H, S, D)), new, jnp.array([0, 3, 6]))))
    expected = np.zeros((B, S, H, D), np.float32)
    for b, s in enumerate([0, 3, 6]):
        expected[b, s : s + 2] = np.asarray(new[b])
    np.testing.assert_array_equal(out, expected)
