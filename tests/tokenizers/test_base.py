"""The shared tokenizer interface: saving convention, load_tokenizer, read_text_file."""
from __future__ import annotations

import json

import pytest

from tfd_jax.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer,
    read_text_file,
)


def test_tokenizer_is_abstract():
    with pytest.raises(TypeError):
        Tokenizer()


def test_kinds_are_subclasses_with_the_interface():
    for cls in (BPETokenizer, CharTokenizer):
        assert issubclass(cls, Tokenizer)
        for name in ("encode", "decode", "encode_batch", "save", "load", "vocab_size"):
            assert hasattr(cls, name)


def test_save_writes_a_directory_with_a_kind_record(tmp_path):
    tok = CharTokenizer.train("abc")
    out = tok.save(tmp_path / "a" / "b")
    assert out == tmp_path / "a" / "b" and out.is_dir()
    record = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert record["kind"] == "char" and record["vocab_size"] == 3
    # saving again over it replaces it
    CharTokenizer.train("xyzw").save(out)
    assert load_tokenizer(out).vocab_size == 4


def test_save_to_a_file_path_is_refused(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="it is a file, and a tokenizer is saved as a directory"):
        CharTokenizer.train("abc").save(f)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer record"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"kind": "char", "format_version": 99, "chars": ["a"]}))
    with pytest.raises(ValueError, match="newer tfd_jax"):
        load_tokenizer(bad)


def test_load_checks_the_kind(tmp_path):
    BPETokenizer.train("hello hello", 257).save(tmp_path / "bpe")
    with pytest.raises(ValueError, match="holds a 'bpe' tokenizer, not a 'char' one; use .*load_tokenizer"):
        CharTokenizer.load(tmp_path / "bpe")
    assert isinstance(Tokenizer.load(tmp_path / "bpe"), BPETokenizer)


def test_encode_batch_refuses_a_bare_string():
    with pytest.raises(TypeError, match="list of strings"):
        CharTokenizer.train("abc").encode_batch("abc")


def test_special_ids_and_repr():
    tok = BPETokenizer.train("hello hello", 258, special_tokens={"bos": "<s>"})
    assert tok.special_ids() == {"bos": 257}
    assert repr(tok) == "BPETokenizer(vocab_size=258, bos_id=257)"


def test_read_text_file_exact(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("line 1\r\nlíne 2\n\n".encode("utf-8"))
    assert read_text_file(p) == "line 1\r\nlíne 2\n\n"  # no newline translation


def test_read_text_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*nope.txt"):
        read_text_file(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="is a directory; pass a text file"):
        read_text_file(tmp_path)
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf\xe9 ok")
    with pytest.raises(ValueError, match=r"latin1.txt is not valid UTF-8 \(byte 0xe9 at offset 3\); convert it"):
        read_text_file(p)
