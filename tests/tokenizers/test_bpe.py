"""The from-scratch byte-level BPE (Chapter 2): merges, ties, chunking, round trips, trace, errors."""
from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfd_jax.tokenizers import BPETokenizer, MergeStep, format_trace, load_tokenizer, train_trace
from tfd_jax.tokenizers.bpe import SPLIT_PATTERN

A, B, C, D = 97, 98, 99, 100  # byte values of "a" "b" "c" "d"


def random_corpus(n_chars: int, seed: int) -> str:
    """Random-ish text with repeated words, punctuation, digits, newlines and non-ASCII words."""
    rng = random.Random(seed)
    syllables = ["th", "e", "an", "ing", "er", "o", "qu", "st", "a", "re", "x", "é", "ü", "日本", "语"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(120)]
    words += ["42", "2024", "😀", "it's", "we'll", "foo_bar", "x=1;"]
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(rng.choice(words))
        out.append(rng.choice([" ", " ", " ", ", ", ". ", "\n", "  ", "\t", "!\n\n"]))
    return "".join(out)


# --- a reference trainer that recounts every pair after every merge -----------------------------
def _naive_merge(seq, pair, new):
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def naive_train(text: str, num_merges: int):
    """Returns (merges, counts, final token sequence of each unique chunk)."""
    chunks = Counter(re.findall(SPLIT_PATTERN, text))
    seqs = {c: list(c.encode("utf-8")) for c in chunks}
    merges, counts = [], []
    for new in range(256, 256 + num_merges):
        pair_counts = Counter()
        for c, f in chunks.items():
            s = seqs[c]
            for p in zip(s, s[1:]):
                pair_counts[p] += f
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda p: (-pair_counts[p], p))
        merges.append(best)
        counts.append(pair_counts[best])
        seqs = {c: _naive_merge(s, best, new) for c, s in seqs.items()}
    return merges, counts, seqs


# --- merges --------------------------------------------------------------------------------------
def test_hand_computed_merges():
    # "aaabdaaabac" is one chunk (all letters): bytes a a a b d a a a b a c.
    # 1. pairs: aa x4 (overlaps count), ab x2, bd da ba ac x1  -> merge (a, a) = 256 "aa"
    #    left to right: aa a b d aa a b a c
    # 2. pairs: (256, a) x2, (a, b) x2, others x1; tie at 2 -> smaller pair (97, 98) wins
    #    -> 257 "ab":  aa ab d aa ab a c
    # 3. (256, 257) x2 -> 258 "aaab":  aaab d aaab a c
    # 4. all x1: (258, d) (d, 258) (258, a) (a, c); smallest is (97, 99) -> 259 "ac"
    # 5. (258, d) (d, 258) (258, 259); smallest (100, 258) -> 260 "daaab"
    # 6. (258, 260) (260, 259); smallest (258, 260) -> 261 "aaabdaaab"
    # 7. (261, 259) -> 262, the whole string; no pairs are left: at most 263 tokens.
    expected = [(A, A), (A, B), (256, 257), (A, C), (D, 258), (258, 260), (261, 259)]
    steps = train_trace("aaabdaaabac", 100)
    assert [s.pair for s in steps] == expected
    assert [s.count for s in steps] == [4, 2, 2, 1, 1, 1, 1]
    assert [s.merged for s in steps][:3] == [b"aa", b"ab", b"aaab"]
    tok = BPETokenizer.train("aaabdaaabac", 263)
    assert tok.merges == expected
    assert tok.encode("aaabdaaabac") == [262]
    assert tok.encode("aaab") == [258]
    assert tok.encode("aaa") == [256, A]  # left to right: "aa" "a"


def test_incremental_trainer_matches_full_recount():
    text = random_corpus(4000, seed=0)
    merges, counts, _ = naive_train(text, 300)
    steps = train_trace(text, 300)
    assert [s.pair for s in steps] == merges
    assert [s.count for s in steps] == counts


