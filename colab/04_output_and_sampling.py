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
# # 4. The output head and sampling (Chapter 10)
#
# The last hidden vector of a position becomes one score (**logit**) per vocabulary token,
# `logits = h @ W_vocab`; softmax turns the scores into probabilities, and a **sampler** picks the
# next token:
#
# - **temperature** divides the logits: below 1 sharpens the distribution, above 1 flattens it;
# - **top-k** keeps the k best tokens, **top-p** the smallest set whose probability reaches p;
# - **greedy** (temperature 0) always takes the best one.

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

from tfd_jax import explain, notebook, ops, viz
from tfd_jax.explain.data import examples_by_id

print(notebook.summary())

# %% [markdown]
# ## The course's six candidates after "I love pizza"
#
# The course prints logits for six tokens. Its probabilities divide by an assumed total of 500
# over the whole vocabulary; over these six alone the softmax is:

# %%
example = examples_by_id(explain.load_examples())["ch10.logits_softmax"]["inputs"]
tokens, logits = list(example["logits"]), jnp.array(list(example["logits"].values()))
probs = jax.nn.softmax(logits)
for t, z, p in zip(tokens, logits, probs):
    print(f"{t:>6}: logit {float(z):5.1f}  probability {float(p):.4f}")

viz.sampling_distributions(logits, tokens, temperatures=(0.5, 1.0, 1.5), top_ps=(1.0, 0.9, 0.6))

# %% [markdown]
# ## The course's temperature example, corrected
#
# For logits 4.7 / 3.2 / 2.1 at T = 0.5 the course prints 94.3 / 5.2 / 0.5 %; `e^6.4` is 601.8, not
# 665, and the right figures are 94.76 / 4.72 / 0.52 % (erratum 13).

# %%
t05 = jax.nn.softmax(ops.filter_logits(jnp.array([4.7, 3.2, 2.1]), temperature=0.5))
print("T = 0.5:", np.round(np.asarray(t05) * 100, 2), "%")
assert np.allclose(np.asarray(t05) * 100, [94.76, 4.72, 0.52], atol=0.01)

# %% [markdown]
# ## The sampler draws what the distribution says
#
# `ops.sample` is the library's one sampler (the decode loop calls it too). Drawn many times, its
# frequencies match the filtered softmax; top-p 0.9 never draws a token outside the kept set.

# %%
draws = notebook.pick(50_000, 5_000)
keys = jax.random.split(jax.random.key(0), draws)
for T, top_p in ((1.0, None), (0.7, 0.9)):
    ids = jax.vmap(lambda k: ops.sample(k, logits, temperature=T, top_p=top_p))(keys)
    freq = np.bincount(np.asarray(ids), minlength=len(tokens)) / draws
    want = np.asarray(jax.nn.softmax(ops.filter_logits(logits, temperature=T, top_p=top_p)))
    print(f"T={T}, top_p={top_p}: drawn {np.round(freq, 3)} expected {np.round(want, 3)}")
    assert np.abs(freq - want).max() < 0.03 and freq[want == 0].sum() == 0

# %% [markdown]
# Greedy decoding is temperature 0: the same answer every time.

# %%
print("greedy picks:", tokens[int(ops.sample(jax.random.key(1), logits, temperature=0.0))])
