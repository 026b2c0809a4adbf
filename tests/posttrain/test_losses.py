"""Post-training losses (``tfd_jax.posttrain``, Chapter 18) against float64 NumPy formulas written here:
the Bradley-Terry reward loss, the three DPO variants, the KL estimators (and their bias and spread
by sampling), GAE against a loop over time, PPO's clipping and its gradients, the clipped value
loss, the masked helpers and the KL coefficient schedules."""
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from tfd_jax import posttrain as pt
from fastjit import FAST


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def f64(x):
    return np.asarray(x, np.float64)


# ------------------------------------------------------------------------------------------------
# Reward model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [None, 0.5, "per_pair"])
def test_reward_model_loss_is_bradley_terry(margin):
    rng = np.random.default_rng(0)
    rc, rr = rng.normal(size=16) * 3, rng.normal(size=16) * 3
    m = rng.uniform(0, 2, size=16) if margin == "per_pair" else margin
    got = pt.reward_model_loss(jnp.asarray(rc), jnp.asarray(rr), margin=None if m is None else jnp.asarray(m))
    want = -np_log_sigmoid(rc - rr - (0.0 if m is None else m))
    assert got.shape == (16,)
    np.testing.assert_allclose(f64(got), want, rtol=1e-5, atol=1e-6)


def test_reward_model_loss_is_finite_for_huge_gaps():
    got = f64(pt.reward_model_loss(jnp.asarray([1000.0, -1000.0, 0.0]), jnp.zeros(3)))
    np.testing.assert_allclose(got, [0.0, 1000.0, math.log(2)], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------------


def dpo_inputs(seed=0, B=32):
    rng = np.random.default_rng(seed)
    return [rng.normal(-40, 6, size=B) for _ in range(4)]


def np_dpo(pc, pr, rc, rr, beta, variant, ls):
    h = (f64(pc) - rc) - (f64(pr) - rr)
    if variant == "sigmoid":
        return -(1 - ls) * np_log_sigmoid(beta * h) - ls * np_log_sigmoid(-beta * h)
    if variant == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return (1 - ls) * np.maximum(0.0, 1 - beta * h) + ls * np.maximum(0.0, 1 + beta * h)


@pytest.mark.parametrize("variant,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0),
                                        ("hinge", 0.0), ("hinge", 0.2)])
def test_dpo_loss_matches_the_formulas(variant, ls):
    pc, pr, rc, rr = dpo_inputs()
    beta = 0.3
    got = pt.dpo_loss(*(jnp.asarray(a) for a in (pc, pr, rc, rr)), beta=beta, variant=variant, label_smoothing=ls)
    # float32 log-probs near -40 carry ~4e-6 absolute error into h, hence the tolerances.
    np.testing.assert_allclose(f64(got), np_dpo(pc, pr, rc, rr, beta, variant, ls), rtol=1e-4, atol=1e-4)
    # the hinge really is flat past the margin and the test data reaches both sides of it
    if variant == "hinge":
        h = (pc - rc) - (pr - rr)
        assert (beta * h > 1).any() and (beta * h < 1).any()


@pytest.mark.parametrize("ls", [0.0, 0.25])
def test_dpo_is_log_2_when_the_policy_is_the_reference(ls):
    pc, pr, _, _ = dpo_inputs(1)
    got = pt.dpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(pc), jnp.asarray(pr), beta=0.1, label_smoothing=ls)
    np.testing.assert_allclose(f64(got), math.log(2), rtol=1e-6)


def test_dpo_gradient_weights_pairs_by_how_wrong_they_are():
    pc, pr, rc, rr = (jnp.asarray(a) for a in dpo_inputs(2, B=8))
    beta = 0.5
    g = jax.grad(lambda x: jnp.sum(pt.dpo_loss(x, pr, rc, rr, beta=beta)))(pc)
    h = (f64(pc) - f64(rc)) - (f64(pr) - f64(rr))
    np.testing.assert_allclose(f64(g), -beta / (1 + np.exp(beta * h)), rtol=1e-3, atol=1e-6)


