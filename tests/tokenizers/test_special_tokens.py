"""Special tokens for BERT-style models in our three kinds (BPE, sentencepiece, char)."""
from __future__ import annotations

import json

import pytest

from tfd_jax.tokenizers import (
    BERT_SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    special_token_role,
)
from tfd_jax.tokenizers.bpe import SPLIT_PATTERN

CORPUS = "".join(
    f"the cat sat on the mat {i}. a dog ate the pizza, naïve café!\n" for i in range(60)
)
TEXT = "the cat [MASK] on the [MASK].[SEP]\n[CLS]a dog [UNK] ate[PAD][PAD]"


def train(kind: str, special_tokens=None):
    if kind == "bpe":
        return BPETokenizer.train(CORPUS, 300 if special_tokens is None else 305, special_tokens=special_tokens)
    if kind == "spm":
        return SentencePieceTokenizer.train(CORPUS, 320, special_tokens=special_tokens)
    return CharTokenizer.train(CORPUS, special_tokens=special_tokens)


KINDS = ["bpe", "spm", "char"]
_CACHE: dict = {}


def bert(kind: str):
    if kind not in _CACHE:
        _CACHE[kind] = (train(kind), train(kind, BERT_SPECIAL_TOKENS))
    return _CACHE[kind]


def test_bert_special_tokens_constant_and_roles():
    assert BERT_SPECIAL_TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    assert [special_token_role(t) for t in BERT_SPECIAL_TOKENS] == ["pad", "unk", "cls", "sep", "mask"]
    assert special_token_role("<s>") == "bos" and special_token_role("<|endoftext|>") == "eos"
    assert special_token_role("[FOO]") is None


