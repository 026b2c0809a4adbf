"""Post-training: turning a pretrained language model into an assistant (Chapter 18).

Chapter 18 describes the steps after pre-training: supervised fine-tuning on example answers, a
reward model learned from human preferences, and reinforcement learning (PPO) against that reward
with a penalty for drifting from the starting model. ``tfd_jax.posttrain.losses`` holds the pure
functions these steps are made of: the Bradley-Terry reward-model loss, PPO's clipped policy and
value losses, generalised advantage estimation, KL estimators and the adaptive KL coefficient, and
Direct Preference Optimisation (which learns from the preference pairs without a reward model).
All but the reward-model loss and PPO's outline go beyond the course; each docstring says which.

More modules will join this package: trainers for SFT, the reward model, PPO and DPO built on
these functions.
"""
from tfd_jax.posttrain.losses import (
    DPO_VARIANTS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    adaptive_kl_update,
    dpo_implied_rewards,
    dpo_loss,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    reward_model_loss,
    value_loss,
)

__all__ = [
    "DPO_VARIANTS",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "adaptive_kl_update",
    "dpo_implied_rewards",
    "dpo_loss",
    "gae",
    "kl_estimate",
    "masked_mean",
    "masked_whiten",
    "ppo_policy_loss",
    "reward_model_loss",
    "value_loss",
]
