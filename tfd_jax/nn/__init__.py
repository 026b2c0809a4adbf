"""NNX layers: parameters plus a call of the matching pure function in ``tfd_jax.ops``."""
from tfd_jax.nn.layers import Dropout, Embed, LayerNorm, Linear, RMSNorm, init_pair, normal_init, xavier_init
from tfd_jax.nn.transformer import Block, FeedForward, MultiHeadAttention, make_norm

__all__ = [
    "Block",
    "Dropout",
    "Embed",
    "FeedForward",
    "LayerNorm",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "init_pair",
    "make_norm",
    "normal_init",
    "xavier_init",
]
