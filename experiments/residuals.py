"""What the training step keeps from the forward pass for the backward pass, in bytes.

    python experiments/residuals.py                                 # GPT-2 124M, bf16, B=16, T=1024
    python experiments/residuals.py --preset tiny --batch-size 8 --seq-len 128 --dtype float32
    python experiments/residuals.py --compile                       # also XLA's temp-buffer size

Everything the backward pass reads that the forward pass wrote goes through device memory twice
(written, then read), so these bytes are a device-independent measure of a step's memory traffic
and of its activation memory. The script traces the loss of ``GPT.token_losses`` under
``jax.ad_checkpoint.print_saved_residuals`` (shapes only: nothing runs, nothing is allocated),
groups the residuals by the source line that made them, and prints one JSON object. With
``--compile`` it also compiles the gradient for the local backend and adds XLA's own figure
(``temp_bytes``: the scratch memory of the compiled program, activations included).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from collections import Counter

_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "bool": 1, "u32": 4, "f64": 8, "i64": 8}
_LINE = re.compile(r"^(\w+)\[([\d,]*)\] (.*)$")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--attention-impl", default="xla", help="cudnn needs a GPU; xla shows XLA's own residuals")
    ap.add_argument("--remat", default=None, choices=["none", "full", "dots", "dots_no_batch"])
    ap.add_argument("--top", type=int, default=8, help="how many source lines to list")
    ap.add_argument("--compile", action="store_true", help="also compile and report XLA's temp bytes")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.ad_checkpoint import print_saved_residuals

    from tfd_jax.models import GPT, GPTConfig

    overrides = dict(dtype=args.dtype, attention_impl=args.attention_impl)
    if args.remat:
        overrides["remat"] = args.remat
    cfg = GPTConfig.preset(args.preset, **overrides)
    if args.seq_len > cfg.context_length:
        cfg = cfg.replace(context_length=args.seq_len)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))

    def loss(state, tokens):
        return nnx.merge(graphdef, state).token_losses(tokens, tokens).mean()

    tokens = jax.ShapeDtypeStruct((args.batch_size, args.seq_len), jnp.int32)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_saved_residuals(loss, state, tokens)
    total, by_source = 0, Counter()
    for line in text.getvalue().splitlines():
        m = _LINE.match(line.strip())
        if not m or "from the argument" in m.group(3) or "from a literal" in m.group(3):
            continue  # parameters and constants exist anyway
        n = _ITEMSIZE.get(m.group(1), 4)
        for d in filter(None, m.group(2).split(",")):
            n *= int(d)
        total += n
        source = re.sub(r"^.* from \S*?(tfd_jax/)", r"\1", m.group(3))
        by_source[source] += n
    record = {
        "what": "residuals", "preset": args.preset, "dtype": args.dtype, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "attention_impl": cfg.attention_impl, "remat": cfg.remat_policy,
        "saved_bytes": total, "saved_gib": round(total / 2**30, 3),
        # the attention scores' share (none with a fused kernel such as cuDNN's, which keeps O(T))
        "attention_bytes": sum(b for s, b in by_source.items() if s.startswith("tfd_jax/ops/attention.py")),
        "largest": [{"source": s, "bytes": b} for s, b in by_source.most_common(args.top)],
    }
    if args.compile:
        compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
        mem = compiled.memory_analysis()
        record.update(backend=jax.default_backend(), temp_bytes=getattr(mem, "temp_size_in_bytes", None))
    print(json.dumps(record), flush=True)
    return record


if __name__ == "__main__":
    main()
