"""A character-level tokenizer (Chapters 1-2): one id per distinct character of the corpus.

This is the simplest vocabulary Chapter 2 mentions (individual characters, "always in the
vocabulary" as the fallback), and the one small from-scratch models such as a tiny-Shakespeare
GPT train on: the sorted set of characters in the corpus, 65 symbols for tiny Shakespeare. It has no
special tokens and no unknown token: encoding a character the corpus never contained is an error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tfd_jax.tokenizers.base import Tokenizer, bad_id_error


class CharTokenizer(Tokenizer):
    """Characters <-> ids; id ``i`` is the ``i``-th character in sorted (code point) order.

    Args:
      chars: the vocabulary, distinct single characters (sorted on construction).
    """

    kind = "char"

    def __init__(self, chars: str | list[str]):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"a character vocabulary holds single characters, got {bad[0]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("a character vocabulary must not repeat characters")
        if not chars:
            raise ValueError("a character vocabulary needs at least one character")
        self.chars: list[str] = sorted(chars)
        self._stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        """The sorted set of characters in ``text`` (``V`` = number of distinct characters)."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.train takes the corpus as a str, got {type(text).__name__}")
        if not text:
            raise ValueError("cannot train a character tokenizer: the corpus is empty; pass some text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Text -> one id per character. Raises ValueError naming a character not in the vocabulary."""
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise ValueError(
                f"character {c!r} (U+{ord(c):04X}) at index {text.index(c)} is not in this tokenizer's "
                f"vocabulary of {len(self.chars)} characters; remove it from the text or train the "
                "tokenizer on a corpus that contains it"
            ) from None

    def decode(self, ids: list[int]) -> str:
        """Ids -> the characters they stand for."""
        chars = self.chars
        try:
            if any(i < 0 for i in ids):  # a negative index would silently wrap around
                raise IndexError
            return "".join([chars[i] for i in ids])
        except (IndexError, TypeError):
            raise bad_id_error(ids, len(chars)) from None

    def _to_record(self, directory: Path) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "chars": self.chars}

    @classmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "CharTokenizer":
        try:
            return cls(record["chars"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory} holds a damaged character tokenizer record ({e}); save it again") from None
