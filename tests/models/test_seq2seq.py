"""The encoder-decoder (Chapter 19, Part 5): T5's relative buckets against a float64 formula, cached
decoding against the uncached forward pass at every step, cross-attention keys computed once,
padding that changes nothing, and the configs' checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfd_jax import ops
from tfd_jax.decode import generate, rollout
from tfd_jax.models import EncoderDecoder, Seq2SeqConfig
from tfd_jax.models import registry
from tfd_jax.nn import Block, with_layout

FAMILIES = ["tiny", "t5-tiny", "bart-tiny"]


def _bucket_reference(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucket of one offset ``k - q``, written out in float64 Python."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            bucket += num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_the_float64_formula(bidirectional, num_buckets, max_distance):
    q = np.arange(0, 300, 7)
    k = np.arange(0, 300, 3)
    got = np.asarray(ops.relative_position_buckets(jnp.asarray(q), jnp.asarray(k), num_buckets=num_buckets,
                                                   max_distance=max_distance, bidirectional=bidirectional))
    want = np.array([[_bucket_reference(int(b - a), bidirectional, num_buckets, max_distance) for b in k] for a in q])
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() < num_buckets


def _model(preset: str, **overrides):
    cfg = Seq2SeqConfig.preset(preset, dropout=0.0, vocab_size=61, **overrides)
    return EncoderDecoder(cfg, rngs=nnx.Rngs(0))


def _ragged_source(seed=0, lengths=(7, 3, 5)):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(3, 61, n)) for n in lengths]


def _padded(rows, width, pad):
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return jnp.asarray(out), jnp.asarray(np.arange(width)[None] < np.array([len(r) for r in rows])[:, None])


@pytest.mark.parametrize("preset,temperature", [("tiny", 0.0), ("t5-tiny", 0.0), ("bart-tiny", 0.0),
                                                 ("t5-tiny", 1.0)])
def test_cached_decoding_equals_the_uncached_forward_at_every_step(preset, temperature):
    """Decoding a ragged batch (sources and decoder prompts of different lengths), greedy or
    sampled with top-k: each new token's log-probability matches the uncached forward pass over
    everything before it within 1e-5, and a greedy token is that pass's argmax."""
    model = _model(preset)
    model.eval()
    cfg = model.config
    sources = _ragged_source()
    prompts = [[cfg.decoder_start_id], [cfg.decoder_start_id, 9, 4], [cfg.decoder_start_id, 11]]
    out = rollout(model, prompts, 6, key=jax.random.key(0), temperature=temperature,
                  top_k=None if temperature == 0 else 20, source=sources)
    tokens, logps, lengths = (np.asarray(a) for a in (out.tokens, out.log_probs, out.lengths))
    src, src_mask = _padded(sources, 8, cfg.pad_id)
    for b in range(3):
        seq = prompts[b] + [int(t) for t in tokens[b, : lengths[b]]]
        logits = model(src[b:b + 1], jnp.asarray([seq]), src_padding_mask=src_mask[b:b + 1])[0]
        lp = jax.nn.log_softmax(logits, -1)
        for j in range(int(lengths[b])):
            pos = len(prompts[b]) - 1 + j
            if temperature == 0:
                assert int(jnp.argmax(logits[pos])) == seq[pos + 1], (b, j)
            assert abs(float(lp[pos, seq[pos + 1]]) - float(logps[b, j])) < 1e-5, (b, j)


@pytest.mark.parametrize("preset", ["t5-tiny", "bart-tiny"])
def test_forward_cached_logits_equal_uncached_logits(preset):
    """Prefill of a 3-token target, then one token at a time: every step's logits within 1e-5."""
    model = _model(preset)
    model.eval()
    cfg = model.config
    src, src_mask = _padded(_ragged_source(1), 8, cfg.pad_id)
    tgt = jnp.asarray(np.random.default_rng(2).integers(3, 61, (3, 7)).astype(np.int32)).at[:, 0].set(cfg.decoder_start_id)
    full = model(src, tgt, src_padding_mask=src_mask)
    cache = model.init_cache(3, 16, source=src, source_mask=src_mask)
    h, cache = model.forward_cached(tgt[:, :3], cache, jnp.full((3,), 3))
    steps = [model.logits(h)]
    for t in range(3, 7):
        h, cache = model.forward_cached(tgt[:, t:t + 1], cache, jnp.ones((3,), jnp.int32))
        steps.append(model.logits(h))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-5)


def test_a_decoding_step_does_not_recompute_the_cross_attention_keys(monkeypatch):
    """Cross-attention keys/values come from the cache: making the cache computes them once per
    decoder layer, and tracing a decoding step computes them zero times."""
    model = _model("t5-tiny", d_ff=96)  # shapes of its own: generate below traces (and compiles) afresh
    model.eval()
    calls = []
    original = Block.cross_key_value
    monkeypatch.setattr(Block, "cross_key_value", lambda self, memory: calls.append(memory.shape) or original(self, memory))
    src, src_mask = _padded(_ragged_source(), 8, 0)
    cache = model.init_cache(3, 16, source=src, source_mask=src_mask)
    assert len(calls) == model.config.num_decoder_layers
    calls.clear()
    jax.make_jaxpr(lambda c: model.forward_cached(jnp.ones((3, 1), jnp.int32), c, jnp.ones((3,), jnp.int32)))(cache)
    assert calls == []
    generate(model, None, 3, source=_ragged_source())  # prefill and the whole loop: once per layer, at prefill
    assert len(calls) == model.config.num_decoder_layers


