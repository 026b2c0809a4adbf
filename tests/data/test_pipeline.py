"""grain pipelines: fixed-shape batches, determinism, sharding, packing, checkpointable iterators.

Most tests use ``tokens = arange(N)``, so a row's first token is its window's start and the target
of token ``t`` is ``t + 1`` exactly when no boundary lies between them.
"""
from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tfd_jax.data import pipeline
from tfd_jax.data.corpora import Corpus, Document
from tfd_jax.data.pipeline import (
    IteratorRestore,
    IteratorSave,
    iterator_state,
    make_iterator,
    restore_iterator,
)
from tfd_jax.data.tokenized import write_tokens

N, B, T = 1000, 4, 8
TOKENS = np.arange(N, dtype=np.uint16)


def _lm(seed=0, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return make_iterator(TOKENS, batch_size=kw.pop("batch_size", B), seq_len=T, seed=seed, **kw)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# --- windows ---------------------------------------------------------------------------------

def test_window_batches_have_fixed_shapes_and_shifted_targets():
    for batch in _take(_lm(), 5):
        assert batch["tokens"].shape == batch["targets"].shape == batch["mask"].shape == (B, T)
        assert batch["tokens"].dtype == batch["targets"].dtype == np.int32
        assert batch["mask"].dtype == bool and batch["mask"].all()
        np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)
        np.testing.assert_array_equal(batch["tokens"], batch["tokens"][:, :1] + np.arange(T))


def test_same_seed_same_batches_different_seed_different_batches():
    assert _same(_take(_lm(seed=3), 6), _take(_lm(seed=3), 6))
    a = np.stack([b["tokens"] for b in _take(_lm(seed=3), 6)])
    c = np.stack([b["tokens"] for b in _take(_lm(seed=4), 6)])
    assert not np.array_equal(a, c)


def test_random_windows_start_anywhere_inside_the_stream():
    starts = np.concatenate([b["tokens"][:, 0] for b in _lm(num_epochs=1)])
    windows = (N - T) // T
    assert len(starts) == windows // B * B  # an "epoch" has as many windows as the "epochs" mode
    assert starts.min() >= 0 and starts.max() + T + 1 <= N
    assert len(set((starts % T).tolist())) > T // 2  # not on a grid: all sorts of offsets
    # uniform: each quarter of the stream gets about a quarter of 20 epochs' windows
    many = np.concatenate([b["tokens"][:, 0] for b in _lm(num_epochs=20)])
    counts = np.histogram(many, bins=4, range=(0, N - T))[0] / len(many)
    np.testing.assert_allclose(counts, 0.25, atol=0.04)
    with pytest.raises(ValueError, match="sampling"):
        _lm(sampling="grid")


def test_one_epoch_visits_every_window_once_and_epochs_differ():
    windows = (N - T) // T  # 124
    starts = np.concatenate([b["tokens"][:, 0] for b in _lm(num_epochs=1, sampling="epochs")])
    assert len(starts) == windows // B * B
    assert len(set(starts.tolist())) == len(starts)
    assert len(set((starts % T).tolist())) == 1  # one offset per epoch, windows T apart
    assert starts.max() + T + 1 <= N
    two = np.concatenate([b["tokens"][:, 0] for b in _lm(num_epochs=2, sampling="epochs")])
    assert len(two) == 2 * windows // B * B
    assert not np.array_equal(two[:windows - windows % B], two[windows:2 * windows - windows % B])


@pytest.mark.parametrize("sampling", ["random", "epochs"])
def test_two_shards_are_disjoint_and_make_up_the_global_batch(sampling):
    kw = dict(batch_size=8, sampling=sampling)
    full, s0, s1 = _lm(**kw), _lm(shard_index=0, shard_count=2, **kw), _lm(shard_index=1, shard_count=2, **kw)
    seen = []
    for _ in range(10):
        f, a, b = next(full), next(s0), next(s1)
        assert a["tokens"].shape == b["tokens"].shape == (4, T)
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), f["tokens"])
        seen += [*a["tokens"][:, 0].tolist(), *b["tokens"][:, 0].tolist()]
    assert len(seen) == 80
    if sampling == "epochs":  # within an epoch no window comes twice (random starts may repeat)
        assert len(set(seen)) == 80


