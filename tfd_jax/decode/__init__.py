"""Inference: a preallocated KV cache, a jitted prefill and a jitted decode loop (Chapters 10 and 13).

One loop for any causal model: the model owns its cached forward (``model.init_cache``,
``model.forward_cached``, ``model.logits``) and this package owns the loop and the sampling
(``tfd_jax.ops.sample``); it never looks inside a block.

``generate(model, prompts, max_new_tokens, temperature=..., top_k=..., top_p=..., seed=..., eos_id=...)``
returns the new tokens ``[B, max_new_tokens]`` and their lengths; ``generate_stream`` yields them in
chunks as they are produced; ``rollout`` keeps tokens, log-probabilities and the response mask on the
device (Chapter 18's rollouts), and ``rollout_traced`` does so inside a jitted program of one's own.

The function ``generate`` hides the module of the same name as an attribute of this package; reach the
module's other names with ``from tfd_jax.decode.generate import ...``.
"""
from tfd_jax.decode.cache import KVCache, bucket_length, bytes_per_token, init_cache
from tfd_jax.decode.generate import (
    TRACE_COUNTS,
    Chunk,
    DecodeState,
    GenerationPlan,
    Rollout,
    SamplingSpec,
    compiled_programs,
    decode_loop_kind,
    forward_cached,
    generate,
    generate_stream,
    plan_generation,
    rollout,
    rollout_traced,
)

__all__ = [
    "TRACE_COUNTS",
    "Chunk",
    "DecodeState",
    "GenerationPlan",
    "KVCache",
    "Rollout",
    "SamplingSpec",
    "bucket_length",
    "bytes_per_token",
    "compiled_programs",
    "decode_loop_kind",
    "forward_cached",
    "generate",
    "generate_stream",
    "init_cache",
    "plan_generation",
    "rollout",
    "rollout_traced",
]
