"""The GPT model: causality by gradient, the course's post-LN block, dropout modes, precision,
remat, packing (segment ids) and padding."""
import functools

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.models import GPT, GPTConfig, count_params, with_layout
from tfd_jax.ops import head as layers
from fastjit import FAST

T = 8


# Everything below runs compiled: one program per model and shape, rather than one per primitive.
@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST)
def _apply(fn, graphdef, state, *args):
    model = nnx.merge(graphdef, state)
    out = fn(model, *args)
    return out, nnx.state(model)


def jit_apply(fn, model, *args):
    """``fn(model, *args)`` compiled, with the model's state (e.g. dropout RNG counts) written back."""
    graphdef, state = nnx.split(model)
    out, state = _apply(fn, graphdef, state, *args)
    nnx.update(model, state)
    return out


def _call(model, tokens, positions, segment_ids, padding_mask):
    return model(tokens, positions=positions, segment_ids=segment_ids, padding_mask=padding_mask)


def run(model, tokens, positions=None, segment_ids=None, padding_mask=None):
    """``model(tokens, ...)``, compiled. Defaults are filled in explicitly (positions ``0..T-1``, one
    segment, nothing padded), so one program per model and shape serves every call; the
    ``None`` defaults of ``__call__`` itself are exercised by the causality probe below."""
    B, n = tokens.shape
    positions = default_positions(B, n) if positions is None else positions
    segment_ids = jnp.zeros((B, n), jnp.int32) if segment_ids is None else segment_ids
    padding_mask = jnp.ones((B, n), bool) if padding_mask is None else padding_mask
    return jit_apply(_call, model, tokens, positions, segment_ids, padding_mask)


def _rngs():
    return nnx.Rngs(params=0, dropout=1)


@functools.cache
def _init_state(cfg: GPTConfig):
    return jax.jit(lambda: nnx.state(GPT(cfg, rngs=_rngs())), compiler_options=FAST)()


@functools.cache
def _graphdef(cfg: GPTConfig):
    return nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=_rngs())))[0]


def build(name, *, train=False, **overrides):
    """A fresh model (its own module objects) from the preset, initialised by one compiled program
    per parameter layout; in eval mode unless ``train``.

    Compute dtype, remat and scan_layers do not change the parameters, so such variants share the
    initial state of the plain config (and compare like with like)."""
    cfg = GPTConfig.preset(name, **overrides)
    plain = cfg.replace(dtype="float32", remat=False, scan_layers=False)
    model = nnx.merge(_graphdef(cfg.replace(scan_layers=False)), _init_state(plain), copy=True)
    model = with_layout(model, scan_layers=cfg.scan_layers)  # the same weights, blocks stacked
    if not train:
        model.eval()
    return model


# Small vocabularies and contexts keep every test fast; the architecture is the preset's. The
# course preset is also the sinusoidal-positions variant.
CONFIGS = {
    "course": ("course", dict(vocab_size=50)),  # post-LN, sinusoidal, untied, no Q/K/V/O biases
    "tiny": ("tiny", dict(vocab_size=64, context_length=16)),  # GPT-2 style: pre-LN, learned positions
    "tiny-rope": ("tiny", dict(vocab_size=64, context_length=16, positions="rope")),
}


def build_named(key, **more):
    name, overrides = CONFIGS[key]
    return build(name, **overrides, **more)


@functools.cache
def shared(key):
    """One model per config for the read-only tests (tests that change a model build their own)."""
    return build_named(key)


@pytest.fixture(params=sorted(CONFIGS))
def key(request):
    return request.param


@pytest.fixture
def course():
    return shared("course")


@pytest.fixture
def tiny():
    return shared("tiny")


def tokens_for(model, B=2, T=T, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, model.config.vocab_size, (B, T)), jnp.int32)


def default_positions(B, T):
    return jnp.broadcast_to(jnp.arange(T), (B, T))


# ---- causality -----------------------------------------------------------------------------------


def _direction(model):
    return jnp.asarray(np.random.default_rng(1).standard_normal(model.config.vocab_size), jnp.float32)


