"""SentencePiece tokenizers, trained in-process (Chapter 2 at production scale).

The from-scratch :mod:`tfd_jax.tokenizers.bpe` shows the algorithm; for real runs this wraps the
``sentencepiece`` library (BPE or unigram), which trains fast in C++ and encodes in parallel.

Settings chosen so that text (prose or code) comes back exactly as it went in:

* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``: no Unicode normalisation, no collapsing or adding of spaces.
* ``allow_whitespace_only_pieces=True``: runs of spaces (code indentation) can become single pieces.
* ``byte_fallback=True``: a character with no piece of its own is encoded as its UTF-8 bytes
  (pieces ``<0x00>``..``<0xFF>``), so there is no unknown token in practice.
* ``"\\n"`` is a user-defined piece. SentencePiece trains on sentences (lines), so the corpus is split at
  newlines for training, and the ``"\\n"`` piece carries newlines through encode and decode.
* ``split_digits=True`` (each digit its own piece) by default.

Special ids: ``unk_id=0``, ``bos_id=1``, ``eos_id=2``, ``pad_id=3`` (Chapter 1 uses 0/1/2 for
pad/start/end; sentencepiece wants unk somewhere, and 0 is its convention). ``encode`` never adds
them; ``decode`` drops bos/eos/pad and writes unk as ``" ⁇ "``.

Known limit: SentencePiece uses U+2581 (``▁``) to stand for a space, so a literal ``▁`` in the input
text decodes as a space.
"""
from __future__ import annotations

import io
import operator
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import sentencepiece

from tfd_jax.tokenizers.base import Tokenizer, bad_id_error, read_text_file

MODEL_FILE = "spm.model"
#: training sentences longer than this many characters are cut into pieces (sentencepiece skips
#: sentences longer than ``max_sentence_length`` bytes; 4 bytes per character is the UTF-8 maximum)
_MAX_CHARS = 4096
_MAX_BYTES = 4 * _MAX_CHARS
MODEL_TYPES = ("bpe", "unigram")


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_CHARS):
                yield line[start : start + _MAX_CHARS]


def _corpus_texts(text_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(text_or_files, str):
        return [text_or_files]
    if isinstance(text_or_files, os.PathLike):
        return [read_text_file(text_or_files)]
    if isinstance(text_or_files, (list, tuple)):
        return [read_text_file(p) for p in text_or_files]
    raise TypeError(
        "text_or_files must be the corpus as a str, a path (pathlib.Path), or a list of paths; "
        f"got {type(text_or_files).__name__}"
    )


def _clean_message(msg: str) -> str:
    """Strip sentencepiece's ``INTERNAL: src/x.cc(123) [condition]`` prefix from an error message."""
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\]\s*", "", msg).strip()


