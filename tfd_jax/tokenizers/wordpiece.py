"""BERT's WordPiece tokenizer, read from a Hugging Face ``vocab.txt`` (Chapter 2's "split an unknown
word into known pieces", the way BERT does it).

Encoding, as BERT (and Hugging Face's ``BertTokenizer``) does it:

1. Added/special tokens (``[CLS]``, ``[SEP]``, ``[MASK]``, ...) are cut out of the text first and
   give their ids; they are never lowercased or split (BERT's ``never_split``).
2. The basic tokenizer cleans the rest: control characters (and NUL, U+FFFD) are dropped, any
   whitespace becomes a space, each CJK character gets spaces around it, and with
   ``do_lower_case`` the text is lowercased and accents are stripped (NFD, then the combining marks
   dropped). It then splits at whitespace and makes every punctuation character a word of its own.
3. Each word becomes the longest vocabulary entry that starts it, then the longest ``##``-prefixed
   entry that continues it, and so on (greedy longest match first). A word that cannot be covered
   this way, or longer than ``max_input_chars_per_word`` (100) characters, is one ``[UNK]``.

Decoding: tokens are joined with spaces, a ``##`` piece is glued to the one before, and spaces before
``.`` ``,`` ``!`` ``?`` are removed (Hugging Face's WordPiece decoder); the result is normalised text,
not the original (case, accents and spacing are gone).
"""
from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tfd_jax.tokenizers.base import SPECIAL_ROLES, SpecialSplitter, Tokenizer, bad_id_error

