"""Every fast path equals the plain one on the CPU: values and gradients.

* One fused Q/K/V product (``MultiHeadAttention.query_key_value``, picked by itself for
  self-attention) against three separate projections: outputs, gradients of every parameter, with
  and without biases, grouped-query heads, RoPE, LoRA and the cached (decoding) forward.
* The training step's guard against non-finite steps run as one ``lax.cond`` (the CPU's pick)
  against element-wise selects: the same state and metrics after a finite step, a diverged one and
  an fp16 overflow, on one device and data-parallel over two.
* Each device's gradients of its own rows summed in one flat all-reduce (``local_rows``, the CPU's
  pick) against the partitioner's all-reduce per parameter: the same state and metrics, with
  gradient accumulation and fp16, over two and four devices.
* Several training steps in one call (``make_multi_step``, one ``lax.scan``) against as many
  single calls: the same state and per-step metrics, a diverged step among them included.
* The decode loop of known trip count (``loop="fixed"``) against the early-exit ``while_loop``:
  the same tokens, log-probabilities and lengths, greedy and sampled with the same key, with and
  without EOS, and inside a jitted program of one's own (``rollout_traced``).
* The embedding gradient as a sorted segment sum against the scatter-add and float64, and the
  Pallas decode-attention kernel (in its interpreter) against float64 and XLA's attention.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fastjit import FAST
from tfd_jax import ops
from tfd_jax.decode import decode_loop_kind, generate, rollout, rollout_traced
from tfd_jax.models import GPT, GPTConfig
from tfd_jax.nn.layers import Embed
from tfd_jax.nn.transformer import MultiHeadAttention
from tfd_jax.ops.embedding import EMBED_GRADS
from tfd_jax.train import sharding as shd
from tfd_jax.train.optim import OptimConfig, make_optimizer
from tfd_jax.train.step import init_state, make_multi_step, make_train_step, split_model
from tfd_jax.train.tasks import lm_loss

# -- the non-finite guard of the training step ----------------------------------------------------


def _assert_same_tree(a, b):
    # Adam divides by the root of the second moment, so where a gradient is ~0 the compiled
    # programs' different rounding shows at ~1e-6; an update step here is lr = 1e-2.
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("precision,mesh", [("fp32", None), ("fp32", "data=2"), ("fp16", None)])
def test_cond_guard_equals_select_guard(precision, mesh):
    cfg = GPTConfig.preset("tiny", vocab_size=61, d_model=32, num_heads=4, num_layers=1, context_length=16,
                           dtype="float16" if precision == "fp16" else "float32")
    graphdef, params, rest = split_model(GPT(cfg, rngs=nnx.Rngs(0)))
    opt, sched = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 17)).astype(np.int32)
    batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "mask": np.ones((4, 16), bool)}
    state = init_state(params, opt, 0, precision)
    if mesh:
        m = shd.make_mesh(mesh, jax.devices()[:2])
        state = jax.device_put(state, jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec()))
        batch = jax.device_put(batch, jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec("data")))
    steps = {g: jax.jit(make_train_step(graphdef, rest, opt, sched, lm_loss, fp16=precision == "fp16", guard=g),
                        compiler_options=FAST) for g in ("select", "cond")}
    cases = [("finite", state, 1.0), ("diverged", state, jnp.float32(jnp.nan))]
    if precision == "fp16":  # scaled fp16 gradients overflow: the scale search skips the step
        cases.append(("overflow", {**state, "loss_scale": jnp.float32(2.0**40)}, 1.0))
    for name, start, poison in cases:
        (s1, m1), (s2, m2) = (steps[g](start, batch, poison) for g in ("select", "cond"))
        _assert_same_tree(s1, s2)
        _assert_same_tree(m1, m2)
        moved = any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(s2["params"]),
                                                                       jax.tree.leaves(start["params"])))
        assert moved == (name == "finite") and bool(m2["finite"]) == (name == "finite"), name
    with pytest.raises(ValueError, match="guard"):
        make_train_step(graphdef, rest, opt, sched, lm_loss, guard="maybe")


@pytest.mark.parametrize("precision,accum,devices", [("fp32", 1, 2), ("fp32", 2, 2), ("fp16", 1, 4)])
def test_local_rows_equal_the_partitioned_step(precision, accum, devices):
    cfg = GPTConfig.preset("tiny", vocab_size=61, d_model=32, num_heads=4, num_layers=1, context_length=16,
                           dtype="float16" if precision == "fp16" else "float32")
    graphdef, params, rest = split_model(GPT(cfg, rngs=nnx.Rngs(0)))
    # plain SGD: the new parameters show the gradients as they are (Adam's m / sqrt(v) would turn a
    # ~0 gradient's rounding into a full step of either sign)
    opt, sched = optax.sgd(1e-2), optax.constant_schedule(1e-2)
    rows = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(8, 17)).astype(np.int32)
    mask = np.ones((8, 16), bool)
    mask[1, 5:] = mask[6, 9:] = False  # unequal token counts per device: the mean is over all of them
    batch = {"tokens": rows[:, :-1], "targets": rows[:, 1:], "mask": mask}
    m = shd.make_mesh(f"data={devices}", jax.devices()[:devices])
    state = jax.device_put(init_state(params, opt, 0, precision), jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec()))
    batch = jax.device_put(batch, jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec("data")))
    steps = [jax.jit(make_train_step(graphdef, rest, opt, sched, lm_loss, grad_accum=accum, fp16=precision == "fp16",
                                     local_rows=lr), compiler_options=FAST) for lr in (None, m)]
    for poison in (1.0, jnp.float32(jnp.nan)):
        (s1, m1), (s2, m2) = (f(state, batch, poison) for f in steps)
        _assert_same_tree(s1, s2)
        _assert_same_tree(m1, m2)
        assert bool(m2["finite"]) == (poison == 1.0)
    assert float(m2["tokens"]) == mask.sum()
    # the fast path is the one that ran: its only all-reduce carries one flat buffer
    def all_reduced(f):  # the buffers of each all-reduce in the compiled step
        return [re.findall(r"[a-z]+\d*\[[\d,]*\]", line.split(" all-reduce")[0])
                for line in f.lower(state, batch).compile().as_text().splitlines()
                if re.search(r" all-reduce(-start)?\(", line)]

    assert sum(map(len, all_reduced(steps[0]))) > 2
    assert all_reduced(steps[1]) == [[f"f32[{sum(x.size for x in jax.tree.leaves(params)) + 2}]"]]
    with pytest.raises(ValueError, match="splits only 'data'"):
        make_train_step(graphdef, rest, opt, sched, lm_loss, local_rows=shd.make_mesh("data=2,fsdp=2", jax.devices()[:4]))


def test_multi_step_equals_single_steps():
    cfg = GPTConfig.preset("tiny", vocab_size=61, d_model=32, num_heads=4, num_layers=1, context_length=16)
    graphdef, params, rest = split_model(GPT(cfg, rngs=nnx.Rngs(0)))
    opt, sched = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), 10)
    rows = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(3, 4, 17)).astype(np.int32)
    batches = {"tokens": rows[..., :-1], "targets": rows[..., 1:], "mask": np.ones((3, 4, 16), bool)}
    poison = jnp.asarray([1.0, jnp.nan, 1.0], jnp.float32)  # the middle step diverges and is skipped
    step = make_train_step(graphdef, rest, opt, sched, lm_loss)
    single = jax.jit(step, compiler_options=FAST)
    state, singles = init_state(params, opt, 0, "fp32"), []
    for i in range(3):
        state, m = single(state, jax.tree.map(lambda x: x[i], batches), poison[i])
        singles.append(m)
    multi_state, multi_m = jax.jit(make_multi_step(step, 3), compiler_options=FAST)(
        init_state(params, opt, 0, "fp32"), batches, poison)
    _assert_same_tree(multi_state, state)
    _assert_same_tree(multi_m, jax.tree.map(lambda *xs: jnp.stack(xs), *singles))
    assert multi_m["finite"].tolist() == [True, False, True] and int(multi_state["step"]) == 3
    with pytest.raises(ValueError, match="3 batches stacked"):
        make_multi_step(step, 3)(init_state(params, opt, 0, "fp32"), jax.tree.map(lambda x: x[:2], batches))


# -- fused Q/K/V ----------------------------------------------------------------------------------

CONFIGS = {
    "shakespeare-cpu (no biases, tied)": dict(vocab_size=65, d_model=32, num_heads=4, num_layers=2, context_length=16,
                                              tie_embeddings=True, qkv_bias=False, out_bias=False, ffn_bias=False),
    "gpt2 (biases)": dict(vocab_size=61, d_model=32, num_heads=4, num_layers=2, context_length=16),
    "llama (gqa, rope, rmsnorm)": dict(vocab_size=61, d_model=32, num_heads=4, num_kv_heads=2, num_layers=2,
                                       context_length=16, positions="rope", norm="rmsnorm", gated_ffn=True,
                                       activation="silu", qkv_bias=False, out_bias=False, ffn_bias=False),
    "scan_layers": dict(vocab_size=61, d_model=32, num_heads=4, num_layers=3, context_length=16, scan_layers=True),
}


class qkv_path:
    """Within this block attention takes one path: ``fused=True`` one Q/K/V product, False three."""

    def __init__(self, fused: bool):
        self.fused = fused

    def __enter__(self):
        self.saved, MultiHeadAttention.fuse_qkv = MultiHeadAttention.fuse_qkv, self.fused

    def __exit__(self, *exc):
        MultiHeadAttention.fuse_qkv = self.saved


def plain_qkv():
    return qkv_path(False)


def test_the_fused_path_is_picked_off_the_cpu_only():
    attn = MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))
    assert MultiHeadAttention.fuse_qkv is None and attn._fuse_qkv() == (jax.default_backend() != "cpu")
    with qkv_path(True):
        assert attn._fuse_qkv()


def _loss_and_grads(model, tokens):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        return jnp.mean(m.token_losses(tokens[:, :-1], tokens[:, 1:])), m(tokens)

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_qkv_equals_three_projections(name):
    cfg = GPTConfig.preset("tiny", **CONFIGS[name])
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 13)), jnp.int32)
    with qkv_path(True):
        fused = _loss_and_grads(model, tokens)
    with plain_qkv():
        plain = _loss_and_grads(model, tokens)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-5, atol=1e-6)
    flat_f, flat_p = nnx.to_flat_state(fused[2]), nnx.to_flat_state(plain[2])
    assert [p for p, _ in flat_f] == [p for p, _ in flat_p]
    for (path, gf), (_, gp) in zip(flat_f, flat_p):
        np.testing.assert_allclose(gf.get_value(), gp.get_value(), rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_fused_qkv_with_lora_and_cached_forward():
    cfg = GPTConfig.preset("tiny", **CONFIGS["gpt2 (biases)"], lora_rank=2, lora_targets="attn.q,attn.k,attn.v")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    # A LoRA update that is not zero, so that leaving it out of the fused product would show.
    for _, m in nnx.iter_graph(model):
        if getattr(m, "lora_b", None) is not None:
            m.lora_b[...] = 0.1 * jnp.ones_like(m.lora_b[...])
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    with qkv_path(True):
        fused = _loss_and_grads(model, tokens)
    with plain_qkv():
        plain = _loss_and_grads(model, tokens)
    np.testing.assert_allclose(fused[1], plain[1], rtol=1e-5, atol=1e-6)
    for (path, gf), (_, gp) in zip(nnx.to_flat_state(fused[2]), nnx.to_flat_state(plain[2])):
        np.testing.assert_allclose(gf.get_value(), gp.get_value(), rtol=1e-5, atol=1e-7, err_msg=str(path))

    with qkv_path(True):
        jax.clear_caches()
        out = generate(model, [[1, 2, 3], [4, 5]], 6, temperature=0.0)
    with plain_qkv():
        jax.clear_caches()  # the plain path must compile its own programs
        ref = generate(model, [[1, 2, 3], [4, 5]], 6, temperature=0.0)
    jax.clear_caches()
    np.testing.assert_array_equal(out[0], ref[0])
    np.testing.assert_array_equal(out[1], ref[1])


def test_cross_attention_keeps_separate_projections():
    """Cross-attention's keys come from another sequence: no fused product there."""
    attn = MultiHeadAttention(16, 2, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 3, 16))
    ctx = jnp.linspace(-1, 1, 5 * 16).reshape(1, 5, 16)
    y = attn(x, context=ctx)
    q = attn.query(x)
    k, v = attn.key_value(ctx)
    np.testing.assert_allclose(y, attn.attend(q, k, v), rtol=1e-6)


