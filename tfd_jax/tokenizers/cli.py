"""``tfd-jax tokenizer train | encode | decode`` (Chapters 1-2 from the shell).

Examples::

    tfd-jax tokenizer train --kind bpe --vocab-size 1000 --input corpus.txt --out run/tokenizer
    tfd-jax tokenizer encode --tokenizer run/tokenizer --text "To be, or not to be"
    echo "84 111 32" | tfd-jax tokenizer decode --tokenizer run/tokenizer
"""
from __future__ import annotations

import argparse
import re
import sys

from tfd_jax.cli import UserError
from tfd_jax.tokenizers.base import Tokenizer, load_tokenizer, read_text_file

KINDS = ("bpe", "spm", "char")


def register(subparsers) -> None:
    """Add the ``tokenizer`` command and its ``train``, ``encode`` and ``decode`` subcommands."""
    parser = subparsers.add_parser(
        "tokenizer", help="train a tokenizer, or encode/decode with one (Chapters 1-2)",
        description="Train a tokenizer on a text file, or encode text / decode ids with a saved one.",
    )
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: _help(parser))

    p = sub.add_parser("train", help="train a tokenizer on a UTF-8 text file and save it to a directory")
    p.add_argument("--kind", choices=KINDS, default="bpe",
                   help="bpe: from-scratch byte-level BPE; spm: sentencepiece; char: one id per character")
    p.add_argument("--vocab-size", type=int, help="vocabulary size (bpe: >= 256; spm: >= ~300; not for char)")
    p.add_argument("--input", required=True, metavar="PATH", help="training corpus, a UTF-8 text file")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to save the tokenizer into")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="sentencepiece model type (spm only)")
    p.add_argument("--verbose", action="store_true", help="print each BPE merge / the sentencepiece log")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="print the ids of a text, space-separated")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="a directory written by 'tokenizer train'")
    p.add_argument("--text", help="the text to encode (default: read standard input)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="print the text of a list of ids")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="a directory written by 'tokenizer train'")
    p.add_argument("--ids", help="ids separated by spaces or commas (default: read standard input)")
    p.set_defaults(func=cmd_decode)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _read_input(path: str) -> str:
    try:
        return read_text_file(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def _read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"standard input is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8 first"
        ) from None


def _load(path: str) -> Tokenizer:
    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def cmd_train(args: argparse.Namespace) -> int:
    from tfd_jax.tokenizers import BPETokenizer, CharTokenizer, SentencePieceTokenizer

    if args.kind == "char":
        if args.vocab_size is not None:
            raise UserError(
                "--vocab-size does not apply to --kind char (its vocabulary is the corpus's distinct "
                "characters); drop --vocab-size"
            )
    elif args.vocab_size is None:
        raise UserError(f"--vocab-size is required for --kind {args.kind}")
    text = _read_input(args.input)
    if not text:
        raise UserError(f"{args.input} is empty: the corpus needs some text to train a tokenizer on")
    try:
        if args.kind == "bpe":
            tok = BPETokenizer.train(text, args.vocab_size, verbose=args.verbose)
        elif args.kind == "spm":
            tok = SentencePieceTokenizer.train(text, args.vocab_size, model_type=args.model_type, verbose=args.verbose)
        else:
            tok = CharTokenizer.train(text)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = tok.save(args.out)
    n_tokens = len(tok.encode(text))
    print(
        f"trained a {args.kind} tokenizer with {tok.vocab_size} tokens on {len(text.encode('utf-8')):,} bytes "
        f"({n_tokens:,} tokens, {len(text.encode('utf-8')) / max(n_tokens, 1):.2f} bytes/token); saved to {out}"
    )
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer)
    text = args.text if args.text is not None else _read_stdin()
    try:
        ids = tok.encode(text)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(" ".join(map(str, ids)))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    tok = _load(args.tokenizer)
    raw = args.ids if args.ids is not None else _read_stdin()
    ids = []
    for item in re.split(r"[\s,]+", raw.strip()):
        if not item:
            continue
        try:
            ids.append(int(item))
        except ValueError:
            raise UserError(f"ids must be integers separated by spaces or commas, got {item!r}") from None
    try:
        text = tok.decode(ids)
    except ValueError as e:
        raise UserError(str(e)) from None
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0
