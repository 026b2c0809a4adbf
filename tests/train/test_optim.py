"""Optimizer, schedule and precision pieces against the course's numbers and hand formulas."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tfd_jax.models import GPT, GPTConfig
from tfd_jax.train.metrics import flops_per_token, matmul_params, mfu, peak_flops_per_device
from tfd_jax.train.optim import OptimConfig, decay_mask, lr_schedule, make_optimizer
from tfd_jax.train.precision import all_finite, compute_dtype, update_loss_scale
from tfd_jax.train.step import split_model


def test_course_schedule_shape():
    """Chapter 14: warmup to 6e-4 at step 4,000, cosine to the 6e-5 floor at 100,000."""
    s = lr_schedule(OptimConfig.course_schedule(), total_steps=100_000)
    assert float(s(0)) == 0.0
    assert float(s(1000)) == pytest.approx(1.5e-4, rel=1e-5)
    assert float(s(2000)) == pytest.approx(3e-4, rel=1e-5)
    assert float(s(4000)) == pytest.approx(6e-4, rel=1e-5)
    for t in (20_000, 50_000, 90_000):
        progress = (t - 4000) / 96_000
        expect = 6e-5 + (6e-4 - 6e-5) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(s(t)) == pytest.approx(expect, rel=1e-4)
    assert float(s(100_000)) == pytest.approx(6e-5, rel=1e-5)
    assert float(s(150_000)) == pytest.approx(6e-5, rel=1e-5)


def test_course_adam_step_matches_chapter_11():
    """W = 0.5, gradient -0.702, lr 1e-4: one Adam step gives 0.5001 (m = -0.0702, v = 0.000493)."""
    opt, _ = make_optimizer(OptimConfig.course(), 10)
    params = {"w": jnp.array([0.5])}
    state = opt.init(params)
    updates, state = opt.update({"w": jnp.array([-0.702])}, state, params)
    new = optax.apply_updates(params, updates)
    assert float(new["w"][0]) == pytest.approx(0.5 + 1e-4 * 0.702 / (0.702 + 1e-8), rel=1e-7)
    adam_state = state[-1][0]
    assert float(adam_state.mu["w"][0]) == pytest.approx(-0.0702, rel=1e-6)
    assert float(adam_state.nu["w"][0]) == pytest.approx(0.001 * 0.702**2, rel=1e-5)


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig.preset("tiny", vocab_size=11, num_layers=1), rngs=nnx.Rngs(0))
    _, params, _ = split_model(model)
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed and all("kernel" in k for k in decayed)
    assert any("'q']['kernel']" in k for k in decayed)
    assert not any(v for k, v in flat.items() if "bias" in k or "scale" in k or "embedding" in k)


def test_clipping_bounds_the_update_norm():
    """With clipping at 1.0, a gradient of norm 50 reaches Adam's moments as norm 1 (Chapter 14)."""
    opt, _ = make_optimizer(OptimConfig(name="adam", lr=1.0, warmup_steps=0, schedule="constant", clip_norm=1.0), 10)
    p = {"w": jnp.zeros(4)}
    g = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
    _, state = opt.update(g, opt.init(p), p)
    mu = np.asarray(state[-1][0].mu["w"])  # first moment = (1 - beta1) * clipped gradient
    np.testing.assert_allclose(mu / 0.1, [0.6, 0.8, 0, 0], rtol=1e-5)


@pytest.mark.parametrize("norm", [0.3, 50.0])
def test_clipping_equals_optax_and_keeps_its_state(norm):
    """The library's clip (one scalar factor) against optax.clip_by_global_norm (a select of divided
    elements): the same clipped tree below and above the bound, and the same (empty) state, so a
    checkpoint written with either restores into the other."""
    from tfd_jax.train.optim import clip_by_global_norm

    rng = np.random.default_rng(0)
    g = {"a": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "b": jnp.asarray(rng.normal(size=7), jnp.float32)}
    g = jax.tree.map(lambda x: x * norm / float(optax.tree.norm(g)), g)
    ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    (u1, s1), (u2, s2) = ours.update(g, ours.init(g)), theirs.update(g, theirs.init(g))
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(optax.tree.norm(u1)), min(norm, 1.0), rtol=1e-5)
    cfg = OptimConfig(clip_norm=1.0)
    p = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lambda step: 1e-3, mask=decay_mask))
    assert jax.tree.structure(make_optimizer(cfg, 10)[0].init(p)) == jax.tree.structure(reference.init(p))


