"""SentencePiece tokenizers, trained in-process (Chapter 2 at production scale).

The from-scratch :mod:`tfd_jax.tokenizers.bpe` shows the algorithm; for real runs this wraps the
``sentencepiece`` library (BPE or unigram), which trains fast in C++ and encodes in parallel.

Settings chosen so that text (prose or code) comes back exactly as it went in:

* ``normalization_rule_name="identity"``, ``remove_extra_whitespaces=False``,
  ``add_dummy_prefix=False``: no Unicode normalisation, no collapsing or adding of spaces.
* ``allow_whitespace_only_pieces=True``: runs of spaces (code indentation) can become single pieces.
* ``byte_fallback=True``: a character with no piece of its own is encoded as its UTF-8 bytes
  (pieces ``<0x00>``..``<0xFF>``), so there is no unknown token in practice.
* ``"\\n"`` is a user-defined piece. SentencePiece trains on sentences (lines), so the corpus is split at
  newlines for training, and the ``"\\n"`` piece carries newlines through encode and decode.
* ``split_digits=True`` (each digit its own piece) by default.

Special ids: ``unk_id=0``, ``bos_id=1``, ``eos_id=2``, ``pad_id=3`` (Chapter 1 uses 0/1/2 for
pad/start/end; sentencepiece wants unk somewhere, and 0 is its convention). ``encode`` never adds
them; ``decode`` drops bos/eos/pad and writes unk as ``" ⁇ "``.

Registered special tokens (``train(..., special_tokens=BERT_SPECIAL_TOKENS)``) live in the model
itself: a token whose name has one of sentencepiece's own roles (``[UNK]``, ``[PAD]``, ``<s>``,
``</s>``) becomes that piece (so ``[UNK]`` is id 0 and ``[PAD]`` id 3), the others (``[CLS]``,
``[SEP]``, ``[MASK]``) are user-defined symbols right after them, before ``"\n"``. For
``BERT_SPECIAL_TOKENS``: ``[UNK]`` 0, ``<s>`` 1, ``</s>`` 2, ``[PAD]`` 3, ``[CLS]`` 4, ``[SEP]`` 5,
``[MASK]`` 6, ``"\n"`` 7, then the byte pieces. With registered tokens, ``encode`` turns each of those
strings in the text into its id, and ``decode`` writes them as their text (bos/eos/pad that are not
registered still vanish).

Known limit: SentencePiece uses U+2581 (``▁``) to stand for a space, so a literal ``▁`` in the input
text decodes as a space.
"""
from __future__ import annotations

import io
import operator
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import sentencepiece

from tfd_jax.tokenizers.base import (
    SPECIAL_ROLES,
    SpecialSplitter,
    Tokenizer,
    bad_id_error,
    check_special_tokens,
    read_text_file,
    roles_from_names,
    special_token_role,
)

MODEL_FILE = "spm.model"
#: training sentences longer than this many characters are cut into pieces (sentencepiece skips
#: sentences longer than ``max_sentence_length`` bytes; 4 bytes per character is the UTF-8 maximum)
_MAX_CHARS = 4096
_MAX_BYTES = 4 * _MAX_CHARS
MODEL_TYPES = ("bpe", "unigram")
#: where a model with ``add_dummy_prefix`` puts its leading space when the text is cut at special
#: tokens (Hugging Face's Metaspace ``prepend_scheme``): ``"first"`` only before the text that starts
#: the input, ``"always"`` before every piece of text, ``"never"`` nowhere
PREPEND_SCHEMES = ("first", "always", "never")
# the roles sentencepiece itself has pieces for
_SPM_ROLES = ("unk", "bos", "eos", "pad")


