"""Models built from ``tfd_jax.nn`` layers: the GPT decoder (later BERT and encoder-decoder)."""
from tfd_jax.models.config import PRESETS, GPTConfig
from tfd_jax.models.gpt import GPT, count_params, stack_blocks, unstack_blocks, with_layout

__all__ = ["GPT", "GPTConfig", "PRESETS", "count_params", "stack_blocks", "unstack_blocks", "with_layout"]
