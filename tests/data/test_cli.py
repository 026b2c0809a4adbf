"""``tfd-jax data prepare``: writes train/val token files; user errors print one line, no traceback."""
from __future__ import annotations

import numpy as np

from tfd_jax.cli import main
from tfd_jax.data.corpora import load_corpus
from tfd_jax.data.tokenized import load_tokens


def _corpus_dir(root):
    root.mkdir()
    for i in range(10):
        (root / f"doc{i}.txt").write_text(f"document number {i}\n" * (i + 1))
    return root


def test_prepare_writes_train_and_val(tmp_path, byte_tokenizer, capsys):
    corpus = _corpus_dir(tmp_path / "corpus")
    tok_dir = byte_tokenizer.save(tmp_path / "tok")
    out = tmp_path / "out"
    rc = main(["data", "prepare", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out),
               "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and "val:" in printed
    for split in ("train", "val"):
        tf = load_tokens(out, split)
        docs = load_corpus(str(corpus), split=split).documents
        assert tf.num_documents == len(docs)
        expected = np.concatenate([[*d.text.encode(), 256] for d in docs])
        np.testing.assert_array_equal(np.asarray(tf.tokens), expected)
        assert tf.meta["tokenizer"] == "test_bytes"


def test_prepare_reports_user_errors_without_traceback(tmp_path, byte_tokenizer, capsys):
    tok_dir = byte_tokenizer.save(tmp_path / "tok")
    rc = main(["data", "prepare", "--corpus", str(tmp_path / "missing.txt"), "--tokenizer", str(tok_dir),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such file or directory" in err and "Traceback" not in err
    rc = main(["data", "prepare", "--corpus", str(_corpus_dir(tmp_path / "c")), "--tokenizer",
               str(tmp_path / "no_tok"), "--out", str(tmp_path / "out")])
    assert rc == 2 and "no such tokenizer directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    rc = main(["data", "prepare", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "file")])
    assert rc == 2 and "is a file; pass a directory" in capsys.readouterr().err
