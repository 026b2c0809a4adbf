"""Hugging Face tokenizers without ``transformers`` (Chapter 2, with the files real models ship).

:func:`load_hf_tokenizer` reads a Hugging Face model directory and returns one of our tokenizers,
giving the same ids as ``transformers.AutoTokenizer`` (called with ``add_special_tokens=False``):

* ``vocab.json`` + ``merges.txt`` (GPT-2, RoBERTa, BART): :class:`ByteLevelBPETokenizer`.
* ``tokenizer.model`` (Llama) or ``spiece.model`` (T5): :class:`SentencePieceTokenizer` on the
  model's bytes.
* ``vocab.txt`` (BERT): :class:`WordPieceTokenizer`.
* only Hugging Face's ``tokenizer.json``: its model must be byte-level BPE (a ``ByteLevel``
  pre-tokenizer) or WordPiece.

Special tokens and their roles come from ``tokenizer_config.json`` (``bos_token``, ``eos_token``,
``unk_token``, ``pad_token``, ``cls_token``, ``sep_token``, ``mask_token``, ``added_tokens_decoder``,
``do_lower_case``, ...), ``special_tokens_map.json``, ``added_tokens.json`` and the ``added_tokens``
of ``tokenizer.json``, whichever the directory has (transformers 5 writes only ``tokenizer.json`` and
``tokenizer_config.json``; older versions wrote all of them). Every added token is registered:
``encode`` turns its text into its id.

Hugging Face's ``tokenizer.json`` has the same name as our record; ours has a ``"kind"`` field, so a
directory is read as ours when its ``tokenizer.json`` has one. ``tok.save(dir)`` writes our record
plus the vocabulary files the kind needs, and :func:`~tfd_jax.tokenizers.load_tokenizer` reads it back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tfd_jax.tokenizers.base import (
    RECORD_NAME,
    SPECIAL_ROLES,
    Tokenizer,
    is_our_record,
    roles_from_names,
)
from tfd_jax.tokenizers.bytelevel import MERGES_FILE, VOCAB_FILE as BPE_VOCAB_FILE
from tfd_jax.tokenizers.bytelevel import ByteLevelBPETokenizer, read_merges_txt
from tfd_jax.tokenizers.spm import SentencePieceTokenizer
from tfd_jax.tokenizers.wordpiece import VOCAB_FILE as WORDPIECE_VOCAB_FILE
from tfd_jax.tokenizers.wordpiece import WordPieceTokenizer, read_vocab_txt

SPM_FILES = ("tokenizer.model", "spiece.model")
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
ADDED_TOKENS_FILE = "added_tokens.json"
#: the files :func:`load_hf_tokenizer` looks for, for error messages
LOOKED_FOR = (
    f"{BPE_VOCAB_FILE} + {MERGES_FILE}, {' or '.join(SPM_FILES)}, {WORDPIECE_VOCAB_FILE}, "
    f"or Hugging Face's {RECORD_NAME}"
)


def _hf_tokenizer_json(directory: Path) -> dict[str, Any] | None:
    """Hugging Face's ``tokenizer.json`` of ``directory`` (not our record), or None."""
    path = directory / RECORD_NAME
    if not path.is_file() or is_our_record(path):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or save the tokenizer again") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return None
    return data


