"""Masked-LM pre-training of a small BERT on the embedded corpus: how far beyond the most-frequent-token
baseline it gets, and how long that takes.

A tiny BERT first learns how often each token occurs (its masked-token accuracy then equals that of
always guessing the most frequent token) and only later learns to use the context around a masked
position. This script trains one run and prints, as JSON, the masked-token accuracy on the
validation split at each evaluation next to that baseline, with the wall time and the CPU/GPU.

    python experiments/mlm_pretrain.py --steps 600 --out /tmp/mlm_run

The defaults are those of ``tfd-jax train --task mlm`` (sentencepiece with 512 tokens, batch 16 x
128, a constant learning rate of 1e-3 after 30 warmup steps, dropout 0.1).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from machine import device_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default="/tmp/tfd_mlm_pretrain")
    p.add_argument("--tokenizer", default="spm")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()

    from tfd_jax.data.tokenized import load_tokens
    from tfd_jax.tokenizers import load_tokenizer
    from tfd_jax.train import OptimConfig, TrainConfig, train
    from tfd_jax.train.metrics import read_metrics

    cfg = TrainConfig(task="mlm", arch="bert", preset=args.preset, out=args.out, force=True, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size, max_bytes=3_000_000, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      optim=OptimConfig(lr=args.lr, min_lr=args.lr, warmup_steps=30, b2=0.99, weight_decay=0.0),
                      log_every=50, eval_every=max(args.steps // 10, 1), eval_batches=8, ckpt_every=args.steps,
                      progress=False)
    t0 = time.time()
    summary = train(cfg)
    wall = time.time() - t0
    tokens = np.asarray(load_tokens(f"{args.out}/data/val").tokens)
    special = load_tokenizer(f"{args.out}/tokenizer").all_special_ids()
    counts = np.bincount(tokens[~np.isin(tokens, special)])
    baseline = float(counts.max() / counts.sum())
    curve = [(r["step"], round(r["val_masked_accuracy"], 4)) for r in read_metrics(args.out) if "val_masked_accuracy" in r]
    print(json.dumps({"what": "mlm_pretrain", "preset": args.preset, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size, "steps": args.steps,
                      "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
                      "most_frequent_token_baseline": round(baseline, 4), "val_masked_accuracy": curve,
                      "tokens_per_s": summary.get("tokens_per_s"), "wall_s": round(wall, 1), "device": device_name()}))


if __name__ == "__main__":
    main()
