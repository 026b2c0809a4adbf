"""Moving weights between ``tfd_jax`` models and other libraries' checkpoints (Hugging Face GPT-2)."""
from tfd_jax.interop.hf import gpt2_config_from_hf, gpt2_config_to_hf, load_hf_gpt2, save_hf_gpt2

__all__ = ["gpt2_config_from_hf", "gpt2_config_to_hf", "load_hf_gpt2", "save_hf_gpt2"]
