"""Pairs for encoder-decoder training: numbers in words, held-out numbers never trained on, pair
files, and fixed-shape batches whose iterator resumes exactly."""
import json

import numpy as np
import pytest

from tfd_jax.data.pairs import PairEncoder, load_pairs, make_pairs_iterator, number_to_words, pairs_of
from tfd_jax.data.tokenized import write_tokens
from tfd_jax.tokenizers import CharTokenizer
from tfd_jax.train.tasks import SEQ2SEQ_SPECIAL_TOKENS


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (7, "seven"), (15, "fifteen"), (40, "forty"), (77, "seventy-seven"), (100, "one hundred"),
    (213, "two hundred thirteen"), (40213, "forty thousand two hundred thirteen"), (90000, "ninety thousand"),
    (1_000_001, "one million one"), (99999, "ninety-nine thousand nine hundred ninety-nine"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_the_numbers_task_holds_out_a_tenth_it_never_trains_on():
    train, val = load_pairs("numbers", "train"), load_pairs("numbers", "val")
    train_src = {d.text.split("\t")[0] for d in train.documents}
    val_src = {d.text.split("\t")[0] for d in val.documents}
    assert not train_src & val_src and len(train_src) + len(val_src) == 100_000
    assert 0.09 < len(val_src) / 100_000 < 0.11
    assert {d.text for d in val.documents[:5]} == {d.text for d in load_pairs("numbers", "val").documents[:5]}


def test_pair_files_and_their_errors(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) for i in range(20)) + "\n")
    tsv = tmp_path / "p.tsv"
    tsv.write_text("".join(f"s{i}\tt{i}\n" for i in range(20)))
    for path in (jl, tsv):
        train, val = load_pairs(str(path), "train"), load_pairs(str(path), "val")
        assert [d.text for d in val.documents] == ["s9\tt9", "s19\tt19"] and len(train.documents) == 18
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected"):
        load_pairs(str(bad))
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected source<TAB>target"):
        load_pairs(str(tmp_path / "bad.tsv"))


def test_batches_are_the_pairs_and_the_iterator_resumes(tmp_path):
    corpus = load_pairs("numbers", "val", max_bytes=20_000)
    tok = CharTokenizer.train(corpus.text, special_tokens=SEQ2SEQ_SPECIAL_TOKENS)
    tf = write_tokens(corpus, PairEncoder(tok, tok.sep_id), tmp_path / "val", progress=False)
    first = pairs_of(tf, tok.sep_id, 3)
    src0, tgt0 = corpus.documents[0].text.split("\t")
    assert tok.decode(first[0][0]) == src0 and tok.decode(first[0][1]) == tgt0
    kw = dict(batch_size=8, src_len=6, tgt_len=48, seed=5, sep_id=tok.sep_id, pad_id=tok.pad_id, start_id=tok.bos_id)
    it = make_pairs_iterator(tf, **kw)
    b = next(it)
    assert b["src"].shape == (8, 6) and b["tgt_in"].shape == b["targets"].shape == b["mask"].shape == (8, 48)
    assert (b["tgt_in"][:, 0] == tok.bos_id).all()
    np.testing.assert_array_equal(b["tgt_in"][:, 1:], b["targets"][:, :-1])
    for row in range(8):  # each row is one pair: the source digits, the words, then the eos
        n = int(b["mask"][row].sum())
        assert b["targets"][row, n - 1] == tok.eos_id
        words = tok.decode([int(t) for t in b["targets"][row, : n - 1]])
        digits = tok.decode([int(t) for t in b["src"][row][b["src_mask"][row]]])
        assert number_to_words(int(digits)) == words
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = make_pairs_iterator(tf, **kw)
    again.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(again)["targets"], w["targets"])
