"""Moving weights between ``tfd_jax`` models and Hugging Face checkpoints: GPT-2, Llama/Qwen2, BERT.

See :mod:`tfd_jax.interop.hf` for the layout of the package.
"""
from tfd_jax.interop.hf import (
    bert_config_from_hf,
    bert_config_to_hf,
    gpt2_config_from_hf,
    gpt2_config_to_hf,
    llama_config_from_hf,
    llama_config_to_hf,
    load_hf_bert,
    load_hf_gpt2,
    load_hf_llama,
    save_hf_bert,
    save_hf_gpt2,
    save_hf_llama,
)

__all__ = [
    "bert_config_from_hf",
    "bert_config_to_hf",
    "gpt2_config_from_hf",
    "gpt2_config_to_hf",
    "llama_config_from_hf",
    "llama_config_to_hf",
    "load_hf_bert",
    "load_hf_gpt2",
    "load_hf_llama",
    "save_hf_bert",
    "save_hf_gpt2",
    "save_hf_llama",
]
