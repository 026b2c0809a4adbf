"""LoRA adapters (Chapter 18, beyond the course): a fresh adapter changes nothing; a trained one
computes what kernels ``W + (alpha / r) A B`` folded in float64 compute; switching it off gives the
base model back; merging gives a plain model; only the factors train. For a GPT (unrolled, with
``scan_layers``, gated Llama-style) and a T5-style encoder-decoder."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tfd_jax.models import GPT, EncoderDecoder, GPTConfig, Seq2SeqConfig, with_layout
from tfd_jax.nn import LORA_FILTER, Linear, LoRAParam, add_lora, linear_paths, lora_disabled, merge_lora
from tfd_jax.train.step import merge_model, split_trainable
from fastjit import FAST

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


# -- the models and what each computes ---------------------------------------------------------

def _gpt_outputs(model, tokens):
    """Logits (through ``Linear.__call__`` or the plain head) and the fused head + loss."""
    return model(tokens), model.token_losses(tokens, jnp.roll(tokens, -1, axis=1))


def _seq2seq_outputs(model, src, tgt):
    return model(src, tgt), model.token_losses(src, tgt, jnp.roll(tgt, -1, axis=1))


def _gpt_inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.integers(0, 512, (2, 8)), jnp.int32),)


def _seq2seq_inputs():
    rng = np.random.default_rng(1)
    return (jnp.asarray(rng.integers(2, 512, (2, 7)), jnp.int32), jnp.asarray(rng.integers(2, 512, (2, 5)), jnp.int32))


CASES = {
    # Untied head, so lm_head has a kernel to adapt (through the fused head and loss too).
    "gpt": (lambda: GPT(GPTConfig.preset("tiny", tie_embeddings=False), rngs=nnx.Rngs(0)),
            ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.w_in", "ffn.w_out", "lm_head"), _gpt_outputs, _gpt_inputs),
    # Stacked [L, ...] blocks run as one scan.
    "gpt-scan": (lambda: GPT(GPTConfig.preset("tiny", tie_embeddings=False, scan_layers=True), rngs=nnx.Rngs(0)),
                 ("attn.q", "attn.v", "ffn.w_out", "lm_head"), _gpt_outputs, _gpt_inputs),
    # SwiGLU (ops.gated_feed_forward reads three kernels) and grouped-query attention.
    "llama": (lambda: GPT(GPTConfig.preset("llama-tiny"), rngs=nnx.Rngs(0)),
              ("attn.k", "attn.o", "ffn.w_gate", "ffn.w_in", "ffn.w_out"), _gpt_outputs, _gpt_inputs),
    # Both stacks' self-attention, the decoder's cross-attention and the FFNs; tied head.
    "t5": (lambda: EncoderDecoder(Seq2SeqConfig.preset("t5-tiny"), rngs=nnx.Rngs(0)),
           ("attn.q", "attn.v", "cross_attn.q", "cross_attn.k", "ffn.w_in", "ffn.w_out"), _seq2seq_outputs,
           _seq2seq_inputs),
}


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST)
def _apply(fn, graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)


def run(fn, model, *args):
    """``fn(model, *args)`` compiled (the graph def, which holds the LoRA switches, is static)."""
    graphdef, state = nnx.split(model)
    return _apply(fn, graphdef, state, *args)


def _build(name):
    make, targets, outputs, inputs = CASES[name]
    base = make()
    base.eval()
    adapted = nnx.clone(base)
    add_lora(adapted, rank=RANK, alpha=ALPHA, targets=targets, rngs=nnx.Rngs(7))
    return base, adapted, outputs, inputs()


def _adapted_layers(model) -> dict[str, Linear]:
    return {path: lin for path, lin in linear_paths(model) if lin.lora_a is not None}


def _randomize_b(model, seed=0):
    """Move every ``lora_b`` away from zero, as training would."""
    for i, lin in enumerate(_adapted_layers(model).values()):
        lin.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), lin.lora_b.shape)


def _folded_in_float64(base, adapted):
    """A copy of ``base`` whose adapted kernels are ``W + (alpha / r) A @ B``, computed in float64 NumPy."""
    ref = nnx.clone(base)
    ref_layers = dict(linear_paths(ref))
    for path, lin in _adapted_layers(adapted).items():
        w = np.asarray(ref_layers[path].kernel[...], np.float64)
        a, b = np.asarray(lin.lora_a[...], np.float64), np.asarray(lin.lora_b[...], np.float64)
        ref_layers[path].kernel[...] = jnp.asarray((w + SCALE * (a @ b)).astype(np.float32))
    return ref


def _close(got, want, tol=2e-5):
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def _max_diff(got, want):
    return max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in zip(got, want))


# -- the tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_factors_start_the_model_where_it_was(name):
    base, adapted, outputs, args = _build(name)
    layers = _adapted_layers(adapted)
    for path, lin in layers.items():
        k = lin.kernel.shape
        assert isinstance(lin.lora_a, LoRAParam) and isinstance(lin.lora_b, LoRAParam)
        assert lin.lora_a.shape == (*k[:-1], RANK), path  # a stacked kernel [L, in, out] -> [L, in, r]
        assert lin.lora_b.shape == (*k[:-2], RANK, k[-1]), path
        assert not np.any(np.asarray(lin.lora_b[...])) and np.std(np.asarray(lin.lora_a[...])) > 0
        assert lin.lora_scale == SCALE
        if name == "gpt-scan" and path.startswith("blocks."):
            assert lin.lora_a.shape[0] == 2  # one set of factors per layer
    _close(run(outputs, adapted, *args), run(outputs, base, *args), tol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_adapted_model_equals_kernels_folded_in_float64(name):
    base, adapted, outputs, args = _build(name)
    _randomize_b(adapted)
    got, want = run(outputs, adapted, *args), run(outputs, _folded_in_float64(base, adapted), *args)
    assert _max_diff(got, run(outputs, base, *args)) > 1e-2  # the adapter does change the model
    _close(got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_disabled_adapters_are_the_base_model_and_merging_folds_them(name):
    base, adapted, outputs, args = _build(name)
    _randomize_b(adapted)
    want_base, want_adapted = run(outputs, base, *args), run(outputs, adapted, *args)
    with lora_disabled(adapted) as ref:
        assert ref is adapted
        _close(run(outputs, adapted, *args), want_base, tol=1e-6)
    _close(run(outputs, adapted, *args), want_adapted, tol=1e-6)  # switched back on

    merged = merge_lora(adapted)
    assert not jax.tree.leaves(nnx.state(merged, LoRAParam))
    assert all(lin.lora_a is None and lin.lora_b is None for _, lin in linear_paths(merged))
    # A plain model again: the same parameter names and shapes, the same structure, as the base.
    shapes = lambda m: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m)))  # noqa: E731
    assert shapes(merged) == shapes(base)
    assert nnx.graphdef(merged) == nnx.graphdef(base)
    _close(run(outputs, merged, *args), want_adapted)
    assert _adapted_layers(adapted)  # the adapted model keeps its factors
    _close(run(outputs, adapted, *args), want_adapted, tol=1e-6)


def test_disabling_restores_each_layers_own_switch():
    _, adapted, _, _ = _build("gpt")
    layers = list(_adapted_layers(adapted).values())
    layers[0].lora_enabled = False
    with pytest.raises(RuntimeError):
        with lora_disabled(adapted):
            assert not any(lin.lora_enabled for lin in layers)
            raise RuntimeError
    assert [lin.lora_enabled for lin in layers] == [False] + [True] * (len(layers) - 1)


def _loss(fn, model, *args):
    _, losses = fn(model, *args)
    return jnp.mean(losses)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST)
def _grads(fn, graphdef, params, fixed, rest, *args):
    return jax.grad(lambda p: _loss(fn, merge_model(graphdef, p, fixed, rest), *args))(params)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST)
def _param_grads(fn, graphdef, params, rest, *args):
    return jax.grad(lambda p: _loss(fn, nnx.merge(graphdef, p, rest), *args))(params)


@pytest.mark.parametrize("name", list(CASES))
def test_only_the_factors_train(name):
    _, adapted, outputs, args = _build(name)
    _randomize_b(adapted)  # with B = 0, A's gradient is zero: move B first so both have one
    layers = _adapted_layers(adapted)
    graphdef, params, fixed, rest = split_trainable(adapted, LORA_FILTER)
    flat = nnx.to_flat_state(params)
    assert {(path[:-1], path[-1]) for path, _ in flat} == {
        (tuple(int(p) if p.isdigit() else p for p in path.split(".")), f)
        for path in layers for f in ("lora_a", "lora_b")}
    assert all(isinstance(v, LoRAParam) for _, v in flat)
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(fixed))

    grads = _grads(outputs, graphdef, params, fixed, rest, *args)
    # The chain rule through W_eff = W + s A B: dA = s G B^T and dB = s A^T G, with G the gradient
    # of the loss with respect to W_eff (the kernel of the merged model), all in float64.
    m_graphdef, m_params, m_rest = nnx.split(merge_lora(adapted), nnx.Param, ...)
    merged_kernels = dict(linear_paths(nnx.merge(m_graphdef, _param_grads(outputs, m_graphdef, m_params, m_rest, *args),
                                                 m_rest)))
    grad_layers = dict(linear_paths(merge_model(graphdef, grads, fixed, rest)))
    for path, lin in layers.items():
        g = np.asarray(merged_kernels[path].kernel[...], np.float64)
        a, b = np.asarray(lin.lora_a[...], np.float64), np.asarray(lin.lora_b[...], np.float64)
        da, db = grad_layers[path].lora_a[...], grad_layers[path].lora_b[...]
        scale = max(np.abs(g).max(), 1e-12)
        np.testing.assert_allclose(np.asarray(da), SCALE * g @ np.swapaxes(b, -1, -2), atol=1e-5 * scale, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(db), SCALE * np.swapaxes(a, -1, -2) @ g, atol=1e-5 * scale, rtol=1e-4)
        assert np.abs(np.asarray(db)).max() > 0 and np.abs(np.asarray(da)).max() > 0

    # One optimiser step moves every factor and nothing else.
    before = nnx.to_flat_state(nnx.state(adapted, nnx.Param))
    opt = optax.adam(1e-2)
    updates, _ = opt.update(grads, opt.init(params), params)
    stepped = merge_model(graphdef, optax.apply_updates(params, updates), fixed, rest)
    after = dict(nnx.to_flat_state(nnx.state(stepped, nnx.Param)))
    for path, v in before:
        changed = not np.array_equal(np.asarray(v[...]), np.asarray(after[path][...]))
        assert changed == isinstance(v, LoRAParam), path


def _reference_loss(fn, model, *args):
    with lora_disabled(model):
        return _loss(fn, model, *args)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST)
def _reference_grads(fn, graphdef, params, fixed, rest, *args):
    return jax.value_and_grad(lambda p: _reference_loss(fn, merge_model(graphdef, p, fixed, rest), *args))(params)


def test_the_reference_policy_is_the_same_model_switched_off():
    """Inside a traced loss (as RLHF computes its reference log-probabilities), the switched-off
    model is the base model, and no gradient reaches the factors through it."""
    base, adapted, outputs, args = _build("gpt-scan")
    _randomize_b(adapted)
    graphdef, params, fixed, rest = split_trainable(adapted, LORA_FILTER)
    loss, grads = _reference_grads(outputs, graphdef, params, fixed, rest, *args)
    np.testing.assert_allclose(float(loss), float(jnp.mean(run(outputs, base, *args)[1])), rtol=1e-6)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))
    assert all(lin.lora_enabled for lin in _adapted_layers(adapted).values())


def test_layouts_carry_the_factors():
    """Adapters attached to an unrolled model survive ``with_layout`` both ways (stacked ``[L, ...]``
    factors) and decoding over a KV cache uses them."""
    base, adapted, outputs, args = _build("gpt")
    _randomize_b(adapted)
    want = run(outputs, adapted, *args)
    stacked = with_layout(adapted, scan_layers=True)
    assert stacked.blocks.attn.q.lora_a.shape == (2, 64, RANK)
    _close(run(outputs, stacked, *args), want)
    _close(run(outputs, with_layout(stacked, scan_layers=False), *args), want)

    (tokens,) = args
    cache = stacked.init_cache(tokens.shape[0], tokens.shape[1])
    h, _ = stacked.forward_cached(tokens, cache, jnp.full((tokens.shape[0],), tokens.shape[1]))
    np.testing.assert_allclose(np.asarray(stacked.logits(h)), np.asarray(want[0]), rtol=1e-4, atol=1e-4)


def test_bad_targets_and_ranks_are_clear_errors():
    gpt = GPT(GPTConfig.preset("tiny"), rngs=nnx.Rngs(0))  # tied head: no lm_head Linear
    with pytest.raises(ValueError, match=r"'attn\.x' matches no Linear.*blocks\.0\.attn\.q.*blocks\.1\.ffn\.w_out"):
        add_lora(gpt, rank=2, alpha=2.0, targets=("attn.q", "attn.x"), rngs=nnx.Rngs(0))
    assert not _adapted_layers(gpt)  # nothing attached when a target is wrong
    with pytest.raises(ValueError, match="'lm_head' matches no Linear"):
        add_lora(gpt, rank=2, alpha=2.0, targets=("lm_head",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'tn\.q' matches no Linear"):  # whole components, not substrings
        add_lora(gpt, rank=2, alpha=2.0, targets=("tn.q",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="positive integer"):
        add_lora(gpt, rank=0, alpha=2.0, rngs=nnx.Rngs(0))
    add_lora(gpt, rank=2, alpha=2.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA factors"):
        add_lora(gpt, rank=2, alpha=2.0, targets=("attn.q",), rngs=nnx.Rngs(0))
    t5 = EncoderDecoder(Seq2SeqConfig.preset("t5-tiny"), rngs=nnx.Rngs(0))
    add_lora(t5, rank=2, alpha=2.0, targets=("cross_attn.q",), rngs=nnx.Rngs(0))
    assert sorted(_adapted_layers(t5)) == ["decoder.blocks.0.cross_attn.q", "decoder.blocks.1.cross_attn.q"]
