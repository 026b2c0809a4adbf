"""Training batches from a token array, with grain: deterministic, sharded, checkpointable (Chapter 11).

Every batch is a dict of NumPy arrays of fixed shape (``B`` = rows this process yields, ``T`` =
sequence length):

=============  ===========  ===================================================================
``tokens``     int32 [B, T]  the model's input ids
``targets``    int32 [B, T]  the id that follows each input position (what the loss predicts)
``mask``       bool  [B, T]  True where the target counts in the loss
=============  ===========  ===================================================================

Packed batches (``packing=True``) add ``segment_ids`` (int32 [B, T]: 1, 2, ... for the documents
of a row, 0 on padding) and ``positions`` (int32 [B, T]: position inside the segment, from 0), so
attention can be kept inside each document.

Two ways to cut batches:

* **windows** (:func:`make_lm_dataset`): windows of ``T + 1`` tokens from the flat token stream;
  inputs are ``window[:-1]``, targets ``window[1:]``; targets may run across a document's end (the
  eos token sits there). Two ways to place them:

  - ``sampling="random"`` (the default; nanoGPT's): every window starts at its own uniformly random
    position, a pure function of ``(seed, element index)``, so a token is seen at many different
    places in its context.
  - ``sampling="epochs"``: the stream is cut into windows that overlap by one token (window ``i``
    starts at ``offset + i * T``), so each token is a target exactly once per epoch; ``offset`` is
    drawn afresh each epoch from ``(seed, epoch)`` and the windows are shuffled.

  Either way an "epoch" is ``(N - T) // T`` windows, about one pass over the tokens.
* **packing** (:func:`make_packed_dataset`): documents, shuffled, are turned into (input, next
  token) pairs and concatenated into rows of ``T`` pairs; a document that does not fit is split
  and goes on in the next row. Since a pair never spans two documents, no target ever crosses a
  document boundary; ``mask`` is False only on padding (at the end of a finite run). The first
  token of a document is never a target (nothing before it in its document predicts it).

**Sharding** (multi-host). ``batch_size`` is the *global* batch. Every process builds the same
global stream of batches (same seed) and keeps its own slice: process ``p`` of ``P`` gets rows
``p * B/P ... (p + 1) * B/P`` of each global window batch, so the slices are disjoint and together
are exactly the single-process batch. Packing shards by document instead (process ``p`` packs
documents ``p, p + P, ...`` of the shuffled order): disjoint and covering too, but the row layout
depends on ``P``. With a finite ``num_epochs`` processes may then run out at different steps, so
multi-host packing should use ``num_epochs=None`` and stop by step count. ``shard_index`` /
``shard_count`` default to ``jax.process_index()`` / ``jax.process_count()``.

**Workers.** ``num_workers=0`` (the default; fine on Colab) builds batches in this process with a
small thread prefetch. ``num_workers > 0`` uses grain's multiprocessing prefetch (``mp_prefetch``);
batches come out in the same deterministic order, and memory-mapped tokens are reopened by file
name in each worker rather than copied.

**Checkpointing the iterator.** An iterator from :func:`make_iterator` is a
``grain.DatasetIterator``: ``iterator_state(it)`` returns a small JSON-able dict and
``restore_iterator(it, state)`` puts a fresh iterator (built with the same arguments) back so that
it yields exactly the batch that would have come next. For orbax, use grain's own handler through
the two argument classes exported here, :data:`IteratorSave` and :data:`IteratorRestore`
(``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``; each process writes its own
``process_<i>-of-<n>.json``)::

    import orbax.checkpoint as ocp
    from tfd_jax.data.pipeline import IteratorSave, IteratorRestore

    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=IteratorSave(it)))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_train_state),
        data=IteratorRestore(it)))          # `it` now continues where the saved one stopped

The iterator's state is taken when ``save`` is called (the handler is synchronous), so the loop
may keep drawing batches while an async save of the arrays is in flight.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np

from tfd_jax.data.tokenized import TokenFile

#: orbax argument classes for saving / restoring a data iterator (see the module docstring)
IteratorSave = grain.checkpoint.CheckpointSave
IteratorRestore = grain.checkpoint.CheckpointRestore

Batch = dict[str, np.ndarray]

#: how :func:`make_lm_dataset` places its windows (see the module docstring)
SAMPLINGS = ("random", "epochs")


# --- sharding --------------------------------------------------------------------------------

def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """``(index, count)``; missing values come from ``jax.process_index()/process_count()``."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in 0..shard_count-1, got {shard_index} of {shard_count}")
    return shard_index, shard_count


