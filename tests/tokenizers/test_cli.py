"""``tfd-jax tokenizer train | encode | decode``."""
from __future__ import annotations

import argparse
import io
import sys

import pytest

from tfd_jax import cli as top_cli
from tfd_jax.cli import UserError
from tfd_jax.tokenizers import BPETokenizer, CharTokenizer, SentencePieceTokenizer, load_tokenizer
from tfd_jax.tokenizers import cli as tok_cli

CORPUS = "".join(
    f"line {i}: the quick brown fox jumps over the lazy dog, {'again ' * (i % 3)}and again.\n"
    f"    indented({i}) = {{'k': {i * 7}}}\n"
    for i in range(200)
)


def run(argv: list[str]) -> int:
    """Parse with only the tokenizer command registered, then call its func."""
    parser = argparse.ArgumentParser(prog="tfd-jax")
    tok_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


def set_stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


@pytest.mark.parametrize(
    "kind, extra, cls, vocab",
    [
        ("bpe", ["--vocab-size", "300"], BPETokenizer, 300),
        ("char", [], CharTokenizer, len(set(CORPUS))),
        ("spm", ["--vocab-size", "330"], SentencePieceTokenizer, 330),
    ],
)
def test_train_encode_decode(kind, extra, cls, vocab, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "tok"
    assert run(["tokenizer", "train", "--kind", kind, "--input", str(corpus), "--out", str(out), *extra]) == 0
    assert f"trained a {kind} tokenizer with {vocab} tokens" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert isinstance(tok, cls) and tok.vocab_size == vocab

    text = "the lazy dog\n    indented(3)"
    assert run(["tokenizer", "encode", "--tokenizer", str(out), "--text", text]) == 0
    printed = capsys.readouterr().out
    assert printed == " ".join(map(str, tok.encode(text))) + "\n"

    assert run(["tokenizer", "decode", "--tokenizer", str(out), "--ids", printed]) == 0
    assert capsys.readouterr().out == text

    # the same through standard input
    set_stdin(monkeypatch, text.encode("utf-8"))
    assert run(["tokenizer", "encode", "--tokenizer", str(out)]) == 0
    printed_stdin = capsys.readouterr().out
    assert printed_stdin == printed
    set_stdin(monkeypatch, printed.replace(" ", ", ").encode())
    assert run(["tokenizer", "decode", "--tokenizer", str(out)]) == 0
    assert capsys.readouterr().out == text


def test_missing_input_file(tmp_path):
    with pytest.raises(UserError, match="no such file: .*nope.txt"):
        run(["tokenizer", "train", "--kind", "char", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])


def test_non_utf8_input(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"hello \xff world")
    with pytest.raises(UserError, match=r"latin1.txt is not valid UTF-8 \(byte 0xff at offset 6\); convert it"):
        run(["tokenizer", "train", "--vocab-size", "300", "--input", str(p), "--out", str(tmp_path / "o")])


def test_non_utf8_stdin(tmp_path, monkeypatch):
    CharTokenizer.train("abc").save(tmp_path / "tok")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ab\xfe"), encoding="utf-8"))
    with pytest.raises(UserError, match=r"standard input is not valid UTF-8 \(byte 0xfe at offset 2\)"):
        run(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok")])


def test_empty_corpus(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    with pytest.raises(UserError, match="empty.txt is empty"):
        run(["tokenizer", "train", "--kind", "char", "--input", str(p), "--out", str(tmp_path / "o")])


def test_vocab_size_flags(corpus, tmp_path):
    with pytest.raises(UserError, match="--vocab-size is required for --kind bpe"):
        run(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match="--vocab-size does not apply to --kind char"):
        run(["tokenizer", "train", "--kind", "char", "--vocab-size", "10", "--input", str(corpus), "--out", str(tmp_path / "o")])
    with pytest.raises(UserError, match=r"supports at most \d+ tokens"):
        run(["tokenizer", "train", "--vocab-size", "100000", "--input", str(corpus), "--out", str(tmp_path / "o")])


def test_encode_decode_errors(tmp_path):
    CharTokenizer.train("abc").save(tmp_path / "tok")
    with pytest.raises(UserError, match="no such tokenizer directory"):
        run(["tokenizer", "encode", "--tokenizer", str(tmp_path / "missing"), "--text", "a"])
    with pytest.raises(UserError, match=r"character 'z'"):
        run(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "--text", "abz"])
    with pytest.raises(UserError, match="ids must be integers separated by spaces or commas, got 'x'"):
        run(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), "--ids", "1 x 2"])
    with pytest.raises(UserError, match="token id 7 is not in this vocabulary"):
        run(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), "--ids", "1 7"])


def test_main_prints_the_error_without_traceback(tmp_path, capsys):
    code = top_cli.main(["tokenizer", "train", "--kind", "char", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: no such file:" in err and "Traceback" not in err
