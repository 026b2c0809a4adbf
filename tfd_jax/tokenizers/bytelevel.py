"""GPT-2's byte-level BPE, read from a Hugging Face model directory (Chapter 2, as GPT-2 does it).

The same algorithm as :mod:`tfd_jax.tokenizers.bpe` (bytes, then learned merges applied lowest rank
first), in the form GPT-2, RoBERTa and BART ship it:

* ``vocab.json`` maps token strings to ids and ``merges.txt`` lists the merges in rank order, one
  ``left right`` pair per line. Tokens are strings, not bytes: GPT-2 shows each of the 256 bytes as a
  printable character (:func:`bytes_to_unicode`: printable bytes stand for themselves, the others,
  space included, are shifted to ``Ā``, ``ā``, ...; a space is ``Ġ``), so a token such as ``"Ġthe"``
  is the bytes of ``" the"``.
* Text is first cut with GPT-2's regex (``GPT2_SPLIT_PATTERN``: contractions, letters, digits, other
  symbols, each with an optional leading space, then whitespace); merges stay inside a piece.
* Added tokens (``<|endoftext|>``, RoBERTa's ``<mask>``) are cut out of the text first and give their
  ids, as in Hugging Face's tokenizers.

:func:`tfd_jax.tokenizers.hf.load_hf_tokenizer` builds this class from a model directory; ``save``
writes ``vocab.json`` and ``merges.txt`` next to the record.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import regex

from tfd_jax.tokenizers.base import SPECIAL_ROLES, SpecialSplitter, Tokenizer, bad_id_error

#: GPT-2's pre-tokenisation regex (Hugging Face's ``ByteLevel`` pre-tokenizer uses the same)
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
_CACHE_LIMIT = 1 << 16


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table byte -> the character that shows it in ``vocab.json``.

    The 188 printable bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68
    (controls, space, ...) take the characters from U+0100 on, in byte order (space, 0x20, is ``Ġ``).
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=None)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """The merges of a ``merges.txt`` (``#version`` header line skipped), in rank order."""
    merges = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path} line {n} is not a merge 'left right': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class ByteLevelBPETokenizer(Tokenizer):
    """GPT-2-style byte-level BPE from a Hugging Face vocabulary and merge list (Chapter 2).

    Args:
      vocab: token string (GPT-2's byte characters) -> id.
      merges: ``[(left, right), ...]`` in rank order (the first merge is applied first).
      special_tokens: added tokens, text -> id; ``encode`` cuts them out of the text first.
      roles: role -> id (roles among pad, bos, eos, unk, cls, sep, mask).
      add_prefix_space: put a space before text that does not start with one (RoBERTa's option).
      lstrip, rstrip: added tokens that also swallow the whitespace on their left/right.
      ignore_merges: a piece that is a whole vocabulary token is taken as it is (newer models).
    """

    kind = "hf_bpe"

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        special_tokens: Mapping[str, int] | None = None,
        roles: Mapping[str, int | None] | None = None,
        *,
        add_prefix_space: bool = False,
        lstrip: Iterable[str] = (),
        rstrip: Iterable[str] = (),
        ignore_merges: bool = False,
    ):
        self.vocab: dict[str, int] = {str(k): int(v) for k, v in vocab.items()}
        self.merges: list[tuple[str, str]] = [(str(a), str(b)) for a, b in merges]
        self._ranks = {p: r for r, p in enumerate(self.merges)}
        self.add_prefix_space = bool(add_prefix_space)
        self.ignore_merges = bool(ignore_merges)
        self._special_tokens = {str(t): int(i) for t, i in (special_tokens or {}).items()}
        self.lstrip = sorted(set(lstrip) & set(self._special_tokens))
        self.rstrip = sorted(set(rstrip) & set(self._special_tokens))
        size = 1 + max([-1, *self.vocab.values(), *self._special_tokens.values()])
        itos: list[str | None] = [None] * size
        for t, i in self.vocab.items():
            if i < 0:
                raise ValueError(f"token {t!r} has the negative id {i}")
            itos[i] = t
        for t, i in self._special_tokens.items():
            if i < 0:
                raise ValueError(f"special token {t!r} has the negative id {i}")
            itos[i] = t
        self._itos = itos
        for role, i in (roles or {}).items():
            if role not in SPECIAL_ROLES:
                raise ValueError(f"unknown special-token role {role!r}; use one of {', '.join(SPECIAL_ROLES)}")
            if i is not None and not 0 <= i < size:
                raise ValueError(f"the {role} id {i} is not in this vocabulary (ids are 0..{size - 1})")
            setattr(self, f"{role}_id", i)
        self._roles = {r: i for r, i in (roles or {}).items() if i is not None}
        self._splitter = SpecialSplitter(self._special_tokens, self.lstrip, self.rstrip)
        self._regex = regex.compile(GPT2_SPLIT_PATTERN)
        self._byte_char = [bytes_to_unicode()[b] for b in range(256)]
        self._cache: dict[str, tuple[int, ...]] = {}

    # --- the Tokenizer interface ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """One pre-split piece (already in GPT-2's byte characters) -> ids, merging by rank."""
        vocab = self.vocab
        if self.ignore_merges and piece in vocab:
            return (vocab[piece],)
        word = list(piece)
        ranks = self._ranks
        while len(word) > 1:
            best, best_rank = None, None
            for p in zip(word, word[1:]):
                r = ranks.get(p)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = p, r
            if best is None:
                break
            a, b = best
            merged, i, n = [], 0, len(word)
            while i < n:
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = []
        for w in word:
            i = vocab.get(w)
            if i is None:
                if self.unk_id is None:
                    raise ValueError(
                        f"the token {w!r} is not in this vocabulary and it has no unknown token; "
                        "the vocab.json does not match the merges.txt"
                    )
                i = self.unk_id
            out.append(i)
        return tuple(out)

    def _encode_text(self, text: str) -> list[int]:
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        out: list[int] = []
        cache, table = self._cache, self._byte_char
        for piece in self._regex.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe("".join(table[b] for b in piece.encode("utf-8")))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def encode(self, text: str) -> list[int]:
        """Text -> ids: added tokens first, then GPT-2's regex, bytes-to-unicode and the merges."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        out: list[int] = []
        try:
            for part in self._splitter.split(text):
                if isinstance(part, int):
                    out.append(part)
                else:
                    # (RoBERTa's add_prefix_space applies to every piece of text between added tokens)
                    out.extend(self._encode_text(part))
        except UnicodeEncodeError as e:
            raise ValueError(
                f"cannot encode text containing {e.object[e.start:e.end]!r} at index {e.start}: a lone "
                "surrogate is not valid Unicode text; fix the string's decoding"
            ) from None
        return out

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Ids -> the bytes they stand for (added tokens as their UTF-8 text)."""
        itos, to_byte = self._itos, unicode_to_bytes()
        out = bytearray()
        try:
            for i in ids:
                if i < 0:
                    raise IndexError
                tok = itos[i]
                if tok is None:
                    raise IndexError
                try:
                    out += bytes(to_byte[c] for c in tok)
                except KeyError:  # not all GPT-2 byte characters (e.g. an added token with a space)
                    out += tok.encode("utf-8")
        except (IndexError, TypeError):
            raise bad_id_error(ids, len(itos)) from None
        return bytes(out)

    def decode(self, ids: list[int]) -> str:
        """Ids -> text (Hugging Face's ByteLevel decoder); lossless for what ``encode`` produced."""
        for i in ids:
            if isinstance(i, int) and 0 <= i < len(self._itos) and self._itos[i] is None:
                raise ValueError(f"token id {i} is not in this vocabulary (no token has that id)")
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary string of one id (e.g. ``'Ġthe'``)."""
        if not 0 <= token_id < len(self._itos) or self._itos[token_id] is None:
            raise bad_id_error([token_id], len(self._itos))
        return self._itos[token_id]

    # --- saving -------------------------------------------------------------------------------
    def with_special_tokens(self, tokens: Iterable[str]) -> "ByteLevelBPETokenizer":
        """A copy with ``tokens`` added as special tokens (those it lacks), ids from ``vocab_size`` on."""
        specials, next_id = dict(self._special_tokens), self.vocab_size
        for t in tokens:
            if t not in specials:
                specials[t], next_id = next_id, next_id + 1
        if len(specials) == len(self._special_tokens):
            return self
        return ByteLevelBPETokenizer(self.vocab, self.merges, specials, self._roles,
                                     add_prefix_space=self.add_prefix_space, lstrip=self.lstrip, rstrip=self.rstrip,
                                     ignore_merges=self.ignore_merges)

    def _to_record(self, directory: Path) -> dict[str, Any]:
        (directory / VOCAB_FILE).write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (directory / MERGES_FILE).write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8"
        )
        return {
            "vocab_size": self.vocab_size,
            "vocab_file": VOCAB_FILE,
            "merges_file": MERGES_FILE,
            "special_tokens": self._special_tokens,
            "roles": self._roles,
            "add_prefix_space": self.add_prefix_space,
            "lstrip": self.lstrip,
            "rstrip": self.rstrip,
            "ignore_merges": self.ignore_merges,
        }

    @classmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "ByteLevelBPETokenizer":
        files = [directory / record.get("vocab_file", VOCAB_FILE), directory / record.get("merges_file", MERGES_FILE)]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"{directory} is a byte-level BPE tokenizer but its {f.name} is missing; copy the whole "
                    "tokenizer directory or save it again"
                )
        try:
            vocab = json.loads(files[0].read_text(encoding="utf-8"))
            return cls(
                vocab,
                read_merges_txt(files[1]),
                record.get("special_tokens"),
                record.get("roles"),
                add_prefix_space=record.get("add_prefix_space", False),
                lstrip=record.get("lstrip", ()),
                rstrip=record.get("rstrip", ()),
                ignore_merges=record.get("ignore_merges", False),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"{directory} holds a damaged byte-level BPE tokenizer ({e}); save it again") from None
