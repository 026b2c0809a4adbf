"""The reward model of Chapter 18: a GPT that reads a whole conversation and outputs one number.

Chapter 18 trains it on people's preferences: for two answers to the same prompt, the one people
preferred should score higher (``tfd_jax.posttrain.losses.reward_model_loss``). It is the GPT of
``models/gpt.py`` (the same blocks, usually started from the fine-tuned model's weights) with a
scalar head, ``value_head`` ``[M, 1]``, read at the last real token of each row, after the final norm.
The language-model head stays (tied models share it with the embeddings) but scoring does not use it.

The same class is PPO's policy (``tfd_jax.posttrain.ppo``): there the language-model head writes the
answers and the scalar head, read at every position, is the value function (``policy_outputs``).

Shape letters: B batch, T sequence length, M model width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax.models.gpt import GPT
from tfd_jax.nn import Linear, normal_init

__all__ = ["RewardModel"]


class RewardModel(GPT):
    """``RewardModel(GPTConfig.preset("tiny"), rngs=nnx.Rngs(0)).score(tokens, lengths)`` -> float32 ``[B]``."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        super().__init__(config, rngs=rngs)
        self.value_head = Linear(config.d_model, 1, kernel_init=normal_init(1.0 / (config.d_model + 1) ** 0.5),
                                 dtype=config.compute_dtype, param_dtype=config.params_dtype, rngs=rngs)

    def score(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """One score per row: ``tokens [B, T]`` (right-padded), ``lengths [B]`` real tokens per row
        (the head reads position ``lengths - 1``). Padding after a row's end never changes its score
        (attention is causal)."""
        x, positions = self._embed_input(tokens, None)
        h = self.hidden_states(x, positions=positions)
        if self.final_norm is not None:
            h = self.final_norm(h)
        last = jnp.take_along_axis(h, (jnp.asarray(lengths) - 1)[:, None, None], axis=1)[:, 0]  # [B, M]
        return self.value_head(last)[:, 0].astype(jnp.float32)

    def policy_outputs(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One forward pass for PPO: next-token logits float32 ``[B, T, V]`` and the value head at
        every position, float32 ``[B, T]`` (the value of the state after reading ``tokens[:, :t+1]``)."""
        x, positions = self._embed_input(tokens, None)
        h = self.hidden_states(x, positions=positions)
        values = self.value_head(self.final_norm(h) if self.final_norm is not None else h)[..., 0]
        return self.logits(h).astype(jnp.float32), values.astype(jnp.float32)