def _per_shard_batch(batch_size: int, shard_count: int) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    if batch_size % shard_count:
        raise ValueError(
            f"the global batch size {batch_size} does not split evenly over {shard_count} processes; "
            f"use a multiple of {shard_count}"
        )
    return batch_size // shard_count


# --- picklable pieces (mp_prefetch sends them to worker processes) ---------------------------

class _Tokens:
    """Holds the token array; a memory map travels to workers as its file name, not its data."""

    def __init__(self, tokens: np.ndarray):
        self.array = tokens

    def __getstate__(self):
        a = self.array
        if _is_whole_file_map(a):
            return {"file": a.filename, "dtype": a.dtype.str, "length": a.shape[0], "offset": a.offset}
        return {"array": np.asarray(a)}

    def __setstate__(self, state):
        if "file" in state:
            self.array = np.memmap(state["file"], dtype=np.dtype(state["dtype"]), mode="r",
                                   shape=(state["length"],), offset=state["offset"])
        else:
            self.array = state["array"]


def _is_whole_file_map(a: np.ndarray) -> bool:
    """True for a memory map of a whole file (a slice of one would reopen at the wrong place)."""
    return (
        isinstance(a, np.memmap) and bool(a.filename) and a.ndim == 1 and a.flags.c_contiguous
        and os.path.getsize(a.filename) == a.offset + a.nbytes
    )


@dataclass
class _WindowStart:
    """Global element index -> start of its window: ``offset(epoch) + window * T``."""

    windows_per_epoch: int
    seq_len: int
    max_offset: int
    seed: int

    def __call__(self, index: int, window: int) -> int:
        epoch = index // self.windows_per_epoch
        return _epoch_offset(self.seed, epoch, self.max_offset) + int(window) * self.seq_len


@dataclass(frozen=True)
class _RandomStart:
    """Global element index -> a window start drawn uniformly from ``0..max_start``."""

    max_start: int
    seed: int

    def __call__(self, index: int, _window: int) -> int:
        return _mix64(_mix64(self.seed) ^ index) % (self.max_start + 1)


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``x`` (cheap, stateless, reproducible)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=16)
def _epoch_offset(seed: int, epoch: int, max_offset: int) -> int:
    """A random offset in ``0..max_offset`` that depends only on ``(seed, epoch)``."""
    return int(np.random.default_rng([seed, epoch]).integers(0, max_offset + 1))


class _ReadWindows:
    """Global batch of window starts ``[B_global]`` -> this shard's rows as a batch dict."""

    def __init__(self, tokens: np.ndarray, seq_len: int, shard_index: int, rows: int):
        self.tokens, self.seq_len = _Tokens(tokens), seq_len
        self.lo, self.hi = shard_index * rows, (shard_index + 1) * rows

    def __call__(self, starts: np.ndarray) -> Batch:
        t = self.tokens.array
        rows = np.stack([t[s:s + self.seq_len + 1] for s in starts[self.lo:self.hi]]).astype(np.int32)
        return {
            "tokens": rows[:, :-1],
            "targets": rows[:, 1:],
            "mask": np.ones(rows[:, 1:].shape, dtype=bool),
        }


