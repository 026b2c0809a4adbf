"""What every tokenizer offers, how tokenizers are saved, and a careful text-file reader (Chapters 1-2).

Chapter 1 gives the model a fixed vocabulary of ``V`` ids (0..V-1) and Chapter 2 turns text into
those ids. Whichever way a tokenizer does that (characters, from-scratch BPE, sentencepiece), it
offers the same small interface, :class:`Tokenizer`, so data pipelines, training and generation never
need to know which kind they hold.

Saving convention: ``tok.save(path)`` treats ``path`` as a **directory**. It creates the directory
(and its parents) if needed and writes ``tokenizer.json`` there, a small JSON record whose ``"kind"``
field names the tokenizer class; a kind that needs more (sentencepiece's ``.model`` file) writes it
next to the record. Training runs keep their tokenizer in ``run_dir/tokenizer/``.
:func:`load_tokenizer` reads the record and returns the right class. ``load`` also accepts the path of
the ``tokenizer.json`` file itself.
"""
from __future__ import annotations

import abc
import json
import operator
import os
from pathlib import Path
from typing import Any, ClassVar

#: file name of the record written into a tokenizer directory
RECORD_NAME = "tokenizer.json"
#: bumped when the record layout changes in a way older readers cannot follow
FORMAT_VERSION = 1

# kind -> class; filled by Tokenizer.__init_subclass__
_REGISTRY: dict[str, type["Tokenizer"]] = {}


