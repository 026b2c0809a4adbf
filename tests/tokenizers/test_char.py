"""The character-level tokenizer (Chapters 1-2)."""
from __future__ import annotations

import string

import pytest

from tfd_jax.tokenizers import CharTokenizer, load_tokenizer

# the 65 distinct characters of the tiny-Shakespeare corpus
SHAKESPEARE_CHARS = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase


def shakespeare_like_text() -> str:
    lines = [
        "First Citizen:\nBefore we proceed any further, hear me speak.\n",
        "All:\nSpeak, speak.\n",
        "KING RICHARD III:\nA horse! a horse! my kingdom for a horse!\n",
        "Is't so? What $ & - 3; ye 'lords'?\n",
        string.ascii_uppercase + "\n" + string.ascii_lowercase + "\n",
    ]
    return "".join(lines * 3)


def test_shakespeare_alphabet_has_65_symbols():
    text = shakespeare_like_text()
    assert set(text) == set(SHAKESPEARE_CHARS)
    tok = CharTokenizer.train(text)
    assert tok.vocab_size == 65
    assert "".join(tok.chars) == "".join(sorted(SHAKESPEARE_CHARS))
    assert tok.encode("\n ") == [0, 1]  # sorted by code point: newline first, then space
    assert tok.encode("z") == [64]


def test_round_trip():
    text = shakespeare_like_text()
    tok = CharTokenizer.train(text)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.encode_batch(["ab", ""]) == [tok.encode("ab"), []]


def test_unknown_character_is_named():
    tok = CharTokenizer.train("hello world")
    with pytest.raises(ValueError, match=r"character 'z' \(U\+007A\) at index 4 is not in"):
        tok.encode("hellz")
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\)"):
        tok.encode("é")


def test_empty_corpus():
    with pytest.raises(ValueError, match="corpus is empty"):
        CharTokenizer.train("")


def test_decode_rejects_bad_ids():
    tok = CharTokenizer.train("abc")
    with pytest.raises(ValueError, match=r"token id 3 is not in this vocabulary \(ids are 0..2\)"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_save_load(tmp_path):
    tok = CharTokenizer.train(shakespeare_like_text() + "é😀")
    tok.save(tmp_path / "tok")
    for loaded in (CharTokenizer.load(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert isinstance(loaded, CharTokenizer)
        assert loaded.chars == tok.chars and loaded.vocab_size == 67
        assert loaded.encode("Speak 😀\n") == tok.encode("Speak 😀\n")
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.unk_id) == (None,) * 4