def test_dpo_implied_rewards():
    pc, pr, rc, rr = dpo_inputs(3)
    chosen, rejected = pt.dpo_implied_rewards(*(jnp.asarray(a) for a in (pc, pr, rc, rr)), beta=0.2)
    np.testing.assert_allclose(f64(chosen), 0.2 * (pc - rc), atol=1e-5)
    np.testing.assert_allclose(f64(rejected), 0.2 * (pr - rr), atol=1e-5)


def test_dpo_rejects_bad_options():
    z = jnp.zeros(2)
    with pytest.raises(ValueError, match="unknown DPO variant"):
        pt.dpo_loss(z, z, z, z, variant="kto")
    with pytest.raises(ValueError, match="not defined for the 'ipo'"):
        pt.dpo_loss(z, z, z, z, variant="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        pt.dpo_loss(z, z, z, z, label_smoothing=0.7)


# ------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------


def test_kl_estimators_match_their_formulas():
    rng = np.random.default_rng(4)
    a, b = rng.normal(-3, 1, (3, 7)), rng.normal(-3, 1, (3, 7))
    x = a - b
    want = {"k1": x, "k2": 0.5 * x**2, "k3": np.exp(-x) - 1 + x}
    for kind, w in want.items():
        got = pt.kl_estimate(jnp.asarray(a), jnp.asarray(b), kind)
        assert got.shape == (3, 7)
        np.testing.assert_allclose(f64(got), w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        pt.kl_estimate(jnp.zeros(1), jnp.zeros(1), "k4")


def test_k3_is_never_negative():
    x = np.concatenate([np.linspace(-20, 20, 4001), [1e-7, -1e-7, 3e-4, -3e-4, 0.0]]).astype(np.float32)
    assert (f64(pt.kl_estimate(jnp.asarray(x), jnp.zeros_like(jnp.asarray(x)), "k3")) >= 0).all()


def test_k1_and_k3_are_unbiased_and_k3_spreads_less():
    """Sample 200k tokens from pi over 6 tokens: the sample means of k1 and k3 are within 4 standard
    errors of the exact KL(pi || ref) (k2's is not); k3's variance is lower than k1's, and every k3 is >= 0."""
    rng = np.random.default_rng(5)
    z_pi, z_ref = rng.normal(0, 0.6, 6), rng.normal(0, 0.6, 6)
    log_pi = z_pi - np.log(np.exp(z_pi).sum())
    log_ref = z_ref - np.log(np.exp(z_ref).sum())
    exact = float(np.sum(np.exp(log_pi) * (log_pi - log_ref)))
    tokens = rng.choice(6, size=(400, 500), p=np.exp(log_pi))
    lp, lr = jnp.asarray(log_pi[tokens]), jnp.asarray(log_ref[tokens])
    n = tokens.size
    k1, k3 = f64(pt.kl_estimate(lp, lr, "k1")), f64(pt.kl_estimate(lp, lr, "k3"))
    for k in (k1, k3):
        assert abs(k.mean() - exact) < 4 * k.std() / math.sqrt(n), (k.mean(), exact)
    assert k3.var() < k1.var()
    k2 = f64(pt.kl_estimate(lp, lr, "k2"))  # biased: the same test tells it apart
    assert abs(k2.mean() - exact) > 10 * k2.std() / math.sqrt(n)
    assert (k3 >= 0).all() and (k1 < 0).any()


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------


def loop_gae(rewards, values, mask, gamma, lam):
    """GAE by a plain loop, backwards over the real tokens of each row."""
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            a = delta + gamma * lam * next_a
            adv[b, t], ret[b, t] = a, a + values[b, t]
            next_v, next_a = values[b, t], a
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.99, 1.0), (0.7, 0.0)])
def test_gae_matches_a_loop_over_time(gamma, lam):
    rng = np.random.default_rng(6)
    B, T = 5, 11
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    starts, ends = [0, 3, 2, 0, 5], [11, 9, 3, 6, 5]  # ragged rows; the last one is empty
    t = np.arange(T)
    mask = np.stack([(t >= s) & (t < e) for s, e in zip(starts, ends)])
    mask[0, 4] = False  # a hole in the middle is skipped, not a break
    fn = jax.jit(lambda r, v, m: pt.gae(r, v, m, gamma=gamma, lam=lam), compiler_options=FAST)
    adv, ret = fn(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask))
    want_adv, want_ret = loop_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(f64(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(ret), want_ret, rtol=1e-5, atol=1e-5)
    assert (f64(adv)[~mask] == 0).all() and (f64(ret)[~mask] == 0).all()


def test_gae_with_gamma_and_lam_one_is_reward_to_go_minus_value():
    rewards = np.array([[0.0, 0.0, 1.0, 2.0, 9.0]])
    values = np.array([[0.5, 0.1, 0.2, 0.3, 9.0]])
    mask = np.array([[False, True, True, True, False]])
    adv, ret = pt.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=1.0, lam=1.0)
    np.testing.assert_allclose(f64(ret), [[0, 3, 3, 2, 0]], atol=1e-6)
    np.testing.assert_allclose(f64(adv), [[0, 2.9, 2.8, 1.7, 0]], atol=1e-6)