# -- the decode loop of known trip count ------------------------------------------------------------

PROMPTS = [[5, 17, 3], [8, 1, 2, 3, 4, 5, 6, 7, 9], [42, 42, 11, 60, 2]]


@pytest.fixture(scope="module")
def model():
    cfg = GPTConfig.preset("tiny", vocab_size=97, context_length=64, num_layers=2, tie_embeddings=False)
    return GPT(cfg, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=7),
    dict(temperature=0.8, top_k=20, top_p=0.9, seed=11),
], ids=["greedy", "sampled", "top-k-top-p"])
@pytest.mark.parametrize("n_new", [16, 11], ids=["fills-the-bucket", "inside-the-bucket"])
def test_fixed_loop_equals_while_loop(model, kwargs, n_new):
    a = generate(model, PROMPTS, n_new, loop="while", **kwargs)
    b = generate(model, PROMPTS, n_new, loop="fixed", **kwargs)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_fixed_loop_with_eos_equals_while_loop(model):
    free, _ = generate(model, PROMPTS, 12, temperature=0.0, loop="while")
    eos = int(free[0, 3])  # row 0 stops at its fourth token
    kw = dict(temperature=1.0, eos_id=eos, pad_id=0)
    for seed in (0, 1):
        a = rollout(model, PROMPTS, 12, key=jax.random.key(seed), loop="while", **kw)
        b = rollout(model, PROMPTS, 12, key=jax.random.key(seed), loop="fixed", **kw)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    a = generate(model, PROMPTS, 12, temperature=0.0, eos_id=eos, loop="while")
    b = generate(model, PROMPTS, 12, temperature=0.0, eos_id=eos, loop="fixed")
    assert a[1][0] == 4
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_fixed_loop_inside_a_jitted_program(model):
    graphdef, state = nnx.split(model)
    prompts = jnp.asarray([[5, 17, 3, 0], [8, 1, 2, 3]], jnp.int32)
    lengths = jnp.asarray([3, 4], jnp.int32)

    @jax.jit
    def run(state, key):
        m = nnx.merge(graphdef, state)
        m.eval()
        return [rollout_traced(m, prompts, lengths, 8, key=key, eos_id=5, loop=loop) for loop in ("while", "fixed")]

    a, b = run(state, jax.random.key(4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_decode_loop_kind(monkeypatch):
    monkeypatch.delenv("TFD_JAX_DECODE_LOOP", raising=False)
    assert decode_loop_kind("while") == "while" and decode_loop_kind("fixed") == "fixed"
    # On this (CPU) backend the early exit is kept, EOS or not.
    assert decode_loop_kind("auto", can_stop_early=False) == "while"
    monkeypatch.setenv("TFD_JAX_DECODE_LOOP", "fixed")
    assert decode_loop_kind("auto") == "fixed"
    assert decode_loop_kind("while") == "while"  # an explicit choice wins over the environment
    with pytest.raises(ValueError, match="unknown decode loop"):
        decode_loop_kind("unrolled")


# ------------------------------------------------------------------------------------------------
# The embedding lookup's gradient: scatter-add (default) or sort + sorted segment sum
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", EMBED_GRADS)
def test_embedding_lookup_gradient_equals_float64(grad):
    rng = np.random.default_rng(4)
    table = rng.normal(size=(11, 5)).astype(np.float32)
    ids = rng.integers(0, 11, size=(3, 17))
    ids[0, :6] = 2  # a frequent token: many positions add into one row
    g = rng.normal(size=(3, 17, 5)).astype(np.float32)
    out, vjp = jax.vjp(lambda t: ops.embedding_lookup(t, jnp.asarray(ids), grad), jnp.asarray(table))
    np.testing.assert_array_equal(out, table[ids])
    want = np.zeros((11, 5))
    np.add.at(want, ids.reshape(-1), g.reshape(-1, 5).astype(np.float64))
    (got,) = vjp(jnp.asarray(g))
    assert got.dtype == jnp.float32 and got.shape == (11, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="embedding grad must be one of"):
        ops.embedding_lookup(jnp.asarray(table), jnp.asarray(ids), "onehot")


def test_sorted_embedding_grad_equals_the_scatter_in_a_model(monkeypatch):
    cfg = GPTConfig.preset("tiny", **CONFIGS["gpt2 (biases)"])
    model = GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 7, (3, 13)), jnp.int32)  # few distinct tokens
    graphdef, params = nnx.split(model, nnx.Param)

    def sorts_in_the_gradient():
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p).token_losses(tokens[:, :-1], tokens[:, 1:]))
        return "sort[" in str(jax.make_jaxpr(jax.grad(loss))(params))

    scatter = _loss_and_grads(model, tokens)
    assert not sorts_in_the_gradient()
    monkeypatch.setattr(Embed, "grad_impl", "sorted")
    sorted_ = _loss_and_grads(model, tokens)
    assert sorts_in_the_gradient()
    np.testing.assert_array_equal(sorted_[0], scatter[0])
    for (path, a), (_, b) in zip(nnx.to_flat_state(sorted_[2]), nnx.to_flat_state(scatter[2])):
        np.testing.assert_allclose(a.get_value(), b.get_value(), rtol=1e-5, atol=1e-7, err_msg=str(path))