def test_shards_default_to_jax_process_index_and_count():
    import jax

    assert pipeline.resolve_shard(None, None) == (jax.process_index(), jax.process_count())
    assert _same(_take(make_iterator(TOKENS, batch_size=B, seq_len=T, seed=1), 3), _take(_lm(seed=1), 3))


def test_restored_iterator_continues_with_the_next_batch():
    it = _lm(seed=7)
    _take(it, 5)
    state = iterator_state(it)
    json.dumps(state)  # small and JSON-able
    expected = _take(it, 4)
    fresh = restore_iterator(_lm(seed=7), state)
    assert _same(_take(fresh, 4), expected)
    assert not _same(_take(_lm(seed=7), 1), expected[:1])  # a fresh one would start elsewhere


@pytest.mark.parametrize("packing", [False, True])
def test_iterator_state_round_trips_through_an_orbax_checkpoint_manager(tmp_path, packing):
    docs = _docs([5, 13, 3, 9, 20, 11, 4, 17])
    make = (lambda: _packed(docs, seed=11)) if packing else (lambda: _lm(seed=11))
    it = make()
    _take(it, 3)
    weights = {"w": np.arange(3.0)}
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(weights), data=IteratorSave(it)))
        expected = _take(it, 3)  # drawn while the save may still be running
        manager.wait_until_finished()
    with ocp.CheckpointManager(tmp_path) as manager:  # as a new process would
        fresh = make()
        restored = manager.restore(3, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"w": np.zeros(3)}), data=IteratorRestore(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], weights["w"])
    assert restored["data"] is fresh
    assert _same(_take(fresh, 3), expected)


@pytest.mark.slow  # starting worker processes takes several seconds
def test_token_file_input_and_worker_processes(tmp_path, byte_tokenizer):
    text = "".join(chr(ord("a") + i % 26) for i in range(3000))
    tf = write_tokens(Corpus("t", "train", (Document("d", text),)), byte_tokenizer, tmp_path / "train",
                      progress=False)
    kw = dict(batch_size=B, seq_len=T, seed=5, shard_index=0, shard_count=1)
    expected = _take(make_iterator(tf, **kw), 6)
    assert _same(expected, _take(make_iterator(np.asarray(tf.tokens), **kw), 6))
    it = make_iterator(tf, num_workers=2, **kw)  # workers reopen the memory map by file name
    try:
        got = _take(it, 6)
        assert "iterators_in_use_states" in iterator_state(it)  # per-worker positions
    finally:
        it.close()
    assert _same(got, expected)


# --- packing ---------------------------------------------------------------------------------

