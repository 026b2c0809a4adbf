"""The BERT encoder (Chapter 19, Parts 2-4): padding never reaches real tokens, attention is
bidirectional (by outputs and by gradient), the course-encoder preset is the course's model without
the causal mask, scanned layers equal unrolled ones, the heads follow their formulas, and bad
configurations fail clearly."""
import functools
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.models.bert import Bert, BertConfig
from tfd_jax.nn import run_blocks, with_layout
from fastjit import FAST

TOL = dict(rtol=1e-5, atol=1e-5)

# A small BERT with every feature on: learned positions, token types, embedding norm, biases, exact
# GELU, a classifier.
TINY = BertConfig.preset("tiny", vocab_size=53, context_length=32, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                         num_labels=3)


def random_model(cfg: BertConfig, seed: int = 0, std: float = 0.2) -> Bert:
    """A ``Bert`` in eval mode with every parameter drawn from N(0, std^2) (norm scales N(1, std^2)).

    Random weights from numpy instead of the initialisers: building eagerly compiles every
    initialiser, and nonzero biases (the initialisers' zeros) exercise more of the formulas."""
    abstract = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        base = 1.0 if path[-1] == "scale" else 0.0
        return jnp.asarray((base + rng.normal(0.0, std, x.shape)).astype(x.dtype))

    params = nnx.from_flat_state([(p, v.replace(fill(p, v.get_value()))) for p, v in nnx.to_flat_state(params)])

    def concrete(x):  # dropout streams: a key and a counter each
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        return jnp.zeros(x.shape, x.dtype)

    model = nnx.merge(graphdef, params, jax.tree.map(concrete, rest))
    model.eval()
    return model


@functools.cache
def tiny():
    return random_model(TINY)


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=FAST)
def _heads(graphdef, state, tokens, types, pmask):
    m = nnx.merge(graphdef, state)
    kw = dict(token_types=types, padding_mask=pmask)
    last, layers = m.encode(tokens, all_layers=True, **kw)
    out = dict(encode=m.encode(tokens, **kw), last=last, layers=layers, pooled=m.pooled(tokens, **kw),
               mlm=m.mlm_logits(tokens, **kw), embed=m.embed(tokens, types))
    if m.classifier is not None:
        out["classify"] = m.classify(tokens, **kw)
    return out


def heads(model, tokens, types=None, pmask=None):
    """encode / pooled / mlm_logits / classify (and all_layers, embed) in one compiled program."""
    tokens = jnp.asarray(tokens, jnp.int32)
    types = jnp.zeros_like(tokens) if types is None else jnp.asarray(types, jnp.int32)
    pmask = jnp.ones(tokens.shape, bool) if pmask is None else jnp.asarray(pmask, bool)
    graphdef, state = nnx.split(model)
    return {k: jax.tree.map(np.asarray, v) for k, v in _heads(graphdef, state, tokens, types, pmask).items()}


# ---- padding and bidirectionality --------------------------------------------------------------------

LENGTHS = [6, 4]  # real tokens per row (ragged)
BASE = 6


def real_inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY.vocab_size, (2, BASE))
    types = (np.arange(BASE)[None] >= 3).astype(np.int64).repeat(2, 0)  # segment A then B
    return tokens, types


def right_padded(extra, seed=0):
    """The real tokens, then garbage (random ids and types) on every padded position."""
    tokens, types = real_inputs(seed)
    rng = np.random.default_rng(100 + extra)
    T = BASE + extra
    tok = rng.integers(0, TINY.vocab_size, (2, T))
    typ = rng.integers(0, TINY.type_vocab_size, (2, T))
    mask = np.zeros((2, T), bool)
    for b, n in enumerate(LENGTHS):
        tok[b, :n], typ[b, :n], mask[b, :n] = tokens[b, :n], types[b, :n], True
    return tok, typ, mask


@functools.cache
def padded_outputs(extra):
    return heads(tiny(), *right_padded(extra))


