"""Post-training: turning a pretrained language model into an assistant (Chapter 18).

Chapter 18 describes the steps after pre-training: supervised fine-tuning on example answers, a
reward model learned from human preferences, and reinforcement learning (PPO) against that reward
with a penalty for drifting from the starting model. ``tfd_jax.posttrain.losses`` holds the pure
functions these steps are made of: the Bradley-Terry reward-model loss, PPO's clipped policy and
value losses, generalised advantage estimation, KL estimators and the adaptive KL coefficient, and
Direct Preference Optimisation (which learns from the preference pairs without a reward model).
All but the reward-model loss and PPO's outline go beyond the course; each docstring says which.

The steps themselves are tasks for the one ``Trainer`` (``tfd-jax train --task ...``):
``tasks.SFTTask`` (``sft``), ``tasks.RewardTask`` (``reward``), ``ppo.PPOTask`` (``ppo``) and
``tasks.DPOTask`` (``dpo``); ``data`` holds the chat template, the JSONL loaders and the built-in
task whose hidden rule plays the human rater; ``pipeline`` runs the whole chain (``tfd-jax
pipeline``) and ``chat`` talks to a fine-tuned run (``tfd-jax chat``). The tasks are imported on
first use (``from tfd_jax.posttrain.ppo import PPOTask``), so importing the losses stays light.
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
