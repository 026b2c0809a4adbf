"""Prefill + cached decoding equals the uncached model; the loop stops, pads and reuses its programs.

Compiled programs are the expensive part on CPU, so the tests share shapes on purpose: every batch-3
call below lands in one bucket (prompt buffer 16, cache 32, output buffer 16).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfd_jax.decode import TRACE_COUNTS, compiled_programs, forward_cached, generate, generate_stream, init_cache
from tfd_jax.models import GPTConfig, with_layout

PROMPTS = [[5, 17, 3], [8, 1, 2, 3, 4, 5, 6, 7, 9], [42, 42, 11, 60, 2]]  # ragged on purpose
N_NEW = 12


def _full_forward(model):
    """A jitted uncached forward in eval mode (the model itself is left as it is)."""
    graphdef, state = nnx.split(model)

    def fwd(s, t):
        m = nnx.merge(graphdef, s)
        m.eval()
        return m(t)

    return lambda tokens: jax.jit(fwd)(state, jnp.asarray(tokens))


def uncached_greedy(model, prompts, n):
    """Chapter 13's loop without a cache: rerun the whole sequence for every new token.

    Returns the tokens ``[B, n]`` and the smallest gap between the best and second-best logit met on
    the way (a tiny gap would make any greedy comparison fragile).
    """
    full = _full_forward(model)
    C = model.config.context_length
    out, gap = [], np.inf
    for p in prompts:
        seq = np.zeros((1, C), np.int32)  # padding after the prefix cannot change it (causal mask)
        seq[0, : len(p)] = p
        for t in range(len(p), len(p) + n):
            logits = np.asarray(full(seq))[0, t - 1]
            top2 = np.sort(logits)[-2:]
            gap = min(gap, top2[1] - top2[0])
            seq[0, t] = int(np.argmax(logits))
        out.append(seq[0, len(p) : len(p) + n].tolist())
    return np.array(out), gap


@pytest.fixture(scope="module")
def greedy_ref(tiny_model):
    tokens, gap = uncached_greedy(tiny_model, PROMPTS, N_NEW)
    assert gap > 1e-5, "reference path has a near-tie; pick other prompts"
    assert len(set(tokens.ravel().tolist())) > 6, "reference continuation is degenerate"
    return tokens


# -- teacher forcing: the cache gives exactly the uncached logits --------------------------------

BASE = dict(vocab_size=97, context_length=64, d_model=32, num_heads=4, num_layers=2)
CONFIGS = {
    # GPT-2: pre-LN, learned positions (through embed), tied head.
    "gpt2": GPTConfig.preset("tiny", **BASE),
    # The course's post-LN block, untied head and dropout, with rotary positions (through project)
    # and an RMSNorm/SwiGLU block in place of the course's LayerNorm/ReLU.
    "post-ln-rope": GPTConfig.preset("course", **BASE, d_ff=64, positions="rope", norm="rmsnorm", gated_ffn=True,
                                     activation="silu"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_teacher_forced_cached_logits_equal_full_forward(name, make_gpt):
    """Prefill ragged prompts (lengths 3, 9, 5), then (gpt2 only) a 3-token chunk at per-row offsets,
    then one token at a time: every position's logits match one uncached forward (fp32, < 1e-5)."""
    cfg = CONFIGS[name]
    model = make_gpt(cfg, seed=1)
    B, T = 3, 20
    seq = np.random.default_rng(7).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    full = np.asarray(_full_forward(model)(seq))  # [B, T, V]
    traces = TRACE_COUNTS["forward_cached"]

    lengths = np.array([3, 9, 5])
    P = lengths.max()
    prompts = np.where(np.arange(P)[None] < lengths[:, None], seq[:, :P], 0)
    cache = init_cache(cfg, B, 32)
    logits, cache = forward_cached(model, prompts, cache, num_valid=lengths)
    for b in range(B):
        np.testing.assert_allclose(np.asarray(logits)[b, : lengths[b]], full[b, : lengths[b]], atol=1e-5, rtol=0)
    checked, pos = lengths.sum(), lengths.copy()
    if name == "gpt2":
        chunk = np.stack([seq[b, pos[b] : pos[b] + 3] for b in range(B)])
        logits, cache = forward_cached(model, chunk, cache)
        for b in range(B):
            np.testing.assert_allclose(np.asarray(logits)[b], full[b, pos[b] : pos[b] + 3], atol=1e-5, rtol=0)
        checked, pos = checked + 3 * B, pos + 3
    np.testing.assert_array_equal(np.asarray(cache.lengths), pos)
    steps = 0
    while (pos < T).any():
        valid = pos < T
        step = seq[np.arange(B), np.minimum(pos, T - 1)][:, None]
        logits, cache = forward_cached(model, step, cache, num_valid=valid.astype(np.int32))
        for b in np.flatnonzero(valid):
            np.testing.assert_allclose(np.asarray(logits)[b, 0], full[b, pos[b]], atol=1e-5, rtol=0)
            checked += 1
        pos, steps = pos + valid, steps + 1
    assert checked == B * T and steps == T - lengths.min() - (3 if name == "gpt2" else 0)
    # One trace per distinct shape (prefill, [chunk,] step); the many single-token calls reuse one.
    assert TRACE_COUNTS["forward_cached"] - traces == (3 if name == "gpt2" else 2)