def _sensitivity(model, tokens, positions, segment_ids, r):
    """|d logits[t] / d x[s]| summed over features, for batch row 0: ``[T_out, T_in]``.

    ``x`` is the embedded input (tokens plus positions), the continuous input of the blocks. The
    logits are contracted with a fixed random direction ``r`` (one backward pass per output
    position instead of one per vocabulary entry); a random direction hides a real dependence
    with probability zero.
    """
    x = model.embed(tokens, positions)
    f = lambda x: model.forward_embeddings(x, positions=positions, segment_ids=segment_ids)[0] @ r  # noqa: E731
    J = jax.jacrev(f)(x)  # [T_out, B, T_in, M]
    return jnp.abs(J[:, 0]).sum(-1)


def _probe(model, tokens, changed, r):
    """Everything the read-only tests need from one model, in one compiled program."""
    positions = default_positions(*tokens.shape)
    x = model.embed(tokens, positions)
    blocks = []  # the residual stream after each block, run by hand
    for block in model.blocks:
        x = block(x, mask=ops.causal_mask(tokens.shape[1]))
        blocks.append(x)
    logits, logits_changed = jnp.split(model(jnp.concatenate([tokens, changed])), 2)
    return dict(
        sensitivity=_sensitivity(model, tokens[:1], positions[:1], None, r),
        logits=logits,
        changed=logits_changed,
        blocks=jnp.stack(blocks),
        head=model.logits(x),
    )


@functools.cache
def probe_of(key):
    model = shared(key)
    tokens = tokens_for(model, seed=2)
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % model.config.vocab_size)  # a new future from t = 5
    return {k: np.asarray(v) for k, v in jit_apply(_probe, model, tokens, changed, _direction(model)).items()}


def test_causality_by_gradient(key):
    g = probe_of(key)["sensitivity"]
    future = np.triu(np.ones((T, T), bool), k=1)  # [t, s] with s > t
    assert np.all(g[future] == 0.0), "logits depend on later positions"
    assert np.all(g[~future] > 1e-8), "logits ignore an earlier position"


def test_future_tokens_do_not_change_past_logits(key):
    la, lb = probe_of(key)["logits"], probe_of(key)["changed"]
    np.testing.assert_allclose(la[:, :5], lb[:, :5], rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(la[:, 5:] - lb[:, 5:])) > 1e-4


def test_call_is_embed_then_blocks_then_head(key):
    # __call__ (with its own mask and default positions) equals running the pieces by hand.
    direct = probe_of(key)["logits"]
    assert direct.shape == (2, T, shared(key).config.vocab_size) and direct.dtype == np.float32
    np.testing.assert_allclose(direct, probe_of(key)["head"], rtol=1e-6, atol=1e-6)


# ---- the course's block --------------------------------------------------------------------------


def np_layer_norm(x, scale, bias, eps):
    x = np.asarray(x, np.float64)
    y = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


