"""A corpus turned into token ids once, stored on disk, memory-mapped for training (Chapter 2).

Tokenizing is slow next to training on small models, so it happens once. ``write_tokens`` writes
three files next to each other:

``NAME.bin``
    every token id of the split in one flat array, ``uint16`` when the vocabulary fits
    (``vocab_size <= 65536``), else ``uint32`` (nanoGPT's ``train.bin`` is the same layout);
``NAME.offsets.npy``
    ``int64 [D + 1]``: document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``, used by packing;
``NAME.json``
    a small record: dtype, length, number of documents, vocab size, tokenizer kind and
    fingerprint, eos id, and the corpus spec it came from. It is written last, so its presence
    means the files are complete.

If the tokenizer has an ``eos_id``, it is appended to **every** document (the last one too), so a
model trained on the flat stream learns where documents end, and the eos is part of its document's
span in ``offsets``. Without an ``eos_id`` documents are simply concatenated.

``load_tokens`` memory-maps the ``.bin`` file: nothing is read until a batch needs it, so a corpus
larger than memory works.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np

from tfd_jax.data.corpora import Corpus, atomic_write_bytes

#: version of the sidecar record layout
FORMAT_VERSION = 1


class TokenizerLike(Protocol):
    """What tokenizing needs from a tokenizer (any of ``tfd_jax.tokenizers``)."""

    vocab_size: int
    eos_id: int | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class TokenFile:
    """A tokenized split.

    Attributes:
      tokens: ``[N]`` token ids (a read-only memory map, uint16 or uint32).
      offsets: ``int64 [D + 1]`` document boundaries; ``offsets[0] == 0``, ``offsets[-1] == N``.
      meta: the JSON record (``vocab_size``, ``tokenizer``, ``eos_id``, ``source`` ...).
      path: the ``.bin`` file.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_documents(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def vocab_size(self) -> int | None:
        return self.meta.get("vocab_size")

    def document(self, d: int) -> np.ndarray:
        """The tokens of document ``d`` (its eos included, if any)."""
        return self.tokens[self.offsets[d]:self.offsets[d + 1]]


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id ``0..vocab_size-1`` fits in 16 bits, else ``uint32``."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, not {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint32")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``NAME.bin``, ``NAME.offsets.npy``, ``NAME.json`` for a path given with or without ``.bin``."""
    p = Path(path)
    if p.suffix in (".bin", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".offsets.npy"), p.with_name(p.name + ".json")


def _batches(texts: list[str], max_chars: int = 1 << 20) -> Iterable[list[str]]:
    """Group documents into lists of about ``max_chars`` characters for ``encode_batch``."""
    group, size = [], 0
    for text in texts:
        group.append(text)
        size += len(text)
        if size >= max_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def write_tokens(
    corpus: Corpus,
    tokenizer: TokenizerLike,
    path: str | os.PathLike,
    *,
    progress: bool = True,
) -> TokenFile:
    """Tokenize every document of ``corpus`` and write ``path`` (``.bin``, ``.offsets.npy``, ``.json``).

    Args:
      corpus: documents from :func:`tfd_jax.data.load_corpus`.
      tokenizer: anything with ``encode_batch``, ``vocab_size`` and ``eos_id``.
      path: the output name, e.g. ``out/train`` or ``out/train.bin``; its directory is created.
      progress: show a progress bar (characters tokenized) on stderr.

    Returns:
      the written file, loaded back with :func:`load_tokens`.
    """
    from tqdm.auto import tqdm

    bin_path, offsets_path, meta_path = _paths(path)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    vocab_size = int(tokenizer.vocab_size)
    dtype = token_dtype(vocab_size)
    eos = getattr(tokenizer, "eos_id", None)
    texts = [doc.text for doc in corpus.documents]

    offsets = [0]
    fd, tmp = tempfile.mkstemp(dir=bin_path.parent, prefix=bin_path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f, tqdm(
            total=sum(len(t) for t in texts), unit="char", unit_scale=True,
            desc=f"tokenizing {corpus.split}", disable=not progress, leave=False,
        ) as bar:
            for group in _batches(texts):
                for ids in tokenizer.encode_batch(group):
                    if eos is not None:
                        ids = [*ids, eos]
                    arr = np.asarray(ids, dtype=np.int64)
                    bad = arr[(arr < 0) | (arr >= vocab_size)]
                    if bad.size:
                        raise ValueError(
                            f"the tokenizer produced id {int(bad[0])} outside 0..{vocab_size - 1}; "
                            "its vocab_size does not cover its ids"
                        )
                    f.write(arr.astype(dtype).tobytes())
                    offsets.append(offsets[-1] + arr.size)
                bar.update(sum(len(t) for t in group))
            f.flush()
            os.fsync(f.fileno())
        if offsets[-1] == 0:
            raise ValueError(
                f"the {corpus.split} split of {corpus.spec!r} produced no tokens; give it more text"
            )
        os.replace(tmp, bin_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

    offsets_arr = np.asarray(offsets, dtype=np.int64)
    buf = _npy_bytes(offsets_arr)
    atomic_write_bytes(offsets_path, buf)
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "length": int(offsets_arr[-1]),
        "num_documents": len(offsets) - 1,
        "vocab_size": vocab_size,
        "tokenizer": getattr(tokenizer, "kind", type(tokenizer).__name__),
        "tokenizer_fingerprint": tokenizer.fingerprint() if hasattr(tokenizer, "fingerprint") else None,
        "eos_id": eos,
        "eos_between_documents": eos is not None,
        "source": corpus.spec,
        "split": corpus.split,
        "offsets_file": offsets_path.name,
    }
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return load_tokens(bin_path)


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def load_tokens(path: str | os.PathLike, split: str | None = None) -> TokenFile:
    """Memory-map a split written by :func:`write_tokens`.

    Args:
      path: ``DIR`` (with ``split``), or ``DIR/train``, ``DIR/train.bin`` or ``DIR/train.json``.
      split: ``"train"`` or ``"val"`` when ``path`` is the directory.
    """
    p = Path(path)
    if p.is_dir():
        p = p / (split or "train")
    bin_path, offsets_path, meta_path = _paths(p)
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"no such token file: {meta_path} is missing; run `tfd-jax data prepare --corpus ... "
            f"--tokenizer ... --out {bin_path.parent}` first"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        length = int(meta["length"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_path} is not a token-file record ({e}); prepare the data again") from None
    if not bin_path.is_file() or bin_path.stat().st_size != length * dtype.itemsize:
        raise ValueError(
            f"{bin_path} does not hold the {length} {dtype.name} tokens {meta_path.name} describes; "
            "prepare the data again"
        )
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(length,))
    if offsets_path.is_file():
        offsets = np.load(offsets_path, allow_pickle=False)
    else:  # no boundaries recorded: one document
        offsets = np.asarray([0, length], dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != length or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{offsets_path} does not match {bin_path}; prepare the data again")
    return TokenFile(tokens=tokens, offsets=offsets, meta=meta, path=bin_path)


def check_tokenizer(tf: TokenFile, tokenizer) -> None:
    """Raise ``ValueError`` (naming the file) if ``tf`` was not made with ``tokenizer``.

    Compares the recorded fingerprint (:meth:`Tokenizer.fingerprint`); files from before
    fingerprints were recorded are compared by kind, vocabulary size and eos id.
    """
    meta = tf.meta
    recorded = meta.get("tokenizer_fingerprint")
    if recorded is not None and hasattr(tokenizer, "fingerprint"):
        same = recorded == tokenizer.fingerprint()
    else:
        same = (meta.get("vocab_size") == tokenizer.vocab_size
                and meta.get("eos_id") == getattr(tokenizer, "eos_id", None)
                and meta.get("tokenizer") in (None, getattr(tokenizer, "kind", None)))
    if not same:
        theirs = f"{meta.get('tokenizer')}, {meta.get('vocab_size')} tokens"
        ours = f"{getattr(tokenizer, 'kind', type(tokenizer).__name__)}, {tokenizer.vocab_size} tokens"
        raise ValueError(
            f"{tf.path} was made with another tokenizer ({theirs}) than this one ({ours}); its ids mean "
            "other things: prepare it again with this tokenizer"
        )


def identity(tf: TokenFile) -> dict[str, Any]:
    """What a training run records about its token files, to tell later whether they changed."""
    meta = tf.meta
    return {"tokens": tf.num_tokens, "documents": tf.num_documents, "source": meta.get("source"),
            "tokenizer_fingerprint": meta.get("tokenizer_fingerprint")}
