"""Models built from ``tfd_jax.nn`` layers: the GPT decoder (the course's model, GPT-2, the Llama family),
the BERT encoder and the encoder-decoder (the original Transformer, T5, BART); ``registry`` names them
for run directories and the CLI."""
from tfd_jax.models.bert import BERT_PRESETS, Bert, BertConfig
from tfd_jax.models.config import PRESETS, GPTConfig
from tfd_jax.models.gpt import GPT, count_params, stack_blocks, unstack_blocks, with_layout
from tfd_jax.models.seq2seq import SEQ2SEQ_PRESETS, EncoderDecoder, Seq2SeqConfig

__all__ = ["BERT_PRESETS", "Bert", "BertConfig", "EncoderDecoder", "GPT", "GPTConfig", "PRESETS", "SEQ2SEQ_PRESETS",
           "Seq2SeqConfig", "count_params", "stack_blocks", "unstack_blocks", "with_layout"]
