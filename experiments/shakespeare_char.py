"""nanoGPT's character-level Shakespeare runs, with tfd_jax.

Two published configurations:

* ``cpu``: 4 layers, 4 heads, 128 wide, block 64, batch 12, 2,000 iterations, lr 1e-3 -> 1e-4,
  warmup 100, beta2 0.99, weight decay 0.1, dropout 0 (nanoGPT reports val loss about 1.88).
* ``gpu``: 6 layers, 6 heads, 384 wide, block 256, batch 64, 5,000 iterations, dropout 0.2
  (nanoGPT reports about 1.47).

    python experiments/shakespeare_char.py --config cpu [--data PATH] [--out DIR]

``--data`` takes a local copy of tinyshakespeare (otherwise it is downloaded once and cached).
The last line printed is JSON with the final validation loss and the wall time.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

CONFIGS = {
    "cpu": dict(layers=4, heads=4, width=128, block=64, batch=12, iters=2000, dropout=0.0, lr=1e-3, min_lr=1e-4),
    "gpu": dict(layers=6, heads=6, width=384, block=256, batch=64, iters=5000, dropout=0.2, lr=1e-3, min_lr=1e-4),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    ap.add_argument("--data", default="tinyshakespeare", help="path to tinyshakespeare.txt (default: download and cache)")
    ap.add_argument("--out", default=None, help="run directory (default: a new temporary directory)")
    ap.add_argument("--iters", type=int, default=None, help="override the number of iterations")
    ap.add_argument("--eval-batches", type=int, default=100)
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    from tfd_jax.train import OptimConfig, TrainConfig, train

    c = CONFIGS[args.config]
    iters = args.iters or c["iters"]
    cfg = TrainConfig(
        out=args.out or tempfile.mkdtemp(prefix=f"shakespeare_{args.config}_"),
        force=args.out is not None,
        data=args.data,
        max_bytes=None,
        tokenizer="char",
        preset="tiny",
        model_overrides=dict(
            d_model=c["width"], num_heads=c["heads"], num_layers=c["layers"], context_length=c["block"],
            dropout=c["dropout"], tie_embeddings=True, activation="gelu",  # nanoGPT's nn.GELU is the exact one
            # nanoGPT's bias=False: no biases in the linear layers or the LayerNorms
            qkv_bias=False, out_bias=False, ffn_bias=False, norm_bias=False,
        ),
        steps=iters,
        batch_size=c["batch"],
        seq_len=c["block"],
        optim=OptimConfig(lr=c["lr"], min_lr=c["min_lr"], warmup_steps=100, decay_steps=iters, b2=0.99, weight_decay=0.1,
                          decay_embeddings=True),  # nanoGPT decays every 2-D parameter, embeddings included
        precision=args.precision,
        log_every=50,
        eval_every=max(iters // 4, 1),
        eval_batches=args.eval_batches,
        ckpt_every=iters,
        samples=1,
        sample_tokens=200,
        sample_prompts=("\n",),
        progress=args.progress,
        seed=args.seed,
    )
    t0 = time.time()
    summary = train(cfg)
    result = {
        "config": args.config,
        "seed": args.seed,
        "iters": iters,
        "val_loss": summary["val_loss"],
        "train_loss": summary["final_loss"],
        "wall_s": round(time.time() - t0, 1),
        "compile_and_first_step_s": summary.get("compile_and_first_step_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "num_params": summary.get("num_params"),
        "run_dir": cfg.out,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
