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
# # 2. Attention and masks (Chapters 5, 6 and 12)
#
# Attention lets every token look at the others and take a weighted mix of what they offer:
#
# - **Scores** `Q K^T / sqrt(d_k)`: how well each query matches each key (Ch. 5).
# - **Softmax** turns a row of scores into weights that add up to 1.
# - **Masks** (Ch. 12) forbid some pairs: a decoder may not look at the future, and nobody looks at
#   padding.
# - **Dropout** (Ch. 6) randomly zeroes some of those weights while training.
#
# We start from the course's own numbers for "I love pizza", then look inside a real model.

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
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax import explain, notebook, ops, viz
from tfd_jax.models import GPT, GPTConfig
from tfd_jax.nn import record_attention_weights

print(notebook.summary())

# %% [markdown]
# ## The course's head 1, recomputed
#
# `explain.run` pushes the course's worked example through the library; we take head 1's queries,
# keys and values for the three words (each `[3, 3]`: the course gives head 1 the first three
# dimensions).

# %%
steps = {s.name: s.ours for s in explain.run(None).steps}
words = ["I", "love", "pizza"]
Q, K, V = (jnp.asarray(steps[n], jnp.float32)[None, :, None, :] for n in "QKV")  # [B=1, T=3, H=1, D=3]

scores = ops.attention_scores(Q, K)[0, 0]
print("scaled scores Q K^T / sqrt(3):\n", np.round(np.asarray(scores), 3))
w_bi = ops.attention_weights(Q, K)
print("weights (each row sums to 1):\n", np.round(np.asarray(w_bi[0, 0]), 3))
viz.attention_map(w_bi, words, title="Chapter 5: no mask (every word sees every word)")

# %% [markdown]
# The course's Chapter 5 example is computed *without* a mask, but the model it builds is a decoder
# (erratum 3). With the causal mask, "I" can only look at itself, so its output is just `V_I`.

# %%
mask = ops.causal_mask(3)
w_causal = ops.attention_weights(Q, K, mask)
out = ops.attention(Q, K, V, mask=mask)
print("output of 'I' with the mask:", np.round(np.asarray(out[0, 0, 0]), 4), " V_I:", np.round(np.asarray(V[0, 0, 0]), 4))
assert jnp.allclose(out[0, 0, 0], V[0, 0, 0], atol=1e-6)
viz.attention_map(w_causal, words, mask=mask, title="Chapter 12: the causal mask (grey = may not attend)")

# %% [markdown]
# ## Every mask from what queries and keys are
#
# `ops.attention_mask` builds them all from positions, segments and which keys are real tokens:
# causal, padding (a batch of sentences of different lengths), and both at once.

# %%
pos = jnp.arange(5)[None]
valid = jnp.array([[True, True, True, False, False]])  # a 3-token sentence padded to 5
masks = {
    "causal": ops.attention_mask(q_positions=pos, k_positions=pos, causal=True),
    "padding": ops.attention_mask(k_valid=valid, q_positions=pos, k_positions=pos, causal=False),
    "causal + padding": ops.attention_mask(k_valid=valid, q_positions=pos, k_positions=pos, causal=True),
}
viz.mask_patterns({k: jnp.broadcast_to(m, (1, 1, 5, 5))[0, 0] for k, m in masks.items()},
                  ["I", "love", "pizza", "<pad>", "<pad>"])

# %% [markdown]
# ## Dropout on the weights (Chapter 6)
#
# Training drops each weight with probability p and scales the rest by 1/(1-p) so that the expected
# value stays the same: the course's 0.25 becomes 0.278 at p = 0.1. At inference nothing is dropped.

# %%
dropped = ops.dropout(w_causal, 0.1, jax.random.key(0))
print("kept weights are scaled by", float(1 / 0.9), "e.g.", np.round(np.asarray(dropped[0, 0]), 3))
print("0.25 ->", round(float(ops.dropout(jnp.full((1,), 0.25), 0.1, jax.random.key(3))[0]), 3), "(or 0 if dropped)")

# %% [markdown]
# ## Inside a model: several heads, several patterns
#
# A small GPT with random weights already shows the causal triangle in every head; each head
# has its own pattern. (Train one in notebook 5 and look again: heads specialise.)

# %%
cfg = GPTConfig.preset("tiny", vocab_size=64, context_length=32)
model = GPT(cfg, rngs=nnx.Rngs(0))
model.eval()
tokens = jnp.arange(8)[None] * 7 % 64
_, weights = record_attention_weights(model, lambda: model(tokens))
print(f"{len(weights)} layers, each {weights[0].shape} = [B, H, T, S]")
viz.attention_map(weights[0], [f"t{i}" for i in range(8)], mask=ops.causal_mask(8), heads=range(cfg.num_heads),
                  title="Layer 0 of a random tiny GPT")