def _docs(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.arange(offsets[-1], dtype=np.uint16), offsets


def _packed(data, seed=0, **kw):
    kw.setdefault("shard_index", 0)
    kw.setdefault("shard_count", 1)
    return make_iterator(data, packing=True, batch_size=kw.pop("batch_size", 2), seq_len=kw.pop("seq_len", 6),
                         seed=seed, **kw)


def _pairs(batches, offsets):
    """All (input, target) pairs under the mask; checks each one stays inside its document."""
    doc_of = lambda t: np.searchsorted(offsets, t, side="right") - 1  # noqa: E731
    pairs = []
    for b in batches:
        m = b["mask"]
        assert np.array_equal(m, b["segment_ids"] > 0)
        tok, tgt = b["tokens"][m], b["targets"][m]
        assert np.array_equal(doc_of(tok), doc_of(tgt))
        np.testing.assert_array_equal(tgt, tok + 1)
        pairs += tok.tolist()
    return pairs


def test_packing_segment_ids_positions_and_no_target_across_documents():
    tokens, offsets = _docs([5, 13, 3, 1, 9, 20])  # the one-token document has no pair
    batches = list(_packed((tokens, offsets), num_epochs=1))
    assert batches
    for b in batches:
        assert {k: v.shape for k, v in b.items()} == {k: (2, 6) for k in
                                                    ("tokens", "targets", "mask", "segment_ids", "positions")}
        for row in range(2):
            seg, pos, tok = b["segment_ids"][row], b["positions"][row], b["tokens"][row]
            real = seg[seg > 0]  # padding (0) only at the end of the last rows
            assert seg[0] == 1 and np.all(np.diff(real) >= 0) and np.all(seg[len(real):] == 0)
            for t in range(6):
                if t == 0 or seg[t] != seg[t - 1]:
                    assert pos[t] == 0
                elif seg[t] > 0:
                    assert pos[t] == pos[t - 1] + 1 and tok[t] == tok[t - 1] + 1
    pairs = _pairs(batches, offsets)
    assert len(pairs) == len(set(pairs))
    boundaries = set((offsets[1:] - 1).tolist())  # last token of each document: never an input
    assert not boundaries & set(pairs)


def test_packing_covers_all_pairs_and_shards_split_documents():
    tokens, offsets = _docs([7] * 8)  # 8 documents of 6 pairs
    every = set(range(len(tokens))) - set((offsets[1:] - 1).tolist())
    one = _pairs(_packed((tokens, offsets), batch_size=2, seq_len=4, num_epochs=1), offsets)
    assert sorted(one) == sorted(every)
    a = _pairs(_packed((tokens, offsets), batch_size=2, seq_len=4, num_epochs=1, shard_index=0, shard_count=2),
               offsets)
    b = _pairs(_packed((tokens, offsets), batch_size=2, seq_len=4, num_epochs=1, shard_index=1, shard_count=2),
               offsets)
    assert not set(a) & set(b) and sorted(a + b) == sorted(every)
    doc_of = lambda ts: set((np.searchsorted(offsets, ts, side="right") - 1).tolist())  # noqa: E731
    assert len(doc_of(a)) == len(doc_of(b)) == 4 and not doc_of(a) & doc_of(b)


def test_packed_iterator_is_deterministic_and_restorable():
    tokens, offsets = _docs([5, 13, 3, 9, 20, 11, 4, 17])
    assert _same(_take(_packed((tokens, offsets), seed=2), 8), _take(_packed((tokens, offsets), seed=2), 8))
    it = _packed((tokens, offsets), seed=2)
    _take(it, 5)  # stops inside a split document
    state = json.loads(json.dumps(iterator_state(it)))  # as grain's orbax handler stores it
    expected = _take(it, 6)
    assert _same(_take(restore_iterator(_packed((tokens, offsets), seed=2), state), 6), expected)


# --- errors ----------------------------------------------------------------------------------

def test_corpus_too_small_for_one_batch():
    with pytest.raises(ValueError, match=r"corpus has 39 tokens; one batch .*needs at least 40 .* use a smaller --batch-size/--seq-len"):
        make_iterator(TOKENS[:39], batch_size=B, seq_len=T, seed=0, shard_index=0, shard_count=1)
    tokens, offsets = _docs([3, 4])
    with pytest.raises(ValueError, match=r"5 \(input, target\) pairs; one packed batch needs 2\*6 = 12"):
        _packed((tokens, offsets))


def test_bad_batch_and_shard_arguments():
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        _lm(batch_size=4, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match="shard_index must be in 0..shard_count-1"):
        _lm(shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="flat"):
        make_iterator(TOKENS.reshape(10, 100), batch_size=B, seq_len=T, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="packing needs document boundaries"):
        make_iterator(TOKENS, packing=True, batch_size=B, seq_len=T, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        _lm(num_workers=-1)