@pytest.mark.parametrize("preset", FAMILIES)
def test_padding_changes_nothing_for_real_tokens(preset):
    """More source padding leaves the encoder's real positions and the logits unchanged."""
    model = _model(preset)
    model.eval()
    rows = _ragged_source(3)
    tgt = jnp.asarray([[model.config.decoder_start_id, 5, 6, 7]] * 3)
    a_src, a_mask = _padded(rows, 7, model.config.pad_id)
    b_src, b_mask = _padded(rows, 12, model.config.pad_id)
    a, b = model.encode(a_src, src_padding_mask=a_mask), model.encode(b_src, src_padding_mask=b_mask)
    for i, r in enumerate(rows):
        np.testing.assert_allclose(np.asarray(a[i, : len(r)]), np.asarray(b[i, : len(r)]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(a_src, tgt, src_padding_mask=a_mask)),
                               np.asarray(model(b_src, tgt, src_padding_mask=b_mask)), atol=1e-5)


def test_cross_attention_weights_skip_padding_and_sum_to_one():
    model = _model("tiny")
    model.eval()
    src, mask = _padded(_ragged_source(), 8, 0)
    tgt = jnp.asarray([[0, 5, 6]] * 3)
    weights = model.cross_attention_weights(src, tgt, src_padding_mask=mask)
    assert len(weights) == model.config.num_decoder_layers
    for w in weights:
        assert w.shape == (3, model.config.num_heads, 3, 8)
        np.testing.assert_allclose(np.asarray(w.sum(-1)), 1.0, atol=1e-6)
        assert float(jnp.max(jnp.where(mask[:, None, None, :], 0.0, w))) == 0.0


def test_scanned_layers_equal_unrolled_layers():
    cfg = Seq2SeqConfig.preset("t5-tiny", dropout=0.0, vocab_size=61)
    plain, scanned = EncoderDecoder(cfg, rngs=nnx.Rngs(0)), EncoderDecoder(cfg.replace(scan_layers=True), rngs=nnx.Rngs(0))
    src, mask = _padded(_ragged_source(), 8, 0)
    tgt = jnp.asarray([[0, 5, 6]] * 3)
    want = plain(src, tgt, src_padding_mask=mask)
    np.testing.assert_allclose(np.asarray(scanned(src, tgt, src_padding_mask=mask)), np.asarray(want), atol=1e-5)
    back = with_layout(scanned, scan_layers=False)
    np.testing.assert_allclose(np.asarray(back(src, tgt, src_padding_mask=mask)), np.asarray(want), atol=1e-5)
    out_scanned = generate(scanned, None, 4, source=_ragged_source())
    out_plain = generate(plain, None, 4, source=_ragged_source())
    np.testing.assert_array_equal(out_scanned[0], out_plain[0])


def test_the_families_differ_where_the_papers_say():
    t5, t5_11, bart, base = (Seq2SeqConfig.preset(p) for p in ("t5-small", "t5-v1_1-small", "bart-base",
                                                                "transformer-base"))
    assert (t5.attn_scale, t5.positions, t5.norm, t5.norm_position, t5.head_scale) == (1.0, "relative", "rmsnorm",
                                                                                       "pre", True)
    assert (t5_11.gated_ffn, t5_11.tie_embeddings, t5_11.activation) == (True, False, "gelu_tanh")
    assert (bart.positions, bart.position_offset, bart.embed_norm, bart.logits_bias) == ("learned", 2, True, True)
    assert (base.positions, base.norm_position, base.scale_embeddings, base.tie_embeddings) == ("sinusoidal", "post",
                                                                                                True, True)
    assert registry.arch_of(t5) == "t5" and registry.arch_of(bart) == "bart" and registry.arch_of(base) == "transformer"
    assert registry.config_preset("t5", "tiny").family == "t5"
    with pytest.raises(ValueError, match="is a t5 model, not bart"):
        registry.config_preset("bart", "t5-small")


@pytest.mark.parametrize("field,value,match", [
    ("positions", "rotary", "positions must be"), ("norm_position", "middle", "norm_position"),
    ("num_heads", 5, "not divisible"), ("pad_id", 10**6, "pad_id"), ("family", "gpt", "family"),
])
def test_bad_configs_are_refused_with_the_field_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        Seq2SeqConfig.preset("tiny", **{field: value})


def test_decoding_inputs_are_checked():
    model = _model("tiny")
    with pytest.raises(ValueError, match="decodes from a source"):
        generate(model, [[0]], 3)
    with pytest.raises(ValueError, match="source 1 is empty"):
        generate(model, None, 3, source=[[4, 5], []])
    with pytest.raises(ValueError, match="outside"):
        generate(model, None, 3, source=[[4, 500]])
    with pytest.raises(ValueError, match="one per source"):
        generate(model, [[0], [0]], 3, source=[[4, 5]])