def test_course_is_post_ln():
    # With LN last in each sub-layer, every block's output rows have mean 0 and population
    # variance 1 (LN's scale 1 and bias 0 at init; var/(var + eps) is within 1e-3 of 1 here).
    blocks = probe_of("course")["blocks"].astype(np.float64)
    assert blocks.shape == (3, 2, T, 6)
    np.testing.assert_allclose(blocks.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(blocks.var(-1), 1.0, atol=1e-3)


def test_pre_ln_block_outputs_are_not_normalised():
    # The contrast that makes the check above meaningful: a GPT-2 (pre-LN) block leaves the
    # residual stream un-normalised.
    blocks = probe_of("tiny")["blocks"].astype(np.float64)
    assert np.all(np.max(np.abs(blocks.var(-1) - 1.0), axis=(1, 2)) > 0.5)


def test_course_has_no_qkvo_biases_and_an_untied_head(course):
    assert count_params(course) == course.config.num_params()
    for block in course.blocks:
        for lin in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
            assert lin.bias is None
        assert block.ffn.w_in.bias is not None and block.ffn.activation == "relu"
    assert course.final_norm is None and course.lm_head is not None and course.lm_head.bias is None
    E = np.asarray(course.tok_embed.embedding[...], np.float64)
    W = np.asarray(course.lm_head.kernel[...], np.float64)
    assert E.shape == (50, 6) and W.shape == (6, 50)
    assert not np.allclose(E, W.T)
    # The logits are the last block's output times lm_head, with no norm in between.
    probe = probe_of("course")
    np.testing.assert_allclose(probe["logits"], probe["blocks"][-1].astype(np.float64) @ W, rtol=1e-5, atol=1e-5)


def test_gpt2_head_is_tied(tiny):
    # GPT-2: final LayerNorm, then the transposed token embedding as the output layer.
    assert tiny.lm_head is None
    probe = probe_of("tiny")
    ln = tiny.final_norm
    h = np_layer_norm(probe["blocks"][-1], ln.scale[...], ln.bias[...], ln.eps)
    E = np.asarray(tiny.tok_embed.embedding[...], np.float64)
    np.testing.assert_allclose(probe["logits"], h @ E.T, rtol=1e-5, atol=1e-5)


# ---- input checks (they fire before any computation) ---------------------------------------------


def test_too_long_input_raises(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context length 16"):
        tiny(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="exceeds"):  # also when traced: the check needs only the shape
        run(tiny, jnp.zeros((1, 17), jnp.int32))


def test_non_integer_tokens_raise(tiny):
    with pytest.raises(ValueError, match="must be integers"):
        tiny(jnp.zeros((1, 4), jnp.float32))


def test_bad_token_shapes_raise(tiny):
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        tiny(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="empty"):
        tiny(jnp.zeros((1, 0), jnp.int32))


def test_invalid_config_raises_before_building():
    with pytest.raises(ValueError, match="not divisible"):
        GPT(GPTConfig.preset("course", num_heads=4), rngs=nnx.Rngs(0))


# ---- dropout modes -------------------------------------------------------------------------------


def test_eval_is_deterministic_train_is_not():
    model = build_named("course", train=True)
    assert model.config.dropout == 0.1  # the course's rate
    tokens = tokens_for(model)
    model.eval()
    a, b = run(model, tokens), run(model, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model.train()
    c, d = run(model, tokens), run(model, tokens)
    assert np.max(np.abs(np.asarray(c) - np.asarray(d))) > 1e-3
    assert np.max(np.abs(np.asarray(c) - np.asarray(a))) > 1e-3
    model.eval()
    np.testing.assert_array_equal(np.asarray(run(model, tokens)), np.asarray(a))


# ---- precision and remat -------------------------------------------------------------------------


def test_bf16_compute_gives_float32_logits_close_to_fp32():
    f32 = shared("tiny")
    b16 = build_named("tiny", dtype="bfloat16")
    # The same float32 parameters in both: only the compute dtype differs.
    for p, q in zip(jax.tree.leaves(nnx.state(f32, nnx.Param)), jax.tree.leaves(nnx.state(b16, nnx.Param))):
        assert q.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
    tokens = tokens_for(f32)
    lf, lb = np.asarray(run(f32, tokens)), np.asarray(run(b16, tokens))
    assert lb.dtype == np.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); through two blocks and the
    # head the logits may drift by a few percent of their scale, not more.
    scale = np.abs(lf).max()
    assert np.abs(lb - lf).max() < 0.05 * scale
    assert np.abs(lb - lf).max() > 0  # the bf16 path really ran in lower precision


def _loss_and_grads(model, tokens):
    def loss_fn(m):
        logits = m(tokens[:, :-1])
        return ops.cross_entropy(logits, tokens[:, 1:]), logits

    return nnx.value_and_grad(loss_fn, has_aux=True)(model)


def test_remat_changes_nothing():
    plain = shared("tiny")
    remat = build_named("tiny", remat=True)
    assert remat.config.remat and not plain.config.remat
    tokens = tokens_for(plain, T=T + 1)
    (l1, logits1), g1 = jit_apply(_loss_and_grads, plain, tokens)
    (l2, logits2), g2 = jit_apply(_loss_and_grads, remat, tokens)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits1), rtol=1e-6, atol=1e-6)
    assert abs(float(l1) - float(l2)) <= 1e-6 * abs(float(l1))
    leaves1, leaves2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(leaves1) == len(leaves2) == len(jax.tree.leaves(nnx.state(plain, nnx.Param)))
    for a, b in zip(leaves1, leaves2):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert all(float(jnp.abs(a).max()) > 0 for a in leaves1)


