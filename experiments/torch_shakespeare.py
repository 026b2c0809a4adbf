"""nanoGPT's character-level Shakespeare CPU run, in PyTorch, as the peer for ``shakespeare_char.py``.

    python experiments/torch_shakespeare.py --data PATH [--seed 0] [--iters 2000] [--threads N]

The same recipe as nanoGPT's ``train.py`` with its CPU settings (4 layers, 4 heads, 128 wide, block
64, batch 12, no biases, exact GELU, tied head, AdamW betas (0.9, 0.99) with weight decay 0.1 on
every 2-D parameter, lr 1e-3 with 100 warmup steps ``lr * (it + 1) / 101`` then cosine to 1e-4 at
2,000, clipping at 1.0, batches of uniformly random windows from the first 90% of the characters),
on the model of ``experiments/torch_reference.py`` with nanoGPT's initialisation. It answers "what
validation loss does this recipe reach here?" independently of tfd_jax. The last line is JSON:
the validation loss over ``--eval-batches`` random batches of the last 10%, and nanoGPT's own noisier
20-batch estimate.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="path to tinyshakespeare.txt")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("torch_reference", HERE / "torch_reference.py")
    tr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tr)

    text = Path(args.data).read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    B, T, L = 12, 64, 4
    cfg = dict(vocab_size=len(chars), context_length=T, d_model=128, num_heads=4, num_layers=L, d_ff=512,
               activation="gelu", tie_embeddings=True, qkv_bias=False, out_bias=False, ffn_bias=False,
               norm_bias=False)
    torch.manual_seed(1337 + args.seed)
    model = tr.TorchGPT(cfg)
    torch.nn.init.normal_(model.wpe.weight, std=0.02)  # nanoGPT's (torch_reference uses GPT-2's 0.01)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))

    def lr_at(it, warmup=100, peak=1e-3, floor=1e-4):
        if it < warmup:
            return peak * (it + 1) / (warmup + 1)
        ratio = min((it - warmup) / (args.iters - warmup), 1.0)
        return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - floor)

    def batch(split):
        d = train if split == "train" else val
        ix = torch.randint(len(d) - T, (B,))
        return torch.stack([d[i:i + T] for i in ix]), torch.stack([d[i + 1:i + 1 + T] for i in ix])

    def loss_of(x, y):
        return F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1))

    @torch.no_grad()
    def val_loss(batches):
        model.eval()
        out = sum(loss_of(*batch("val")).item() for _ in range(batches)) / batches
        model.train()
        return out

    t0 = time.time()
    for it in range(args.iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch("train")
        loss = loss_of(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    wall = time.time() - t0
    result = {"impl": "torch", "seed": args.seed, "iters": args.iters, "train_loss": loss.item(),
              "val_loss": val_loss(args.eval_batches), "val_loss_20_batches": val_loss(20),
              "eval_batches": args.eval_batches, "wall_s": round(wall, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
