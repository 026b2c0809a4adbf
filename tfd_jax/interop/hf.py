"""Hugging Face weights in and out of ``tfd_jax`` models, one import for every family (Chapter 18).

The code lives in two layers: :mod:`tfd_jax.interop.files` reads and writes checkpoint files
(config.json, safetensors, PyTorch pickles, the Hub) and :mod:`tfd_jax.interop.weightmap` applies a
declarative key-to-parameter map. Each family adds its config translation and its map:

- :mod:`tfd_jax.interop.gpt2`: GPT-2 (``GPT2LMHeadModel``) <-> ``GPT`` (Chapters 9, 10);
- :mod:`tfd_jax.interop.llama`: Llama and Qwen2 (``LlamaForCausalLM``, ``Qwen2ForCausalLM``) <-> ``GPT``
  with RMSNorm, RoPE, SwiGLU and grouped-query attention (Chapter 19);
- :mod:`tfd_jax.interop.bert`: BERT (``BertModel``, ``BertForMaskedLM``,
  ``BertForSequenceClassification``) <-> ``models.bert.Bert`` (Chapter 19);
- :mod:`tfd_jax.interop.t5`: T5 v1.0 and v1.1 (``T5ForConditionalGeneration``) <-> ``models.seq2seq.EncoderDecoder``
  with relative position buckets (Chapter 19, Part 5);
- :mod:`tfd_jax.interop.bart`: BART (``BartForConditionalGeneration``) <-> ``models.seq2seq.EncoderDecoder``
  (Chapter 19, Part 5).

This module re-exports their public functions.
"""
from tfd_jax.interop.bart import bart_config_from_hf, bart_config_to_hf, load_hf_bart, save_hf_bart
from tfd_jax.interop.bert import bert_config_from_hf, bert_config_to_hf, load_hf_bert, save_hf_bert
from tfd_jax.interop.gpt2 import gpt2_config_from_hf, gpt2_config_to_hf, load_hf_gpt2, save_hf_gpt2
from tfd_jax.interop.llama import llama_config_from_hf, llama_config_to_hf, load_hf_llama, save_hf_llama
from tfd_jax.interop.t5 import load_hf_t5, save_hf_t5, t5_config_from_hf, t5_config_to_hf

__all__ = [
    "bart_config_from_hf",
    "bart_config_to_hf",
    "bert_config_from_hf",
    "bert_config_to_hf",
    "gpt2_config_from_hf",
    "gpt2_config_to_hf",
    "llama_config_from_hf",
    "llama_config_to_hf",
    "load_hf_bart",
    "load_hf_bert",
    "load_hf_gpt2",
    "load_hf_llama",
    "load_hf_t5",
    "save_hf_bart",
    "save_hf_bert",
    "save_hf_gpt2",
    "save_hf_llama",
    "save_hf_t5",
    "t5_config_from_hf",
    "t5_config_to_hf",
]
