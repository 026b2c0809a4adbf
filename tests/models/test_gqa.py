"""Grouped-query attention in the GPT (Chapter 19, Part 7): a cache of only the key/value heads,
cached decoding equal to the uncached model, GQA as MHA with shared K/V kernels, rollout's
log-probabilities, and a head width of its own."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import decode
from tfd_jax.models import GPT, GPTConfig, count_params
from fastjit import FAST

B, T = 2, 16  # every uncached forward below has this shape: one compiled program per model layout
BASE = GPTConfig.preset("tiny", vocab_size=61, context_length=32, d_model=32, num_heads=4, num_layers=2, d_ff=64)
CONFIGS = {
    "gqa": BASE.replace(num_kv_heads=2),
    "mqa": BASE.replace(num_kv_heads=1),
    # A head width that is not d_model / num_heads (12, not 8), with RoPE on the wider heads.
    "head_dim": BASE.replace(num_kv_heads=2, head_dim=12, positions="rope"),
}


def random_gpt(cfg: GPTConfig, seed: int = 0, std: float = 0.1) -> GPT:
    """A ``GPT`` in eval mode with every parameter from N(0, std^2) (norm scales N(1, std^2))."""
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        base = 1.0 if path[-1] == "scale" else 0.0
        return jnp.asarray((base + rng.normal(0.0, std, x.shape)).astype(x.dtype))

    params = nnx.from_flat_state([(p, v.replace(fill(p, v.get_value()))) for p, v in nnx.to_flat_state(params)])

    def concrete(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        return jnp.zeros(x.shape, x.dtype)

    model = nnx.merge(graphdef, params, jax.tree.map(concrete, rest))
    model.eval()
    return model


@functools.cache
def model_for(name):
    return random_gpt(CONFIGS[name])


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=FAST)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def uncached(model, tokens):
    """Logits of one uncached forward pass over ``tokens [B, T]``, float64 numpy."""
    return np.asarray(_forward(*nnx.split(model), jnp.asarray(tokens, jnp.int32)), np.float64)


def tokens_for(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# ---- the cache holds only the key/value heads ------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa", "mqa", "head_dim"])
def test_cache_holds_only_kv_heads(name):
    cfg = CONFIGS[name]
    K, D, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    cache = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))).init_cache(3, 16)
    assert cache.num_layers == L and len(cache.v) == L
    for a in (*cache.k, *cache.v):
        assert a.shape == (3, K, 16, D) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.zeros(3))
    # Chapter 13's count with K instead of H heads: 2 (K and V) x L x K x D numbers per token.
    assert decode.bytes_per_token(cfg) == 2 * L * K * D * 4
    assert decode.bytes_per_token(cfg, jnp.bfloat16) == 2 * L * K * D * 2
    assert cache.nbytes == 3 * 16 * decode.bytes_per_token(cfg)
    mha = cfg.replace(num_kv_heads=cfg.num_heads)
    assert decode.bytes_per_token(mha) * K == decode.bytes_per_token(cfg) * cfg.num_heads
    same = decode.init_cache(cfg, 3, 16)
    assert [a.shape for a in same.k] == [a.shape for a in cache.k]


def test_head_dim_of_its_own_shapes_the_kernels():
    cfg = CONFIGS["head_dim"]
    M, H, K, D = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    assert D == 12 and H * D != M
    model = model_for("head_dim")
    for blk in model.blocks:
        assert blk.attn.q.kernel.shape == (M, H * D) and blk.attn.q.bias.shape == (H * D,)
        assert blk.attn.k.kernel.shape == (M, K * D) and blk.attn.v.kernel.shape == (M, K * D)
        assert blk.attn.o.kernel.shape == (H * D, M)
        assert blk.attn.head_dim == D and blk.attn.num_kv_heads == K
    assert count_params(model) == cfg.num_params()
    # A width that no head count divides needs head_dim, and works with it.
    with pytest.raises(ValueError, match="head_dim"):
        GPTConfig(d_model=30, num_heads=4)
    odd = BASE.replace(d_model=30, head_dim=8, num_kv_heads=2)
    attn = nnx.eval_shape(lambda: GPT(odd, rngs=nnx.Rngs(0))).blocks[0].attn
    assert attn.q.kernel.shape == (30, 32) and attn.k.kernel.shape == (30, 16) and attn.o.kernel.shape == (32, 30)
    for name in ("gqa", "mqa"):
        assert count_params(model_for(name)) == CONFIGS[name].num_params()


# ---- cached decoding equals the uncached forward ---------------------------------------------------


def check_cache(model, cache, filled):
    cfg = model.config
    np.testing.assert_array_equal(np.asarray(cache.lengths), [filled] * B)
    for a in (*cache.k, *cache.v):
        assert a.shape == (B, cfg.num_kv_heads, 32, cfg.head_dim)
        a = np.asarray(a)
        assert np.all(a[:, :, filled:] == 0), "slots past the filled length were written"
        assert np.all(np.abs(a[:, :, :filled]).max(axis=-1) > 0), "a filled slot holds no key/value"


def test_decode_forward_cached_token_by_token_equals_uncached():
    # tfd_jax.decode.forward_cached, one token at a time from an empty cache (one compiled program).
    model = model_for("gqa")
    tokens = tokens_for(model.config, seed=1)
    cache = model.init_cache(B, 32)
    steps = []
    for t in range(T):
        logits, cache = decode.forward_cached(model, tokens[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    assert cached.shape == (B, T, model.config.vocab_size)
    np.testing.assert_allclose(cached, uncached(model, tokens), rtol=1e-5, atol=1e-5)
    check_cache(model, cache, T)


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=FAST)
def _cached_step(graphdef, state, tokens, cache):
    # What decode.forward_cached runs (the model's own cached forward, then its head), compiled with
    # the tests' fast options: decode's jit compiles for seconds per shape on CPU.
    model = nnx.merge(graphdef, state)
    h, cache = model.forward_cached(tokens, cache, jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32))
    return model.logits(h), cache


@pytest.mark.parametrize("name", ["mqa", "head_dim"])  # "gqa": decode.forward_cached above
def test_prefill_then_steps_equals_uncached(name):
    model = model_for(name)
    graphdef, state = nnx.split(model)
    tokens = tokens_for(model.config, seed=3)
    cache = model.init_cache(B, 32)
    prefill = 5
    logits, cache = _cached_step(graphdef, state, jnp.asarray(tokens[:, :prefill], jnp.int32), cache)
    steps = [np.asarray(logits)]
    for t in range(prefill, T):
        logits, cache = _cached_step(graphdef, state, jnp.asarray(tokens[:, t:t + 1], jnp.int32), cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), uncached(model, tokens), rtol=1e-5, atol=1e-5)
    check_cache(model, cache, T)


# ---- GQA is MHA whose K/V kernels repeat per group -------------------------------------------------


def repeat_heads(w, K, H, D):
    """A ``[..., K*D]`` kernel or bias -> ``[..., H*D]``: query head h gets K/V head h // (H/K)."""
    w = np.asarray(w)
    heads = w.reshape(*w.shape[:-1], K, D)
    return np.concatenate([heads[..., h // (H // K), :] for h in range(H)], axis=-1)


@pytest.mark.parametrize("name", ["gqa", "mqa"])
def test_gqa_equals_mha_with_repeated_kv_kernels(name):
    gqa = model_for(name)
    cfg = gqa.config
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    mha_cfg = cfg.replace(num_kv_heads=H)
    graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: GPT(mha_cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
    source = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(gqa, nnx.Param))}
    filled, repeated = [], 0
    for path, var in nnx.to_flat_state(params):
        w = source[path]
        if path[-2] in ("k", "v") and path[-3] == "attn":
            w = repeat_heads(w, K, H, D)
            repeated += 1
        assert w.shape == var.get_value().shape, path
        filled.append((path, var.replace(jnp.asarray(w))))
    assert repeated == 4 * cfg.num_layers  # k, v kernels and biases of every layer
    mha = nnx.merge(graphdef, nnx.from_flat_state(filled), nnx.state(gqa, nnx.Not(nnx.Param)))
    mha.eval()
    assert mha.blocks[0].attn.num_kv_heads == H
    tokens = tokens_for(cfg, seed=2)
    np.testing.assert_allclose(uncached(gqa, tokens), uncached(mha, tokens), rtol=1e-5, atol=1e-5)
    if K > 1:
        # The layout matters: query head h reads K/V head h // (H/K), not h % K (tiled copies).
        for blk, src in zip(mha.blocks, gqa.blocks):
            for name_ in ("k", "v"):
                lin, w = getattr(blk.attn, name_), getattr(src.attn, name_)
                lin.kernel[...] = jnp.tile(w.kernel[...].reshape(cfg.d_model, K, D), (1, H // K, 1)).reshape(
                    cfg.d_model, H * D)
                lin.bias[...] = jnp.tile(w.bias[...].reshape(K, D), (H // K, 1)).reshape(H * D)
        assert np.max(np.abs(uncached(gqa, tokens) - uncached(mha, tokens))) > 1e-4


# ---- rollout: log-probabilities of the sampled tokens, the mask and EOS stopping ---------------------

PROMPTS = [[5, 17, 3], [8, 1, 2, 3, 4]]
N_NEW = 11  # the longest prompt plus N_NEW is T: the reference forward reuses the program above


def check_rollout(model, out, pad_id):
    """Every row's tokens, mask and log-probs against an uncached forward over prompt + response."""
    tokens, logp, mask, lengths = (np.asarray(x) for x in out)
    N = tokens.shape[1]
    np.testing.assert_array_equal(mask, np.arange(N)[None] < lengths[:, None])
    seq = np.zeros((B, T), np.int64)
    for b, p in enumerate(PROMPTS):
        n = int(lengths[b])
        assert 1 <= n <= N_NEW
        seq[b, :len(p)] = p
        seq[b, len(p):len(p) + n] = tokens[b, :n]
        assert np.all(tokens[b, n:] == pad_id) and np.all(logp[b, n:] == 0.0)
    ref = np_log_softmax(uncached(model, seq))
    for b, p in enumerate(PROMPTS):
        for j in range(int(lengths[b])):
            # Token j of the response is predicted at position len(p) + j - 1, from the model's own
            # distribution (no temperature, no top-k filter).
            np.testing.assert_allclose(logp[b, j], ref[b, len(p) + j - 1, tokens[b, j]], rtol=1e-4, atol=1e-4)
    return tokens, lengths


def test_rollout_log_probs_mask_and_eos():
    model = model_for("gqa")
    kw = dict(key=jax.random.key(7), temperature=0.8, top_k=20)
    first = decode.rollout(model, PROMPTS, N_NEW, **kw)
    toks, lengths = check_rollout(model, first, pad_id=0)
    np.testing.assert_array_equal(lengths, [N_NEW, N_NEW])  # no EOS: every row runs to the end
    assert len(set(toks[:, :N_NEW].ravel().tolist())) > 4, "degenerate sample"
    # An EOS id taken from row 0's response (preferably one row 1 never produced): the same key
    # samples the same tokens, and each row stops right after its first EOS.
    row0 = toks[0, 1:N_NEW - 1].tolist()
    eos = next((t for t in row0 if t not in toks[1, :N_NEW]), row0[0])
    second = decode.rollout(model, PROMPTS, N_NEW, eos_id=eos, pad_id=60, **kw)
    toks2, lengths2 = check_rollout(model, second, pad_id=60)
    for b in range(B):
        hits = np.flatnonzero(toks[b, :N_NEW] == eos)
        expected = int(hits[0]) + 1 if hits.size else N_NEW
        assert lengths2[b] == expected
        np.testing.assert_array_equal(toks2[b, :expected], toks[b, :expected])
    assert lengths2[0] < N_NEW


@pytest.mark.parametrize("changes", [dict(num_heads=8), dict(num_heads=2), dict(d_model=128)])
def test_replace_rederives_kv_heads_and_head_dim(changes):
    # The module docstring offers replace() and preset(name, **overrides) as two ways to vary a field.
    # The defaults num_kv_heads=0 (= num_heads) and head_dim=0 (= d_model / num_heads) must then
    # follow the new head count or width, not keep the values derived from the old ones (which turns
    # an MHA model into a GQA one, or gives attention a width other than d_model).
    via_replace = GPTConfig.preset("tiny").replace(**changes)
    fresh = GPTConfig.preset("tiny", **changes)
    assert (via_replace.num_heads, via_replace.num_kv_heads, via_replace.head_dim) == (
        fresh.num_heads, fresh.num_kv_heads, fresh.head_dim)