def test_bfloat16_cache_runs_and_tracks_the_full_forward(make_gpt):
    """bf16 compute: the cache is bf16 (half the bytes), and prefill + steps stay close to the
    uncached bf16 forward (rounding differs between the two paths, hence the loose tolerance)."""
    cfg = CONFIGS["gpt2"].replace(dtype="bfloat16")
    model = make_gpt(cfg, seed=1)
    seq = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    full = np.asarray(_full_forward(model)(seq))
    cache = init_cache(cfg, 2, 16)
    assert cache.k[0].dtype == jnp.bfloat16
    logits, cache = forward_cached(model, seq[:, :8], cache)
    got = [np.asarray(logits)]
    for t in range(8, 12):
        logits, cache = forward_cached(model, seq[:, t : t + 1], cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    scale = np.abs(full).max()
    assert np.abs(got - full).max() < 0.03 * scale, np.abs(got - full).max() / scale


def test_forward_cached_updates_the_cache_in_place(tiny_model, tiny_cfg):
    """The cache is donated: the new one reuses its buffers, so a step copies no cache."""
    cache = init_cache(tiny_cfg, 1, 16)
    kept = jax.tree.map(jnp.copy, cache)
    _, new = forward_cached(tiny_model, np.zeros((1, 3), np.int32), cache)
    assert cache.k[0].is_deleted() and not kept.k[0].is_deleted()
    np.testing.assert_array_equal(np.asarray(new.lengths), [3])
    assert np.any(np.asarray(new.k[0])[:, :, :3] != 0) and not np.any(np.asarray(kept.k[0]))


def test_forward_cached_refuses_to_overflow(tiny_model, tiny_cfg):
    cache = init_cache(tiny_cfg, 1, 16)
    with pytest.raises(ValueError, match="do not fit"):
        forward_cached(tiny_model, np.zeros((1, 17), np.int32), cache)


# -- generate: greedy, EOS, buckets -------------------------------------------------------------


def test_greedy_generate_matches_uncached_loop_for_ragged_batch(tiny_model, greedy_ref):
    tokens, lengths = generate(tiny_model, PROMPTS, N_NEW)
    assert tokens.shape == (3, N_NEW) and tokens.dtype == np.int32
    np.testing.assert_array_equal(lengths, [N_NEW] * 3)
    np.testing.assert_array_equal(tokens, greedy_ref)
    assert tiny_model.blocks[0].drop1.deterministic is False  # dropout went off on a copy only


def test_scan_layers_model_generates_the_same_tokens(tiny_model, greedy_ref):
    """A model that stores its blocks stacked (``scan_layers``) decodes layer by layer from slices of
    them: the same greedy tokens as the uncached loop on the unrolled model."""
    scanned = with_layout(tiny_model, scan_layers=True)
    assert scanned.config.scan_layers and scanned.blocks.attn.q.kernel.shape[0] == tiny_model.config.num_layers
    tokens, lengths = generate(scanned, PROMPTS, N_NEW)
    np.testing.assert_array_equal(lengths, [N_NEW] * 3)
    np.testing.assert_array_equal(tokens, greedy_ref)


def test_eos_stops_each_row_and_pads_after_it(tiny_model, greedy_ref):
    row0 = greedy_ref[0].tolist()
    k = next(i for i in range(3, N_NEW) if row0[i] not in row0[:i])  # first appears at step k >= 3
    eos = row0[k]
    tokens, lengths = generate(tiny_model, PROMPTS, N_NEW, eos_id=eos, pad_id=96)
    assert lengths[0] == k + 1
    for b in range(3):
        ref = greedy_ref[b].tolist()
        n = ref.index(eos) + 1 if eos in ref else N_NEW
        assert lengths[b] == n
        np.testing.assert_array_equal(tokens[b, :n], ref[:n])
        assert (tokens[b, n:] == 96).all()


def test_same_bucket_does_not_recompile(tiny_model, greedy_ref):
    """Other prompt lengths, output lengths, EOS id and array input in the same bucket: no new trace."""
    generate(tiny_model, PROMPTS, N_NEW)  # compiled here or by an earlier test
    before, sizes = dict(TRACE_COUNTS), compiled_programs()
    tokens, _ = generate(tiny_model, [[7, 8], [1] * 11, [3, 4, 5, 6]], 14, eos_id=3)
    assert tokens.shape == (3, 14)
    arr = np.array([p[:3] for p in PROMPTS], np.int32)  # an int array [B, T] works too
    tokens, lengths = generate(tiny_model, arr, 15)  # 3 + 15 tokens: still the 32-slot cache
    assert dict(TRACE_COUNTS) == before and compiled_programs() == sizes
    np.testing.assert_array_equal(tokens[0, :N_NEW], greedy_ref[0])  # PROMPTS[0] has 3 tokens
    # A prompt of 17 tokens needs the next prompt bucket: that one does compile (the counter works).
    generate(tiny_model, [[1] * 17, [2], [3]], 5)
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1


# -- sampling -----------------------------------------------------------------------------------


def test_top_k_1_equals_greedy(tiny_model, greedy_ref):
    tokens, _ = generate(tiny_model, PROMPTS, N_NEW, temperature=1.7, top_k=1, seed=5)
    np.testing.assert_array_equal(tokens, greedy_ref)


def test_sampling_is_seeded_and_streaming_matches(tiny_model):
    kw = dict(temperature=0.9, top_p=0.8)
    a, la = generate(tiny_model, PROMPTS, N_NEW, seed=3, **kw)
    b, _ = generate(tiny_model, PROMPTS, N_NEW, seed=3, **kw)
    c, _ = generate(tiny_model, PROMPTS, N_NEW, seed=4, **kw)
    d, _ = generate(tiny_model, PROMPTS, N_NEW, seed=3, temperature=2.0, top_p=0.99)  # traced: no recompile
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != d).any()
    np.testing.assert_array_equal(la, [N_NEW] * 3)
    chunks = list(generate_stream(tiny_model, PROMPTS, N_NEW, seed=3, chunk_size=5, **kw))
    assert [ch.tokens.shape[1] for ch in chunks] == [1, 5, 5, 1]
    np.testing.assert_array_equal(np.concatenate([ch.tokens for ch in chunks], axis=1), a)
    assert np.concatenate([ch.valid for ch in chunks], axis=1).all() and chunks[-1].done.all()


