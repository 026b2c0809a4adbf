"""``tfd-jax data prepare``: tokenize a corpus once into train/val token files.

Example::

    tfd-jax data prepare --corpus tinyshakespeare --tokenizer runs/shakespeare/tokenizer --out data/shakespeare

writes ``OUT/train.bin``, ``OUT/val.bin`` (with their ``.offsets.npy`` and ``.json``), which
``tfd_jax.data.load_tokens(OUT, split)`` memory-maps for training.
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare training data (tokenize a corpus once)")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    prep = sub.add_parser(
        "prepare",
        help="tokenize a corpus into OUT/train.bin and OUT/val.bin",
        description="Tokenize the train and val splits of a corpus and write memory-mappable token files.",
    )
    prep.add_argument("--corpus", default="pystdlib",
                      help="'pystdlib' (default, no download), 'tinyshakespeare', a text file, a "
                           "directory or a glob pattern")
    prep.add_argument("--tokenizer", required=True, help="directory of a saved tokenizer")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--max-bytes", type=int, default=None,
                      help="use only about this many bytes of each split (quick runs)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_prepare)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _prepare(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from tfd_jax.cli import UserError
    from tfd_jax.data.corpora import load_corpus
    from tfd_jax.data.tokenized import write_tokens
    from tfd_jax.tokenizers.base import load_tokenizer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory (it will be created)")
    if args.max_bytes is not None and args.max_bytes <= 0:
        raise UserError(f"--max-bytes must be positive, not {args.max_bytes}")
    tokenizer = load_tokenizer(args.tokenizer)
    _check_not_another_runs_data(out, tokenizer)
    # Read both splits before writing anything, so a bad corpus leaves no directory behind.
    corpora = {split: load_corpus(args.corpus, split=split, max_bytes=args.max_bytes) for split in ("train", "val")}
    created = not out.exists()
    try:
        for split, corpus in corpora.items():
            tf = write_tokens(corpus, tokenizer, out / split, progress=not args.no_progress)
            print(
                f"{split}: {corpus.num_chars:,} chars in {len(corpus)} documents -> {tf.num_tokens:,} tokens "
                f"({tf.tokens.dtype.name}) in {tf.path}",
                file=sys.stdout,
            )
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return 0


def _check_not_another_runs_data(out, tokenizer) -> None:
    """``--out RUN/data`` of a training run: refuse a tokenizer other than the run's (its ids would
    mean other things to the run's model) and a run that is training now."""
    from tfd_jax.cli import UserError
    from tfd_jax.train.rundir import RunLock, is_run

    run = out.parent
    if out.name != "data" or not is_run(run):
        return
    from tfd_jax.tokenizers.base import load_tokenizer

    theirs = load_tokenizer(run / "tokenizer")
    if theirs.fingerprint() != tokenizer.fingerprint():
        raise UserError(
            f"--out {out} is the data of the training run {run}, whose tokenizer is another one; pass "
            f"--tokenizer {run / 'tokenizer'} to prepare data for that run, or choose another --out"
        )
    RunLock.acquire(run).release()  # refuses while the run is training