VOCAB_FILE = "vocab.txt"
#: Unicode's White_Space characters (what the basic tokenizer splits at)
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                        "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# the CJK blocks BERT puts spaces around (not Japanese kana or Korean hangul)
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _is_whitespace(c: str) -> bool:
    return c in _WHITESPACE or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    if c in "\t\n\r":
        return False
    return unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True  # all ASCII non-letters/digits, e.g. "$" "^" "`" count as punctuation
    return unicodedata.category(c).startswith("P")


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _cleanup(token: str) -> str:
    """Hugging Face's WordPiece-decoder cleanup of one (space-prefixed) token."""
    return (
        token.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" do not", " don't")
        .replace(" 's", "'s").replace(" 've", "'ve").replace(" 're", "'re")
    )


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (used when ``clean_up_tokenization_spaces`` is set)."""
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
        .replace(" 've", "'ve").replace(" 're", "'re")
    )


def read_vocab_txt(path: Path) -> list[str]:
    """The tokens of a ``vocab.txt``, one a line; the line number (from 0) is the id."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class WordPieceTokenizer(Tokenizer):
    """BERT's WordPiece behind the :class:`Tokenizer` interface (Chapter 2).

    Args:
      vocab: the tokens in id order (``vocab.txt``), or token -> id.
      special_tokens: added/special tokens, text -> id (e.g. ``{"[CLS]": 2, ...}``); ``encode`` cuts
        them out of the text first.
      roles: role -> id (roles among pad, bos, eos, unk, cls, sep, mask).
      do_lower_case: lowercase (and, unless ``strip_accents`` says otherwise, strip accents).
      strip_accents: None: follow ``do_lower_case``.
      tokenize_chinese_chars: put spaces around CJK characters.
      clean_text: drop control characters and turn any whitespace into a space.
      unk_token: what an unmatchable word becomes (must be in the vocabulary).
      continuing_prefix: the mark of a piece that continues a word (``"##"``).
      max_input_chars_per_word: a longer word is one ``unk_token``.
      cleanup: remove spaces before punctuation when decoding (Hugging Face's decoder default).
      clean_up_tokenization_spaces: also apply transformers' whole-text cleanup when decoding.
      lstrip, rstrip: added tokens that also swallow the whitespace on their left/right.
    """

    kind = "hf_wordpiece"

    def __init__(
        self,
        vocab: Sequence[str] | Mapping[str, int],
        special_tokens: Mapping[str, int] | None = None,
        roles: Mapping[str, int | None] | None = None,
        *,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        clean_text: bool = True,
        unk_token: str = "[UNK]",
        continuing_prefix: str = "##",
        max_input_chars_per_word: int = 100,
        cleanup: bool = True,
        clean_up_tokenization_spaces: bool = False,
        lstrip: Iterable[str] = (),
        rstrip: Iterable[str] = (),
    ):
        if isinstance(vocab, Mapping):
            size = 1 + max([-1, *vocab.values()])
            tokens: list[str | None] = [None] * size
            for t, i in vocab.items():
                if i < 0:
                    raise ValueError(f"token {t!r} has the negative id {i}")
                tokens[i] = t
            self.vocab: dict[str, int] = {str(t): int(i) for t, i in vocab.items()}
        else:
            tokens = [str(t) for t in vocab]
            self.vocab = {t: i for i, t in enumerate(tokens)}
        self._special_tokens = {str(t): int(i) for t, i in (special_tokens or {}).items()}
        size = max(len(tokens), 1 + max([-1, *self._special_tokens.values()]))
        tokens = tokens + [None] * (size - len(tokens))
        for t, i in self._special_tokens.items():
            if i < 0:
                raise ValueError(f"special token {t!r} has the negative id {i}")
            tokens[i] = t
        self._itos = tokens
        self.do_lower_case = bool(do_lower_case)
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = bool(tokenize_chinese_chars)
        self.clean_text = bool(clean_text)
        self.unk_token = unk_token
        self.continuing_prefix = continuing_prefix
        self.max_input_chars_per_word = int(max_input_chars_per_word)
        self.cleanup = bool(cleanup)
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.lstrip = sorted(set(lstrip) & set(self._special_tokens))
        self.rstrip = sorted(set(rstrip) & set(self._special_tokens))
        for role, i in (roles or {}).items():
            if role not in SPECIAL_ROLES:
                raise ValueError(f"unknown special-token role {role!r}; use one of {', '.join(SPECIAL_ROLES)}")
            if i is not None and not 0 <= i < size:
                raise ValueError(f"the {role} id {i} is not in this vocabulary (ids are 0..{size - 1})")
            setattr(self, f"{role}_id", i)
        self._roles = {r: i for r, i in (roles or {}).items() if i is not None}
        self._unk = self.vocab.get(unk_token, self._special_tokens.get(unk_token))
        self._splitter = SpecialSplitter(self._special_tokens, self.lstrip, self.rstrip)
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    # --- BERT's basic tokenizer ---------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """Clean, space out CJK, strip accents and lowercase, as BERT's normalizer does."""
        if self.clean_text:
            text = "".join(
                " " if _is_whitespace(c) else c
                for c in text
                if not (c == "\x00" or c == "\ufffd" or _is_control(c))
            )
        if self.tokenize_chinese_chars:
            text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
        strip = self.do_lower_case if self.strip_accents is None else self.strip_accents
        if strip:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.do_lower_case:
            text = "".join(c.lower() for c in text)  # character by character, as BERT does
        return text

    def basic_tokenize(self, text: str) -> list[str]:
        """Normalised text cut at whitespace, each punctuation character a word of its own."""
        words: list[str] = []
        current: list[str] = []
        for c in self.normalize(text):
            if _is_whitespace(c):
                if current:
                    words.append("".join(current))
                    current = []
            elif _is_punctuation(c):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(c)
            else:
                current.append(c)
        if current:
            words.append("".join(current))
        return words

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first pieces of one word, or ``(unk,)``."""
        vocab, prefix = self.vocab, self.continuing_prefix
        if len(word) > self.max_input_chars_per_word:
            return (self._unk_id_or_fail(word),)
        out = []
        start, n = 0, len(word)
        while start < n:
            end = n
            found = None
            while start < end:
                sub = word[start:end]
                if start > 0:
                    sub = prefix + sub
                found = vocab.get(sub)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return (self._unk_id_or_fail(word),)
            out.append(found)
            start = end
        return tuple(out)

    def _unk_id_or_fail(self, word: str) -> int:
        if self._unk is None:
            raise ValueError(
                f"the word {word!r} has no WordPiece split and the unknown token {self.unk_token!r} is not "
                "in the vocabulary; add it to vocab.txt"
            )
        return self._unk

    # --- the Tokenizer interface ----------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids: special tokens, then the basic tokenizer, then WordPiece for each word."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        out: list[int] = []
        cache = self._cache
        for part in self._splitter.split(text):
            if isinstance(part, int):
                out.append(part)
                continue
            for word in self.basic_tokenize(part):
                ids = cache.get(word)
                if ids is None:
                    ids = self._wordpiece(word)
                    if len(cache) >= 1 << 16:
                        cache.clear()
                    cache[word] = ids
                out.extend(ids)
        return out

    def decode(self, ids: list[int]) -> str:
        """Ids -> text as Hugging Face's BertTokenizer decodes it (``##`` pieces glued on, tokens
        separated by spaces, no space before ``.`` ``,`` ``!`` ``?``)."""
        itos, prefix = self._itos, self.continuing_prefix
        parts = []
        try:
            for k, i in enumerate(ids):
                if i < 0 or itos[i] is None:
                    raise IndexError
                tok = itos[i]
                if k:
                    tok = tok[len(prefix):] if tok.startswith(prefix) else " " + tok
                parts.append(_cleanup(tok) if self.cleanup else tok)
        except (IndexError, TypeError):
            raise bad_id_error(ids, len(itos)) from None
        text = "".join(parts)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id (e.g. ``'##ing'``)."""
        if not 0 <= token_id < len(self._itos) or self._itos[token_id] is None:
            raise bad_id_error([token_id], len(self._itos))
        return self._itos[token_id]

    # --- saving -------------------------------------------------------------------------------
    def _to_record(self, directory: Path) -> dict[str, Any]:
        by_id: list[str | None] = [None] * (1 + max([-1, *self.vocab.values()]))
        for t, i in self.vocab.items():
            by_id[i] = t
        if any(t is None or "\n" in t for t in by_id):
            vocab_field: Any = self.vocab  # gaps or odd tokens: keep the mapping in the record
        else:
            (directory / VOCAB_FILE).write_text("".join(t + "\n" for t in by_id), encoding="utf-8")
            vocab_field = VOCAB_FILE
        return {
            "vocab_size": self.vocab_size,
            "vocab_file": vocab_field,
            "special_tokens": self._special_tokens,
            "roles": self._roles,
            "do_lower_case": self.do_lower_case,
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "clean_text": self.clean_text,
            "unk_token": self.unk_token,
            "continuing_prefix": self.continuing_prefix,
            "max_input_chars_per_word": self.max_input_chars_per_word,
            "cleanup": self.cleanup,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
        }

    @classmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "WordPieceTokenizer":
        source = record.get("vocab_file", VOCAB_FILE)
        if isinstance(source, str):
            path = directory / source
            if not path.is_file():
                raise FileNotFoundError(
                    f"{directory} is a WordPiece tokenizer but its {path.name} is missing; copy the whole "
                    "tokenizer directory or save it again"
                )
            vocab: Any = read_vocab_txt(path)
        else:
            vocab = source
        try:
            return cls(
                vocab,
                record.get("special_tokens"),
                record.get("roles"),
                **{k: record[k] for k in (
                    "do_lower_case", "strip_accents", "tokenize_chinese_chars", "clean_text", "unk_token",
                    "continuing_prefix", "max_input_chars_per_word", "cleanup", "clean_up_tokenization_spaces",
                    "lstrip", "rstrip",
                ) if k in record},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{directory} holds a damaged WordPiece tokenizer ({e}); save it again") from None