@pytest.mark.parametrize("kind", KINDS)
def test_ids_are_distinct_in_range_and_have_roles(kind):
    _, tok = bert(kind)
    specials = tok.special_tokens
    assert list(specials) == list(BERT_SPECIAL_TOKENS)
    ids = list(specials.values())
    assert len(set(ids)) == 5 and all(0 <= i < tok.vocab_size for i in ids)
    roles = tok.special_ids()
    for role, text in zip(("pad", "unk", "cls", "sep", "mask"), BERT_SPECIAL_TOKENS):
        assert roles[role] == specials[text] == getattr(tok, f"{role}_id")
    assert set(ids) <= set(tok.all_special_ids()) and tok.all_special_ids() == sorted(tok.all_special_ids())
    # no ordinary token shares an id with a special one
    plain = tok.encode(CORPUS)
    assert not set(plain) & set(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_encode_maps_special_strings_and_decode_writes_them(kind):
    _, tok = bert(kind)
    assert tok.encode("[MASK]") == [tok.mask_id]
    ids = tok.encode(TEXT)
    assert ids.count(tok.mask_id) == 2 and ids.count(tok.pad_id) == 2
    assert ids.count(tok.cls_id) == ids.count(tok.sep_id) == ids.count(tok.unk_id) == 1
    assert tok.decode(ids) == TEXT
    # encode adds nothing by itself
    assert tok.encode("the cat") == [i for i in tok.encode("the cat") if i not in tok.all_special_ids()]
    assert tok.encode("") == []


def test_layouts():
    bpe = bert("bpe")[1]
    assert bpe.vocab_size == 305 and list(bpe.special_tokens.values()) == [300, 301, 302, 303, 304]
    char = bert("char")[1]
    n = len(set(CORPUS))
    assert list(char.special_tokens.values()) == list(range(n, n + 5)) and char.vocab_size == n + 5
    spm = bert("spm")[1]
    assert spm.vocab_size == 320
    assert [spm.id_to_piece(i) for i in range(8)] == ["[UNK]", "<s>", "</s>", "[PAD]", "[CLS]", "[SEP]", "[MASK]", "\n"]
    assert spm.special_ids() == {"pad": 3, "bos": 1, "eos": 2, "unk": 0, "cls": 4, "sep": 5, "mask": 6}
    assert spm.all_special_ids() == [0, 1, 2, 3, 4, 5, 6]
    assert spm.sp.piece_to_id("[MASK]") == 6  # the sentencepiece model itself knows them


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_keeps_them_and_fingerprint_covers_them(kind, tmp_path):
    plain, tok = bert(kind)
    out = tok.save(tmp_path / "tok")
    back = load_tokenizer(out)
    assert type(back) is type(tok)
    assert back.special_tokens == tok.special_tokens and back.special_ids() == tok.special_ids()
    assert back.encode(TEXT) == tok.encode(TEXT) and back.decode(back.encode(TEXT)) == TEXT
    assert back.fingerprint() == tok.fingerprint() != plain.fingerprint()


@pytest.mark.parametrize("kind", KINDS)
def test_without_special_tokens_nothing_changes(kind, tmp_path):
    plain, _ = bert(kind)
    assert plain.special_tokens == {}
    assert plain.all_special_ids() == sorted(plain.special_ids().values())
    assert plain.cls_id is plain.sep_id is plain.mask_id is None
    record = json.loads((plain.save(tmp_path / "tok") / "tokenizer.json").read_text(encoding="utf-8"))
    expected_keys = {
        "bpe": {"kind", "format_version", "vocab_size", "pattern", "special_tokens", "merges"},
        "spm": {"kind", "format_version", "vocab_size", "model_file", "pad", "bos", "eos", "unk"},
        "char": {"kind", "format_version", "vocab_size", "chars"},
    }[kind]
    assert set(record) == expected_keys
    if kind == "bpe":
        assert record["special_tokens"] == {}
    if kind != "char":  # "[" and "M" are not in the char vocabulary
        ids = plain.encode("[MASK]")
        assert len(ids) > 1 and plain.decode(ids) == "[MASK]"  # plain text


def test_records_written_before_special_tokens_still_load(tmp_path):
    old_bpe = {"kind": "bpe", "format_version": 1, "vocab_size": 258, "pattern": SPLIT_PATTERN,
               "special_tokens": {"eos": "<|endoftext|>"}, "merges": [[104, 105]]}
    (tmp_path / "bpe").mkdir()
    (tmp_path / "bpe" / "tokenizer.json").write_text(json.dumps(old_bpe), encoding="utf-8")
    tok = load_tokenizer(tmp_path / "bpe")
    assert tok.encode("hi") == [256] and tok.eos_id == 257 and tok.special_tokens == {}
    assert tok.role_tokens == {"eos": "<|endoftext|>"}
    assert tok.eos_id not in tok.encode("<|endoftext|>")  # role-mapped tokens stay output-only
    assert tok.all_special_ids() == [257]
    (tmp_path / "char").mkdir()
    (tmp_path / "char" / "tokenizer.json").write_text(
        json.dumps({"kind": "char", "format_version": 1, "vocab_size": 2, "chars": ["a", "b"]}), encoding="utf-8"
    )
    assert load_tokenizer(tmp_path / "char").encode("ba") == [1, 0]


def test_bad_special_tokens():
    with pytest.raises(TypeError, match=r"single string '\[MASK\]'; write special_tokens=\('\[MASK\]',\)"):
        CharTokenizer.train("abc", special_tokens="[MASK]")
    with pytest.raises(ValueError, match=r"'\[MASK\]' is listed twice"):
        BPETokenizer.train(CORPUS, 300, special_tokens=["[MASK]", "[MASK]"])
    with pytest.raises(ValueError, match="non-empty string"):
        CharTokenizer.train("abc", special_tokens=[""])
    with pytest.raises(ValueError, match=r"at least 261 \(the 256 byte tokens \+ 5 special"):
        BPETokenizer.train(CORPUS, 260, special_tokens=BERT_SPECIAL_TOKENS)
