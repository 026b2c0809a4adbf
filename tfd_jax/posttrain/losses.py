"""Losses and estimators for learning from preferences and from rewards (Chapter 18).

Chapter 18 describes the RLHF recipe in words: a reward model learned from human preferences, then
PPO that pushes the language model towards high reward while a penalty keeps it close to the
model it started from. This module gives each of those pieces as a pure function:

* :func:`reward_model_loss`: the Bradley-Terry loss that trains a reward model on (chosen,
  rejected) pairs (the course's reward model; the optional margin goes beyond it).
* :func:`ppo_policy_loss` and :func:`value_loss`: PPO's clipped objectives (the course names PPO;
  the formulas follow Schulman et al. 2017 and go beyond the course).
* :func:`gae`: generalised advantage estimation (beyond the course).
* :func:`kl_estimate`: per-token estimators of KL(policy || reference) (beyond the course).
* :class:`AdaptiveKLController` / :func:`adaptive_kl_update`: the KL coefficient schedule of
  Ziegler et al. 2019 (beyond the course).
* :func:`dpo_loss`: Direct Preference Optimisation, which trains the policy on the preference pairs
  directly, with no reward model and no sampling (Rafailov et al. 2023; beyond the course).

Shape letters: B batch (sequences or preference pairs), T time (tokens). Every function computes
in at least float32 and is jittable (string and float options are Python values, fixed at trace
time).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

DPO_VARIANTS = ("sigmoid", "ipo", "hinge")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _float(x) -> jax.Array:
    """``x`` as an array of at least float32 (float64 stays float64 when JAX allows it)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------