# ---- packing and padding -------------------------------------------------------------------------


@pytest.fixture(params=["tiny", "tiny-rope"])
def gpt2ish(request):
    return shared(request.param)


def alone(model, segs):
    """Logits of each sequence in ``segs`` (two ``[1, n]`` arrays) on its own. Each is filled up to
    T and the two share one batch, so one compiled shape serves all; causality makes the fill
    irrelevant."""
    filled = jnp.concatenate([jnp.pad(seg, ((0, 0), (0, T - seg.shape[1]))) for seg in segs])
    out = np.asarray(run(model, filled))
    return [out[i : i + 1, : seg.shape[1]] for i, seg in enumerate(segs)]


def _segment_probe(model, tokens, positions, segment_ids, r):
    logits = model(tokens, positions=positions, segment_ids=segment_ids)
    return logits, _sensitivity(model, tokens, positions, segment_ids, r)


def test_segments_do_not_see_each_other(gpt2ish):
    # Row 0 packs two documents of 3 and 5 tokens, positions restarting at the second; row 1 is
    # one document of 8 tokens.
    model = gpt2ish
    seg_a, seg_b, whole = (tokens_for(model, B=1, T=n, seed=s) for n, s in [(3, 4), (5, 5), (8, 6)])
    packed = jnp.concatenate([jnp.concatenate([seg_a, seg_b], axis=1), whole])
    segment_ids = jnp.array([[0] * 3 + [1] * 5, [0] * 8])
    positions = jnp.array([list(range(3)) + list(range(5)), list(range(8))])
    out, g = map(np.asarray, jit_apply(_segment_probe, model, packed, positions, segment_ids, _direction(model)))
    # Packed, each document gets exactly the logits it gets alone.
    ref_a, ref_b = alone(model, [seg_a, seg_b])
    np.testing.assert_allclose(out[:1, :3], ref_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:1, 3:], ref_b, rtol=1e-5, atol=1e-5)
    unsegmented = np.asarray(run(model, packed, positions))
    np.testing.assert_allclose(out[1:], unsegmented[1:], rtol=1e-5, atol=1e-5)
    # By gradient (row 0): segment 2's logits have zero sensitivity to segment 1's inputs (and
    # segment 1's none to segment 2's, as causality already demands); within a segment, causal
    # dependence as usual.
    assert np.all(g[3:, :3] == 0.0) and np.all(g[:3, 3:] == 0.0)
    assert np.all(g[3:, 3:][np.tril(np.ones((5, 5), bool))] > 1e-8)
    # Without segment ids the second document does see the first.
    assert np.max(np.abs(unsegmented[:1, 3:] - out[:1, 3:])) > 1e-4


def test_left_padding_matches_unpadded(gpt2ish):
    # Two rows, left-padded by 3 and by 1 (different pad tokens); positions count from the first
    # real token. The real positions get exactly the logits of the unpadded sequences.
    model = gpt2ish
    real = [tokens_for(model, B=1, T=5, seed=6), tokens_for(model, B=1, T=7, seed=7)]
    pads = [3, 1]
    padded = jnp.concatenate(
        [jnp.concatenate([jnp.full((1, p), fill, jnp.int32), r], axis=1) for p, r, fill in zip(pads, real, (0, 9))]
    )
    valid = jnp.arange(T)[None] >= jnp.array(pads)[:, None]
    positions = jnp.maximum(jnp.arange(T)[None] - jnp.array(pads)[:, None], 0)
    out = np.asarray(run(model, padded, positions, None, valid))
    assert np.all(np.isfinite(out))
    for row, (p, ref) in enumerate(zip(pads, alone(model, real))):
        np.testing.assert_allclose(out[row : row + 1, p:], ref, rtol=1e-5, atol=1e-5)