def test_stream_ends_as_soon_as_every_row_hit_eos(tiny_model, greedy_ref):
    generate(tiny_model, PROMPTS, N_NEW)
    before = dict(TRACE_COUNTS)
    row0 = greedy_ref[0].tolist()
    n = next(i for i in range(1, N_NEW) if row0[i] not in row0[:i]) + 1  # EOS = a token first seen late
    # Every row continues PROMPTS[0], so every row stops after n tokens; 3 + 14 tokens keep the 32-slot
    # cache of the other batch-3 calls, so nothing compiles here.
    chunks = list(generate_stream(tiny_model, [PROMPTS[0]] * 3, 14, eos_id=row0[n - 1], chunk_size=4))
    assert len(chunks) == 1 + -(-(n - 1) // 4) and chunks[-1].done.all()
    tokens = np.concatenate([ch.tokens for ch in chunks], axis=1)
    np.testing.assert_array_equal(tokens, np.tile(row0[:n], (3, 1)))
    assert dict(TRACE_COUNTS) == before


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[1, 2, 3]), "wrap a single prompt"),
        (dict(prompts=[[1, 97]]), "outside"),
        (dict(prompts=[[1] * 60], max_new_tokens=5), "beyond the model's context length 64"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0, temperature=1.0), "top_p"),
        (dict(top_p=1.5, temperature=1.0), "top_p"),
        (dict(top_k=0, temperature=1.0), "top_k"),
        (dict(eos_id=97), "eos_id"),
    ],
)
def test_bad_input_fails_clearly_before_compiling(tiny_model, kwargs, match):
    kwargs = dict(kwargs)
    prompts, n = kwargs.pop("prompts", [[1, 2, 3]]), kwargs.pop("max_new_tokens", 4)
    before, sizes = dict(TRACE_COUNTS), compiled_programs()
    with pytest.raises(ValueError, match=match):
        generate(tiny_model, prompts, n, **kwargs)
    with pytest.raises(ValueError, match=match):
        next(generate_stream(tiny_model, prompts, n, **kwargs))
    assert dict(TRACE_COUNTS) == before and compiled_programs() == sizes