# --- a little of the protobuf wire format, to read/flip NormalizerSpec.add_dummy_prefix ------------
def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(field number, wire type, the field's raw bytes, its payload) for each field of a message."""
    i, n = 0, len(data)
    while i < n:
        start = i
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            payload = _put_varint(value)
        elif wire == 1:
            payload, i = data[i : i + 8], i + 8
        elif wire == 2:
            length, i = _varint(data, i)
            payload, i = data[i : i + length], i + length
        elif wire == 5:
            payload, i = data[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, data[start:i], payload


_NORMALIZER_SPEC, _ADD_DUMMY_PREFIX = 3, 3  # ModelProto.normalizer_spec, NormalizerSpec.add_dummy_prefix


def _adds_dummy_prefix(proto: bytes) -> bool:
    """Whether the model puts a ``▁`` before the text (NormalizerSpec.add_dummy_prefix, default true)."""
    value = True
    for number, wire, _, payload in _fields(proto):
        if number == _NORMALIZER_SPEC and wire == 2:
            for n2, w2, _, p2 in _fields(payload):
                if n2 == _ADD_DUMMY_PREFIX and w2 == 0:
                    value = bool(_varint(p2, 0)[0])
    return value


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The same model with ``add_dummy_prefix`` switched off."""
    out = bytearray()
    for number, wire, raw, payload in _fields(proto):
        if number == _NORMALIZER_SPEC and wire == 2:
            spec = b"".join(r for n2, _, r, _ in _fields(payload) if n2 != _ADD_DUMMY_PREFIX)
            spec += _put_varint(_ADD_DUMMY_PREFIX << 3) + b"\x00"
            out += _put_varint(_NORMALIZER_SPEC << 3 | 2) + _put_varint(len(spec)) + spec
        else:
            out += raw
    return bytes(out)


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), _MAX_CHARS):
                yield line[start : start + _MAX_CHARS]


def _corpus_texts(text_or_files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(text_or_files, str):
        return [text_or_files]
    if isinstance(text_or_files, os.PathLike):
        return [read_text_file(text_or_files)]
    if isinstance(text_or_files, (list, tuple)):
        return [read_text_file(p) for p in text_or_files]
    raise TypeError(
        "text_or_files must be the corpus as a str, a path (pathlib.Path), or a list of paths; "
        f"got {type(text_or_files).__name__}"
    )


def _clean_message(msg: str) -> str:
    """Strip sentencepiece's ``INTERNAL: src/x.cc(123) [condition]`` prefix from an error message."""
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\]\s*", "", msg).strip()


class SentencePieceTokenizer(Tokenizer):
    """A trained sentencepiece model behind the :class:`Tokenizer` interface (Chapter 2).

    Args:
      model_proto: the serialized model (the bytes of a ``.model`` file).
      special_tokens: registered special tokens, text -> id: a piece of the model (``"<s>"`` -> 1), or
        an id past the model's pieces (Hugging Face's added tokens, e.g. T5's ``<extra_id_0>``; these
        must take the ids right after the pieces). ``None``: none.
      roles: role -> id (roles among pad, bos, eos, unk, cls, sep, mask) when given; otherwise
        sentencepiece's own unk/bos/eos/pad ids, plus the roles of the registered tokens' names.
      prepend_scheme: with registered tokens in the text, where a model that adds a leading ``▁``
        adds it (see ``PREPEND_SCHEMES``; Hugging Face's Llama tokenizers use ``"first"``).
    """

    kind = "spm"

    def __init__(
        self,
        model_proto: bytes,
        special_tokens: Mapping[str, int] | None = None,
        roles: Mapping[str, int | None] | None = None,
        prepend_scheme: str = "first",
    ):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"not a valid sentencepiece model ({_clean_message(str(e))})") from None
        self._model_proto = bytes(model_proto)
        for name in ("pad", "bos", "eos", "unk"):
            value = getattr(self.sp, f"{name}_id")()
            setattr(self, f"{name}_id", value if value >= 0 else None)
        if prepend_scheme not in PREPEND_SCHEMES:
            raise ValueError(f"prepend_scheme must be one of {', '.join(PREPEND_SCHEMES)}, got {prepend_scheme!r}")
        self.prepend_scheme = prepend_scheme
        # whether special tokens / roles were given (then the record keeps them)
        self._explicit = special_tokens is not None or roles is not None
        n_pieces = self.sp.get_piece_size()
        self._special_tokens = {}
        self._extra: dict[int, str] = {}  # ids past the model's pieces -> their text
        for text, i in (special_tokens or {}).items():
            if not isinstance(text, str) or not text:
                raise ValueError(f"a special token must be a non-empty string, got {text!r}")
            try:
                i = operator.index(i)
            except TypeError:
                raise ValueError(f"special token {text!r} needs an integer id, got {i!r}") from None
            if i < 0:
                raise ValueError(f"special token {text!r} has the negative id {i}")
            if i < n_pieces and self.sp.id_to_piece(i) != text:
                raise ValueError(
                    f"special token {text!r} has id {i}, but that id is the model's piece "
                    f"{self.sp.id_to_piece(i)!r}; give it the id of its own piece or one past the "
                    f"model's {n_pieces} pieces"
                )
            self._special_tokens[text] = i
            if i >= n_pieces:
                self._extra[i] = text
        if self._extra and sorted(self._extra) != list(range(n_pieces, n_pieces + len(self._extra))):
            raise ValueError(
                f"the special tokens past the model's {n_pieces} pieces must take the ids right after them "
                f"({n_pieces}, {n_pieces + 1}, ...), got {sorted(self._extra)}"
            )
        if roles is not None:
            for role in SPECIAL_ROLES:
                setattr(self, f"{role}_id", None)
            for role, i in roles.items():
                if role not in SPECIAL_ROLES:
                    raise ValueError(f"unknown special-token role {role!r}; use one of {', '.join(SPECIAL_ROLES)}")
                if i is not None and not 0 <= i < self.vocab_size:
                    raise ValueError(f"the {role} id {i} is not in this vocabulary (ids are 0..{self.vocab_size - 1})")
                setattr(self, f"{role}_id", i)
        else:
            for role, i in roles_from_names(self._special_tokens).items():
                if role not in _SPM_ROLES:  # sentencepiece's own ids stay as the model says
                    setattr(self, f"{role}_id", i)
        self._splitter = SpecialSplitter(self._special_tokens)
        # a model that adds a leading "▁" needs a twin without it for text after a special token
        self._sp_plain = self.sp
        if self._special_tokens and _adds_dummy_prefix(self._model_proto):
            self._sp_plain = sentencepiece.SentencePieceProcessor(
                model_proto=_without_dummy_prefix(self._model_proto)
            )

    @classmethod
    def train(
        cls,
        text_or_files: str | os.PathLike | Sequence[str | os.PathLike],
        vocab_size: int,
        *,
        model_type: str = "bpe",
        split_digits: bool = True,
        character_coverage: float = 0.9995,
        verbose: bool = False,
        num_threads: int | None = None,
        special_tokens: Sequence[str] | None = None,
        **options: Any,
    ) -> "SentencePieceTokenizer":
        """Train a sentencepiece model in memory (no files left behind).

        Args:
          text_or_files: the corpus as a ``str``; or a ``pathlib.Path``; or a list/tuple of file
            paths (UTF-8 text). A plain ``str`` is always the text itself, never a path.
          vocab_size: ``V``, including the 4 special pieces, ``"\\n"`` and the 256 byte pieces; so it
            must be at least about 261 + the number of distinct characters kept.
          model_type: ``"bpe"`` or ``"unigram"``.
          split_digits: make every digit its own piece.
          character_coverage: share of characters given their own piece; the rest use bytes.
          verbose: show sentencepiece's training log.
          special_tokens: optional special-token strings, e.g. ``BERT_SPECIAL_TOKENS``; they become
            pieces of the model (see the module docstring for their ids) and count in ``vocab_size``.
          options: passed on to ``sentencepiece.SentencePieceTrainer.train`` (e.g.
            ``input_sentence_size``, ``max_sentencepiece_length``).
        Raises:
          ValueError: empty corpus, unknown model type, or a vocab size the corpus cannot fill (or
            too small for its characters); the message says which sizes would work.
        """
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        texts = _corpus_texts(text_or_files)
        if not any(t.replace("\n", "") for t in texts):
            raise ValueError(
                "cannot train a sentencepiece tokenizer: the corpus is empty (no text besides newlines); "
                "pass some text"
            )
        model = io.BytesIO()
        settings = dict(
            model_type=model_type,
            vocab_size=vocab_size,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            byte_fallback=True,
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=split_digits,
            character_coverage=character_coverage,
            max_sentence_length=_MAX_BYTES,
            num_threads=num_threads or min(os.cpu_count() or 1, 16),
            minloglevel=0 if verbose else 2,
        )
        registered = check_special_tokens(special_tokens)
        if registered:
            user_defined = []
            for t in registered:
                role = special_token_role(t)
                if role in _SPM_ROLES and f"{role}_piece" not in settings:
                    settings[f"{role}_piece"] = t
                else:
                    user_defined.append(t)
            settings["user_defined_symbols"] = user_defined + ["\n"]
        for key, value in options.items():
            if key == "user_defined_symbols" and registered:
                extra = [value] if isinstance(value, str) else list(value)
                settings[key] = settings[key] + [v for v in extra if v not in settings[key]]
            else:
                settings[key] = value
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=_sentences(texts), model_writer=model, **settings
            )
        except RuntimeError as e:
            raise _training_error(str(e), vocab_size, model_type) from None
        proto = model.getvalue()
        if not registered:
            return cls(proto)
        sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        return cls(proto, special_tokens={t: sp.piece_to_id(t) for t in registered})

    # --- the Tokenizer interface ----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self._extra)

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no bos/eos added; a registered special token in the text gives its id)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if not self._splitter:
            return self.sp.encode(text, out_type=int)
        out: list[int] = []
        scheme = self.prepend_scheme
        for start, part in self._splitter.spans(text):
            if isinstance(part, int):
                out.append(part)
            else:
                # as Hugging Face's Metaspace: no "▁" is added before text that starts with a space
                prefixed = (scheme == "always" or (scheme == "first" and start == 0)) and not part.startswith((" ", "▁"))
                out.extend((self.sp if prefixed else self._sp_plain).encode(part, out_type=int))
        return out

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (in parallel inside sentencepiece)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for a single string")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch takes a list of strings")
        if self._splitter:
            return [self.encode(t) for t in texts]
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        """Ids -> text; bos/eos/pad ids produce nothing, unk gives ``" ⁇ "``, and a registered special
        token gives its text."""
        try:
            clean = [operator.index(i) for i in ids]
        except TypeError:
            raise bad_id_error(ids, self.vocab_size) from None
        if not self._special_tokens:
            try:
                return self.sp.decode(clean)
            except IndexError:
                raise bad_id_error(clean, self.vocab_size) from None
        if any(not 0 <= i < self.vocab_size for i in clean):
            raise bad_id_error(clean, self.vocab_size)
        texts = {i: t for t, i in self._special_tokens.items()}
        out: list[str] = []
        run: list[int] = []
        run_start = 0

        def flush() -> None:
            if run:
                # only the text that starts the output loses the model's leading space
                first = run_start == 0 and self.prepend_scheme != "never"
                out.append((self.sp if first else self._sp_plain).decode(run))
                run.clear()

        for k, i in enumerate(clean):
            if i in texts:
                flush()
                out.append(texts[i])
            else:
                if not run:
                    run_start = k
                run.append(i)
        flush()
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        """The piece text of one id (spaces shown as ``▁``, bytes as ``<0xE2>``)."""
        if not 0 <= token_id < self.vocab_size:
            raise bad_id_error([token_id], self.vocab_size)
        if token_id in self._extra:
            return self._extra[token_id]
        return self.sp.id_to_piece(token_id)

    @property
    def model_proto(self) -> bytes:
        """The serialized model (what ``save`` writes to ``spm.model``)."""
        return self._model_proto

    # --- saving -------------------------------------------------------------------------------
    def _to_record(self, directory: Path) -> dict[str, Any]:
        (directory / MODEL_FILE).write_bytes(self._model_proto)
        record = {"vocab_size": self.vocab_size, "model_file": MODEL_FILE, **self.special_ids()}
        if self._explicit:
            # the roles above are then read back as they are, not taken from the model
            record["special_tokens"] = self._special_tokens
            record["prepend_scheme"] = self.prepend_scheme
        return record

    @classmethod
    def _from_record(cls, record: dict[str, Any], directory: Path) -> "SentencePieceTokenizer":
        model_path = directory / record.get("model_file", MODEL_FILE)
        if not model_path.is_file():
            raise FileNotFoundError(
                f"{directory} is a sentencepiece tokenizer but its model file {model_path.name} is missing; "
                "copy the whole tokenizer directory or save it again"
            )
        kwargs: dict[str, Any] = {}
        if "special_tokens" in record:
            kwargs = dict(
                special_tokens=record["special_tokens"],
                roles={r: record[r] for r in SPECIAL_ROLES if record.get(r) is not None},
                prepend_scheme=record.get("prepend_scheme", "first"),
            )
        try:
            return cls(model_path.read_bytes(), **kwargs)
        except (TypeError, AttributeError) as e:
            raise ValueError(f"{directory} holds a damaged sentencepiece tokenizer record ({e}); save it again") from None
        except ValueError as e:
            raise ValueError(f"{model_path}: {e}") from None


def _training_error(msg: str, vocab_size: int, model_type: str) -> ValueError:
    """Turn sentencepiece's RuntimeError into a ValueError that says what to do."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if too_high:
        limit = int(too_high.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is more than this corpus can fill: sentencepiece ({model_type}) "
            f"can make at most {limit} pieces from it; use vocab_size <= {limit} or train on more text"
        )
    too_small = re.search(r"required_chars\. (\d+) vs (\d+)", msg)
    if too_small:
        need = int(too_small.group(2))
        return ValueError(
            f"vocab_size={vocab_size} is too small for this corpus: the special pieces, the 256 byte "
            f"pieces and the corpus's characters need {need}; use vocab_size >= {need}, or a lower "
            "character_coverage so rare characters fall back to bytes"
        )
    if "sentences_.empty()" in msg:
        return ValueError("cannot train a sentencepiece tokenizer: the corpus is empty; pass some text")
    return ValueError(f"sentencepiece could not train on this corpus: {_clean_message(msg)}")