def test_padding_mask_hides_keys(tiny):
    # A key marked invalid in the middle of the sequence is ignored by every later query: changing
    # its token changes nothing after it (nor, by causality, before it).
    tokens = tokens_for(tiny, seed=8)
    other = tokens.at[:, 2].set((tokens[:, 2] + 5) % 64)
    valid = jnp.array([[True, True, False] + [True] * (T - 3)] * 2)
    a = np.asarray(run(tiny, tokens, padding_mask=valid))
    b = np.asarray(run(tiny, other, padding_mask=valid))
    np.testing.assert_allclose(a[:, 3:], b[:, 3:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a[:, :2], b[:, :2], rtol=1e-6, atol=1e-6)
    # Without the mask the change at position 2 does propagate.
    assert np.max(np.abs(np.asarray(run(tiny, tokens))[:, 3:] - np.asarray(run(tiny, other))[:, 3:])) > 1e-4


@pytest.mark.parametrize("policy", ["dots", "dots_no_batch"])
def test_named_remat_policies_change_nothing(policy):
    plain = shared("tiny")
    remat = build_named("tiny", remat=policy)
    assert remat.config.remat_policy == policy
    tokens = tokens_for(plain, T=T + 1)
    (l1, logits1), g1 = jit_apply(_loss_and_grads, plain, tokens)
    (l2, logits2), g2 = jit_apply(_loss_and_grads, remat, tokens)
    np.testing.assert_allclose(np.asarray(logits1), np.asarray(logits2), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ---- scan over layers ----------------------------------------------------------------------------


def _masked_loss_and_grads(model, tokens, segment_ids, padding_mask):
    def loss_fn(m):
        logits = m(tokens[:, :-1], segment_ids=segment_ids, padding_mask=padding_mask)
        return ops.cross_entropy(logits, tokens[:, 1:]), logits

    return nnx.value_and_grad(loss_fn, has_aux=True)(model)


@pytest.mark.parametrize("key,remat", [("tiny", False), ("course", "dots"), ("tiny-rope", "full")])
def test_scan_layers_gives_the_same_logits_and_gradients(key, remat):
    """One lax.scan over stacked block parameters == the blocks one after another (with packing,
    padding and remat in the mix), gradients included."""
    plain = build_named(key, remat=remat)
    scanned = build_named(key, remat=remat, scan_layers=True)
    tokens = tokens_for(plain, T=T + 1)
    segment_ids = jnp.array([[0] * 3 + [1] * (T - 3), [0] * T])
    padding_mask = jnp.ones((2, T), bool).at[1, -2:].set(False)
    (l1, logits1), g1 = jit_apply(_masked_loss_and_grads, plain, tokens, segment_ids, padding_mask)
    (l2, logits2), g2 = jit_apply(_masked_loss_and_grads, scanned, tokens, segment_ids, padding_mask)
    np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits1), rtol=1e-5, atol=1e-6)
    assert float(l2) == pytest.approx(float(l1), rel=1e-6)
    # The scanned model's gradients come stacked [L, ...]; unstacked they are the unrolled ones.
    g2 = nnx.state(with_layout(nnx.merge(nnx.graphdef(scanned), g2, nnx.state(scanned, nnx.Not(nnx.Param))),
                               scan_layers=False), nnx.Param)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g2))


def test_scan_layers_draws_the_same_dropout_masks_step_after_step():
    """Each block keeps its own dropout stream under the scan, and the advanced counters are written
    back: two training calls in a row give what the unrolled model gives."""
    plain = build_named("course", train=True)
    scanned = build_named("course", train=True, scan_layers=True)
    tokens = tokens_for(plain)
    first = [np.asarray(run(m, tokens)) for m in (plain, scanned)]
    second = [np.asarray(run(m, tokens)) for m in (plain, scanned)]
    np.testing.assert_allclose(first[1], first[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second[1], second[0], rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(second[1] - first[1])) > 1e-3  # new masks on the second call


def _dot_count(cfg: GPTConfig) -> int:
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=_rngs()))
    model.eval()
    return str(jax.make_jaxpr(lambda m, t: m(t))(model, jnp.zeros((1, 4), jnp.int32))).count("dot_general")


