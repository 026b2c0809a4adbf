"""Tokenizers (Chapters 1-2): text <-> the ids of a fixed vocabulary.

Three kinds of our own behind one interface (:class:`Tokenizer`):

* :class:`CharTokenizer`: one id per character of the corpus (65 for tiny Shakespeare).
* :class:`BPETokenizer`: the course's byte-pair encoding, written from scratch (byte-level).
* :class:`SentencePieceTokenizer`: sentencepiece BPE/unigram, for real training runs.

Each can have special tokens (``special_tokens=BERT_SPECIAL_TOKENS`` for a BERT-style model).

And Hugging Face's tokenizers, read without ``transformers`` by :func:`load_hf_tokenizer`:
:class:`ByteLevelBPETokenizer` (GPT-2, RoBERTa, BART), :class:`WordPieceTokenizer` (BERT) and
:class:`SentencePieceTokenizer` (Llama, T5).

``tok.save(dir)`` writes a directory; :func:`load_tokenizer` reads any of them back (and Hugging Face
model directories too).
"""
from tfd_jax.tokenizers.base import (
    BERT_SPECIAL_TOKENS,
    Tokenizer,
    load_tokenizer,
    read_text_file,
    special_token_role,
)
from tfd_jax.tokenizers.bpe import BPETokenizer, MergeStep, format_trace, train_trace
from tfd_jax.tokenizers.bytelevel import ByteLevelBPETokenizer
from tfd_jax.tokenizers.char import CharTokenizer
from tfd_jax.tokenizers.hf import load_hf_tokenizer
from tfd_jax.tokenizers.spm import SentencePieceTokenizer
from tfd_jax.tokenizers.wordpiece import WordPieceTokenizer

__all__ = [
    "Tokenizer",
    "BPETokenizer",
    "SentencePieceTokenizer",
    "CharTokenizer",
    "ByteLevelBPETokenizer",
    "WordPieceTokenizer",
    "BERT_SPECIAL_TOKENS",
    "special_token_role",
    "load_tokenizer",
    "load_hf_tokenizer",
    "read_text_file",
    "MergeStep",
    "train_trace",
    "format_trace",
]
