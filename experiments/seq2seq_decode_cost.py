"""The cost of one decoding step of an encoder-decoder as its source grows (Chapter 19, Part 5).

Each decoder layer's cross-attention keys and values are computed once, when the cache is made, so a
step only reads them: the time per new token should stay nearly flat from a 16- to a 512-token
source, while the prefill (which encodes the source) grows. For contrast, ``recompute_ms_per_step``
times a step that computes the cross-attention keys and values from the encoder output again (what
a decoder without this cache would do). Prints one JSON object per source length and a last one
with the ratios.

    python experiments/seq2seq_decode_cost.py --preset t5-small --new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from machine import device_name


def _recompute_step_ms(model, source, steps: int, repeats: int) -> float:
    """ms per decoding step when every step recomputes each layer's cross-attention keys/values."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tfd_jax.nn.cache import EncoderDecoderCache

    graphdef, state = nnx.split(model)
    B = source.shape[0]

    @jax.jit
    def run(state, source):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(B, steps + 1, source=source)
        memory = m.encode(source)

        def body(_, self_attn):
            kv = [block.cross_key_value(memory) for block in m.decoder.unstacked()]  # again, every step
            c = EncoderDecoderCache(self_attn, tuple(jnp.swapaxes(k, 1, 2) for k, _ in kv),
                                    tuple(jnp.swapaxes(v, 1, 2) for _, v in kv), cache.source_valid)
            return m.forward_cached(jnp.ones((B, 1), jnp.int32), c, jnp.ones((B,), jnp.int32))[1].self_attn

        return jax.lax.fori_loop(0, steps, body, cache.self_attn)

    jax.block_until_ready(run(state, source))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(state, source))
        best = min(best, time.perf_counter() - t0)
    return best / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="t5-small")
    p.add_argument("--sources", default="16,512")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    from flax import nnx

    from tfd_jax.decode import generate
    from tfd_jax.models import EncoderDecoder, Seq2SeqConfig

    cfg = Seq2SeqConfig.preset(args.preset, dropout=0.0)
    model = EncoderDecoder(cfg, rngs=nnx.Rngs(0))
    model.eval()
    rng = np.random.default_rng(0)
    per_token, recompute = {}, {}
    for S in (int(s) for s in args.sources.split(",")):
        source = rng.integers(3, cfg.vocab_size, (args.batch_size, S)).tolist()

        def timed(n: int) -> float:
            generate(model, None, n, source=source)  # compile (and warm up) this shape
            best = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(generate(model, None, n, source=source))
                best = min(best, time.perf_counter() - t0)
            return best

        one, many = timed(1), timed(args.new_tokens)  # no EOS: every row makes all its tokens
        per_token[S] = (many - one) / (args.new_tokens - 1) * 1e3
        recompute[S] = _recompute_step_ms(model, np.asarray(source, np.int32), args.new_tokens, args.repeats)
        print(json.dumps({"what": "seq2seq_decode_cost", "preset": args.preset, "source_tokens": S,
                          "batch_size": args.batch_size, "prefill_and_first_token_ms": round(one * 1e3, 2),
                          "ms_per_token": round(per_token[S], 3), "recompute_ms_per_step": round(recompute[S], 3),
                          "device": device_name()}), flush=True)
    lengths = sorted(per_token)
    print(json.dumps({"what": "seq2seq_decode_cost_ratio", "preset": args.preset,
                      "ms_per_token": {str(k): round(v, 3) for k, v in per_token.items()},
                      "ratio_longest_to_shortest": round(per_token[lengths[-1]] / per_token[lengths[0]], 3),
                      "recompute_ms_per_step": {str(k): round(v, 3) for k, v in recompute.items()},
                      "recompute_ratio_longest_to_shortest": round(recompute[lengths[-1]] / recompute[lengths[0]], 3),
                      "device": device_name()}))


if __name__ == "__main__":
    main()
