"""Models built from ``tfd_jax.nn`` layers: the GPT decoder (the course's model, GPT-2, the Llama family)
and the BERT encoder; ``registry`` names them for run directories and the CLI."""
from tfd_jax.models.bert import BERT_PRESETS, Bert, BertConfig
from tfd_jax.models.config import PRESETS, GPTConfig
from tfd_jax.models.gpt import GPT, count_params, stack_blocks, unstack_blocks, with_layout

__all__ = ["BERT_PRESETS", "Bert", "BertConfig", "GPT", "GPTConfig", "PRESETS", "count_params", "stack_blocks",
           "unstack_blocks", "with_layout"]
