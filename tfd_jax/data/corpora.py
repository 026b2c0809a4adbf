"""Text corpora: where the training text comes from, split into train and val.

Three sources, one entry point (:func:`load_corpus`):

``"pystdlib"``
    The default corpus, needing no network: the ``.py`` files of the running Python's standard
    library (about 12 MB of real, well-written text for Python 3.11). Tests, ``site-packages`` and
    files that are not valid UTF-8 are left out. The exact text depends on the Python version.
``"tinyshakespeare"``
    The 1.1 MB Shakespeare file used by char-rnn and nanoGPT, downloaded once, checked by md5 and
    cached under ``$TFD_DATA_DIR`` (default ``~/.cache/tfd_jax``).
a path
    A text file, a directory (searched recursively for :data:`TEXT_SUFFIXES`, hidden entries
    skipped) or a glob pattern (``"notes/**/*.txt"``; every matching file, whatever its suffix).

A :class:`Corpus` keeps its **documents** (one per file) so that packing can start each document in
a fresh segment (Chapter 11's training batches), and offers ``.text`` for tokenizer training.

How the split is made:

* one document (a single file, tinyshakespeare): the first 90% of its characters are train, the last
  10% val (nanoGPT's split);
* several documents: whole documents go to val, chosen by a stable hash of their names (``hashlib``,
  so the choice is the same on every machine and every run): the ``val_fraction`` of documents with
  the largest hashes, at least one. Within each split, documents stay in sorted-name order.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import math
import os
import sysconfig
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SPLITS = ("train", "val")

#: suffixes a directory corpus picks up (globs and single files take whatever they name)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
TINYSHAKESPEARE_BYTES = 1_115_394
TINYSHAKESPEARE_FILE = "tinyshakespeare.txt"

# directory names that hold tests (or installed packages) in a standard library tree
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class Document(NamedTuple):
    """One document: ``name`` (a relative path or a label) and its ``text``."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """The documents of one split of a corpus, in a fixed order.

    Attributes:
      spec: what was asked for (``"pystdlib"``, ``"tinyshakespeare"`` or a path/glob).
      split: ``"train"`` or ``"val"``.
      documents: ``(name, text)`` pairs.
    """

    spec: str
    split: str
    documents: tuple[Document, ...]

    @property
    def text(self) -> str:
        """All documents joined by a newline (for training a tokenizer or a quick look)."""
        return "\n".join(doc.text for doc in self.documents)

    @property
    def num_chars(self) -> int:
        return sum(len(doc.text) for doc in self.documents)

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        return f"Corpus({self.spec!r}, split={self.split!r}, documents={len(self)}, chars={self.num_chars})"


# --- the entry point --------------------------------------------------------------------------

def load_corpus(
    spec: str,
    *,
    split: str = "train",
    max_bytes: int | None = None,
    val_fraction: float | None = None,
) -> Corpus:
    """Load one split of a corpus.

    Args:
      spec: ``"pystdlib"``, ``"tinyshakespeare"``, or a file, directory or glob pattern.
      split: ``"train"`` or ``"val"``.
      max_bytes: keep only a prefix of the split of about this many UTF-8 bytes (whole documents,
        the last one cut), for quick runs.
      val_fraction: share of documents that go to val when the corpus has several documents
        (default 0.01 for pystdlib, 0.1 otherwise). Single-document corpora always split 90/10.

    Raises:
      FileNotFoundError: a path that does not exist or a glob that matches nothing.
      ValueError: an unknown split, an empty corpus, or a file that is not UTF-8.
    """
    _check_split(split)
    if spec == "pystdlib":
        docs = pystdlib(split, val_fraction=0.01 if val_fraction is None else val_fraction)
    elif spec == "tinyshakespeare":
        docs = tinyshakespeare(split)
    else:
        docs = _split(local_documents(spec), split, 0.1 if val_fraction is None else val_fraction)
    if max_bytes is not None:
        docs = _take_bytes(docs, max_bytes)
    if not any(doc.text for doc in docs):
        raise ValueError(
            f"the {split} split of corpus {spec!r} is empty; give it more text "
            "(or a larger max_bytes)"
        )
    return Corpus(spec=spec, split=split, documents=tuple(docs))


# --- pystdlib --------------------------------------------------------------------------------

def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(base: Path) -> list[Path]:
    """Relative paths of the library's ``.py`` files, tests and installed packages pruned, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(base)
        found += [rel_dir / f for f in filenames if f.endswith(".py") and not f.startswith("test_")]
    return sorted(found, key=lambda p: p.as_posix())


def pystdlib(split: str = "train", *, root: str | os.PathLike | None = None,
             val_fraction: float = 0.01) -> list[Document]:
    """The standard library's ``.py`` files (no tests, no site-packages) as documents.

    Args:
      split: ``"train"`` or ``"val"`` (whole files; see the module docstring).
      root: the library directory (default: :func:`stdlib_root`); tests pass a small tree.
      val_fraction: share of files that go to val.

    Returns:
      ``[(relative posix path, source text), ...]`` sorted by path.
    """
    _check_split(split)
    base = Path(root) if root is not None else stdlib_root()
    docs = []
    for rel in _stdlib_files(base):
        path = base / rel
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are Latin-1 on purpose; they are not part of this corpus
        docs.append(Document(rel.as_posix(), text))
    if not docs:
        raise ValueError(
            f"found no .py files under {base} (this Python may ship its standard library compiled "
            "only); use the tinyshakespeare corpus or a text file instead"
        )
    return _split_documents(docs, split, val_fraction)