@pytest.mark.parametrize("extra", [3, 9])
def test_right_padding_does_not_change_real_tokens(extra):
    ref, out = padded_outputs(0), padded_outputs(extra)
    assert out["encode"].shape == (2, BASE + extra, TINY.d_model)
    assert out["mlm"].shape == (2, BASE + extra, TINY.vocab_size)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(out["encode"][b, :n], ref["encode"][b, :n], **TOL)
        np.testing.assert_allclose(out["mlm"][b, :n], ref["mlm"][b, :n], **TOL)
        for layer in range(TINY.num_layers + 1):
            np.testing.assert_allclose(out["layers"][layer][b, :n], ref["layers"][layer][b, :n], **TOL)
    np.testing.assert_allclose(out["pooled"], ref["pooled"], **TOL)


def test_padding_mask_is_what_hides_the_garbage():
    # The control that makes the test above meaningful: the same garbage, unmasked, changes the real
    # tokens' outputs (row 1 has garbage even at extra=0, in positions 4 and 5).
    tok, typ, mask = right_padded(3)
    unmasked = heads(tiny(), tok, typ, np.ones_like(mask))
    masked = padded_outputs(3)
    for b in range(2):
        assert np.max(np.abs(unmasked["encode"][b, :LENGTHS[b]] - masked["encode"][b, :LENGTHS[b]])) > 1e-3
    assert np.max(np.abs(unmasked["pooled"] - masked["pooled"])) > 1e-4


def test_changing_the_last_token_changes_the_first_position():
    # Bidirectional: position 0 sees the last token (a causal GPT's position 0 would not change).
    tok, typ, mask = right_padded(0)
    changed = tok.copy()
    changed[0, LENGTHS[0] - 1] = (tok[0, LENGTHS[0] - 1] + 1) % TINY.vocab_size
    a, b = padded_outputs(0), heads(tiny(), changed, typ, mask)
    assert np.max(np.abs(a["encode"][0, 0] - b["encode"][0, 0])) > 1e-3
    assert np.max(np.abs(a["mlm"][0, 0] - b["mlm"][0, 0])) > 1e-3
    assert np.max(np.abs(a["pooled"][0] - b["pooled"][0])) > 1e-4
    # Rows are independent.
    np.testing.assert_allclose(b["encode"][1], a["encode"][1], **TOL)


# ---- gradients: MLM logits at position 0 depend on every real position, and on no pad ----------------


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=FAST)
def _mlm0_grad(graphdef, state, tokens, pmask, r):
    model = nnx.merge(graphdef, state)
    x = model.embed(tokens)
    mask = ops.attention_mask(k_valid=pmask)

    def blocks(x):
        return run_blocks(model.blocks, x, lambda blk, h: blk(h, mask=mask), scanned=model.config.scan_layers)

    def f(x):  # sum over rows of (MLM logits at position 0) . r
        return jnp.sum(model.mlm_head(blocks(x))[:, 0] @ r)

    return jax.grad(f)(x), blocks(x), model.encode(tokens, padding_mask=pmask)


def test_mlm_logits_at_position_zero_depend_on_the_last_position_by_gradient():
    model = tiny()
    T, n1 = 8, 5
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, (2, T)), jnp.int32)
    pmask = jnp.asarray(np.arange(T)[None] < np.array([[T], [n1]]))
    r = jnp.asarray(np.random.default_rng(4).standard_normal(TINY.vocab_size), jnp.float32)
    g, mine, encoded = jax.tree.map(np.asarray, _mlm0_grad(*nnx.split(model), tokens, pmask, r))
    np.testing.assert_allclose(mine, encoded, **TOL)  # the steps above are encode's
    sens = np.abs(g).sum(-1)  # [B, T]
    assert sens[0, T - 1] > 1e-6, "MLM logits at position 0 ignore the last position"
    assert np.all(sens[0] > 1e-6)
    assert np.all(sens[1, :n1] > 1e-6)
    assert np.all(sens[1, n1:] == 0.0), "padded positions leak into real tokens' outputs"


# ---- the course-encoder preset ---------------------------------------------------------------------