def test_scan_layers_traces_one_block_whatever_the_depth():
    """What cuts compile time: the unrolled program grows with the number of layers, the scanned one
    does not."""
    base = GPTConfig.preset("tiny", vocab_size=64, context_length=16)
    unrolled = [_dot_count(base.replace(num_layers=n)) for n in (2, 4)]
    scanned = [_dot_count(base.replace(num_layers=n, scan_layers=True)) for n in (2, 4)]
    assert unrolled[1] > unrolled[0]
    assert scanned[0] == scanned[1] < unrolled[0]


def test_scan_layers_stores_the_same_weights_stacked():
    """Built from the same seed, the scanned model holds the unrolled model's weights stacked, and
    ``with_layout`` converts both ways without changing a number."""
    cfg = GPTConfig.preset("tiny", vocab_size=64, context_length=16)
    plain = GPT(cfg, rngs=_rngs())
    scanned = GPT(cfg.replace(scan_layers=True), rngs=_rngs())
    assert scanned.blocks.ln1.scale.shape == (2, 64)  # one Block, every variable stacked
    stacked = nnx.state(with_layout(plain, scan_layers=True), nnx.Param)
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(nnx.state(scanned, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = with_layout(scanned, scan_layers=False)
    assert not back.config.scan_layers and len(back.blocks) == 2
    assert jax.tree.structure(nnx.state(back)) == jax.tree.structure(nnx.state(plain))
    for a, b in zip(jax.tree.leaves(nnx.state(plain)), jax.tree.leaves(nnx.state(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert count_params(scanned) == count_params(plain) == cfg.num_params()
    assert with_layout(plain, scan_layers=False) is plain
    # The converted model has variables of its own: writing one leaves the other model alone.
    back.tok_embed.embedding.set_value(jnp.zeros_like(back.tok_embed.embedding.get_value()))
    assert float(jnp.abs(scanned.tok_embed.embedding.get_value()).max()) > 0
    second = back.blocks[1]  # the stacked blocks one by one
    np.testing.assert_array_equal(np.asarray(second.attn.q.kernel[...]), np.asarray(plain.blocks[1].attn.q.kernel[...]))


def test_scanned_model_in_eval_mode_can_be_closed_over():
    """In eval mode the scan writes nothing back, so plain JAX transforms may close over the model
    (dropout rate > 0: the course's 0.1)."""
    scanned = build_named("course", scan_layers=True)
    tokens = tokens_for(scanned)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda t: scanned(t))(tokens)),
                               np.asarray(run(shared("course"), tokens)), rtol=1e-5, atol=1e-6)
    x = scanned.embed(tokens, default_positions(*tokens.shape))
    g = jax.grad(lambda x: scanned.forward_embeddings(x)[:, 2].sum())(x)
    assert float(jnp.abs(g[:, :3]).max()) > 0 and float(jnp.abs(g[:, 3:]).max()) == 0  # causal


def test_scan_layers_must_be_a_bool():
    with pytest.raises(ValueError, match="scan_layers must be True or False"):
        GPTConfig.preset("tiny", scan_layers="yes")


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat must be"):
        GPTConfig.preset("tiny", remat="everything")


@pytest.mark.parametrize("tie", [True, False])
def test_padded_output_head_gives_the_same_logits_and_gradients(tie):
    """vocab_pad_multiple pads the head's matmul only: logits and gradients are unchanged."""
    cfg = GPTConfig.preset("tiny", vocab_size=301, tie_embeddings=tie, vocab_pad_multiple=1)
    assert 4 * cfg.context_length >= layers.PAD_MIN_ROWS  # enough rows for the padding to apply
    tokens = jax.random.randint(jax.random.key(3), (4, cfg.context_length), 0, cfg.vocab_size)

    def loss_and_grads(c):
        model = GPT(c, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)

        def f(p):
            logits = nnx.merge(graphdef, p)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

        (loss, logits), g = jax.value_and_grad(f, has_aux=True)(params)
        return logits, g

    plain_logits, plain_g = loss_and_grads(cfg)
    padded_logits, padded_g = loss_and_grads(cfg.replace(vocab_pad_multiple=128))
    assert padded_logits.shape == tokens.shape + (301,)
    np.testing.assert_allclose(padded_logits, plain_logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(padded_g), jax.tree.leaves(plain_g)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vocab_pad_multiple_is_validated():
    with pytest.raises(ValueError, match="vocab_pad_multiple"):
        GPTConfig.preset("tiny", vocab_pad_multiple=-1)


def test_output_head_matches_float64_and_its_gradient_in_bf16():
    """head_matmul: float32 logits from bf16 inputs; its backward multiplies in bf16 (rounded
    cotangent) and still matches the float64 gradients to bf16 accuracy, padded or not."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    w = (rng.normal(size=(77, 32)) * 0.1).astype(np.float32)
    g = rng.normal(size=(600, 77)).astype(np.float32)
    want = x.astype(np.float64) @ w.T.astype(np.float64)
    for pad in (1, 64):
        out, vjp = jax.vjp(lambda a, b: layers.head_matmul(a, b, "vm", jnp.bfloat16, pad), jnp.asarray(x), jnp.asarray(w))
        assert out.dtype == jnp.float32 and out.shape == (600, 77)
        np.testing.assert_allclose(out, want, rtol=0.05, atol=0.05)
        dx, dw = vjp(jnp.asarray(g))
        assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32  # cotangents in the inputs' dtypes
        for got, ref in ((dx, g.astype(np.float64) @ w), (dw, g.T.astype(np.float64) @ x)):
            rel = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
            assert rel < 1e-2, rel
        # "mv" layout (an untied head's [M, V] kernel) gives the same numbers
        out_mv = layers.head_matmul(jnp.asarray(x), jnp.asarray(w.T), "mv", jnp.bfloat16, pad)
        np.testing.assert_array_equal(out_mv, out)


@pytest.mark.parametrize("tie,pad,bias", [(True, 1, False), (True, 128, False), (False, 128, False), (False, 128, True)])
def test_token_losses_equal_cross_entropy_of_the_logits_with_the_same_gradients(tie, pad, bias):
    """GPT.token_losses (fused head + loss, what training differentiates) == the two-step path."""
    cfg = GPTConfig.preset("tiny", vocab_size=301, tie_embeddings=tie, vocab_pad_multiple=pad, lm_head_bias=bias)
    keys = jax.random.split(jax.random.key(5))
    tokens = jax.random.randint(keys[0], (4, cfg.context_length), 0, cfg.vocab_size)
    targets = jax.random.randint(keys[1], (4, cfg.context_length), 0, cfg.vocab_size)
    weights = jnp.linspace(0.5, 1.5, tokens.size).reshape(tokens.shape)  # a non-uniform cotangent
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def fused(p):
        return jnp.sum(nnx.merge(graphdef, p).token_losses(tokens, targets) * weights)

    def plain(p):
        return jnp.sum(ops.token_cross_entropy(nnx.merge(graphdef, p)(tokens), targets) * weights)

    (lf, gf), (lp, gp) = jax.value_and_grad(fused)(params), jax.value_and_grad(plain)(params)
    np.testing.assert_allclose(lf, lp, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gp)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_head_loss_in_bf16_matches_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    w = (rng.normal(size=(77, 32)) * 0.3).astype(np.float32)
    t = rng.integers(0, 77, size=600)
    logits = x.astype(np.float64) @ w.T.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = lse - logits[np.arange(600), t]
    p = np.exp(logits - lse[:, None])
    p[np.arange(600), t] -= 1
    for pad in (1, 64):
        losses, vjp = jax.vjp(lambda a, b: layers.head_cross_entropy(a, b, "vm", jnp.bfloat16, jnp.asarray(t), pad),
                              jnp.asarray(x), jnp.asarray(w))
        assert losses.dtype == jnp.float32 and losses.shape == (600,)
        np.testing.assert_allclose(losses, want, rtol=0.03, atol=0.03)
        dx, dw = vjp(jnp.ones(600, jnp.float32))
        for got, ref in ((dx, p @ w), (dw, p.T @ x)):
            rel = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
            assert rel < 2e-2, rel


def test_bf16_logits_keep_a_bf16_array_for_the_backward_and_match_float64():
    """``logits_dtype=bfloat16`` (the opt-in): the [rows, V] array the backward pass keeps is bfloat16
    (float32 by default), and loss and gradients stay within bfloat16 rounding of float64."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 32)).astype(np.float32)
    w = (rng.normal(size=(77, 32)) * 0.3).astype(np.float32)
    t = rng.integers(0, 77, size=600)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    x64, w64 = np.asarray(xb, np.float64), np.asarray(wb, np.float64)  # the inputs as the product sees them
    logits = x64 @ w64.T
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = lse - logits[np.arange(600), t]
    p = np.exp(logits - lse[:, None])
    p[np.arange(600), t] -= 1
    # rounding each logit to bfloat16 moves it by at most |logit| / 256, so each loss by twice that
    bound = 2 * np.abs(logits).max() / 256 + 1e-5
    for pad in (1, 64):
        kept = {}
        for ldt in (jnp.float32, jnp.bfloat16):
            losses, vjp = jax.vjp(
                lambda a, b: layers.head_cross_entropy(a, b, "vm", jnp.bfloat16, jnp.asarray(t), pad, ldt), xb, wb)
            kept[ldt] = {leaf.dtype for leaf in jax.tree.leaves(vjp) if leaf.shape == (600, 77 + (pad - 77 % pad) % pad)}
            assert losses.dtype == jnp.float32 and losses.shape == (600,)
            assert np.abs(np.asarray(losses, np.float64) - want).max() <= bound
            dx, dw = vjp(jnp.ones(600, jnp.float32))
            for got, ref in ((dx, p @ w64), (dw, p.T @ x64)):
                rel = np.linalg.norm(np.asarray(got, np.float64) - ref) / np.linalg.norm(ref)
                assert rel < 2e-2, rel
        assert kept == {jnp.float32: {jnp.dtype(jnp.float32)}, jnp.bfloat16: {jnp.dtype(jnp.bfloat16)}}, (pad, kept)
    out = layers.head_matmul(xb, wb, "vm", jnp.bfloat16, 1, jnp.bfloat16)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out, np.float64) - logits).max() <= np.abs(logits).max() / 256 + 1e-5
    with pytest.raises(ValueError, match="logits_dtype must be one of"):
        layers.head_matmul(xb, wb, "vm", jnp.bfloat16, 1, jnp.float16)


def test_a_model_with_bf16_logits_trains_like_float32_logits():
    """GPTConfig(logits_dtype="bfloat16"): logits and losses within bfloat16 rounding of the default's."""
    cfg = GPTConfig.preset("tiny", vocab_size=301, dtype="bfloat16", num_layers=1, context_length=32)
    tokens = jax.random.randint(jax.random.key(3), (2, cfg.context_length), 0, cfg.vocab_size)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_in = nnx.merge(nnx.split(GPT(cfg.replace(logits_dtype="bfloat16"), rngs=nnx.Rngs(0)), nnx.Param)[0], params)

    def loss(m, p):
        return jnp.mean(nnx.merge(nnx.graphdef(m), p).token_losses(tokens[:, :-1], tokens[:, 1:]))

    (l32, g32), (l16, g16) = (jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(params) for m in (model, opt_in))
    logits, rounded = (jax.jit(lambda p, m=m: nnx.merge(nnx.graphdef(m), p)(tokens))(params) for m in (model, opt_in))
    assert np.abs(np.asarray(rounded - logits)).max() <= np.abs(np.asarray(logits)).max() / 256 + 1e-6
    assert abs(float(l16) - float(l32)) < 1e-2 and np.isfinite(float(l16))
    total = float(optax.tree.norm(g32))
    rows = tokens[:, :-1].size
    for m, kept in ((model, jnp.float32), (opt_in, jnp.bfloat16)):  # the [rows, V] array the backward keeps
        vjp = jax.eval_shape(lambda p, m=m: jax.vjp(lambda q: loss(m, q), p)[1], params)  # traced, not run
        assert {x.dtype for x in jax.tree.leaves(vjp) if x.shape == (rows, cfg.vocab_size)} == {jnp.dtype(kept)}
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        diff = float(jnp.linalg.norm((a - b).ravel()))
        assert diff <= 0.05 * float(jnp.linalg.norm(b.ravel())) or diff <= 1e-3 * total, (diff, total)
