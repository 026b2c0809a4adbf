"""Decoding speed with and without the KV cache, as output length grows (Chapter 13).

Chapter 13's claim: without a cache, token ``n`` reruns the model over all ``n`` previous tokens, so the
cost per token grows with the length; with a cache each token costs one position's worth of
projections and FFN plus attention over the cache, so the cost per token stays (nearly) flat.

Two loops, both greedy, on a randomly initialised model:

* ``cached``: :func:`tfd_jax.decode.generate`'s programs, a jitted prefill and one jitted
  ``while_loop`` writing a preallocated cache. ``prefill_ms`` is the prompt pass; ``ms_per_token`` is
  the loop's time divided by the new tokens.
* ``uncached``: the textbook loop, one full forward over the whole prefix per new token. The prefix is
  padded up to a multiple of ``--naive-granularity`` so that only a few programs compile (causal
  attention makes the padding harmless); all of them compile before timing starts.

Each configuration is timed ``--repeats`` times after a warm-up run and the fastest is kept. Every
line of output is one JSON object; ``match`` says whether both loops produced the same tokens.

    python experiments/decode_bench.py                      # "small" preset, CPU-sized lengths
    python experiments/decode_bench.py --preset gpt2        # GPT-2 small (the default on a GPU)
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax.decode.generate import _decode_loop, _prefill, plan_generation
from tfd_jax.models import GPT, GPTConfig


def _block(tree):
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
    return tree


def cached_run(graphdef, state, cfg, prompts: np.ndarray, n: int) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, loop seconds, tokens [B, n]) for one greedy generation."""
    plan = plan_generation(cfg, prompts, n)
    B = prompts.shape[0]
    out = jnp.zeros((B, plan.out_length), jnp.int32)
    args = (jnp.asarray(plan.prompts), jnp.asarray(plan.lengths))
    _block((out, args))
    t0 = time.perf_counter()  # the prefill allocates the cache itself, inside its program
    dstate = _block(_prefill(graphdef, state, *args, out, jax.random.key(0), plan.context,
                             cache_length=plan.cache_length))
    t1 = time.perf_counter()
    dstate = _block(_decode_loop(graphdef, state, dstate, plan.knobs.max_new, plan.knobs, spec=plan.spec))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, np.asarray(dstate.tokens)[:, :n]


def make_naive_step(graphdef):
    """``step(state, buf [B, L], t, width)``: one full forward over ``buf[:, :width]``; argmax at ``t - 1``."""

    def step(state, buf, t, width):
        model = nnx.merge(graphdef, state)
        model.eval()
        logits = model(buf[:, :width])  # [B, width, V]
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_slice(buf, nxt.astype(buf.dtype)[:, None], (0, t))

    return jax.jit(step, static_argnames=("width",), donate_argnames=("buf",))


def naive_run(step, state, prompts: np.ndarray, n: int, granularity: int, total: int) -> tuple[float, np.ndarray]:
    """(seconds, tokens [B, n]): Chapter 13's loop without a cache."""
    B, P = prompts.shape
    buf = jnp.zeros((B, total), jnp.int32).at[:, :P].set(jnp.asarray(prompts))
    _block(buf)
    t0 = time.perf_counter()
    for t in range(P, P + n):
        width = min(total, -(-t // granularity) * granularity)
        buf = step(state, buf, jnp.asarray(t, jnp.int32), width)
    buf = _block(buf)
    return time.perf_counter() - t0, np.asarray(buf)[:, P : P + n]


def main(argv=None) -> None:
    on_gpu = jax.default_backend() == "gpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2" if on_gpu else "small", help="a GPTConfig preset (default: small on CPU, gpt2 on GPU)")
    p.add_argument("--dtype", default="bfloat16" if on_gpu else "float32", help="compute dtype")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="new-token counts (default depends on the preset)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--naive-granularity", type=int, default=None, help="uncached prefix padding (default 16 on CPU, 64 on GPU)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-naive", action="store_true")
    args = p.parse_args(argv)

    cfg = GPTConfig.preset(args.preset, dtype=args.dtype, dropout=0.0, embed_dropout=0.0)
    lengths = args.lengths or ([32, 64, 128, 256, 512] if cfg.context_length >= 1024 else [16, 32, 64, 128])
    gran = args.naive_granularity or (64 if on_gpu else 16)
    if args.prompt_len + max(lengths) > cfg.context_length:
        p.error(f"prompt length + longest output exceed the context length {cfg.context_length}")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    step = make_naive_step(graphdef)
    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    total = args.prompt_len + max(lengths)

    for B in args.batch_sizes:
        prompts = rng.integers(0, cfg.vocab_size, (B, args.prompt_len)).astype(np.int32)
        if not args.skip_naive:  # compile every prefix width the uncached loop will meet
            naive_run(step, state, prompts, max(lengths), gran, total)
        for n in lengths:
            cached_run(graphdef, state, cfg, prompts, n)  # warm-up (compiles this bucket)
            pre, loop, tok_c = min((cached_run(graphdef, state, cfg, prompts, n) for _ in range(args.repeats)),
                                   key=lambda r: r[0] + r[1])
            common = dict(preset=args.preset, dtype=args.dtype, device=device, batch=B, prompt_len=args.prompt_len,
                          new_tokens=n)
            secs = pre + loop
            print(json.dumps(dict(common, mode="cached", cache_len=plan_generation(cfg, prompts, n).cache_length,
                                  seconds=round(secs, 4), prefill_ms=round(pre * 1e3, 3),
                                  ms_per_token=round(loop * 1e3 / n, 3), tokens_per_s=round(B * n / secs, 1))),
                  flush=True)
            if args.skip_naive:
                continue
            secs, tok_n = min((naive_run(step, state, prompts, n, gran, total) for _ in range(args.repeats)),
                              key=lambda r: r[0])
            print(json.dumps(dict(common, mode="uncached", seconds=round(secs, 4),
                                  ms_per_token=round(secs * 1e3 / n, 3), tokens_per_s=round(B * n / secs, 1),
                                  match=bool((tok_n == tok_c).all()))), flush=True)


if __name__ == "__main__":
    main()