def bert_param_count(cfg: BertConfig) -> int:
    """Parameters from the architecture (Chapter 19): embeddings, L post-LN blocks, the three heads."""
    V, M, F, L, C = cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_labels
    ln = 2 * M  # scale and bias
    embeddings = V * M  # token table
    embeddings += cfg.context_length * M if cfg.positions == "learned" else 0  # sinusoidal: a fixed table
    embeddings += cfg.type_vocab_size * M
    embeddings += ln if cfg.embed_norm else 0
    attention = 4 * M * M + (3 * M if cfg.qkv_bias else 0) + (M if cfg.out_bias else 0)  # W_Q, W_K, W_V, W_O
    ffn = M * F + F * M + ((F + M) if cfg.ffn_bias else 0)
    block = attention + ffn + 2 * ln
    pooler = M * M + M
    mlm = (M * M + M) + ln + V  # dense, LayerNorm, output bias (the output matrix is the tied token table)
    classifier = (M * C + C) if C else 0
    return embeddings + L * block + pooler + mlm + classifier


def count_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_course_encoder_preset_is_the_course_model_without_the_mask():
    cfg = BertConfig.preset("course-encoder")
    assert (cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.num_layers) == (6, 2, 3, 24, 3)
    block = cfg.block()
    assert block.norm_position == "post" and block.activation == "relu"
    assert not block.qkv_bias and not block.out_bias and block.ffn_bias
    model = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing runs
    assert model.pos_embed is None and model.type_embed is None and model.embed_norm is None
    assert len(model.blocks) == 3
    for blk in model.blocks:
        for lin in (blk.attn.q, blk.attn.k, blk.attn.v, blk.attn.o):
            assert lin.bias is None and lin.kernel.shape == (6, 6)
        assert blk.ffn.w_in.kernel.shape == (6, 24) and blk.ffn.w_out.kernel.shape == (24, 6)
    expected = 50000 * 6 + 3 * (4 * 36 + (6 * 24 + 24 + 24 * 6 + 6) + 2 * 12) + (36 + 6) + (36 + 6 + 12 + 50000)
    assert bert_param_count(cfg) == expected
    assert count_params(model) == expected


@pytest.mark.parametrize("num_labels", [0, 3])
def test_param_count_formula_for_full_featured_bert(num_labels):
    cfg = TINY.replace(num_labels=num_labels)
    assert count_params(nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))) == bert_param_count(cfg)


def test_bert_base_matches_the_published_count():
    # Hugging Face's bert-base-uncased: BertModel (encoder + pooler) has 109,482,240 parameters;
    # this model adds the MLM head's dense layer, LayerNorm and output bias.
    cfg = BertConfig.preset("bert-base")
    M, V = cfg.d_model, cfg.vocab_size
    expected = 109_482_240 + (M * M + M) + 2 * M + V
    assert bert_param_count(cfg) == expected  # (the formula equals the model's count: the tests above)


def np_sinusoidal(T, M):
    pe = np.zeros((T, M))
    for pos in range(T):
        for i in range(0, M, 2):
            angle = pos / 10000 ** (i / M)
            pe[pos, i] = math.sin(angle)
            if i + 1 < M:
                pe[pos, i + 1] = math.cos(angle)
    return pe


@functools.partial(jax.jit, static_argnums=(0,), compiler_options=FAST)
def _encode_embed(graphdef, state, tokens):
    m = nnx.merge(graphdef, state)
    return dict(encode=m.encode(tokens), embed=m.embed(tokens))


def test_course_encoder_embeds_sinusoidally_and_attends_both_ways():
    model = random_model(BertConfig.preset("course-encoder", vocab_size=40, context_length=16))
    tokens = np.random.default_rng(5).integers(0, 40, (1, 7))
    changed = tokens.copy()
    changed[0, -1] = (tokens[0, -1] + 1) % 40
    both = jnp.asarray(np.concatenate([tokens, changed]), jnp.int32)
    out = jax.tree.map(np.asarray, _encode_embed(*nnx.split(model), both))
    E = np.asarray(model.tok_embed.embedding[...], np.float64)
    np.testing.assert_allclose(out["embed"][0], E[tokens[0]] + np_sinusoidal(7, 6), **TOL)  # no embedding norm
    # No causal mask: the first position (and every other) sees the changed last token.
    assert np.all(np.abs(out["encode"][0] - out["encode"][1]).max(-1) > 1e-4)


# ---- scanned layers --------------------------------------------------------------------------------


