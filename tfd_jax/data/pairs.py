"""Source/target pairs for encoder-decoder training (Chapter 19, Part 5): a built-in task with a
checkable answer, pair files, and the batches a seq2seq model trains on.

**The built-in task** ``"numbers"``: a number written in digits -> the same number in English words
(``"40213"`` -> ``"forty thousand two hundred thirteen"``), for every number below 100,000. A number
is held out (the ``val`` split) when a hash of it says so (one in ten), so the model is graded on
numbers it never saw; a right answer is checkable character by character.

**Pair files**: JSON lines with ``{"source": ..., "target": ...}`` (or ``"src"``/``"tgt"``) per
line, or TSV lines ``source<TAB>target``. Every tenth pair goes to ``val``.

A pair travels through the run's token files as one document: ``source ids, <sep>, target ids,
</s>`` (:class:`PairEncoder`); :func:`make_pairs_iterator` cuts it back into fixed-shape arrays.
"""
from __future__ import annotations

import json
from pathlib import Path
import grain
import numpy as np

from tfd_jax.data.corpora import Corpus, Document
from tfd_jax.data.pipeline import _per_shard_batch, _read_options, _Tokens, resolve_shard
from tfd_jax.data.tokenized import TokenFile

__all__ = ["BUILTIN_PAIRS", "PairEncoder", "documents_iterator", "is_pairs", "load_pairs", "make_pairs_iterator",
           "number_to_words"]