@pytest.mark.parametrize("name,wd", [("adamw", 0.1), ("adam", 0.0)])
def test_flat_update_equals_the_per_parameter_update(name, wd):
    """OptimConfig.flat_update: the same parameters after a few clipped, decayed steps, from two
    flat moment vectors (decayed and not) instead of one pair per parameter."""
    params = nnx.state(GPT(GPTConfig.preset("tiny", vocab_size=97, num_layers=1, d_model=32), rngs=nnx.Rngs(0)),
                       nnx.Param)
    n = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(3)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params) for _ in range(3)]
    out = {}
    for flat in (False, True):
        tx, _ = make_optimizer(OptimConfig(name=name, weight_decay=wd, lr=1e-2, warmup_steps=1, flat_update=flat), 10)
        p, state = params, tx.init(params)
        for g in grads:  # normal draws: the gradient norm is far above 1, so clipping acts on every step
            u, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, u)
        out[flat] = p
        moments = [x for x in jax.tree.leaves(state) if x.ndim]
        if flat:  # one vector per moment and group, holding every parameter once
            assert all(x.ndim == 1 for x in moments) and sum(x.size for x in moments) == 2 * n
            assert len(moments) == (4 if wd else 2)
        else:
            assert len(moments) == 2 * len(jax.tree.leaves(params))
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out[False]), jax.tree.leaves(params)))
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # a group with no parameters (here nothing is left undecayed, as with LoRA factors only)
    only_decayed, g = {"a": {"kernel": jnp.ones((4, 4))}}, {"a": {"kernel": jnp.full((4, 4), 0.5)}}
    for flat in (False, True):
        tx, _ = make_optimizer(OptimConfig(name=name, weight_decay=wd, lr=1e-2, warmup_steps=1, flat_update=flat), 10)
        out[("one group", flat)] = tx.update(g, tx.init(only_decayed), only_decayed)[0]["a"]["kernel"]
    np.testing.assert_allclose(out[("one group", True)], out[("one group", False)], rtol=1e-6, atol=1e-8)
    tx, _ = make_optimizer(OptimConfig(name=name, weight_decay=wd, flat_update=True), 10)
    with pytest.raises(ValueError, match=r"flat_update puts the parameters in one vector, so they need one dtype"):
        tx.init({"w": jnp.ones((2, 2)), "v": jnp.ones((2, 2), jnp.bfloat16)})  # two dtypes in one group


def test_bad_optimizer_settings():
    with pytest.raises(ValueError, match="learning rate must be positive"):
        make_optimizer(OptimConfig(lr=0.0), 10)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(OptimConfig(name="sgdx"), 10)
    with pytest.raises(ValueError, match="unknown precision"):
        compute_dtype("fp8")


def test_dynamic_loss_scale():
    scale, good = jnp.float32(1024.0), jnp.int32(0)
    s, g = update_loss_scale(scale, good, jnp.bool_(False))
    assert float(s) == 512.0 and int(g) == 0
    s, g = update_loss_scale(scale, jnp.int32(3), jnp.bool_(True), growth_interval=4)
    assert float(s) == 2048.0 and int(g) == 0
    s, g = update_loss_scale(scale, jnp.int32(1), jnp.bool_(True), growth_interval=4)
    assert float(s) == 1024.0 and int(g) == 2
    assert bool(all_finite({"a": jnp.ones(3)})) and not bool(all_finite({"a": jnp.array([1.0, jnp.inf])}))


def test_mfu_formula():
    # GPT-2 small at T=1024: 6N + 6 L M T, N = 124.4M parameters less the 1024 x 768 position table
    # (the tied token table is the output head's matrix, so it counts).
    cfg = GPTConfig.preset("gpt2")
    n = matmul_params(cfg)
    assert n == 124_439_808 - 1024 * 768
    assert matmul_params(cfg.replace(tie_embeddings=False)) == n  # the head matrix counts, the input table not
    fpt = flops_per_token(n, 12, 768, 1024)
    assert fpt == 6 * n + 6 * 12 * 768 * 1024
    assert mfu(1000.0, fpt, 1, 1e12) == pytest.approx(1000.0 * fpt / 1e12)
    assert mfu(1000.0, fpt, 1, None) is None
    assert peak_flops_per_device() is None  # CPUs are not in the table
