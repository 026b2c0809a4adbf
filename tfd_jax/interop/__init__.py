"""Moving weights between ``tfd_jax`` models and Hugging Face checkpoints: GPT-2, Llama/Qwen2, BERT, T5, BART.

See :mod:`tfd_jax.interop.hf` for the layout of the package; its public names are this package's.
"""
from tfd_jax.interop import hf
from tfd_jax.interop.hf import *  # noqa: F401,F403 - the names listed in hf.__all__

__all__ = list(hf.__all__)