# ------------------------------------------------------------------------------------------------
# PPO policy loss
# ------------------------------------------------------------------------------------------------

CLIP = 0.2
# Each column is one token: (log ratio new/old, advantage, mask). Columns:
#   0 inside the range, A > 0          1 inside the range, A < 0
#   2 ratio > 1+clip, A > 0: clipped   3 ratio < 1-clip, A < 0: clipped
#   4 ratio > 1+clip, A < 0: not       5 ratio < 1-clip, A > 0: not
#   6 ratio > 1+clip, A > 0 but masked out
LOG_RATIO = np.array([[0.1, -0.05, 0.5, -0.6, 0.4, -0.5, 0.7]])
ADV = np.array([[1.5, -0.7, 2.0, -1.2, -0.9, 0.8, 3.0]])
MASK = np.array([[1, 1, 1, 1, 1, 1, 0]], bool)


def ppo_case():
    old = np.random.default_rng(7).normal(-2, 0.5, LOG_RATIO.shape)
    return old + LOG_RATIO, old


def test_ppo_loss_value_and_stats():
    new, old = ppo_case()
    loss, stats = pt.ppo_policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(ADV), jnp.asarray(MASK), clip=CLIP)
    ratio = np.exp(LOG_RATIO)
    per = -np.minimum(ratio * ADV, np.clip(ratio, 1 - CLIP, 1 + CLIP) * ADV)
    np.testing.assert_allclose(float(loss), per[MASK].mean(), rtol=1e-5)
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 6)  # columns 2 and 3 only
    k3 = (ratio - 1) - np.log(ratio)  # KL(old || new) from the old policy's samples
    np.testing.assert_allclose(float(stats["approx_kl"]), k3[MASK].mean(), rtol=1e-5)


def test_ppo_clipping_stops_the_gradient_only_where_it_should():
    new, old = ppo_case()
    grad = jax.grad(lambda lp: pt.ppo_policy_loss(lp, jnp.asarray(old), jnp.asarray(ADV), jnp.asarray(MASK), clip=CLIP)[0])
    g = f64(grad(jnp.asarray(new)))[0]
    unclipped = -np.exp(LOG_RATIO[0]) * ADV[0] / MASK.sum()  # d/dlogp of -mean(ratio * A)
    clipped_cols, free_cols = [2, 3], [0, 1, 4, 5]
    np.testing.assert_array_equal(g[clipped_cols], 0.0)
    np.testing.assert_allclose(g[free_cols], unclipped[free_cols], rtol=1e-5)
    assert g[6] == 0.0  # masked out


def test_ppo_loss_at_the_old_policy_is_minus_the_mean_advantage():
    _, old = ppo_case()
    loss, stats = pt.ppo_policy_loss(jnp.asarray(old), jnp.asarray(old), jnp.asarray(ADV), jnp.asarray(MASK))
    np.testing.assert_allclose(float(loss), -ADV[MASK].mean(), rtol=1e-6)
    assert float(stats["clip_fraction"]) == 0.0 and float(stats["approx_kl"]) == 0.0


