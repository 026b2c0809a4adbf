"""Inference: a preallocated KV cache, a jitted prefill and a jitted decode loop (Chapters 10 and 13).

``generate(model, prompts, max_new_tokens, temperature=..., top_k=..., top_p=..., seed=..., eos_id=...)``
returns the new tokens ``[B, max_new_tokens]`` and their lengths; ``generate_stream`` yields them in
chunks as they are produced.

The function ``generate`` hides the module of the same name as an attribute of this package; reach the
module's other names with ``from tfd_jax.decode.generate import ...``.
"""
from tfd_jax.decode.cache import KVCache, bucket_length, bytes_per_token, init_cache
from tfd_jax.decode.generate import (
    TRACE_COUNTS,
    Chunk,
    DecodeState,
    GenerationPlan,
    SamplingSpec,
    choose_tokens,
    compiled_programs,
    filtered_logits,
    forward_cached,
    generate,
    generate_stream,
    plan_generation,
)

__all__ = [
    "TRACE_COUNTS",
    "Chunk",
    "DecodeState",
    "GenerationPlan",
    "KVCache",
    "SamplingSpec",
    "bucket_length",
    "bytes_per_token",
    "choose_tokens",
    "compiled_programs",
    "filtered_logits",
    "forward_cached",
    "generate",
    "generate_stream",
    "init_cache",
    "plan_generation",
]
