"""A character-level tokenizer (Chapters 1-2): one id per distinct character of the corpus.

This is the simplest vocabulary Chapter 2 mentions (individual characters, "always in the
vocabulary" as the fallback), and the one small from-scratch models such as a tiny-Shakespeare
GPT train on: the sorted set of characters in the corpus, 65 symbols for tiny Shakespeare. It has no
unknown token: encoding a character the corpus never contained is an error.

Special tokens are optional (``special_tokens=BERT_SPECIAL_TOKENS`` for a BERT-style model): they take
the ids after the characters, in the order given, and ``encode`` turns each of these strings in the
text into its id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tfd_jax.tokenizers.base import (
    SpecialSplitter,
    Tokenizer,
    bad_id_error,
    check_special_tokens,
    roles_from_names,
)


class CharTokenizer(Tokenizer):
    """Characters <-> ids; id ``i`` is the ``i``-th character in sorted (code point) order.

    Args:
      chars: the vocabulary, distinct single characters (sorted on construction).
      special_tokens: optional special-token strings (e.g. ``BERT_SPECIAL_TOKENS``); they take ids
        ``len(chars)``, ``len(chars) + 1``, ... in the order given, and their roles follow the names.
    """

    kind = "char"

    def __init__(self, chars: str | list[str], special_tokens: Sequence[str] | None = None):
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
        registered = check_special_tokens(special_tokens)
        self._special_tokens = {t: len(self.chars) + k for k, t in enumerate(registered)}
        for role, i in roles_from_names(self._special_tokens).items():
            setattr(self, f"{role}_id", i)
        self._splitter = SpecialSplitter(self._special_tokens)
        self._itos = self.chars + list(registered)

    @classmethod
    def train(cls, text: str, special_tokens: Sequence[str] | None = None) -> "CharTokenizer":
        """The sorted set of characters in ``text`` (``V`` = number of distinct characters, plus the
        special tokens, if any, which take the last ids)."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.train takes the corpus as a str, got {type(text).__name__}")
        if not text:
            raise ValueError("cannot train a character tokenizer: the corpus is empty; pass some text")
        return cls(sorted(set(text)), special_tokens=special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str) -> list[int]:
        """Text -> one id per character (a registered special token in the text gives its id).
        Raises ValueError naming a character not in the vocabulary."""
        if not self._splitter:
            return self._encode_chars(text, 0)
        out: list[int] = []
        for start, part in self._splitter.spans(text):
            if isinstance(part, int):
                out.append(part)
            else:
                out.extend(self._encode_chars(part, start))
        return out

    def _encode_chars(self, part: str, offset: int) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in part]
        except KeyError as e:
            c = e.args[0]
            raise ValueError(
                f"character {c!r} (U+{ord(c):04X}) at index {offset + part.index(c)} is not in this tokenizer's "
                f"vocabulary of {len(self.chars)} characters; remove it from the text or train the "
                "tokenizer on a corpus that contains it"
            ) from None

    def decode(self, ids: list[int]) -> str:
        """Ids -> the characters they stand for (a special id gives its text)."""
        chars = self._itos
        try:
            if any(i < 0 for i in ids):  # a negative index would silently wrap around
                raise IndexError
            return "".join([chars[i] for i in ids])
        except (IndexError, TypeError):
            raise bad_id_error(ids, len(chars)) from None

    def _to_record(self, directory: Path) -> dict[str, Any]:
        record = {"vocab_size": self.vocab_size, "chars": self.chars}
        if self._special_tokens:
            record["special_tokens"] = list(self._special_tokens)
        return record

    @classmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "CharTokenizer":
        try:
            return cls(record["chars"], special_tokens=record.get("special_tokens"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory} holds a damaged character tokenizer record ({e}); save it again") from None
