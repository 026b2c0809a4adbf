"""The sentencepiece tokenizer: in-process training, faithful round trips, special ids, errors."""
from __future__ import annotations

import random

import pytest

from tfd_jax.tokenizers import SentencePieceTokenizer, load_tokenizer

CODE = '''import os


class Counter:
    """Count things."""

    def __init__(self, start=0):
        self.n = start  # trailing spaces follow   
\t\tself.tabbed = True

    def add(self, k: int) -> int:
        if k > 10:
            return self.n + k * 2
        return -1
'''


def generated_corpus(n_lines: int = 400, seed: int = 0) -> str:
    """A few hundred lines of prose, numbers and indented code."""
    rng = random.Random(seed)
    words = (
        "the a cat dog sat on mat pizza love I you we model token vocabulary merge pair count "
        "attention layer embedding transformer learning rate batch loss train decode encode "
        "naïve café über"
    ).split()
    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
            lines.append(sentence.capitalize() + rng.choice([".", "!", "?", ","]))
        elif kind == 1:
            lines.append(f"{rng.randint(0, 99999)} tokens in {rng.random():.3f} s")
        elif kind == 2:
            indent = " " * rng.choice([0, 4, 8, 12])
            lines.append(f"{indent}x_{i} = f({rng.choice(words)!r}, {rng.randint(0, 9)})")
        else:
            lines.append("")
    return "\n".join(lines) + "\n" + CODE


_TOK: dict[str, SentencePieceTokenizer] = {}


def tok(model_type: str = "bpe") -> SentencePieceTokenizer:
    if model_type not in _TOK:
        _TOK[model_type] = SentencePieceTokenizer.train(generated_corpus(), 400, model_type=model_type)
    return _TOK[model_type]


ROUND_TRIP_TEXTS = [
    CODE,
    "  leading spaces, trailing spaces  \n\n\nthree newlines",
    "\ttab\t\tand\r\nCRLF\n",
    "unseen characters: 日本語 😀 ∑ — fall back to bytes",
    "",
    "\n",
    "   ",
    "x" * 10000,
]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_round_trip_keeps_whitespace_and_newlines(model_type):
    t = tok(model_type)
    for text in ROUND_TRIP_TEXTS:
        ids = t.encode(text)
        assert all(0 <= i < t.vocab_size for i in ids)
        assert t.decode(ids) == text, repr(text)
    assert t.decode(t.encode(generated_corpus(50, seed=9))) == generated_corpus(50, seed=9)


def test_vocab_size_special_ids_and_compression():
    t = tok()
    assert t.vocab_size == 400
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 3)
    assert t.special_ids() == {"pad": 3, "bos": 1, "eos": 2, "unk": 0}
    text = generated_corpus(40, seed=3)
    assert len(t.encode(text)) < 0.75 * len(text.encode("utf-8"))  # learned pieces, not just bytes
    assert t.id_to_piece(t.encode("\n")[0]) == "\n"
    # control ids vanish when decoding
    assert t.decode([t.bos_id, *t.encode("the cat"), t.eos_id, t.pad_id]) == "the cat"


def test_encode_batch_matches_encode():
    t = tok()
    texts = ["the cat sat", "", CODE, "😀\n"]
    assert t.encode_batch(texts) == [t.encode(x) for x in texts]


def test_save_load(tmp_path):
    t = tok()
    out = t.save(tmp_path / "tokenizer")
    assert (out / "tokenizer.json").is_file() and (out / "spm.model").is_file()
    for loaded in (SentencePieceTokenizer.load(out), load_tokenizer(out)):
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.vocab_size == 400 and loaded.eos_id == 2
        assert loaded.encode(CODE) == t.encode(CODE)
    (out / "spm.model").unlink()
    with pytest.raises(FileNotFoundError, match="model file spm.model is missing"):
        load_tokenizer(out)


def test_train_from_files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(generated_corpus(200, seed=1), encoding="utf-8")
    b.write_text(CODE, encoding="utf-8")
    t1 = SentencePieceTokenizer.train(a, 350)
    t2 = SentencePieceTokenizer.train([a, b], 350)
    assert t1.vocab_size == t2.vocab_size == 350
    assert t2.decode(t2.encode(CODE)) == CODE
    with pytest.raises(FileNotFoundError, match="no such file"):
        SentencePieceTokenizer.train([tmp_path / "missing.txt"], 350)


def test_training_is_quiet(capfd):
    SentencePieceTokenizer.train(generated_corpus(100), 360)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def _assert_clean(excinfo):
    msg = str(excinfo.value)
    assert "INTERNAL" not in msg and ".cc(" not in msg
    err = excinfo.value
    # no chained sentencepiece traceback
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_empty_corpus():
    for empty in ("", "\n\n\n"):
        with pytest.raises(ValueError, match="corpus is empty") as e:
            SentencePieceTokenizer.train(empty, 300)
        _assert_clean(e)


def test_vocab_too_big_for_the_corpus():
    with pytest.raises(ValueError, match=r"vocab_size=5000 is more than this corpus can fill.*use vocab_size <= \d+") as e:
        SentencePieceTokenizer.train("hello world\n" * 20, 5000)
    _assert_clean(e)


def test_vocab_too_small_for_the_characters():
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small.*use vocab_size >= \d+") as e:
        SentencePieceTokenizer.train("hello world\n" * 20, 100)
    _assert_clean(e)


def test_bad_arguments():
    with pytest.raises(ValueError, match="model_type must be one of bpe, unigram"):
        SentencePieceTokenizer.train("hello", 300, model_type="word")
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        SentencePieceTokenizer.train("hello", 0)
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        SentencePieceTokenizer(b"not a model")


def test_decode_rejects_bad_ids():
    t = tok()
    with pytest.raises(ValueError, match=r"token id 400 is not in this vocabulary \(ids are 0..399\)"):
        t.decode([5, 400])
    with pytest.raises(ValueError, match="must be integers"):
        t.decode(["▁the"])
