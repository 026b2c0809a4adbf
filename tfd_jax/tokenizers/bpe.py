"""Byte-pair encoding from scratch (Chapter 2).

Training, as Chapter 2 teaches it: start from a base alphabet, count every adjacent pair of tokens,
merge the most frequent pair into a new token, and repeat until the vocabulary has the size you
asked for. Each merge adds exactly one token.

Choices the course leaves open, and what this module does:

* **Base alphabet: the 256 byte values.** The course starts from ~100 characters; starting from
  bytes instead means every UTF-8 string (any language, emoji, code) can be encoded and decoded
  back exactly, with no unknown token. Ids 0..255 are the bytes themselves, so merge ``k`` (counted
  from 1) creates id ``255 + k``.
* **Pre-splitting.** Text is first cut into chunks (runs of letters, digits, punctuation or
  whitespace, each letter/digit/punctuation run taking one leading space, GPT-2 style; see
  ``SPLIT_PATTERN``) and merges never cross a chunk boundary, so a token never glues the end
  of one word to the start of the next.
* **Ties.** When several pairs share the highest count, the pair with the smallest ids wins:
  ``(a, b)`` beats ``(c, d)`` when ``a < c``, or ``a == c and b < d``. This makes training
  deterministic.
* **Overlaps.** Pairs are counted at every position (``"aaa"`` holds the pair ``(a, a)`` twice), and a
  merge replaces occurrences from left to right (``"aaa"`` becomes ``"aa" "a"``).

Encoding. Chapter 2 describes encoding an unknown word as a recursive vocabulary look-up ("is the
whole word in the vocabulary? if not, split it into known pieces"). That is not how BPE encodes:
here a chunk starts as its bytes and the learned merges are applied in the order they were learned
(lowest rank first), which reproduces exactly the tokens training produced for that chunk.

Training is incremental: the corpus is reduced to its unique chunks with their counts, and after
each merge only the chunks that contained the merged pair are re-counted (a heap with lazy
invalidation finds the next most frequent pair). 1,000 tokens on a 1 MB corpus takes seconds.
"""
from __future__ import annotations

import heapq
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from tfd_jax.tokenizers.base import (
    SpecialSplitter,
    Tokenizer,
    bad_id_error,
    check_special_tokens,
    roles_from_names,
)

#: How text is cut into chunks before BPE (merges stay inside a chunk). In order: English
#: contractions ('s 't 're 've 'm 'll 'd), a run of letters (and underscores) with an optional leading
#: space, 1-3 digits with an optional leading space, a run of other symbols with an optional leading
#: space, whitespace that is not followed by a non-space (so " word" keeps its space), any other
#: whitespace. Every character falls in one of these classes, so the chunks always join back to the
#: original text.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d]+| ?\d{1,3}| ?[^\s\w]+|\s+(?!\S)|\s+"""

NUM_BYTES = 256
#: the roles of special tokens given as a role mapping (``{"eos": "<|endoftext|>"}``)
SPECIAL_ROLES = ("pad", "bos", "eos")
_CACHE_LIMIT = 1 << 16


def _show(piece: bytes) -> str:
    """A token's bytes for people: ``'th'`` when they are valid UTF-8, else ``b'\\xe2\\x82'``."""
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(piece)


@dataclass(frozen=True)
class MergeStep:
    """One BPE training step (Chapter 2): ``left + right -> merged``, seen ``count`` times.

    Attributes:
      index: 1 for the first merge.
      pair: the two ids that were merged.
      new_id: the id of the merged token (``255 + index`` without special tokens).
      count: how many times the pair occurred in the corpus when it was chosen.
      vocab_size: the vocabulary size after this merge (bytes + merges so far).
      left, right: the bytes of the two merged tokens; ``left + right`` is the new token.
    """

    index: int
    pair: tuple[int, int]
    new_id: int
    count: int
    vocab_size: int
    left: bytes
    right: bytes

    @property
    def merged(self) -> bytes:
        return self.left + self.right

    def __str__(self) -> str:
        return (
            f"merge {self.index}: {_show(self.left)} + {_show(self.right)} -> {_show(self.merged)} "
            f"(count {self.count}) -> vocab {self.vocab_size}"
        )