# ------------------------------------------------------------------------------------------------
# The Pallas flash-decoding kernel (opt-in) against XLA's attention, in Pallas's interpreter here
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)], ids=["multi-head", "grouped-query"])
def test_decode_attention_equals_float64(heads, kv_heads):
    B, S, D = 3, 64, 16
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, heads, D))
    k, v = (jax.random.normal(x, (B, S, kv_heads, D)) for x in ks[1:])
    lengths = jnp.asarray([1, 37, S])
    got = ops.decode_attention(q, k, v, lengths, scale=0.3)
    kk, vv = (np.repeat(np.asarray(a, np.float64), heads // kv_heads, axis=2) for a in (k, v))
    s = np.einsum("bhd,bshd->bhs", np.asarray(q, np.float64), kk) * 0.3
    s = np.where(np.arange(S)[None, None] < np.asarray(lengths)[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhs,bshd->bhd", p / p.sum(-1, keepdims=True), vv)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert ops.decode_attention_plan(64, 16) == (4, 16) and ops.decode_attention_plan(1024, 64) == (16, 64)
    assert ops.decode_attention_plan(8, 16) is None and ops.decode_attention_plan(64, 24) is None


def test_decode_kernel_in_the_model_equals_xla_attention(model, monkeypatch):
    prompts = jnp.asarray([[5, 17, 3, 9], [8, 1, 2, 3]], jnp.int32)
    cache = model.init_cache(2, 32)
    _, cache = model.forward_cached(prompts, cache, jnp.asarray([4, 3]))  # a prefill (XLA's attention)
    step = jnp.asarray([[7], [11]], jnp.int32)
    xla = model.forward_cached(step, cache, jnp.ones(2, jnp.int32))
    plain = generate(model, PROMPTS, 8, temperature=0.0)
    monkeypatch.setattr(MultiHeadAttention, "decode_kernel", "pallas")
    spy = []
    real = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: spy.append(1) or real(*a, **kw))
    kernel = model.forward_cached(step, cache, jnp.ones(2, jnp.int32))
    assert spy, "the decode kernel did not run"
    np.testing.assert_allclose(kernel[0], xla[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(kernel[1]), jax.tree.leaves(xla[1])):  # later layers: rounding apart
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jax.clear_caches()  # the class attribute is read when a program is traced: trace generate's again
    spy.clear()
    fast = generate(model, PROMPTS, 8, temperature=0.0)
    assert spy, "generate did not run the decode kernel"
    np.testing.assert_array_equal(fast[0], plain[0])
    np.testing.assert_array_equal(fast[1], plain[1])
    monkeypatch.setattr(MultiHeadAttention, "decode_kernel", "triton")
    with pytest.raises(ValueError, match="decode_kernel must be None or 'pallas'"):
        model.forward_cached(step, cache, jnp.ones(2, jnp.int32))
