"""How long the from-scratch BPE (Chapter 2) takes to learn a vocabulary on ~1 MB of text.

    python experiments/bpe_speed.py --data corpus.txt [--vocab 1000] [--bytes 1000000]

Prints one JSON line: {"seconds": training time, "vocab": vocab size, "bytes": corpus bytes used,
"encode_seconds": time to encode that corpus, "bytes_per_token": compression}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from tfd_jax.tokenizers import BPETokenizer, read_text_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary size to train (default 1000)")
    parser.add_argument("--bytes", type=int, default=1_000_000, help="use the first N bytes (default 1,000,000)")
    args = parser.parse_args(argv)
    try:
        text = read_text_file(args.data)
    except (FileNotFoundError, ValueError) as e:
        print(f"bpe_speed: error: {e}", file=sys.stderr)
        return 2
    # cut at a character boundary at or below the byte budget
    text = text.encode("utf-8")[: args.bytes].decode("utf-8", errors="ignore")
    n_bytes = len(text.encode("utf-8"))

    start = time.perf_counter()
    tok = BPETokenizer.train(text, args.vocab)
    seconds = time.perf_counter() - start

    start = time.perf_counter()
    ids = tok.encode(text)
    encode_seconds = time.perf_counter() - start
    assert tok.decode(ids) == text

    print(json.dumps({
        "seconds": round(seconds, 3),
        "vocab": tok.vocab_size,
        "bytes": n_bytes,
        "encode_seconds": round(encode_seconds, 3),
        "bytes_per_token": round(n_bytes / max(len(ids), 1), 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