def masked_mean(x: jax.Array, mask: jax.Array | None = None, axis=None) -> jax.Array:
    """``sum(x * mask) / sum(mask)``: the mean over the positions where ``mask`` is true (Chapter 18's
    losses average over response tokens only).

    Args:
      x: any shape (e.g. ``[B, T]``); mask: bool/0-1, same shape (None = every position).
      axis: reduce over these axes only (None = all).
    Returns:
      The mean, float32 or wider. Where nothing is selected the result is 0, not NaN.
    """
    x = _float(x)
    if mask is None:
        return jnp.mean(x, axis=axis)
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array | None = None, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """Advantage normalisation for PPO (Chapter 18; beyond the course): ``(x - mean) / sqrt(var + eps)``
    with the statistics of the masked positions only.

    The variance is the population one (divide by the count, no Bessel correction), so afterwards
    the selected entries have mean 0 and variance 1 (up to ``eps``). ``shift_mean=False`` rescales
    without centring (the mean is added back). Unselected positions come out as 0.

    Args:
      x: any shape (e.g. ``[B, T]``); mask: bool/0-1, same shape (None = every position).
    Returns:
      Same shape as ``x``.
    """
    x = _float(x)
    m = jnp.ones_like(x) if mask is None else mask.astype(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean(jnp.square(x - mean), m)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --------------------------------------------------------------------------------------------------
# Reward model and DPO
# --------------------------------------------------------------------------------------------------


def reward_model_loss(r_chosen: jax.Array, r_rejected: jax.Array, *, margin=None) -> jax.Array:
    """Bradley-Terry loss of a reward model on preference pairs (Chapter 18).

    The model of human choice: the chosen answer wins with probability
    ``sigmoid(r_chosen - r_rejected)``; the loss is its negative log, per pair::

        loss = -log sigmoid(r_chosen - r_rejected - margin)

    computed with ``log_sigmoid``, so it stays finite for any score gap. The margin (beyond the
    course; Llama 2 uses it for pairs rated "much better") asks the chosen score to win by at least
    that much before the loss flattens.

    Args:
      r_chosen, r_rejected: scalar rewards ``[B]``.
      margin: None, a scalar, or ``[B]``.
    Returns:
      ``[B]`` per-pair losses (take the mean for training).
    """
    diff = _float(r_chosen) - _float(r_rejected)
    if margin is not None:
        diff = diff - _float(margin)
    return -jax.nn.log_sigmoid(diff)


def dpo_implied_rewards(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
    """The rewards a DPO policy implies (Chapter 18; DPO goes beyond the course): ``beta * log(pi / pi_ref)``
    per answer.

    Args:
      the four summed sequence log-probabilities, each ``[B]``.
    Returns:
      ``(beta * (pc - rc), beta * (pr - rr))``, each ``[B]``; their difference is what
      :func:`dpo_loss` pushes up, and the share of pairs where it is positive is DPO's accuracy.
    """
    chosen = beta * (_float(policy_chosen_logps) - _float(ref_chosen_logps))
    rejected = beta * (_float(policy_rejected_logps) - _float(ref_rejected_logps))
    return chosen, rejected


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Direct Preference Optimisation and two relatives (Chapter 18's preference step; DPO itself goes
    beyond the course, which teaches the reward model + PPO route).

    The inputs are summed log-probabilities of whole answers (``log pi(y | x)``: the sum of
    :func:`tfd_jax.ops.token_log_probs` over the answer's tokens). With the log-ratio margin::

        h = (pc - rc) - (pr - rr)        # pc = policy on chosen, rr = reference on rejected, ...

    the per-pair loss, for label smoothing ``ls``, is:

    * ``"sigmoid"`` (DPO, Rafailov et al. 2023): ``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)``.
      With ``ls > 0`` this is conservative DPO: each label is taken as flipped with probability ``ls``.
      When the policy equals the reference (h = 0) the loss is ``log 2`` whatever ``ls``.
    * ``"ipo"`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``, a regression of the margin onto a fixed
      target, so it does not keep growing the margin on separable data. Label smoothing is not
      defined for it: a nonzero ``ls`` raises ``ValueError``. (The IPO paper averages log-probs over
      tokens; pass length-averaged log-probs for that form.)
    * ``"hinge"`` (SLiC, Zhao et al. 2023): ``relu(1 - beta h)``; with label smoothing, the same
      mixture of a pair and its flipped label as for ``"sigmoid"``:
      ``(1 - ls) relu(1 - beta h) + ls relu(1 + beta h)``.

    Minimising the sigmoid form on Bradley-Terry preferences drives ``pi`` towards the optimum of
    the KL-regularised reward problem, ``pi* ∝ pi_ref * exp(r / beta)``.

    Args:
      policy_chosen_logps, policy_rejected_logps: ``[B]`` under the policy being trained.
      ref_chosen_logps, ref_rejected_logps: ``[B]`` under the frozen reference.
      beta: strength of the implied KL penalty (> 0); variant: one of ``DPO_VARIANTS``.
      label_smoothing: probability that a label is wrong, in ``[0, 0.5]``.
    Returns:
      ``[B]`` per-pair losses (take the mean for training).
    """
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; expected one of {DPO_VARIANTS}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if variant == "ipo" and label_smoothing != 0.0:
        raise ValueError("label smoothing is not defined for the 'ipo' variant; use label_smoothing=0")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = (_float(policy_chosen_logps) - _float(ref_chosen_logps)) - (
        _float(policy_rejected_logps) - _float(ref_rejected_logps))
    ls = label_smoothing
    if variant == "sigmoid":
        loss = -jax.nn.log_sigmoid(beta * h)
        if ls:
            loss = (1.0 - ls) * loss - ls * jax.nn.log_sigmoid(-beta * h)
        return loss
    if variant == "ipo":
        return jnp.square(h - 1.0 / (2.0 * beta))
    loss = jax.nn.relu(1.0 - beta * h)  # hinge
    if ls:
        loss = (1.0 - ls) * loss + ls * jax.nn.relu(1.0 + beta * h)
    return loss


# --------------------------------------------------------------------------------------------------
# KL between the policy and its reference
# --------------------------------------------------------------------------------------------------


def kl_estimate(logps: jax.Array, ref_logps: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimators of ``KL(pi || ref)`` from tokens sampled from ``pi`` (Chapter 18's "stay close
    to the starting model"; the estimators go beyond the course: J. Schulman, "Approximating KL
    divergence", 2020).

    With ``x = logps - ref_logps = log(pi(t) / ref(t))`` at each sampled token ``t``:

    * ``"k1"``: ``x``. Unbiased, but single samples are often negative and its variance is high.
    * ``"k2"``: ``x^2 / 2``. Always >= 0, biased (close for nearby distributions), low variance.
    * ``"k3"``: ``exp(-x) - 1 + x``. Always >= 0 and unbiased (``E_pi[exp(-x)] = 1``); usually lower
      variance than k1. Computed as ``expm1(-x) + x`` so it stays accurate near 0.

    The estimate of the sequence KL is the sum over its tokens; Chapter 18's "stay close to the
    starting model" penalty subtracts ``coef * k1`` from the per-token reward in PPO.

    Args:
      logps: ``[B, T]`` (any shape) log-probs of the sampled tokens under ``pi``.
      ref_logps: the same tokens under the reference, same shape.
      kind: one of ``KL_ESTIMATORS``.
    Returns:
      Same shape as ``logps``.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")
    x = _float(logps) - _float(ref_logps)
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * jnp.square(x)
    return jnp.expm1(-x) + x


# --------------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------------


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens (Chapter 18's PPO; GAE goes beyond the
    course: Schulman et al. 2016).

    Walking backwards over the real tokens of each row (where ``mask`` is true)::

        delta_t = r_t + gamma * V_next - V_t
        A_t     = delta_t + gamma * lam * A_next
        R_t     = A_t + V_t                      # the target of the value head

    where ``V_next`` and ``A_next`` belong to the next *real* token of the same row, and are 0
    after the last one (the episode ends with the answer). Positions outside the mask are skipped:
    they get ``A = R = 0`` and do not break the chain, so a row may start late (a prompt) and end
    early (padding). ``lam = 1`` gives the Monte-Carlo advantage (reward-to-go minus ``V``),
    ``lam = 0`` the one-step TD error.

    A reverse ``jax.lax.scan`` over time: jittable, and compiled as one loop rather than unrolled.

    Args:
      rewards, values: ``[B, T]`` per-token rewards (e.g. the KL penalty at every token plus the
        reward model's score at the last one) and value estimates.
      mask: bool/0-1 ``[B, T]``, true on the response tokens.
      gamma: discount; lam: the bias/variance trade-off of GAE.
    Returns:
      ``(advantages, returns)``, each ``[B, T]``, 0 where ``mask`` is false.
    """
    rewards, values = _float(rewards), _float(values)
    dtype = jnp.result_type(rewards, values)
    rewards, values = rewards.astype(dtype), values.astype(dtype)
    real = jnp.asarray(mask).astype(bool)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], dtype)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, real.T), reverse=True)
    advantages = adv_t.T
    returns = jnp.where(real, advantages + values, 0.0)
    return advantages, returns


def ppo_policy_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array | None = None,
    *,
    clip: float = 0.2,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate objective, as a loss (Chapter 18 names PPO; the formula goes beyond it).

    With ``ratio = exp(logps - old_logps)`` (new over old probability of each sampled token)::

        loss = mean_masked( -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) )

    The minimum makes the objective pessimistic: once a token's probability has moved ``clip`` past
    the old one in the direction its advantage favours, the clipped term is the smaller one, it
    does not depend on ``logps``, and that token stops pulling. Elsewhere the gradient is the plain
    policy gradient ``-ratio * A * d logps``.

    Args:
      logps: ``[B, T]`` log-probs of the sampled tokens under the policy being trained.
      old_logps: the same under the policy that sampled them (constants).
      advantages: ``[B, T]`` (constants; e.g. :func:`gae` then :func:`masked_whiten`).
      mask: bool/0-1 ``[B, T]`` response tokens (None = all); clip: the PPO epsilon.
    Returns:
      ``(loss, stats)``: the scalar loss and, without gradient,

      * ``clip_fraction``: share of masked tokens where the clipped term is strictly the smaller one,
        i.e. ``A > 0 and ratio > 1 + clip`` or ``A < 0 and ratio < 1 - clip``: the tokens whose
        gradient the clipping switches off. (A ratio outside the range on the side that makes the
        unclipped term the smaller one is not counted: that token still pulls.)
      * ``approx_kl``: the k3 estimate of ``KL(old || new)`` from the old policy's samples,
        the masked mean of ``(ratio - 1) - log(ratio)`` (>= 0 and unbiased).
    """
    logps, old_logps, advantages = _float(logps), _float(old_logps), _float(advantages)
    log_ratio = logps - old_logps
    ratio = jnp.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-jnp.minimum(unclipped, clipped), mask)
    stats = {
        "clip_fraction": masked_mean((clipped < unclipped).astype(log_ratio.dtype), mask),
        "approx_kl": masked_mean(kl_estimate(old_logps, logps, "k3"), mask),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, stats)


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array | None = None,
    *,
    clip: float = 0.2,
) -> jax.Array:
    """PPO's clipped value loss (Chapter 18's PPO; the formula goes beyond the course)::

        v_clip = clip(v, v_old - clip, v_old + clip)
        loss   = mean_masked( 0.5 * max((v - R)^2, (v_clip - R)^2) )

    The value head may not move more than ``clip`` away from its old estimate in one round for the
    loss to improve: when the clipped error is the larger one it is the one used, and it does not
    depend on ``v``.

    Args:
      values: ``[B, T]`` current value estimates; old_values: those at sampling time (constants).
      returns: ``[B, T]`` targets (from :func:`gae`); mask: bool/0-1 ``[B, T]`` (None = all).
    Returns:
      float scalar.
    """
    values, old_values, returns = _float(values), _float(old_values), _float(returns)
    v_clip = jnp.clip(values, old_values - clip, old_values + clip)
    per_token = 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(v_clip - returns))
    return masked_mean(per_token, mask)


# --------------------------------------------------------------------------------------------------
# KL coefficient schedules
# --------------------------------------------------------------------------------------------------


def adaptive_kl_update(coef, current_kl, n_steps, *, target: float, horizon: float) -> jax.Array:
    """One step of the adaptive KL coefficient of Ziegler et al. 2019 (Chapter 18's KL penalty; the
    schedule goes beyond the course)::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        coef  = coef * (1 + error * n_steps / horizon)

    The penalty grows when the policy drifts further from the reference than ``target`` and
    shrinks when it stays closer, by at most 20% per ``horizon`` steps. Pure and jittable.

    Args:
      coef: the current coefficient; current_kl: the measured KL (e.g. per-sequence, in nats);
      n_steps: how many samples (or steps) this measurement covers.
    Returns:
      The new coefficient (float32 or wider scalar).
    """
    error = jnp.clip(_float(current_kl) / target - 1.0, -0.2, 0.2)
    return _float(coef) * (1.0 + error * n_steps / horizon)


@dataclasses.dataclass
class AdaptiveKLController:
    """The adaptive KL coefficient (Chapter 18; beyond the course) as a small stateful object, kept on
    the host between PPO rounds.

    ``value`` holds the coefficient; :meth:`update` applies :func:`adaptive_kl_update`'s rule with
    plain Python floats and returns the new value.
    """

    init_kl_coef: float
    target: float
    horizon: float
    value: float = dataclasses.field(init=False)

    def __post_init__(self):
        if not (self.target > 0 and self.horizon > 0):
            raise ValueError(f"target and horizon must be > 0, got {self.target} and {self.horizon}")
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclasses.dataclass
class FixedKLController:
    """A KL coefficient that never changes (Chapter 18's plain penalty); the same interface as
    :class:`AdaptiveKLController`."""

    kl_coef: float

    @property
    def value(self) -> float:
        return float(self.kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