class SentencePieceTokenizer(Tokenizer):
    """A trained sentencepiece model behind the :class:`Tokenizer` interface (Chapter 2).

    Args:
      model_proto: the serialized model (the bytes of a ``.model`` file).
    """

    kind = "spm"

    def __init__(self, model_proto: bytes):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a valid sentencepiece model ({_clean_message(str(e))})") from None
        self._model_proto = bytes(model_proto)
        for name in ("pad", "bos", "eos", "unk"):
            value = getattr(self.sp, f"{name}_id")()
            setattr(self, f"{name}_id", value if value >= 0 else None)

    @classmethod
    def train(
        cls,
        text_or_files: str | os.PathLike | Sequence[str | os.PathLike],
        vocab_size: int,
        *,
        model_type: str = "bpe",
        split_digits: bool = True,
        character_coverage: float = 0.9995,
        verbose: bool = False,
        num_threads: int | None = None,
        **options: Any,
    ) -> "SentencePieceTokenizer":
        """Train a sentencepiece model in memory (no files left behind).

        Args:
          text_or_files: the corpus as a ``str``; or a ``pathlib.Path``; or a list/tuple of file
            paths (UTF-8 text). A plain ``str`` is always the text itself, never a path.
          vocab_size: ``V``, including the 4 special pieces, ``"\\n"`` and the 256 byte pieces; so it
            must be at least about 261 + the number of distinct characters kept.
          model_type: ``"bpe"`` or ``"unigram"``.
          split_digits: make every digit its own piece.
          character_coverage: share of characters given their own piece; the rest use bytes.
          verbose: show sentencepiece's training log.
          options: passed on to ``sentencepiece.SentencePieceTrainer.train`` (e.g.
            ``input_sentence_size``, ``max_sentencepiece_length``).
        Raises:
          ValueError: empty corpus, unknown model type, or a vocab size the corpus cannot fill (or
            too small for its characters); the message says which sizes would work.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        texts = _corpus_texts(text_or_files)
        if not any(t.replace("\n", "") for t in texts):
            raise ValueError(
                "cannot train a sentencepiece tokenizer: the corpus is empty (no text besides newlines); "
                "pass some text"
            )
        model = io.BytesIO()
        settings = dict(
            model_type=model_type,
            vocab_size=vocab_size,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            byte_fallback=True,
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            character_coverage=character_coverage,
            max_sentence_length=_MAX_BYTES,
            num_threads=num_threads or min(os.cpu_count() or 1, 16),
            minloglevel=0 if verbose else 2,
        )
        settings.update(options)
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=_sentences(texts), model_writer=model, **settings
            )
        except RuntimeError as e:
            raise _training_error(str(e), vocab_size, model_type) from None
        return cls(model.getvalue())

    # --- the Tokenizer interface ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no bos/eos added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel inside sentencepiece)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for a single string")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of strings")
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; bos/eos/pad ids produce nothing, unk gives ``" ⁇ "``."""
        try:
            clean = [operator.index(i) for i in ids]
        except TypeError:
            raise bad_id_error(ids, self.vocab_size) from None
        try:
            return self.sp.decode(clean)
        except IndexError:
            raise bad_id_error(clean, self.vocab_size) from None

    def id_to_piece(self, token_id: int) -> str:
        """The piece text of one id (spaces shown as ``▁``, bytes as ``<0xE2>``)."""
        if not 0 <= token_id < self.vocab_size:
            raise bad_id_error([token_id], self.vocab_size)
        return self.sp.id_to_piece(token_id)

    @property
    def model_proto(self) -> bytes:
        """The serialized model (what ``save`` writes to ``spm.model``)."""
        return self._model_proto

    # --- saving -------------------------------------------------------------------------------
    def _to_record(self, directory: Path) -> dict[str, Any]:
        (directory / MODEL_FILE).write_bytes(self._model_proto)
        return {"vocab_size": self.vocab_size, "model_file": MODEL_FILE, **self.special_ids()}

    @classmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "SentencePieceTokenizer":
        model_path = directory / record.get("model_file", MODEL_FILE)
        if not model_path.is_file():
            raise FileNotFoundError(
                f"{directory} is a sentencepiece tokenizer but its model file {model_path.name} is missing; "
                "copy the whole tokenizer directory or save it again"
            )
        try:
            return cls(model_path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{model_path}: {e}") from None


def _training_error(msg: str, vocab_size: int, model_type: str) -> ValueError:
    """Turn sentencepiece's RuntimeError into a ValueError that says what to do."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if too_high:
        limit = int(too_high.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is more than this corpus can fill: sentencepiece ({model_type}) "
            f"can make at most {limit} pieces from it; use vocab_size <= {limit} or train on more text"
        )
    too_small = re.search(r"required_chars\. (\d+) vs (\d+)", msg)
    if too_small:
        need = int(too_small.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is too small for this corpus: the special pieces, the 256 byte "
            f"pieces and the corpus's characters need {need}; use vocab_size >= {need}, or a lower "
            "character_coverage so rare characters fall back to bytes"
        )
    if "sentences_.empty()" in msg:
        return ValueError("cannot train a sentencepiece tokenizer: the corpus is empty; pass some text")
    return ValueError(f"sentencepiece could not train on this corpus: {_clean_message(msg)}")