class Tokenizer(abc.ABC):
    """The interface shared by all tokenizers: text <-> a list of ids in ``range(vocab_size)``.

    Subclasses set ``kind`` (the name stored in the saved record) and implement ``encode``,
    ``decode``, ``vocab_size``, ``_to_record`` and ``_from_record``.

    Special ids (``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``) are ints, or None when the tokenizer has
    no such token. ``encode`` never adds them: callers that want ``<start>``/``<end>`` markers
    (Chapter 1's ids 1 and 2) add them explicitly, e.g. ``[tok.bos_id, *tok.encode(text)]``.
    """

    kind: ClassVar[str] = ""
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    # --- the core interface -------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text -> ids, each in ``range(vocab_size)``."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Ids -> text. ``decode(encode(text)) == text`` for the text each tokenizer supports."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """``V``: the number of ids; the model's embedding table has ``V`` rows (Chapter 3)."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``; kinds with a faster batched path override it."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for a single string")
        return [self.encode(t) for t in texts]

    # --- saving -------------------------------------------------------------------------------
    @abc.abstractmethod
    def _to_record(self, directory: Path) -> dict[str, Any]:
        """The JSON-able fields of this tokenizer; may also write extra files into ``directory``."""

    @classmethod
    @abc.abstractmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "Tokenizer":
        """Rebuild a tokenizer from the record (and any extra files in ``directory``)."""

    def save(self, path: str | os.PathLike) -> Path:
        """Write this tokenizer into the directory ``path`` (created if missing); returns the directory.

        The directory holds ``tokenizer.json`` plus any files the kind needs. Saving over an earlier
        save of a tokenizer replaces it.
        """
        directory = Path(path)
        if directory.exists() and not directory.is_dir():
            raise ValueError(
                f"cannot save a tokenizer to {directory}: it is a file, and a tokenizer is saved as a "
                "directory; pass a directory path (it will be created)"
            )
        directory.mkdir(parents=True, exist_ok=True)
        record = {"kind": self.kind, "format_version": FORMAT_VERSION}
        record.update(self._to_record(directory))
        tmp = directory / (RECORD_NAME + ".tmp")
        # one top-level field per line, each value compact (a merge list stays one line, not 3 per merge)
        body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in record.items())
        tmp.write_text("{\n" + body + "\n}\n", encoding="utf-8")
        os.replace(tmp, directory / RECORD_NAME)
        return directory

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer saved with :meth:`save` (``path``: its directory or its ``tokenizer.json``).

        Called on a subclass, it checks that the saved kind matches; ``Tokenizer.load`` (or
        :func:`load_tokenizer`) accepts any kind.
        """
        record, directory = _read_record(path)
        kind = record.get("kind")
        target = _REGISTRY.get(kind)
        if target is None:
            known = ", ".join(sorted(_REGISTRY))
            raise ValueError(f"{directory / RECORD_NAME} names an unknown tokenizer kind {kind!r} (known: {known})")
        if cls is not Tokenizer and not issubclass(target, cls):
            raise ValueError(
                f"{directory} holds a {kind!r} tokenizer, not a {cls.kind!r} one; "
                "use tfd_jax.tokenizers.load_tokenizer() to load whatever kind it is"
            )
        return target._from_record(record, directory)

    def fingerprint(self) -> str:
        """A short hash of everything that defines this tokenizer (what :meth:`save` writes):
        equal fingerprints mean the same text gives the same ids. Token files record it, so a
        training run can tell whether they were made with its tokenizer. Computed once per object
        (a tokenizer does not change after it is built)."""
        cached = self.__dict__.get("_fingerprint")
        if cached is not None:
            return cached
        import hashlib
        import tempfile

        h = hashlib.sha256()
        with tempfile.TemporaryDirectory() as d:
            self.save(d)
            for p in sorted(Path(d).rglob("*")):
                if p.is_file():
                    h.update(p.relative_to(d).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
        self.__dict__["_fingerprint"] = h.hexdigest()[:16]
        return self.__dict__["_fingerprint"]

    # --- conveniences -------------------------------------------------------------------------
    def special_ids(self) -> dict[str, int]:
        """The special ids this tokenizer has, e.g. ``{"unk": 0, "bos": 1, "eos": 2, "pad": 3}``."""
        out = {}
        for name in ("pad", "bos", "eos", "unk"):
            value = getattr(self, f"{name}_id")
            if value is not None:
                out[name] = value
        return out

    def __repr__(self) -> str:
        specials = "".join(f", {k}_id={v}" for k, v in self.special_ids().items())
        return f"{type(self).__name__}(vocab_size={self.vocab_size}{specials})"


def _read_record(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    p = Path(path)
    if p.is_dir():
        directory, record_path = p, p / RECORD_NAME
    elif p.name == RECORD_NAME or p.suffix == ".json":
        directory, record_path = p.parent, p
    else:
        directory, record_path = p, p / RECORD_NAME
    if not record_path.is_file():
        if not p.exists():
            raise FileNotFoundError(f"no such tokenizer directory: {p}")
        raise FileNotFoundError(
            f"{p} has no {RECORD_NAME}; pass a directory written by a tokenizer's save() "
            "(e.g. run_dir/tokenizer)"
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record_path} is not a valid tokenizer record ({e}); save the tokenizer again") from None
    if not isinstance(record, dict) or "kind" not in record:
        raise ValueError(f"{record_path} is not a tokenizer record (no 'kind' field); save the tokenizer again")
    version = record.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{record_path} was written by a newer tfd_jax (format {version}, this one reads up to "
            f"{FORMAT_VERSION}); upgrade tfd_jax"
        )
    return record, directory


def bad_id_error(ids: list[int], vocab_size: int) -> ValueError:
    """The error for an id sequence holding an id outside ``range(vocab_size)`` (or a non-integer)."""
    for i in ids:
        try:
            j = operator.index(i)
        except TypeError:
            return ValueError(f"token ids must be integers, got {i!r}")
        if not 0 <= j < vocab_size:
            return ValueError(f"token id {j} is not in this vocabulary (ids are 0..{vocab_size - 1})")
    return ValueError(f"invalid token ids for a vocabulary of {vocab_size}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load any tokenizer saved with ``save`` and return an instance of the right class.

    Args:
      path: the directory given to ``save`` (e.g. ``run_dir/tokenizer``) or its ``tokenizer.json``.
    """
    # importing the package registers every kind, even when only base.py was imported so far
    import tfd_jax.tokenizers  # noqa: F401

    return Tokenizer.load(path)


def read_text_file(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file exactly as it is (no newline translation), with clear errors.

    Raises:
      FileNotFoundError: ``"no such file: PATH"``.
      ValueError: the path is a directory, or the bytes are not valid UTF-8 (the message gives the
        first bad byte and its offset, and what to do).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; pass a text file")
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start]
        raise ValueError(
            f"{p} is not valid UTF-8 (byte 0x{bad:02x} at offset {e.start}); convert it to UTF-8 "
            f"first (e.g. iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8{p.suffix}) or pass a UTF-8 file"
        ) from None
