"""NNX layers: parameters plus a call of the matching pure function in ``tfd_jax.ops``; blocks and the layer stack;
LoRA adapters (``tfd_jax.nn.lora``)."""
from tfd_jax.nn.cache import EncoderDecoderCache, KVCache, allocate_cache
from tfd_jax.nn.config import BlockConfig
from tfd_jax.nn.layers import Dropout, Embed, LayerNorm, Linear, LoRAParam, RMSNorm, init_pair, normal_init, xavier_init
from tfd_jax.nn.lora import LORA_FILTER, add_lora, linear_paths, lora_disabled, merge_lora
from tfd_jax.nn.stack import REMAT_POLICIES, make_blocks, run_blocks, stack_blocks, unstack_blocks, with_layout
from tfd_jax.nn.transformer import Block, FeedForward, MultiHeadAttention, make_attention, make_norm
from tfd_jax.nn.transformer import record_attention_weights, residual

__all__ = [
    "LORA_FILTER",
    "REMAT_POLICIES",
    "Block",
    "BlockConfig",
    "Dropout",
    "Embed",
    "EncoderDecoderCache",
    "FeedForward",
    "KVCache",
    "LayerNorm",
    "Linear",
    "LoRAParam",
    "MultiHeadAttention",
    "RMSNorm",
    "add_lora",
    "allocate_cache",
    "init_pair",
    "linear_paths",
    "lora_disabled",
    "make_attention",
    "make_blocks",
    "make_norm",
    "merge_lora",
    "normal_init",
    "record_attention_weights",
    "residual",
    "run_blocks",
    "stack_blocks",
    "unstack_blocks",
    "with_layout",
    "xavier_init",
]