#: what separates source from target in a pair document's text
SEPARATOR = "\t"
#: built-in tasks by name
BUILTIN_PAIRS = ("numbers",)
NUMBERS_BELOW = 100_000

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_words(n: int) -> str:
    """``0 <= n < 10**9`` in English words, e.g. ``40213`` -> ``"forty thousand two hundred thirteen"``
    (hyphens between tens and ones: ``"seventy-seven"``; no "and")."""
    if not 0 <= n < 10**9:
        raise ValueError(f"number_to_words takes 0 <= n < 10**9, got {n}")

    def below_1000(m: int) -> list[str]:
        words = []
        if m >= 100:
            words += [_ONES[m // 100], "hundred"]
            m %= 100
        if m >= 20:
            words.append(_TENS[m // 10] + (f"-{_ONES[m % 10]}" if m % 10 else ""))
        elif m:
            words.append(_ONES[m])
        return words

    if n == 0:
        return "zero"
    words = []
    for scale, name in ((10**6, "million"), (10**3, "thousand"), (1, "")):
        part = (n // scale) % 1000
        if part:
            words += below_1000(part) + ([name] if name else [])
    return " ".join(words)


def _held_out(n: int) -> bool:
    """One number in ten, spread evenly and fixed forever (a multiplicative hash, not ``n % 10``)."""
    return (n * 2654435761) % 2**32 % 10 == 0


def is_pairs(spec: str) -> bool:
    """Whether ``--data spec`` names pairs (a built-in task or a .jsonl/.tsv file) rather than text."""
    return spec in BUILTIN_PAIRS or Path(spec).suffix.lower() in (".jsonl", ".tsv")


def _read_pair_file(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"pair file {path} does not exist")
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg}); each line must be "
                                 '{"source": "...", "target": "..."}') from None
            src = row.get("source", row.get("src")) if isinstance(row, dict) else None
            tgt = row.get("target", row.get("tgt")) if isinstance(row, dict) else None
            if not isinstance(src, str) or not isinstance(tgt, str):
                raise ValueError(f'{path}:{i}: expected {{"source": "...", "target": "..."}} with two strings')
        else:
            src, sep, tgt = line.partition("\t")
            if not sep:
                raise ValueError(f"{path}:{i}: expected source<TAB>target")
        if SEPARATOR in src or SEPARATOR in tgt:
            raise ValueError(f"{path}:{i}: a source or target holds a tab, which separates them here")
        pairs.append((src, tgt))
    if not pairs:
        raise ValueError(f"pair file {path} holds no pairs")
    return pairs


def load_pairs(spec: str, split: str = "train", *, max_bytes: int | None = None) -> Corpus:
    """One split of a pairs dataset as a :class:`Corpus` whose documents read ``source<TAB>target``.

    Args:
      spec: ``"numbers"`` or a ``.jsonl`` / ``.tsv`` file.
      split: ``"train"`` or ``"val"``.
      max_bytes: keep about this many bytes of pairs (whole pairs).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if spec == "numbers":
        numbers = [n for n in range(NUMBERS_BELOW) if _held_out(n) == (split == "val")]
        order = np.random.default_rng(1234).permutation(len(numbers))  # no order to learn from
        pairs = [(str(numbers[i]), number_to_words(numbers[i])) for i in order]
    elif is_pairs(spec):
        every = _read_pair_file(Path(spec))
        pairs = [p for i, p in enumerate(every) if (i % 10 == 9) == (split == "val")]
        if not pairs:
            raise ValueError(f"{spec} has too few pairs for a {split} split (every tenth pair is held out)")
    else:
        raise ValueError(f"{spec!r} is not a pairs dataset: give {', '.join(BUILTIN_PAIRS)} or a .jsonl/.tsv file")
    docs, size = [], 0
    for k, (src, tgt) in enumerate(pairs):
        docs.append(Document(f"{k}", f"{src}{SEPARATOR}{tgt}"))
        size += len(src) + len(tgt) + 1
        if max_bytes is not None and size >= max_bytes:
            break
    return Corpus(spec=spec, split=split, documents=tuple(docs))


class PairEncoder:
    """Wraps a tokenizer so that ``write_tokens`` stores a pair ``source<TAB>target`` as
    ``encode(source) + [sep_id] + encode(target)`` (``write_tokens`` appends the eos)."""

    def __init__(self, tokenizer, sep_id: int):
        self.tokenizer, self.sep_id = tokenizer, sep_id
        self.vocab_size, self.eos_id = tokenizer.vocab_size, tokenizer.eos_id
        self.kind = tokenizer.kind

    def fingerprint(self) -> str:
        return self.tokenizer.fingerprint()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            src, _, tgt = text.partition(SEPARATOR)
            out.append([*self.tokenizer.encode(src), self.sep_id, *self.tokenizer.encode(tgt)])
        return out


class _ReadPair:
    """Document index -> fixed-shape arrays of one pair (see :func:`make_pairs_iterator`)."""

    def __init__(self, tokens, offsets, src_len, tgt_len, sep_id, pad_id, start_id):
        self.tokens, self.offsets = _Tokens(tokens), np.asarray(offsets, np.int64)
        self.src_len, self.tgt_len = src_len, tgt_len
        self.sep_id, self.pad_id, self.start_id = sep_id, pad_id, start_id

    def __call__(self, doc: int) -> dict[str, np.ndarray]:
        d = np.asarray(self.tokens.array[self.offsets[doc]:self.offsets[doc + 1]], np.int32)
        cut = int(np.argmax(d == self.sep_id)) if (d == self.sep_id).any() else d.size
        src, tgt = d[:cut][: self.src_len], d[cut + 1:][: self.tgt_len]
        out_src = np.full(self.src_len, self.pad_id, np.int32)
        out_src[: src.size] = src
        targets = np.full(self.tgt_len, self.pad_id, np.int32)
        targets[: tgt.size] = tgt
        tgt_in = np.concatenate([[self.start_id], targets[:-1]]).astype(np.int32)
        return {"src": out_src, "src_mask": np.arange(self.src_len) < src.size, "tgt_in": tgt_in,
                "targets": targets, "mask": np.arange(self.tgt_len) < tgt.size}


def make_pairs_iterator(data: TokenFile, *, batch_size: int, src_len: int, tgt_len: int, seed: int, sep_id: int,
                        pad_id: int, start_id: int, shard_index: int | None = None,
                        shard_count: int | None = None) -> grain.DatasetIterator:
    """Batches of pairs, shuffled with ``seed`` and repeated forever; checkpointable like every
    iterator of :mod:`tfd_jax.data.pipeline`.

    Each batch: ``src`` int32 ``[B, S]`` and ``src_mask`` bool ``[B, S]`` (the source, right-padded
    with ``pad_id``); ``tgt_in`` int32 ``[B, T]`` (``start_id`` then the target shifted right),
    ``targets`` int32 ``[B, T]`` (the target and its eos) and ``mask`` bool ``[B, T]`` (True on
    real target tokens). Longer sources and targets are cut at ``S`` and ``T``.
    """
    read = _ReadPair(data.tokens, data.offsets, src_len, tgt_len, sep_id, pad_id, start_id)
    return documents_iterator(data, read, batch_size=batch_size, seed=seed, shard_index=shard_index,
                              shard_count=shard_count)


def documents_iterator(data: TokenFile, read, *, batch_size: int, seed: int, shard_index: int | None = None,
                       shard_count: int | None = None, what: str = "pairs") -> grain.DatasetIterator:
    """Batches of whole documents of ``data`` (one example each), shuffled with ``seed`` and repeated
    forever, checkpointable: ``read(document index) -> dict of fixed-shape arrays`` makes each
    example. Process ``p`` of ``P`` takes every ``P``-th document of the shuffled order."""
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    rows = _per_shard_batch(batch_size, shard_count)
    n = data.num_documents
    if n < batch_size:
        raise ValueError(f"{data.path} holds {n} {what}, fewer than one batch of {batch_size}; use a smaller --batch-size")
    ds = (grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)[shard_index::shard_count]
          .map(read).to_iter_dataset(_read_options()).batch(rows, drop_remainder=True))
    return iter(ds)


def pairs_of(data: TokenFile, sep_id: int, limit: int | None = None) -> list[tuple[list[int], list[int]]]:
    """The first ``limit`` pairs of a token file as (source ids, target ids without the eos)."""
    out: list[tuple[list[int], list[int]]] = []
    eos = data.meta.get("eos_id")
    for d in range(data.num_documents if limit is None else min(limit, data.num_documents)):
        ids = [int(t) for t in data.document(d)]
        cut = ids.index(sep_id) if sep_id in ids else len(ids)
        tgt = ids[cut + 1:]
        if tgt and tgt[-1] == eos:
            tgt = tgt[:-1]
        out.append((ids[:cut], tgt))
    return out
