"""DPO and PPO find the known optimum of a one-step bandit (``tfd_jax.posttrain``, Chapter 18).

Four actions with known rewards ``r`` and a fixed, non-uniform reference policy ``pi_ref``. The
KL-regularised problem ``max_pi E_pi[r] - beta * KL(pi || pi_ref)`` has the closed-form optimum

    pi*(a) = pi_ref(a) * exp(r(a) / beta) / Z,

which is where both routes of the preference step should land: DPO from Bradley-Terry preference
pairs, PPO from sampled rewards with the KL penalty inside the reward. The policy is a softmax over
four free logits, started at ``log pi_ref``; every run is seeded and jitted as one ``lax.scan``.
"""
from functools import partial

import numpy as np

import jax
import jax.numpy as jnp
import optax

from tfd_jax import posttrain as pt
from fastjit import FAST

PI_REF = np.array([0.5, 0.25, 0.15, 0.10])
REWARD = np.array([0.0, 1.0, -0.5, 0.6])
BETA = 0.5
PI_STAR = PI_REF * np.exp(REWARD / BETA) / np.sum(PI_REF * np.exp(REWARD / BETA))  # ~[.18, .68, .02, .12]


def tv(p, q=PI_STAR):
    """Total variation distance, in float64."""
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - q).sum())


def test_the_optimum_is_far_from_the_reference():
    assert tv(PI_REF) > 0.4  # so landing within the tolerances below is not an accident of the start


def test_dpo_on_bradley_terry_pairs_reaches_the_regularised_optimum():
    """60,000 pairs of distinct actions drawn uniformly, the winner drawn from the Bradley-Terry
    model ``P(a beats b) = sigmoid(r_a - r_b)``; full-batch Adam (lr 0.05, 300 steps) on the mean
    sigmoid-variant ``dpo_loss`` with beta = 0.5.

    Tolerances: TV(pi, pi*) < 0.02 (about 0.007 with this seed; the sampling noise of 60,000 pairs
    keeps it under 0.009 over a dozen seeds), and the implied rewards ``beta * log(pi / pi_ref)``
    equal ``r`` up to a constant within 0.05 (the data fix rewards only up to a shift).
    """
    rng = np.random.default_rng(0)
    n = 60_000
    a = rng.integers(0, 4, n)
    b = (a + rng.integers(1, 4, n)) % 4
    a_wins = rng.uniform(size=n) < 1.0 / (1.0 + np.exp(-(REWARD[a] - REWARD[b])))
    chosen, rejected = jnp.asarray(np.where(a_wins, a, b)), jnp.asarray(np.where(a_wins, b, a))
    log_ref = jnp.log(jnp.asarray(PI_REF, jnp.float32))
    opt = optax.adam(0.05)

    def loss_fn(theta):
        logp = jax.nn.log_softmax(theta)
        return jnp.mean(pt.dpo_loss(logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected],
                                    beta=BETA, variant="sigmoid"))

    def step(carry, _):
        theta, state = carry
        loss, grad = jax.value_and_grad(loss_fn)(theta)
        updates, state = opt.update(grad, state, theta)
        return (optax.apply_updates(theta, updates), state), loss

    @partial(jax.jit, compiler_options=FAST)
    def train(theta):
        (theta, _), losses = jax.lax.scan(step, (theta, opt.init(theta)), None, length=300)
        return theta, losses

    theta, losses = train(log_ref)
    pi = np.asarray(jax.nn.softmax(theta), np.float64)
    assert abs(float(losses[0]) - np.log(2)) < 1e-6  # the policy starts as the reference
    assert tv(pi) < 0.02, (pi, PI_STAR, tv(pi))
    implied = BETA * (np.log(pi) - np.log(PI_REF))
    np.testing.assert_allclose(implied - implied.mean(), REWARD - REWARD.mean(), atol=0.05)


def _ppo_bandit(kl_coef, *, iters=100, epochs=8, batch=1024, seed=0):
    """PPO on the bandit: each round samples ``batch`` actions from the current policy, scores them
    ``r(a) - kl_coef * (log pi_old(a) - log pi_ref(a))`` (the k1 estimate inside the reward),
    subtracts the batch mean as the baseline, and takes ``epochs`` full-batch Adam steps on
    ``ppo_policy_loss`` (clip 0.2; lr 0.1, cosine-decayed to 0.001). Returns the final policy and
    each round's mean clip fraction."""
    log_ref = jnp.log(jnp.asarray(PI_REF, jnp.float32))
    reward = jnp.asarray(REWARD, jnp.float32)
    opt = optax.adam(optax.cosine_decay_schedule(0.1, iters * epochs, alpha=0.01))

    def round_(carry, key):
        theta, state = carry
        actions = jax.random.categorical(key, theta, shape=(batch,))
        old = jax.nn.log_softmax(theta)[actions]
        scores = reward[actions] - kl_coef * pt.kl_estimate(old, log_ref[actions], "k1")
        adv = scores - jnp.mean(scores)

        def epoch(carry, _):
            theta, state = carry
            loss_fn = lambda th: pt.ppo_policy_loss(jax.nn.log_softmax(th)[actions], old, adv, clip=0.2)
            (_, stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(theta)
            updates, state = opt.update(grad, state, theta)
            return (optax.apply_updates(theta, updates), state), stats["clip_fraction"]

        (theta, state), clip_fraction = jax.lax.scan(epoch, (theta, state), None, length=epochs)
        return (theta, state), jnp.mean(clip_fraction)

    @partial(jax.jit, compiler_options=FAST)
    def train(theta, key):
        (theta, _), clip_fraction = jax.lax.scan(round_, (theta, opt.init(theta)), jax.random.split(key, iters))
        return jax.nn.softmax(theta), clip_fraction

    pi, clip_fraction = train(log_ref, jax.random.key(seed))
    return np.asarray(pi, np.float64), np.asarray(clip_fraction)


def test_ppo_with_the_kl_penalty_in_the_reward_reaches_the_regularised_optimum():
    """100 rounds x 8 epochs of PPO with the k1 penalty (coefficient beta = 0.5) in the reward.

    Tolerance: TV(pi, pi*) < 0.01 (about 1e-5 with this seed). At pi* every action's penalised reward
    is the same constant, so every advantage is 0 and the sampling noise vanishes there: the
    optimum is a fixed point of the update, which is why PPO gets so much closer than DPO. The
    early rounds move far enough that clipping is active (mean clip fraction > 5% over the first
    10 rounds), so the clipped objective, not just the plain policy gradient, is exercised.
    Without the penalty the same run heads for the best action instead and ends far from pi*.
    """
    pi, clip_fraction = _ppo_bandit(BETA)
    assert tv(pi) < 0.01, (pi, PI_STAR, tv(pi))
    assert clip_fraction[:10].mean() > 0.05
    greedy, _ = _ppo_bandit(0.0)
    assert tv(greedy) > 0.2 and greedy[np.argmax(REWARD)] > 0.85