def has_hf_files(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds any of the Hugging Face tokenizer files :func:`load_hf_tokenizer` reads."""
    d = Path(directory)
    if (d / BPE_VOCAB_FILE).is_file() and (d / MERGES_FILE).is_file():
        return True
    if any((d / f).is_file() for f in SPM_FILES) or (d / WORDPIECE_VOCAB_FILE).is_file():
        return True
    try:
        return _hf_tokenizer_json(d) is not None
    except ValueError:
        return False  # not JSON: load_tokenizer reports it as a damaged record


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or save the tokenizer again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as the configs write it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"] or None
    return None


class _Specials:
    """Added tokens and roles gathered from a Hugging Face directory's files."""

    def __init__(self, directory: Path, hf_json: dict[str, Any] | None):
        self.config = _read_json(directory / CONFIG_FILE)
        stmap = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        self.added: dict[str, int] = {}
        self.lstrip: set[str] = set()
        self.rstrip: set[str] = set()

        def add(text: Any, i: Any, info: dict[str, Any] | None = None) -> None:
            if not isinstance(text, str) or not text:
                return
            try:
                self.added[text] = int(i)
            except (TypeError, ValueError):
                raise ValueError(f"{directory}: the added token {text!r} has the id {i!r}, not an integer") from None
            if info and info.get("lstrip"):
                self.lstrip.add(text)
            if info and info.get("rstrip"):
                self.rstrip.add(text)

        for item in (hf_json or {}).get("added_tokens") or []:
            if isinstance(item, dict):
                add(item.get("content"), item.get("id"), item)
        decoder = self.config.get("added_tokens_decoder") or {}
        if isinstance(decoder, dict):
            for i, info in decoder.items():
                if isinstance(info, dict):
                    add(info.get("content"), i, info)
        for text, i in _read_json(directory / ADDED_TOKENS_FILE).items():
            add(text, i)

        self.role_texts: dict[str, str] = {}
        for source in (stmap, self.config):  # tokenizer_config.json has the last word
            for role in SPECIAL_ROLES:
                text = _token_text(source.get(f"{role}_token"))
                if text is not None:
                    self.role_texts[role] = text
        self.extra_texts: list[str] = []
        for source in (stmap, self.config):
            for key in ("additional_special_tokens", "extra_special_tokens"):
                values = source.get(key)
                if isinstance(values, dict):
                    values = list(values.values())
                for v in values or []:
                    text = _token_text(v)
                    if text is not None:
                        self.extra_texts.append(text)

    def resolve(self, lookup) -> tuple[dict[str, int], dict[str, int | None]]:
        """(registered tokens text -> id, roles) where ``lookup(text)`` finds a token in the model."""
        registered = dict(self.added)
        for text in [*self.role_texts.values(), *self.extra_texts]:
            if text not in registered:
                i = lookup(text)
                if i is not None:
                    registered[text] = i
        roles: dict[str, int | None] = {}
        for role, text in self.role_texts.items():
            roles[role] = registered.get(text)
        return registered, roles


def _pre_tokenizers(hf_json: dict[str, Any] | None, key: str = "pre_tokenizer") -> list[dict[str, Any]]:
    node = (hf_json or {}).get(key)
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        items = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        return [n for n in items if isinstance(n, dict)]
    return [node]


def _first_of(nodes: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((n for n in nodes if n.get("type") == kind), None)


def _bool(value: Any, default: bool) -> bool:
    return default if value is None else bool(value)


def load_hf_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """A tokenizer of ours from a Hugging Face model directory (no ``transformers`` needed).

    Args:
      directory: a directory as ``save_pretrained`` writes it or a model repository ships it.
    Returns:
      a :class:`ByteLevelBPETokenizer`, :class:`SentencePieceTokenizer` or :class:`WordPieceTokenizer`.
    Raises:
      FileNotFoundError: no such directory, or none of the tokenizer files (the message lists them).
      ValueError: a file is damaged, or ``tokenizer.json`` holds a kind of model this cannot read.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"no such tokenizer directory: {d}")
    if not d.is_dir():
        raise ValueError(f"{d} is a file; pass the Hugging Face model directory that holds it")
    hf_json = _hf_tokenizer_json(d)
    specials = _Specials(d, hf_json)

    if (d / BPE_VOCAB_FILE).is_file() and (d / MERGES_FILE).is_file():
        vocab = _read_json(d / BPE_VOCAB_FILE)
        try:
            merges = read_merges_txt(d / MERGES_FILE)
        except ValueError as e:
            raise ValueError(f"{e}; download or save the tokenizer again") from None
        return _byte_level(d, vocab, merges, hf_json, specials)
    for name in SPM_FILES:
        if (d / name).is_file():
            return _sentencepiece(d / name, hf_json, specials)
    if (d / WORDPIECE_VOCAB_FILE).is_file():
        return _wordpiece(d, read_vocab_txt(d / WORDPIECE_VOCAB_FILE), hf_json, specials)
    if hf_json is not None:
        model = hf_json["model"]
        mtype = model.get("type") or ("BPE" if "merges" in model else "WordPiece" if "continuing_subword_prefix" in model else None)
        if mtype == "BPE":
            merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
            if any(len(m) != 2 for m in merges):
                raise ValueError(f"{d / RECORD_NAME}: a merge is not a pair of tokens; download the tokenizer again")
            return _byte_level(d, model.get("vocab") or {}, merges, hf_json, specials)
        if mtype == "WordPiece":
            return _wordpiece(d, model.get("vocab") or {}, hf_json, specials)
        raise ValueError(
            f"{d / RECORD_NAME} holds a {mtype} tokenizer model; load_hf_tokenizer reads byte-level BPE and "
            f"WordPiece from tokenizer.json (and sentencepiece from {' or '.join(SPM_FILES)}); use "
            "transformers for this one"
        )
    raise FileNotFoundError(
        f"{d} has none of the Hugging Face tokenizer files ({LOOKED_FOR}); pass the directory of a "
        "Hugging Face model (where save_pretrained wrote its tokenizer)"
    )


def _byte_level(d: Path, vocab: dict, merges: list, hf_json: dict | None, specials: _Specials) -> ByteLevelBPETokenizer:
    pre = _pre_tokenizers(hf_json)
    if hf_json is not None and _first_of(pre, "ByteLevel") is None:
        raise ValueError(
            f"{d / RECORD_NAME}: its BPE model has no ByteLevel pre-tokenizer, so it is not GPT-2-style "
            "byte-level BPE; load_hf_tokenizer cannot read it (use transformers)"
        )
    byte_level = _first_of(pre, "ByteLevel") or {}
    if byte_level and byte_level.get("use_regex") is False:
        raise ValueError(
            f"{d / RECORD_NAME}: its ByteLevel pre-tokenizer does not use GPT-2's regex (it splits another "
            "way); load_hf_tokenizer reads only GPT-2-style byte-level BPE (use transformers)"
        )
    add_prefix_space = specials.config.get("add_prefix_space")
    if add_prefix_space is None:
        add_prefix_space = byte_level.get("add_prefix_space", False)
    model = (hf_json or {}).get("model") or {}
    registered, roles = specials.resolve(vocab.get)
    if not specials.role_texts and "<|endoftext|>" in registered | vocab:  # GPT-2's defaults
        i = registered.get("<|endoftext|>", vocab.get("<|endoftext|>"))
        registered.setdefault("<|endoftext|>", i)
        roles = {"bos": i, "eos": i, "unk": i}
    try:
        return ByteLevelBPETokenizer(
            vocab, merges, registered, roles,
            add_prefix_space=bool(add_prefix_space),
            lstrip=specials.lstrip, rstrip=specials.rstrip,
            ignore_merges=bool(model.get("ignore_merges", False)),
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{d} holds a damaged byte-level BPE tokenizer ({e}); download it again") from None


def _sentencepiece(path: Path, hf_json: dict | None, specials: _Specials) -> SentencePieceTokenizer:
    try:
        base = SentencePieceTokenizer(path.read_bytes())
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    sp = base.sp
    unk = sp.unk_id()

    def lookup(text: str) -> int | None:
        i = sp.piece_to_id(text)
        return None if (i == unk and text != sp.id_to_piece(unk)) else i

    registered, roles = specials.resolve(lookup)
    if not specials.role_texts:
        roles = dict(base.special_ids())
    # where the model's leading "▁" goes once the text is cut at special tokens
    scheme = "first"
    metaspace = _first_of(_pre_tokenizers(hf_json), "Metaspace")
    if metaspace is not None:
        scheme = metaspace.get("prepend_scheme") or ("always" if metaspace.get("add_prefix_space", True) else "never")
    elif _first_of(_pre_tokenizers(hf_json, "normalizer"), "Prepend") is not None:
        scheme = "always"
    elif specials.config.get("legacy") is True:
        scheme = "always"
    if specials.config.get("add_prefix_space") is False:
        scheme = "never"
    try:
        return SentencePieceTokenizer(path.read_bytes(), special_tokens=registered, roles=roles, prepend_scheme=scheme)
    except ValueError as e:
        raise ValueError(f"{path.parent}: {e}") from None


def _wordpiece(d: Path, vocab: list | dict, hf_json: dict | None, specials: _Specials) -> WordPieceTokenizer:
    config = specials.config
    norm = _first_of(_pre_tokenizers(hf_json, "normalizer"), "BertNormalizer") or {}
    model = (hf_json or {}).get("model") or {}
    decoder = _first_of(_pre_tokenizers(hf_json, "decoder"), "WordPiece") or {}
    lookup_vocab = vocab if isinstance(vocab, dict) else {t: i for i, t in enumerate(vocab)}
    registered, roles = specials.resolve(lookup_vocab.get)
    if not specials.role_texts:  # BertTokenizer's defaults
        defaults = {t: lookup_vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in lookup_vocab}
        for t, i in defaults.items():
            registered.setdefault(t, i)
        roles = roles_from_names(defaults)
    strip_accents = config["strip_accents"] if "strip_accents" in config else norm.get("strip_accents")
    try:
        return WordPieceTokenizer(
            vocab, registered, roles,
            do_lower_case=_bool(config.get("do_lower_case", norm.get("lowercase")), True),
            strip_accents=strip_accents,
            tokenize_chinese_chars=_bool(config.get("tokenize_chinese_chars", norm.get("handle_chinese_chars")), True),
            clean_text=_bool(norm.get("clean_text"), True),
            unk_token=specials.role_texts.get("unk") or model.get("unk_token") or "[UNK]",
            continuing_prefix=model.get("continuing_subword_prefix") or decoder.get("prefix") or "##",
            max_input_chars_per_word=int(model.get("max_input_chars_per_word") or 100),
            cleanup=_bool(decoder.get("cleanup"), True),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            lstrip=specials.lstrip, rstrip=specials.rstrip,
        )
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{d} holds a damaged WordPiece tokenizer ({e}); download it again") from None