# --- tinyshakespeare -------------------------------------------------------------------------

def data_dir() -> Path:
    """Where downloads are cached: ``$TFD_DATA_DIR``, else ``~/.cache/tfd_jax``."""
    return Path(os.environ.get("TFD_DATA_DIR") or Path.home() / ".cache" / "tfd_jax")


def tinyshakespeare(
    split: str = "train",
    *,
    path: str | os.PathLike | None = None,
    url: str | None = None,
    md5: str | None = TINYSHAKESPEARE_MD5,
    cache_dir: str | os.PathLike | None = None,
) -> list[Document]:
    """Tiny Shakespeare as one document per split: first 90% / last 10% of its characters.

    Args:
      split: ``"train"`` or ``"val"``.
      path: read this local copy instead of downloading (used as is, no checksum).
      url: where to download from (default ``$TFD_TINYSHAKESPEARE_URL``, else char-rnn's copy).
      md5: the expected checksum of the download and of the cached file; None skips the check.
      cache_dir: where the file is cached (default :func:`data_dir`).
    """
    _check_split(split)
    if path is not None:
        text = read_text(path)
    else:
        text = download_tinyshakespeare(url=url, md5=md5, cache_dir=cache_dir).decode("utf-8")
    return _split([Document("tinyshakespeare", text)], split, 0.1)


def download_tinyshakespeare(
    *, url: str | None = None, md5: str | None = TINYSHAKESPEARE_MD5,
    cache_dir: str | os.PathLike | None = None,
) -> bytes:
    """The bytes of Tiny Shakespeare, from the cache or downloaded once and cached.

    The cached copy is used when its md5 matches. A download is checked before it is cached and
    written atomically (a temporary file renamed into place), so an interrupted or corrupt
    download never leaves a bad cache file.
    """
    url = url or os.environ.get("TFD_TINYSHAKESPEARE_URL") or TINYSHAKESPEARE_URL
    target = Path(cache_dir if cache_dir is not None else data_dir()) / TINYSHAKESPEARE_FILE
    if target.is_file():
        data = target.read_bytes()
        if md5 is None or hashlib.md5(data).hexdigest() == md5:
            return data
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(
            f"could not download tinyshakespeare from {url} ({reason}); check the network, set "
            "TFD_TINYSHAKESPEARE_URL to a mirror, or download input.txt yourself and pass its path "
            "as the corpus"
        ) from None
    actual = hashlib.md5(data).hexdigest()
    if md5 is not None and actual != md5:
        raise ValueError(
            f"checksum mismatch for {url}: expected md5 {md5}, got {actual} ({len(data)} bytes); "
            "the download is corrupt or the URL serves a different file. Nothing was cached; "
            "retry, or pass a local copy of the file by path"
        )
    atomic_write_bytes(target, data)
    return data


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- local files -----------------------------------------------------------------------------

def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 file's text, with clear errors for missing files and bad bytes."""
    from tfd_jax.tokenizers.base import read_text_file

    return read_text_file(path)


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def local_documents(spec: str | os.PathLike) -> list[Document]:
    """The documents named by a file path, a directory or a glob pattern, in sorted order.

    A directory is searched recursively for :data:`TEXT_SUFFIXES`, skipping hidden files and
    directories (``.git`` ...). A glob (``**`` allowed) takes every file it matches.
    """
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return [Document(path.name, read_text(path))]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix in TEXT_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(
                f"directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)}); "
                "give a text file instead, or a glob such as 'DIR/**/*.csv' for other kinds of files"
            )
        return [Document(p.relative_to(path).as_posix(), read_text(p)) for p in files]
    if _is_glob(spec):
        files = sorted(p for p in globlib.glob(os.path.expanduser(spec), recursive=True)
                       if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"no such file: the pattern {spec!r} matches no files; check the path")
        return [Document(Path(p).as_posix(), read_text(p)) for p in files]
    raise FileNotFoundError(
        f"no such file or directory: {spec!r}; a corpus is 'pystdlib', 'tinyshakespeare', "
        "a text file, a directory or a glob pattern"
    )


# --- splitting -------------------------------------------------------------------------------

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")


def _split(docs: list[Document], split: str, val_fraction: float) -> list[Document]:
    """One document: 90/10 by characters. Several: whole documents by stable hash."""
    if len(docs) == 1:
        name, text = docs[0]
        cut = int(len(text) * 0.9)
        return [Document(name, text[:cut] if split == "train" else text[cut:])]
    return _split_documents(docs, split, val_fraction)


def _stable_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def _split_documents(docs: list[Document], split: str, val_fraction: float) -> list[Document]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    n_val = min(len(docs) - 1, max(1, math.ceil(len(docs) * val_fraction)))
    by_hash = sorted(docs, key=lambda d: (_stable_hash(d.name), d.name))
    val_names = {d.name for d in by_hash[len(docs) - n_val:]}
    return [d for d in docs if (d.name in val_names) == (split == "val")]


def _take_bytes(docs: list[Document], max_bytes: int) -> list[Document]:
    """Whole documents up to ``max_bytes`` UTF-8 bytes; the last one is cut to fit."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, not {max_bytes}")
    out, left = [], max_bytes
    for name, text in docs:
        data = text.encode("utf-8")
        if len(data) >= left:
            out.append(Document(name, data[:left].decode("utf-8", errors="ignore")))
            break
        out.append(Document(name, text))
        left -= len(data)
    return out
