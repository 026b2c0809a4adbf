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

Special tokens (Chapter 1's ``<start>``/``<end>``, BERT's ``[CLS]`` ``[SEP]`` ``[MASK]``): every kind
can register special tokens, strings with ids of their own (``tok.special_tokens``, text -> id).
``encode`` turns a registered string found in the text into its id (as Hugging Face tokenizers do)
and never adds a token by itself; ``decode`` writes a special id as its text. Roles (``pad_id``,
``bos_id``, ``eos_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``) say which id does which job;
for tokens given by name they follow the name (:func:`special_token_role`).

:func:`load_tokenizer` also reads a Hugging Face model directory (``vocab.json`` + ``merges.txt``,
``tokenizer.model``/``spiece.model``, ``vocab.txt``, or a Hugging Face ``tokenizer.json``; see
:mod:`tfd_jax.tokenizers.hf`) when the directory holds no record of ours. Hugging Face's
``tokenizer.json`` has the same file name as our record; the two are told apart by content: ours has
a ``"kind"`` field.
"""
from __future__ import annotations

import abc
import json
import operator
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

#: file name of the record written into a tokenizer directory
RECORD_NAME = "tokenizer.json"
#: bumped when the record layout changes in a way older readers cannot follow
FORMAT_VERSION = 1

#: the special tokens of a BERT-style model (masked language modelling), in BERT's order
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: the roles a special id can have, in the order :meth:`Tokenizer.special_ids` lists them
SPECIAL_ROLES = ("pad", "bos", "eos", "unk", "cls", "sep", "mask")
# token text -> role, for special tokens given by name (BERT's, sentencepiece's and GPT's conventions)
_ROLE_OF_NAME = {
    "[PAD]": "pad", "<pad>": "pad", "<|pad|>": "pad",
    "[UNK]": "unk", "<unk>": "unk",
    "[CLS]": "cls", "<cls>": "cls",
    "[SEP]": "sep", "<sep>": "sep",
    "[MASK]": "mask", "<mask>": "mask",
    "[BOS]": "bos", "<s>": "bos", "<bos>": "bos", "<|startoftext|>": "bos", "<|begin_of_text|>": "bos",
    "[EOS]": "eos", "</s>": "eos", "<eos>": "eos", "<|endoftext|>": "eos", "<|end_of_text|>": "eos",
}

# kind -> class; filled by Tokenizer.__init_subclass__
_REGISTRY: dict[str, type["Tokenizer"]] = {}


class Tokenizer(abc.ABC):
    """The interface shared by all tokenizers: text <-> a list of ids in ``range(vocab_size)``.

    Subclasses set ``kind`` (the name stored in the saved record) and implement ``encode``,
    ``decode``, ``vocab_size``, ``_to_record`` and ``_from_record``.

    Special ids (``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``) are
    ints, or None when the tokenizer has no such token. ``encode`` never adds them: callers that want
    ``<start>``/``<end>`` markers (Chapter 1's ids 1 and 2) add them explicitly, e.g.
    ``[tok.bos_id, *tok.encode(text)]``; a BERT input is ``[tok.cls_id, *ids, tok.sep_id]``.

    ``special_tokens`` maps each registered special-token string to its id; ``encode`` turns such a
    string inside the text into that id. It is empty for a tokenizer made without special tokens.
    """

    kind: ClassVar[str] = ""
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    mask_id: int | None = None
    # registered special tokens (text -> id); kinds that have some set it in __init__
    _special_tokens: dict[str, int] = {}

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

    # --- special tokens ------------------------------------------------------------------------
    @property
    def special_tokens(self) -> dict[str, int]:
        """The registered special tokens, text -> id (e.g. ``{"[PAD]": 256, ..., "[MASK]": 260}``);
        ``{}`` when there are none. ``encode`` maps these strings in the text to their ids."""
        return dict(self._special_tokens)

    def special_ids(self) -> dict[str, int]:
        """The roles this tokenizer has ids for, e.g. ``{"unk": 0, "bos": 1, "eos": 2, "pad": 3}``
        (roles among pad, bos, eos, unk, cls, sep, mask)."""
        out = {}
        for name in SPECIAL_ROLES:
            value = getattr(self, f"{name}_id")
            if value is not None:
                out[name] = value
        return out

    def with_special_tokens(self, tokens: Iterable[str]) -> "Tokenizer":
        """A copy that also registers ``tokens`` (those it lacks) as special tokens, with new ids
        after the last one (a model reading it needs that many more embedding rows). Only
        tokenizers read from a Hugging Face directory (byte-level BPE) can grow; the others take
        their special tokens when they are trained."""
        missing = [t for t in tokens if t not in self.special_tokens]
        if not missing:
            return self
        raise ValueError(f"a {type(self).__name__} cannot add the special tokens {missing} after training; "
                         "train it with them (special_tokens=...)")

    def all_special_ids(self) -> list[int]:
        """Every special id, sorted: the role ids and the registered special tokens. A masked
        language model never masks (or predicts) these."""
        return sorted(set(self.special_ids().values()) | set(self._special_tokens.values()))

    # --- conveniences -------------------------------------------------------------------------
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

    A directory that holds no record of ours but Hugging Face tokenizer files (``vocab.json`` +
    ``merges.txt``, ``tokenizer.model``, ``spiece.model``, ``vocab.txt``, or Hugging Face's own
    ``tokenizer.json``) is read with :func:`tfd_jax.tokenizers.hf.load_hf_tokenizer`.

    Args:
      path: the directory given to ``save`` (e.g. ``run_dir/tokenizer``) or its ``tokenizer.json``;
        or a Hugging Face model directory.
    """
    # importing the package registers every kind, even when only base.py was imported so far
    import tfd_jax.tokenizers  # noqa: F401
    from tfd_jax.tokenizers import hf

    p = Path(path)
    directory = p.parent if (p.is_file() and p.name == RECORD_NAME) else p
    if directory.is_dir() and not is_our_record(directory / RECORD_NAME) and hf.has_hf_files(directory):
        return hf.load_hf_tokenizer(directory)
    if p.is_dir() and not (p / RECORD_NAME).exists():
        raise FileNotFoundError(
            f"{p} has no {RECORD_NAME} (a tokenizer record of ours) and none of the Hugging Face tokenizer "
            f"files ({hf.LOOKED_FOR}); pass a directory written by a tokenizer's save() (e.g. "
            "run_dir/tokenizer) or a Hugging Face model directory"
        )
    return Tokenizer.load(path)


def is_our_record(path: Path) -> bool:
    """Whether ``path`` is a tokenizer record written by :meth:`Tokenizer.save` (a JSON object with a
    ``"kind"`` field), as opposed to a missing file or Hugging Face's file of the same name."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        # our records put "kind" first; Hugging Face's tokenizer.json starts with "version"
        if b'"kind"' in head:
            record = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(record, dict) and "kind" in record
        return False
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False


def special_token_role(text: str) -> str | None:
    """The role a special token plays judging by its name: ``"[MASK]"`` -> ``"mask"``, ``"<s>"`` ->
    ``"bos"``, ``"<|endoftext|>"`` -> ``"eos"``; None for a name with no known role."""
    return _ROLE_OF_NAME.get(text)


def check_special_tokens(tokens: Iterable[str] | None) -> tuple[str, ...]:
    """Validate a sequence of special-token strings (distinct, non-empty) and return it as a tuple."""
    if tokens is None:
        return ()
    if isinstance(tokens, str):
        raise TypeError(
            f"special_tokens takes a sequence of strings, got the single string {tokens!r}; "
            f"write special_tokens=({tokens!r},)"
        )
    out = tuple(tokens)
    for t in out:
        if not isinstance(t, str) or not t:
            raise ValueError(f"a special token must be a non-empty string, got {t!r}")
    dup = [t for t in out if out.count(t) > 1]
    if dup:
        raise ValueError(f"special token {dup[0]!r} is listed twice; list each special token once")
    return out


def roles_from_names(special_tokens: Mapping[str, int]) -> dict[str, int]:
    """Role -> id for the special tokens whose names have a role (the first token wins a role)."""
    roles: dict[str, int] = {}
    for text, i in special_tokens.items():
        role = special_token_role(text)
        if role is not None and role not in roles:
            roles[role] = i
    return roles


class SpecialSplitter:
    """Cuts text at registered special tokens, as Hugging Face's added-token matching does.

    ``split(text)`` returns a list of plain-text pieces (str) and special ids (int), in order. The
    longest token wins where several match at the same place, the leftmost match first. Tokens in
    ``lstrip``/``rstrip`` also swallow the whitespace on their left/right (Hugging Face's
    ``AddedToken(lstrip=True)``, e.g. RoBERTa's ``<mask>``).
    """

    def __init__(self, tokens: Mapping[str, int], lstrip: Iterable[str] = (), rstrip: Iterable[str] = ()):
        self.tokens = dict(tokens)
        self.lstrip = frozenset(lstrip)
        self.rstrip = frozenset(rstrip)
        ordered = sorted(self.tokens, key=lambda t: (-len(t), t))
        self._regex = re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def split(self, text: str) -> list[str | int]:
        """Plain-text pieces (str) and special ids (int), in order."""
        return [part for _, part in self.spans(text)]

    def spans(self, text: str) -> list[tuple[int, str | int]]:
        """Like :meth:`split`, each part with the index in ``text`` where it starts."""
        if self._regex is None:
            return [(0, text)] if text else []
        out: list[tuple[int, str | int]] = []
        pos, n = 0, len(text)
        while pos <= n:
            m = self._regex.search(text, pos)
            if m is None:
                break
            tok = m.group()
            start, end = m.start(), m.end()
            if tok in self.lstrip:
                while start > pos and text[start - 1].isspace():
                    start -= 1
            if tok in self.rstrip:
                while end < n and text[end].isspace():
                    end += 1
            if start > pos:
                out.append((pos, text[pos:start]))
            out.append((start, self.tokens[tok]))
            pos = end
        if pos < n:
            out.append((pos, text[pos:]))
        return out


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
