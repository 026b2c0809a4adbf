"""Corpora, tokenized token files and grain training pipelines (Chapters 2 and 11).

``load_corpus`` gives text, ``write_tokens``/``load_tokens`` turn it into a memory-mapped token
array once, and ``make_iterator`` yields fixed-shape batch dicts for the training loop.
"""
from tfd_jax.data.corpora import Corpus, Document, load_corpus
from tfd_jax.data.pipeline import (
    IteratorRestore,
    IteratorSave,
    iterator_state,
    make_iterator,
    make_lm_dataset,
    make_packed_dataset,
    restore_iterator,
)
from tfd_jax.data.tokenized import TokenFile, load_tokens, write_tokens

__all__ = [
    "Corpus",
    "Document",
    "IteratorRestore",
    "IteratorSave",
    "TokenFile",
    "iterator_state",
    "load_corpus",
    "load_tokens",
    "make_iterator",
    "make_lm_dataset",
    "make_packed_dataset",
    "restore_iterator",
    "write_tokens",
]