class _ReadPairs:
    """Document index -> ``{"tokens": doc[:-1], "targets": doc[1:]}`` (int32, variable length)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens, self.offsets = _Tokens(tokens), np.asarray(offsets, dtype=np.int64)

    def __call__(self, doc: int) -> Batch:
        d = np.asarray(self.tokens.array[self.offsets[doc]:self.offsets[doc + 1]], dtype=np.int32)
        return {"tokens": d[:-1], "targets": d[1:]}


class _SlicesAsTuples(grain.IterDataset):
    """Passes elements through; on restore, turns the packer's slice lists back into tuples.

    grain's concat-then-split packer keeps ``(start, stop)`` tuples in its state and compares them
    with the tuple ``(-1, -1)``. A state saved as JSON (as grain's orbax handler does) comes back
    with lists, and the comparison would then restore the wrong position.
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _SlicesAsTuplesIterator(self._parent.__iter__())


class _SlicesAsTuplesIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "remainder_slices" in state:
            state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state(state)


def _finish_packed(b: Batch) -> Batch:
    seg = b["tokens_segment_ids"].astype(np.int32)
    return {
        "tokens": b["tokens"].astype(np.int32),
        "targets": b["targets"].astype(np.int32),
        "mask": seg > 0,
        "segment_ids": seg,
        "positions": b["tokens_positions"].astype(np.int32),
    }


# --- datasets --------------------------------------------------------------------------------

def _read_options() -> grain.ReadOptions:
    # batches are cheap to cut from memory-mapped tokens: a couple of threads, a short queue
    return grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


def _with_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, not {num_workers}")
    if num_workers == 0:
        return ds
    # grain's worker start-up reads absl flags; a script that never parsed them would crash there
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _as_tokens(data: TokenFile | np.ndarray) -> np.ndarray:
    tokens = data.tokens if isinstance(data, TokenFile) else data
    if not isinstance(tokens, np.ndarray):  # a memory map is an ndarray and stays one
        tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a flat [N] array, got shape {tokens.shape}")
    return tokens


def make_lm_dataset(
    tokens: TokenFile | np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    num_workers: int = 0,
    sampling: str = "random",
) -> grain.IterDataset:
    """Batches of windows from a flat token array (see the module docstring).

    Args:
      tokens: ``[N]`` ids, or a :class:`TokenFile`.
      batch_size: the global batch; each process yields ``batch_size // shard_count`` rows.
      seq_len: ``T``.
      seed: the same seed gives the same batches on every run and every process.
      shard_index, shard_count: this process's slice (default: JAX's process index and count).
      num_epochs: passes over the windows; None repeats forever.
      num_workers: 0 builds batches in this process; more uses grain's multiprocessing prefetch.
      sampling: ``"random"`` (uniform window starts, nanoGPT's) or ``"epochs"`` (each token once
        per epoch).

    Returns:
      a grain ``IterDataset`` of dicts ``tokens``/``targets`` int32 ``[B, T]``, ``mask`` bool ``[B, T]``.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown window sampling {sampling!r}; choose one of {SAMPLINGS}")
    tokens = _as_tokens(tokens)
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    rows = _per_shard_batch(batch_size, shard_count)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, not {seq_len}")
    n = int(tokens.shape[0])
    windows = (n - seq_len) // seq_len  # leaves room for an offset of up to T-1 tokens
    if windows < batch_size:
        need = (batch_size + 1) * seq_len
        raise ValueError(
            f"corpus has {n} tokens; one batch of {batch_size} windows of {seq_len}+1 tokens needs at "
            f"least {need} (batch_size+1)*seq_len; use a smaller --batch-size/--seq-len or more data"
        )
    if sampling == "random":
        ds = grain.MapDataset.range(windows).repeat(num_epochs).map_with_index(_RandomStart(n - 1 - seq_len, seed))
    else:
        start = _WindowStart(windows, seq_len, max_offset=n - 1 - windows * seq_len, seed=seed)
        ds = (
            grain.MapDataset.range(windows)
            .shuffle(seed=seed)
            .repeat(num_epochs)  # each epoch is shuffled with a seed folded with the epoch number
            .map_with_index(start)
        )
    ds = (
        ds
        .batch(batch_size, drop_remainder=True)
        .map(_ReadWindows(tokens, seq_len, shard_index, rows))
        .to_iter_dataset(_read_options())
    )
    return _with_workers(ds, num_workers)


def make_packed_dataset(
    data: TokenFile | tuple[np.ndarray, np.ndarray],
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """Batches of documents packed into rows of ``T`` (see the module docstring).

    Args:
      data: a :class:`TokenFile`, or ``(tokens [N], offsets int64 [D + 1])``.
      batch_size: the global batch; each process yields ``batch_size // shard_count`` rows.
      seq_len, seed, shard_index, shard_count, num_epochs, num_workers: as in :func:`make_lm_dataset`.

    Returns:
      a grain ``IterDataset`` of dicts ``tokens``/``targets``/``segment_ids``/``positions`` int32
      ``[B, T]`` and ``mask`` bool ``[B, T]``.
    """
    if isinstance(data, TokenFile):
        tokens, offsets = data.tokens, data.offsets
    elif isinstance(data, tuple) and len(data) == 2:
        tokens, offsets = data
    else:
        raise ValueError(
            "packing needs document boundaries: pass a TokenFile (from load_tokens) or (tokens, offsets)"
        )
    tokens = _as_tokens(tokens)
    offsets = np.asarray(offsets, dtype=np.int64)
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    rows = _per_shard_batch(batch_size, shard_count)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, not {seq_len}")
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or offsets[-1] != tokens.shape[0]:
        raise ValueError("offsets must be [D + 1] document boundaries from 0 to len(tokens)")
    lengths = np.diff(offsets)
    docs = np.flatnonzero(lengths >= 2)  # a document of one token has no (input, target) pair
    pairs = int((lengths[docs] - 1).sum())
    if pairs < batch_size * seq_len:
        raise ValueError(
            f"corpus has {int(tokens.shape[0])} tokens in {offsets.size - 1} documents, {pairs} "
            f"(input, target) pairs; one packed batch needs {batch_size}*{seq_len} = "
            f"{batch_size * seq_len}; use a smaller --batch-size/--seq-len or more data"
        )
    ds = (
        grain.MapDataset.source(docs)
        .shuffle(seed=seed)
        .repeat(num_epochs)
        [shard_index::shard_count]
        .map(_ReadPairs(tokens, offsets))
        .to_iter_dataset(_read_options())
    )
    ds = grain.experimental.ConcatThenSplitIterDataset(
        ds, length_struct={"tokens": seq_len, "targets": seq_len}
    )
    ds = _SlicesAsTuples(ds).batch(rows, drop_remainder=True).map(_finish_packed)
    return _with_workers(ds, num_workers)


def make_iterator(
    data: TokenFile | np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    packing: bool = False,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    num_workers: int = 0,
    sampling: str = "random",
) -> grain.DatasetIterator:
    """The training loop's entry point: an iterator of batch dicts (``next(it)``) with state.

    ``packing=True`` needs document boundaries, i.e. a :class:`TokenFile` (or ``(tokens,
    offsets)``). ``sampling`` applies to windows only. See :func:`make_lm_dataset` for the other
    arguments.
    """
    kw = dict(batch_size=batch_size, seq_len=seq_len, seed=seed, shard_index=shard_index,
              shard_count=shard_count, num_epochs=num_epochs, num_workers=num_workers)
    if packing:
        return iter(make_packed_dataset(data, **kw))
    return iter(make_lm_dataset(data, sampling=sampling, **kw))


# --- iterator state --------------------------------------------------------------------------

def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The iterator's position as a JSON-able dict (small: indices, not data)."""
    return it.get_state()


def restore_iterator(it: grain.DatasetIterator, state: dict[str, Any]) -> grain.DatasetIterator:
    """Move ``it`` (built with the same arguments as the saved one) to ``state``; returns ``it``."""
    it.set_state(state)
    return it