def format_trace(steps: list[MergeStep]) -> str:
    """The merges one per line, e.g. ``merge 1: 't' + 'h' -> 'th' (count 150) -> vocab 257``."""
    return "\n".join(str(s) for s in steps)


def _chunk_counts(text: str, pattern: re.Pattern) -> Counter:
    return Counter(pattern.findall(text))


def _merge_seq(seq: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace each ``a, b`` in ``seq`` by ``new``, scanning left to right."""
    out = []
    i, n = 0, len(seq)
    while i < n:
        if seq[i] == a and i + 1 < n and seq[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _pair_counts(seq: list[int]) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for p in zip(seq, seq[1:]):
        counts[p] = counts.get(p, 0) + 1
    return counts


def iter_merges(text: str, pattern: str = SPLIT_PATTERN) -> Iterator[MergeStep]:
    """Yield BPE merges for ``text`` in training order until no adjacent pair is left (Chapter 2).

    Each step merges the most frequent pair (ties: smallest ids), exactly as a full re-count after
    every merge would, but only the chunks that contain the merged pair are re-counted.
    """
    compiled = re.compile(pattern)
    uniq = _chunk_counts(text, compiled)
    seqs: list[list[int]] = [list(chunk.encode("utf-8")) for chunk in uniq]
    freqs: list[int] = list(uniq.values())
    vocab: list[bytes] = [bytes([i]) for i in range(NUM_BYTES)]

    counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for idx, (seq, f) in enumerate(zip(seqs, freqs)):
        for p in zip(seq, seq[1:]):
            counts[p] = counts.get(p, 0) + f
            s = where.get(p)
            if s is None:
                where[p] = {idx}
            else:
                s.add(idx)
    # max count first, then the smallest pair; entries go stale when a count changes and are
    # skipped when popped (the current count is always pushed as well)
    heap = [(-c, a, b) for (a, b), c in counts.items()]
    heapq.heapify(heap)

    index = 0
    while heap:
        neg, a, b = heapq.heappop(heap)
        pair = (a, b)
        if counts.get(pair, 0) != -neg:
            continue  # stale entry
        index += 1
        new = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        yield MergeStep(index, pair, new, -neg, len(vocab), vocab[a], vocab[b])

        changed: set[tuple[int, int]] = set()
        for idx in where.pop(pair, ()):
            seq = seqs[idx]
            old = _pair_counts(seq)
            if pair not in old:
                continue  # the chunk lost this pair to an earlier merge
            merged = _merge_seq(seq, a, b, new)
            seqs[idx] = merged
            fresh = _pair_counts(merged)
            f = freqs[idx]
            for p, c in old.items():
                d = fresh.get(p, 0) - c
                if d:
                    counts[p] += d * f
                    changed.add(p)
            for p, c in fresh.items():
                if p not in old:
                    counts[p] = counts.get(p, 0) + c * f
                    changed.add(p)
                    s = where.get(p)
                    if s is None:
                        where[p] = {idx}
                    else:
                        s.add(idx)
        for p in changed:
            c = counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                del counts[p]
                where.pop(p, None)


def train_trace(text: str, num_merges: int, pattern: str = SPLIT_PATTERN) -> list[MergeStep]:
    """The first ``num_merges`` BPE merges of ``text``, to print like Chapter 2's walk-through.

    ``print(format_trace(train_trace(text, 3)))`` shows lines such as
    ``merge 1: 't' + 'h' -> 'th' (count 150) -> vocab 257``. Returns fewer steps if the corpus runs
    out of pairs first.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    steps = []
    if num_merges == 0:
        return steps
    for step in iter_merges(text, pattern):
        steps.append(step)
        if len(steps) == num_merges:
            break
    return steps


class BPETokenizer(Tokenizer):
    """Byte-level BPE (Chapter 2): 256 byte tokens, then one token per learned merge, then specials.

    Ids: ``0..255`` bytes, ``256..256+len(merges)-1`` merges in training order, then the special
    tokens (if any). ``decode`` turns a special id into its text (e.g. ``"<|endoftext|>"``).

    Special tokens come in two forms:

    * a sequence of strings, e.g. ``BERT_SPECIAL_TOKENS`` (``"[PAD]" "[UNK]" "[CLS]" "[SEP]"
      "[MASK]"``): registered special tokens (``tok.special_tokens``), with ids after the merges in
      the order given; ``encode`` turns each of these strings in the text into its id, and the roles
      (``pad_id``, ``cls_id``, ``mask_id``, ...) follow the names.
    * a role mapping, e.g. ``{"eos": "<|endoftext|>"}`` (roles among pad, bos, eos): output-only
      tokens, with ids after the merges in the order pad, bos, eos; ``encode`` reads their text as
      plain text and never emits them (``tok.role_tokens`` holds the mapping).

    Args:
      merges: ``[(a, b), ...]`` in training order; merge ``r`` (from 0) creates id ``256 + r``.
      special_tokens: a sequence of special-token strings, or a role -> text mapping (see above).
      pattern: the pre-split regex (``SPLIT_PATTERN``).
    """

    kind = "bpe"

    def __init__(
        self,
        merges: list[tuple[int, int]],
        special_tokens: Sequence[str] | Mapping[str, str] | None = None,
        pattern: str = SPLIT_PATTERN,
    ):
        self.merges: list[tuple[int, int]] = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self._ranks = {p: r for r, p in enumerate(self.merges)}
        vocab = [bytes([i]) for i in range(NUM_BYTES)]
        for r, (a, b) in enumerate(self.merges):
            if not (0 <= a < len(vocab) and 0 <= b < len(vocab)):
                raise ValueError(f"merge {r} ({a}, {b}) refers to an id that does not exist yet (only {len(vocab)})")
            vocab.append(vocab[a] + vocab[b])
        self.role_tokens: dict[str, str] = {}
        if isinstance(special_tokens, Mapping):
            for role, tok in special_tokens.items():
                if role not in SPECIAL_ROLES:
                    raise ValueError(
                        f"unknown special-token role {role!r}; use one of {', '.join(SPECIAL_ROLES)}, or pass "
                        f"the special tokens as a sequence of strings (e.g. BERT_SPECIAL_TOKENS)"
                    )
                if not isinstance(tok, str) or not tok:
                    raise ValueError(f"special token for {role!r} must be a non-empty string, got {tok!r}")
            for role in SPECIAL_ROLES:  # fixed order, whatever order the mapping had
                if role in special_tokens:
                    tok = special_tokens[role]
                    setattr(self, f"{role}_id", len(vocab))
                    self.role_tokens[role] = tok
                    vocab.append(tok.encode("utf-8"))
            registered: tuple[str, ...] = ()
        else:
            registered = check_special_tokens(special_tokens)
        self._special_tokens = {}
        for tok in registered:
            self._special_tokens[tok] = len(vocab)
            vocab.append(tok.encode("utf-8"))
        for role, i in roles_from_names(self._special_tokens).items():
            setattr(self, f"{role}_id", i)
        self._splitter = SpecialSplitter(self._special_tokens)
        self._vocab = vocab
        self._cache: dict[str, tuple[int, ...]] = {}

    # --- training -------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int,
        *,
        verbose: bool = False,
        trace: Callable[[MergeStep], None] | None = None,
        special_tokens: Sequence[str] | Mapping[str, str] | None = None,
        pattern: str = SPLIT_PATTERN,
    ) -> "BPETokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``text`` (Chapter 2).

        Args:
          text: the training corpus.
          vocab_size: ``V``, the final vocabulary size, bytes and special tokens included.
          verbose: print every merge (``merge 1: 't' + 'h' -> 'th' (count 150) -> vocab 257``).
          trace: called with each :class:`MergeStep` as it is learned.
          special_tokens: e.g. ``BERT_SPECIAL_TOKENS`` (registered, matched by ``encode``) or
            ``{"eos": "<|endoftext|>"}`` (output-only); they take the last ids.
        Raises:
          ValueError: the corpus is empty, ``vocab_size`` is below 256 (+ specials), or the corpus
            runs out of pairs before reaching ``vocab_size`` (the message says how far it gets).
        """
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.train takes the corpus as a str, got {type(text).__name__}")
        if not text:
            raise ValueError("cannot train a BPE tokenizer: the corpus is empty; pass some text")
        if not isinstance(special_tokens, Mapping):
            special_tokens = check_special_tokens(special_tokens)
        n_special = len(special_tokens or ())
        floor = NUM_BYTES + n_special
        if vocab_size < floor:
            extra = f" + {n_special} special tokens" if n_special else ""
            raise ValueError(
                f"vocab_size must be at least {floor} (the 256 byte tokens{extra}), got {vocab_size}; "
                "byte-level BPE can only add tokens to the byte alphabet"
            )
        num_merges = vocab_size - floor
        merges: list[tuple[int, int]] = []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"the corpus holds {e.object[e.start:e.end]!r} at index {e.start}, a lone surrogate that is "
                "not valid Unicode text; fix how the corpus was decoded"
            ) from None
        if num_merges:
            for step in iter_merges(text, pattern):
                merges.append(step.pair)
                if verbose:
                    print(step, flush=True)
                if trace is not None:
                    trace(step)
                if len(merges) == num_merges:
                    break
        if len(merges) < num_merges:
            reachable = NUM_BYTES + len(merges) + n_special
            raise ValueError(
                f"vocab_size={vocab_size} is more than this corpus can fill: after {len(merges)} merges "
                f"no adjacent pair of tokens is left, so it supports at most {reachable} tokens "
                f"(256 bytes + {len(merges)} merges" + (f" + {n_special} special" if n_special else "")
                + f"); use vocab_size <= {reachable} or train on more text"
            )
        return cls(merges, special_tokens=special_tokens, pattern=pattern)

    # --- the Tokenizer interface ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def _encode_chunk(self, chunk: str) -> tuple[int, ...]:
        ids = list(chunk.encode("utf-8"))
        ranks = self._ranks
        while len(ids) >= 2:
            best, best_rank = None, None
            for p in zip(ids, ids[1:]):
                r = ranks.get(p)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = p, r
            if best is None:
                break
            ids = _merge_seq(ids, best[0], best[1], NUM_BYTES + best_rank)
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Text -> ids: split into chunks, then apply the merges to each chunk in rank order.

        Returns a list of ints in ``range(vocab_size)``. A registered special token in the text
        (e.g. ``"[MASK]"``) gives its id; no other special id is ever emitted.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        out: list[int] = []
        cache = self._cache
        parts = self._splitter.split(text) if self._splitter else [text]
        try:
            for part in parts:
                if isinstance(part, int):
                    out.append(part)
                    continue
                for chunk in self._regex.findall(part):
                    ids = cache.get(chunk)
                    if ids is None:
                        ids = self._encode_chunk(chunk)
                        if len(cache) >= _CACHE_LIMIT:
                            cache.clear()
                        cache[chunk] = ids
                    out.extend(ids)
        except UnicodeEncodeError as e:
            raise ValueError(
                f"cannot encode text containing {e.object[e.start:e.end]!r} at index {e.start}: a lone "
                "surrogate is not valid Unicode text; fix the string's decoding"
            ) from None
        return out

    def decode(self, ids: list[int]) -> str:
        """Ids -> text. Lossless for whatever ``encode`` produced; a sequence that cuts a multi-byte
        character in half decodes the partial bytes as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Ids -> the raw bytes they stand for (special tokens as their UTF-8 text)."""
        vocab = self._vocab
        try:
            if any(i < 0 for i in ids):  # a negative index would silently wrap around
                raise IndexError
            return b"".join([vocab[i] for i in ids])
        except (IndexError, TypeError):
            raise bad_id_error(ids, len(vocab)) from None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (e.g. ``b'th'``)."""
        if not 0 <= token_id < len(self._vocab):
            raise bad_id_error([token_id], len(self._vocab))
        return self._vocab[token_id]

    # --- saving -------------------------------------------------------------------------------
    def _to_record(self, directory: Path) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "pattern": self.pattern,
            # a role mapping (output-only tokens) or a list (registered tokens); {} when none
            "special_tokens": list(self._special_tokens) if self._special_tokens else self.role_tokens,
            "merges": [list(p) for p in self.merges],
        }

    @classmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "BPETokenizer":
        try:
            tok = cls(record["merges"], special_tokens=record.get("special_tokens"), pattern=record["pattern"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory} holds a damaged BPE tokenizer record ({e}); save it again") from None
        if "vocab_size" in record and record["vocab_size"] != tok.vocab_size:
            raise ValueError(
                f"{directory}: the record says vocab_size {record['vocab_size']} but its merges give "
                f"{tok.vocab_size}; the file is damaged, save the tokenizer again"
            )
        return tok