def test_scan_layers_equals_unrolled():
    plain = tiny()
    scanned = with_layout(plain, scan_layers=True)
    assert scanned.config.scan_layers and not plain.config.scan_layers
    # Stacked [L, ...] parameters are the unrolled ones, layer by layer.
    L = TINY.num_layers
    np.testing.assert_array_equal(np.asarray(scanned.blocks.attn.q.kernel[...]),
                                  np.stack([np.asarray(b.attn.q.kernel[...]) for b in plain.blocks]))
    inputs = right_padded(3)
    a, b = heads(plain, *inputs), heads(scanned, *inputs)
    assert len(b["layers"]) == len(a["layers"]) == L + 1
    for k in ("encode", "pooled", "mlm"):
        np.testing.assert_allclose(b[k], a[k], **TOL)
    for la, lb in zip(a["layers"], b["layers"]):
        np.testing.assert_allclose(lb, la, **TOL)
    # all_layers: the embeddings first, the encoder output last.
    np.testing.assert_allclose(a["layers"][0], a["embed"], **TOL)
    np.testing.assert_allclose(a["layers"][-1], a["encode"], **TOL)
    np.testing.assert_allclose(a["last"], a["encode"], **TOL)
    assert np.max(np.abs(a["layers"][1] - a["layers"][2])) > 1e-3


# ---- the heads, by their formulas ------------------------------------------------------------------


def np_layer_norm(x, scale, bias, eps):
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def np_gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def f64(p):
    return np.asarray(p[...], np.float64)


def test_heads_follow_their_formulas():
    model = tiny()
    out = {k: np.asarray(v, np.float64) for k, v in padded_outputs(0).items() if k != "layers"}
    h = out["encode"]
    assert out["classify"].shape == (2, 3)
    pooled = np.tanh(h[:, 0] @ f64(model.pooler.kernel) + f64(model.pooler.bias))
    np.testing.assert_allclose(out["pooled"], pooled, **TOL)
    ref = pooled @ f64(model.classifier.kernel) + f64(model.classifier.bias)
    np.testing.assert_allclose(out["classify"], ref, **TOL)
    t = np_gelu(h @ f64(model.mlm_dense.kernel) + f64(model.mlm_dense.bias))
    t = np_layer_norm(t, f64(model.mlm_norm.scale), f64(model.mlm_norm.bias), TINY.norm_eps)
    ref = t @ f64(model.tok_embed.embedding).T + f64(model.mlm_bias)  # tied to the token table
    np.testing.assert_allclose(out["mlm"], ref, rtol=1e-4, atol=1e-4)


# ---- errors ----------------------------------------------------------------------------------------


def test_classify_without_labels_raises_clearly():
    model = nnx.eval_shape(lambda: Bert(TINY.replace(num_labels=0), rngs=nnx.Rngs(0)))
    assert model.classifier is None
    with pytest.raises(ValueError, match="num_labels"):
        model.classify(jnp.zeros((1, 4), jnp.int32))


def test_too_long_input_raises():
    with pytest.raises(ValueError, match="context length 32"):
        tiny().encode(jnp.zeros((1, 33), jnp.int32))


@pytest.mark.parametrize(
    "field,changes",
    [
        ("vocab_size", dict(vocab_size=0)),
        ("num_heads", dict(d_model=10, num_heads=3)),
        ("type_vocab_size", dict(type_vocab_size=-1)),
        ("num_labels", dict(num_labels=-2)),
        ("activation", dict(activation="swish")),
        ("positions", dict(positions="rope")),
        ("dropout", dict(dropout=1.0)),
        ("norm_eps", dict(norm_eps=0.0)),
        ("init", dict(init="he")),
        ("dtype", dict(dtype="float8")),
        ("remat", dict(remat="sometimes")),
        ("pad_id", dict(pad_id=53)),
        ("attention_impl", dict(attention_impl="flash")),
        ("scan_layers", dict(scan_layers="yes")),
    ],
)
def test_bad_config_values_name_the_field(field, changes):
    with pytest.raises(ValueError, match=f"invalid BertConfig.*{field}"):
        TINY.replace(**changes)


def test_unknown_fields_and_presets_raise():
    with pytest.raises(ValueError, match="hidden_size"):
        BertConfig.from_dict({**TINY.to_dict(), "hidden_size": 16})
    with pytest.raises(ValueError, match="bert-huge"):
        BertConfig.preset("bert-huge")
    assert BertConfig.from_dict(TINY.to_dict()) == TINY
