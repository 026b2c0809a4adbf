# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6. Inference and the KV cache (Chapter 13)
#
# Generating text is a loop: run the model, pick a token, append it, repeat. Run naively, step `t`
# recomputes the keys and values of all `t` earlier tokens in every layer. A **KV cache** keeps them:
# each step computes only the new token's K and V and attends to the stored ones.
#
# The library's decode loop (`tfd_jax.decode.generate`) allocates the cache once, runs a jitted
# prefill over the prompt, then a jitted `while_loop` on the device. Here we check that it gives
# exactly what the naive loop gives, time both, and look at what the cache costs in memory.

# %%
# Setup: on Colab, install tfd_jax the first time (with the JAX build for the runtime's TPU or
# GPU); where tfd_jax is already installed this does nothing.
import importlib.util, os, shutil, subprocess, sys

if importlib.util.find_spec("tfd_jax") is None:
    accel = (["jax[tpu]"] if os.path.exists("/dev/accel0") or "COLAB_TPU_ADDR" in os.environ
             else ["jax[cuda12]"] if shutil.which("nvidia-smi") else [])
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *accel,
                    "tfd_jax[plot] @ git+https://github.com/tfd-jax/tfd_jax"], check=True)

# %%
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax import notebook, viz
from tfd_jax.decode import generate
from tfd_jax.decode.cache import bytes_per_token
from tfd_jax.models import GPT, GPTConfig

print(notebook.summary())

# %% [markdown]
# ## Cached decoding equals the naive loop
#
# A random small GPT is enough to check the arithmetic. The naive loop runs the whole sequence
# through the model at every step (padded to a fixed length, so it compiles once; the causal mask
# keeps the padding from mattering) and takes the argmax at the last real position.

# %%
cfg = GPTConfig.preset(notebook.pick("small", "tiny"), vocab_size=256, context_length=256)
model = GPT(cfg, rngs=nnx.Rngs(0))
model.eval()
prompt, new = [5, 17, 42, 99], notebook.pick(120, 16)
T_max = len(prompt) + new

forward = nnx.jit(lambda m, x: m(x))

def naive_greedy(prompt, new):
    seq = np.zeros((1, T_max), np.int32)
    seq[0, : len(prompt)] = prompt
    for t in range(len(prompt), T_max):
        logits = forward(model, jnp.asarray(seq))  # everything, every step
        seq[0, t] = int(jnp.argmax(logits[0, t - 1]))
    return seq[0, len(prompt):]

naive_greedy(prompt, 2)
start = time.perf_counter(); slow = naive_greedy(prompt, new); t_naive = time.perf_counter() - start
generate(model, [prompt], new)
start = time.perf_counter(); tokens, lengths = generate(model, [prompt], new); t_cache = time.perf_counter() - start
fast = tokens[0]  # generate returns the new tokens only
print("identical tokens:", np.array_equal(np.asarray(fast), slow))
assert np.array_equal(np.asarray(fast), slow)
print(f"{new} tokens: naive {new / t_naive:,.0f} tokens/s, KV cache {new / t_cache:,.0f} tokens/s")

# %% [markdown]
# ## What the cache saves, and what it does not
#
# Without a cache, step `t` projects K and V for all `t` tokens: `1 + 2 + ... + n = n(n+1)/2`
# projections for `n` tokens (5,050 for 100, 500,500 for 1,000: not 500,000). With the cache each
# token is projected once: `n`. Attention itself still reads all `t` cached keys at step `t`, so its
# total stays quadratic (erratum 25): the cache removes recomputation, not attention.

# %%
for n in (100, 1000):
    print(f"n = {n:>5}: K/V projections without a cache {n * (n + 1) // 2:>9,}, with {n:>5,}")

# %% [markdown]
# ## The price: memory that grows with the context
#
# Each token costs `2 x layers x kv_heads x head_dim` numbers in every sequence of the batch.
# Grouped-query attention (Llama's `num_kv_heads < num_heads`) shrinks the cache by sharing K/V heads.

# %%
configs = {name: GPTConfig.preset(name).replace(dtype="bfloat16")
           for name in ("gpt2", "gpt2-xl", "tinyllama-1.1b", "llama2-7b")}
for name, c in configs.items():
    print(f"{name:>15}: {bytes_per_token(c) / 1024:7.1f} KiB per token (bf16), "
          f"{c.num_heads} query heads, {c.num_kv_heads} K/V heads")
viz.kv_cache_memory(configs, max_context=4096, batch_size=1, budget_bytes=16 * 2**30)
