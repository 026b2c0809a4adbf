"""Pure functions, one per idea of the course. No Flax, no global state.

Every function documents its shapes and the chapter it implements; see the module docstrings.
"""
from tfd_jax.ops.attention import (
    attention,
    attention_mask,
    attention_scores,
    attention_weights,
    causal_mask,
    combine_masks,
    cross_attention_mask,
    decode_attention,
    decode_attention_plan,
    merge_heads,
    padding_mask,
    repeat_kv,
    split_heads,
    splash_attention,
)
from tfd_jax.ops.dropout import dropout
from tfd_jax.ops.embedding import EMBED_GRADS, embedding_lookup
from tfd_jax.ops.feedforward import ACTIVATIONS, activation_fn, dense, feed_forward, gated_feed_forward
from tfd_jax.ops.head import head_cross_entropy, head_matmul
from tfd_jax.ops.losses import accuracy, cross_entropy, perplexity, token_cross_entropy
from tfd_jax.ops.masking import mlm_mask, span_corruption, span_corruption_lengths
from tfd_jax.ops.norms import layer_norm, rms_norm
from tfd_jax.ops.positional import (
    apply_rope,
    default_positions,
    learned_positions,
    relative_position_buckets,
    rope_frequencies,
    sinusoidal_positions,
)
from tfd_jax.ops.sampling import (
    apply_temperature,
    check_sampling_args,
    filter_logits,
    sample,
    token_log_probs,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "ACTIVATIONS",
    "accuracy",
    "activation_fn",
    "apply_rope",
    "apply_temperature",
    "attention",
    "attention_mask",
    "attention_scores",
    "attention_weights",
    "causal_mask",
    "check_sampling_args",
    "combine_masks",
    "cross_attention_mask",
    "decode_attention",
    "decode_attention_plan",
    "default_positions",
    "dense",
    "cross_entropy",
    "dropout",
    "EMBED_GRADS",
    "embedding_lookup",
    "feed_forward",
    "filter_logits",
    "gated_feed_forward",
    "head_cross_entropy",
    "head_matmul",
    "layer_norm",
    "learned_positions",
    "merge_heads",
    "mlm_mask",
    "padding_mask",
    "perplexity",
    "relative_position_buckets",
    "repeat_kv",
    "rms_norm",
    "rope_frequencies",
    "sample",
    "sinusoidal_positions",
    "span_corruption",
    "span_corruption_lengths",
    "splash_attention",
    "split_heads",
    "token_cross_entropy",
    "token_log_probs",
    "top_k_filter",
    "top_p_filter",
]
