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
# # 1. Tokens, embeddings and positions (Chapters 1-4)
#
# A transformer never sees letters. This notebook follows a sentence from text to the matrix the
# first layer reads:
#
# 1. **Vocabulary** (Ch. 1): every token the model knows has an id.
# 2. **Tokenization** (Ch. 2): byte-pair encoding (BPE) learns its vocabulary by merging the most
#    frequent pair of symbols, again and again.
# 3. **Embeddings** (Ch. 3): an id picks one row of a table of learned vectors.
# 4. **Positions** (Ch. 4): sine and cosine waves tell the model where each token sits.
#
# Everything below calls `tfd_jax`; change a number and run the cell again.

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

from tfd_jax import notebook, ops, viz
from tfd_jax.data.corpora import load_corpus
from tfd_jax.nn import Embed
from tfd_jax.tokenizers import BPETokenizer, CharTokenizer, train_trace

print(notebook.summary())

# %% [markdown]
# ## Chapters 1-2: from text to ids
#
# A character tokenizer has a tiny vocabulary but long sequences; BPE starts from the 256 bytes and
# adds one merged token per step, so common words become single tokens. The text here is the
# embedded default corpus (the Python standard library's source), so nothing is downloaded.

# %%
text = load_corpus("pystdlib", max_bytes=notebook.pick(200_000, 20_000)).text
sentence = "I love pizza"

chars = CharTokenizer.train(text + sentence)
print(f"characters: vocabulary {chars.vocab_size}, {len(chars.encode(sentence))} tokens for {sentence!r}")

trace = train_trace(text, 12)
viz.bpe_merge_table(trace)

# %%
bpe = BPETokenizer.train(text, vocab_size=notebook.pick(512, 300))
for line in (sentence, "    def __init__(self):"):
    ids = bpe.encode(line)
    print(f"{line!r}: {len(ids)} BPE tokens {[bpe.decode([i]) for i in ids]}")
    assert bpe.decode(ids) == line  # tokenization loses nothing
ids = bpe.encode(sentence)
# Python code is what this BPE has seen: its words merge, "pizza" stays in pieces.

# %% [markdown]
# ## Chapter 3: an embedding is a row lookup
#
# Picking row `id` of the table `E [V, M]` is the same as multiplying a one-hot vector by `E`; the
# lookup just skips the zeros.

# %%
embed = Embed(bpe.vocab_size, 6, rngs=nnx.Rngs(0))
X = embed(jnp.array(ids))                                   # [T, 6]
one_hot = jax.nn.one_hot(jnp.array(ids), bpe.vocab_size)    # [T, V]
print("X = E[ids]:\n", np.round(np.asarray(X), 3))
print("same as one_hot @ E:", bool(jnp.allclose(X, one_hot @ embed.embedding[...], atol=1e-6)))

# %% [markdown]
# ## Chapter 4: positions as waves
#
# Attention by itself does not know the order of the words. The sinusoidal table adds a different
# pattern to every position: dimension pair `(2i, 2i+1)` is a sine and a cosine of `pos / 10000^(2i/M)`.
# With the course's `M = 6` the three divisors are 1, 21.544 and 464.159 (the slowest wave repeats
# every ~2,916 positions, not ~62,800 as the course says: erratum 21).

# %%
pe = ops.sinusoidal_positions(3, 6)
print("PE for 'I love pizza' (positions 0-2):\n", np.round(np.asarray(pe), 4))
viz.positional_waves(d_model=6, num_positions=notebook.pick(100, 40))

# %%
viz.positional_heatmap(num_positions=notebook.pick(128, 32), d_model=notebook.pick(128, 32))

# %% [markdown]
# Why waves? Each pair is a rotation, so the dot product of two positions' encodings depends only
# on how far apart they are, not on where they are. That is what lets attention learn "the word two
# to the left" once, for every position.

# %%
table = np.asarray(ops.sinusoidal_positions(64, 32), np.float64)
for k in (1, 5):
    dots = [table[p] @ table[p + k] for p in range(0, 50, 10)]
    print(f"PE[p] . PE[p+{k}] for p = 0, 10, ..., 40:", np.round(dots, 4))
    assert np.ptp(dots) < 1e-4
