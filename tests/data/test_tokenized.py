"""Token files: flat ids on disk, eos between documents, boundaries, memory-mapped loading."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tfd_jax.data.corpora import Corpus, Document
from tfd_jax.data.tokenized import load_tokens, token_dtype, write_tokens


def _corpus(*texts: str) -> Corpus:
    return Corpus("test", "train", tuple(Document(f"d{i}", t) for i, t in enumerate(texts)))


def test_roundtrip_with_eos_after_every_document(tmp_path, byte_tokenizer):
    tf = write_tokens(_corpus("ab", "", "cde"), byte_tokenizer, tmp_path / "train", progress=False)
    expected = [97, 98, 256, 256, 99, 100, 101, 256]
    assert tf.tokens.tolist() == expected
    assert isinstance(tf.tokens, np.memmap) and tf.tokens.dtype == np.uint16
    assert tf.offsets.tolist() == [0, 3, 4, 8] and tf.offsets.dtype == np.int64
    assert tf.document(2).tolist() == [99, 100, 101, 256]
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["length"] == 8 and meta["dtype"] == "uint16" and meta["vocab_size"] == 257
    assert meta["tokenizer"] == "test_bytes" and meta["eos_id"] == 256 and meta["source"] == "test"
    loaded = load_tokens(tmp_path, "train")
    assert loaded.tokens.tolist() == expected and loaded.num_documents == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "train.json", "train.offsets.npy"]
    with pytest.raises(ValueError):  # read-only memory map
        loaded.tokens[0] = 1


def test_no_eos_means_plain_concatenation(tmp_path, byte_tokenizer):
    byte_tokenizer.eos_id = None
    tf = write_tokens(_corpus("ab", "c"), byte_tokenizer, tmp_path / "x.bin", progress=False)
    assert tf.tokens.tolist() == [97, 98, 99] and tf.offsets.tolist() == [0, 2, 3]
    assert load_tokens(tmp_path / "x.bin").meta["eos_between_documents"] is False


def test_dtype_follows_vocab_size():
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


class _BigVocab:
    vocab_size, eos_id, kind = 70_000, None, "big"

    def encode_batch(self, texts):
        return [[69_999, len(t)] for t in texts]


def test_large_vocab_is_stored_as_uint32(tmp_path):
    tf = write_tokens(_corpus("abc"), _BigVocab(), tmp_path / "t", progress=False)
    assert tf.tokens.dtype == np.uint32 and tf.tokens.tolist() == [69_999, 3]


def test_out_of_range_ids_and_empty_output_fail_without_leaving_files(tmp_path):
    class Bad(_BigVocab):
        vocab_size = 100

    with pytest.raises(ValueError, match="produced id 69999 outside 0..99"):
        write_tokens(_corpus("abc"), Bad(), tmp_path / "t", progress=False)

    class Empty(_BigVocab):
        def encode_batch(self, texts):
            return [[] for _ in texts]

    with pytest.raises(ValueError, match="produced no tokens"):
        write_tokens(_corpus("abc"), Empty(), tmp_path / "t", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path, byte_tokenizer):
    with pytest.raises(FileNotFoundError, match="no such token file.*tfd-jax data prepare"):
        load_tokens(tmp_path, "val")
    write_tokens(_corpus("abcdef"), byte_tokenizer, tmp_path / "train", progress=False)
    (tmp_path / "train.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="does not hold the 7 uint16 tokens"):
        load_tokens(tmp_path / "train")