def test_incremental_trainer_matches_full_recount_to_exhaustion():
    text = random_corpus(600, seed=1)
    merges, counts, seqs = naive_train(text, 10**6)
    steps = train_trace(text, 10**6)
    assert len(steps) == len(merges) > 50
    assert [s.pair for s in steps] == merges
    assert [s.count for s in steps] == counts
    # encoding a chunk with the learned merges gives what training left for that chunk
    tok = BPETokenizer(merges)
    for chunk, seq in seqs.items():
        assert tok.encode(chunk) == seq


def test_vocab_grows_by_one_per_merge_and_stops_at_target():
    text = random_corpus(3000, seed=2)
    steps = train_trace(text, 40)
    assert [s.vocab_size for s in steps] == list(range(257, 297))
    assert [s.new_id for s in steps] == list(range(256, 296))
    tok = BPETokenizer.train(text, 300)
    assert tok.vocab_size == 300 and len(tok.merges) == 44
    assert max(tok.encode(text)) < 300


def test_most_frequent_pair_is_merged_first():
    text = "low lower lowest newer wider " * 5
    first = train_trace(text, 1)[0]
    _, counts, _ = naive_train(text, 1)
    chunks = Counter(re.findall(SPLIT_PATTERN, text))
    pair_counts = Counter()
    for c, f in chunks.items():
        b = c.encode()
        for p in zip(b, b[1:]):
            pair_counts[p] += f
    assert first.count == max(pair_counts.values()) == counts[0]


def test_merges_do_not_cross_chunk_boundaries():
    text = random_corpus(3000, seed=3)
    tok = BPETokenizer.train(text, 500)
    chunks = {c.encode("utf-8") for c in re.findall(SPLIT_PATTERN, text)}
    for i in range(256, tok.vocab_size):
        piece = tok.token_bytes(i)
        # every token lies inside one chunk of the corpus
        assert any(piece in c for c in chunks), piece
    # "ab." splits as "ab" "." (and " ab" "."), so "b." and "b " never become tokens
    merged = [s.merged for s in train_trace("ab. ab. ab.", 100)]
    assert merged == [b"ab", b" ab"]


# --- chunking and round trips ----------------------------------------------------------------------
@given(st.text())
def test_pre_split_covers_every_character(text):
    assert "".join(re.findall(SPLIT_PATTERN, text)) == text


_TOK = None


def _tok() -> BPETokenizer:
    global _TOK
    if _TOK is None:
        _TOK = BPETokenizer.train(random_corpus(5000, seed=4), 500)
    return _TOK


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(text):
    tok = _tok()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_code_and_multibyte():
    tok = _tok()
    text = "def f(x):\n\tif x:\n        return 'café 日本語 😀'\r\n\n  \n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges did compress something


def test_decode_of_split_character_uses_replacement_char():
    tok = BPETokenizer([])  # bytes only
    ids = tok.encode("é")  # two bytes
    assert ids == [0xC3, 0xA9]
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes(ids[:1]) == b"\xc3"


