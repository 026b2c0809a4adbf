"""T5's span corruption (``ops.span_corruption``): the exact number of hidden tokens and spans, the
original recovered from input and target, spans of mean length 3 over many draws, and
determinism from the key."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfd_jax import ops

SENTINELS = np.arange(1000, 1032)
EOS = 1


def _split_on_sentinels(row):
    """[a, S0, b, c, S1, d, eos, eos] -> pieces between sentinels, up to the first eos."""
    row = list(row)
    row = row[: row.index(EOS)]
    pieces, current, order = [], [], []
    for t in row:
        if t in SENTINELS:
            pieces.append(current)
            order.append(int(t))
            current = []
        else:
            current.append(int(t))
    pieces.append(current)
    return pieces, order


@pytest.mark.parametrize("length", [32, 128])
def test_input_and_target_give_back_the_original(length):
    tokens = jnp.asarray(np.random.default_rng(0).integers(10, 900, (8, length)), jnp.int32)
    inputs, targets = ops.span_corruption(jax.random.key(3), tokens, sentinel_ids=jnp.asarray(SENTINELS), eos_id=EOS)
    noise, spans, in_len, out_len = ops.span_corruption_lengths(length)
    assert inputs.shape == (8, in_len) and targets.shape == (8, out_len)
    assert noise == round(0.15 * length) and spans == round(noise / 3)
    for b in range(8):
        kept, order_in = _split_on_sentinels(np.asarray(inputs[b]))
        hidden, order_out = _split_on_sentinels(np.asarray(targets[b]))
        assert order_in == order_out == list(SENTINELS[:spans])  # sentinels in order, one per span
        assert hidden[0] == [] and all(len(h) >= 1 for h in hidden[1:]) and all(len(k) >= 1 for k in kept[:-1])
        assert sum(len(h) for h in hidden) == noise
        rebuilt = kept[0]
        for i in range(spans):
            rebuilt = rebuilt + hidden[i + 1] + kept[i + 1]
        assert rebuilt == [int(t) for t in tokens[b]]
        assert int(inputs[b, -1]) == EOS and int(targets[b, -1]) == EOS


def test_spans_have_the_mean_length_and_draws_follow_the_key():
    tokens = jnp.tile(jnp.arange(10, 138, dtype=jnp.int32), (256, 1))
    a = ops.span_corruption(jax.random.key(0), tokens, sentinel_ids=jnp.asarray(SENTINELS), eos_id=EOS)
    b = ops.span_corruption(jax.random.key(0), tokens, sentinel_ids=jnp.asarray(SENTINELS), eos_id=EOS)
    c = ops.span_corruption(jax.random.key(1), tokens, sentinel_ids=jnp.asarray(SENTINELS), eos_id=EOS)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    lengths = [len(h) for row in np.asarray(a[1]) for h in _split_on_sentinels(row)[0][1:]]
    assert abs(np.mean(lengths) - 19 / 6) < 1e-9  # 19 hidden tokens in 6 spans, in every row
    starts = [row.index(SENTINELS[0]) for row in np.asarray(a[0]).tolist()]
    assert len(set(starts)) > 10  # the spans sit in different places in different rows


def test_too_few_sentinels_is_a_clear_error():
    with pytest.raises(ValueError, match="sentinel tokens"):
        ops.span_corruption(jax.random.key(0), jnp.zeros((1, 128), jnp.int32), sentinel_ids=jnp.arange(3), eos_id=EOS)
