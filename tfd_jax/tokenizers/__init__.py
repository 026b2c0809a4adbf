"""Tokenizers (Chapters 1-2): text <-> the ids of a fixed vocabulary.

Three kinds behind one interface (:class:`Tokenizer`):

* :class:`CharTokenizer`: one id per character of the corpus (65 for tiny Shakespeare).
* :class:`BPETokenizer`: the course's byte-pair encoding, written from scratch (byte-level).
* :class:`SentencePieceTokenizer`: sentencepiece BPE/unigram, for real training runs.

``tok.save(dir)`` writes a directory; :func:`load_tokenizer` reads any of them back.
"""
from tfd_jax.tokenizers.base import Tokenizer, load_tokenizer, read_text_file
from tfd_jax.tokenizers.bpe import BPETokenizer, MergeStep, format_trace, train_trace
from tfd_jax.tokenizers.char import CharTokenizer
from tfd_jax.tokenizers.spm import SentencePieceTokenizer

__all__ = [
    "Tokenizer",
    "BPETokenizer",
    "SentencePieceTokenizer",
    "CharTokenizer",
    "load_tokenizer",
    "read_text_file",
    "MergeStep",
    "train_trace",
    "format_trace",
]