def test_encode_batch_matches_encode():
    tok = _tok()
    texts = ["hello there", "", "日本 ü", "x=1;\n"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# --- trace ----------------------------------------------------------------------------------------
COURSE_CORPUS = "th\n" * 150 + "er\n" * 120  # the course's "t"+"h" then "e"+"r", at 1/1000 scale


def test_trace_prints_course_style_lines():
    steps = train_trace(COURSE_CORPUS, 5)
    assert len(steps) == 2  # nothing else to merge: newlines are chunks of their own
    assert str(steps[0]) == "merge 1: 't' + 'h' -> 'th' (count 150) -> vocab 257"
    assert str(steps[1]) == "merge 2: 'e' + 'r' -> 'er' (count 120) -> vocab 258"
    assert format_trace(steps).splitlines() == [str(steps[0]), str(steps[1])]


def test_train_verbose_and_trace_callback(capsys):
    seen: list[MergeStep] = []
    BPETokenizer.train(COURSE_CORPUS, 258, verbose=True, trace=seen.append)
    out = capsys.readouterr().out
    assert "merge 1: 't' + 'h' -> 'th' (count 150) -> vocab 257" in out
    assert "merge 2: 'e' + 'r' -> 'er' (count 120) -> vocab 258" in out
    assert [s.merged for s in seen] == [b"th", b"er"]


def test_trace_shows_partial_utf8_as_bytes():
    step = train_trace("éé", 1)[0]
    assert step.pair == (0xC3, 0xA9)
    assert str(step) == "merge 1: b'\\xc3' + b'\\xa9' -> 'é' (count 2) -> vocab 257"


# --- special tokens, save/load ---------------------------------------------------------------------
def test_special_tokens_take_the_last_ids():
    text = random_corpus(2000, seed=5)
    tok = BPETokenizer.train(text, 300, special_tokens={"eos": "<|endoftext|>", "pad": "<pad>"})
    assert tok.vocab_size == 300 and len(tok.merges) == 42
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (298, 299, None, None)
    assert tok.decode([*tok.encode("hi"), tok.eos_id]) == "hi<|endoftext|>"
    assert tok.eos_id not in tok.encode("<|endoftext|>")  # encode treats it as plain text


def test_save_load_round_trip(tmp_path):
    text = random_corpus(3000, seed=6)
    tok = BPETokenizer.train(text, 400, special_tokens={"eos": "<|endoftext|>"})
    out = tok.save(tmp_path / "run" / "tokenizer")
    assert (out / "tokenizer.json").is_file()
    for loaded in (BPETokenizer.load(out), load_tokenizer(out), load_tokenizer(out / "tokenizer.json")):
        assert isinstance(loaded, BPETokenizer)
        assert loaded.merges == tok.merges
        assert loaded.vocab_size == tok.vocab_size == 400
        assert loaded.eos_id == tok.eos_id
        sample = random_corpus(1000, seed=7)
        assert loaded.encode(sample) == tok.encode(sample)


# --- errors ---------------------------------------------------------------------------------------
def test_empty_corpus():
    with pytest.raises(ValueError, match="corpus is empty"):
        BPETokenizer.train("", 300)


def test_vocab_below_byte_alphabet():
    with pytest.raises(ValueError, match="at least 256"):
        BPETokenizer.train("hello", 255)
    with pytest.raises(ValueError, match=r"at least 257 \(the 256 byte tokens \+ 1 special"):
        BPETokenizer.train("hello", 256, special_tokens={"eos": "<eos>"})


def test_vocab_the_corpus_cannot_fill():
    with pytest.raises(ValueError, match=r"supports at most 263 tokens.*vocab_size <= 263 or train on more text"):
        BPETokenizer.train("aaabdaaabac", 264)
    assert BPETokenizer.train("aaabdaaabac", 263).vocab_size == 263


def test_decode_rejects_bad_ids():
    tok = BPETokenizer([])
    with pytest.raises(ValueError, match=r"token id 256 is not in this vocabulary \(ids are 0..255\)"):
        tok.decode([104, 256])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="must be integers"):
        tok.decode(["a"])


def test_bad_special_role_and_damaged_merges():
    with pytest.raises(ValueError, match="unknown special-token role 'sep'"):
        BPETokenizer([], special_tokens={"sep": "<sep>"})
    with pytest.raises(ValueError, match="refers to an id that does not exist"):
        BPETokenizer([(97, 300)])


def test_lone_surrogate_is_a_clear_error():
    with pytest.raises(ValueError, match="lone surrogate"):
        BPETokenizer.train("ab\udcffcd", 257)
    with pytest.raises(ValueError, match="lone surrogate"):
        BPETokenizer([]).encode("x\ud800")