# ------------------------------------------------------------------------------------------------
# Value loss
# ------------------------------------------------------------------------------------------------


def test_value_loss_clips_and_stops_the_gradient_when_the_clipped_error_is_larger():
    c = 0.2
    old = np.array([[0.0, 0.0, 0.0, 0.0, 1.0]])
    v = np.array([[0.1, 0.5, 0.5, -0.6, 5.0]])
    R = np.array([[0.3, 1.0, -1.0, 0.4, 0.0]])
    mask = np.array([[1, 1, 1, 1, 0]], bool)
    # 0: inside the range. 1: moved past +c towards R: clipped error (0.8^2) is larger -> used, no grad.
    # 2: moved past +c away from R: unclipped error is larger -> used. 3: past -c away from R.
    v_clip = np.clip(v, old - c, old + c)
    per = 0.5 * np.maximum((v - R) ** 2, (v_clip - R) ** 2)
    got = pt.value_loss(jnp.asarray(v), jnp.asarray(old), jnp.asarray(R), jnp.asarray(mask), clip=c)
    np.testing.assert_allclose(float(got), per[mask].mean(), rtol=1e-6)
    g = f64(jax.grad(lambda x: pt.value_loss(x, jnp.asarray(old), jnp.asarray(R), jnp.asarray(mask), clip=c))(jnp.asarray(v)))[0]
    np.testing.assert_allclose(g, [(0.1 - 0.3) / 4, 0.0, (0.5 + 1.0) / 4, (-0.6 - 0.4) / 4, 0.0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Masked helpers
# ------------------------------------------------------------------------------------------------


def test_masked_mean_and_whiten():
    rng = np.random.default_rng(8)
    x = rng.normal(3, 2, (4, 9))
    mask = rng.uniform(size=(4, 9)) < 0.6
    np.testing.assert_allclose(float(pt.masked_mean(jnp.asarray(x), jnp.asarray(mask))), x[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(f64(pt.masked_mean(jnp.asarray(x), jnp.asarray(mask), axis=1)),
                               (x * mask).sum(1) / mask.sum(1), rtol=1e-5)
    assert float(pt.masked_mean(jnp.asarray(x), jnp.zeros((4, 9), bool))) == 0.0
    w = f64(pt.masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
    want = (x - x[mask].mean()) / np.sqrt(x[mask].var() + 1e-8)
    np.testing.assert_allclose(w[mask], want[mask], rtol=1e-4, atol=1e-5)
    assert (w[~mask] == 0).all()
    assert abs(w[mask].mean()) < 1e-5 and abs(w[mask].var() - 1) < 1e-4
    kept = f64(pt.masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(kept[mask], want[mask] + x[mask].mean(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# KL coefficient
# ------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_follows_the_target_and_is_clipped():
    up = pt.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    up.update(7.5, n_steps=1000)  # 25% over target, clipped to 20%
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    up2 = pt.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    up2.update(6.6, n_steps=1000)  # 10% over, not clipped
    assert up2.value == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    down = pt.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert down.update(0.0, n_steps=10_000) == pytest.approx(0.08)  # a whole horizon, at the -20% clip
    assert down.update(1e6, n_steps=10_000) == pytest.approx(0.08 * 1.2)
    same = pt.AdaptiveKLController(0.3, target=6.0, horizon=10_000)
    assert same.update(6.0, n_steps=500) == pytest.approx(0.3)
    fixed = pt.FixedKLController(0.05)
    assert fixed.update(100.0, 1000) == 0.05 and fixed.value == 0.05


@pytest.mark.parametrize("kl", [0.0, 3.0, 6.6, 7.5, 50.0])
def test_adaptive_kl_update_is_the_controller_in_jax(kl):
    ctrl = pt.AdaptiveKLController(0.2, target=6.0, horizon=1000)
    want = ctrl.update(kl, n_steps=256)
    step = jax.jit(lambda c, k: pt.adaptive_kl_update(c, k, 256, target=6.0, horizon=1000), compiler_options=FAST)
    assert float(step(0.2, kl)) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        pt.AdaptiveKLController(0.2, target=0.0, horizon=1000)
