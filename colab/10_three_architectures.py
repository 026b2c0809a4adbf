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
# # 10. The three architectures: encoder, decoder, encoder-decoder (Chapter 19)
#
# The same blocks, three ways of wiring them:
#
# | | sees | trained to | examples |
# |---|---|---|---|
# | **encoder** | the whole input, both directions | fill in masked words | BERT |
# | **decoder** | only the past | predict the next token | GPT, Llama |
# | **encoder-decoder** | the encoder: all of the source; the decoder: its own past plus all of the source (cross-attention) | write a new sequence from a source | the original Transformer, T5, BART |
#
# The difference is mostly the mask. We draw the masks, corrupt a sentence the way BERT is trained,
# and train a small encoder-decoder to write numbers as words.

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

from tfd_jax import notebook, ops, viz
from tfd_jax.cli import main as tfd_jax_cli
from tfd_jax.decode import generate
from tfd_jax.tokenizers import BERT_SPECIAL_TOKENS, CharTokenizer
from tfd_jax.train.checkpoint import load_for_inference

print(notebook.summary())

# %% [markdown]
# ## The masks
#
# One builder, `ops.attention_mask`, makes all of them from what the queries and keys are: an
# encoder's (everything, minus padding), a decoder's (the lower triangle) and the cross-attention of
# an encoder-decoder (every target position sees every real source token).

# %%
src_valid = jnp.array([[True] * 5 + [False]])  # a 5-token source padded to 6
pos6, pos4 = jnp.arange(6)[None], jnp.arange(4)[None]
masks = {
    "encoder (BERT)": ops.attention_mask(q_positions=pos6, k_positions=pos6, k_valid=src_valid, causal=False),
    "decoder (GPT)": ops.attention_mask(q_positions=pos4, k_positions=pos4, causal=True),
    "cross-attention (target x source)": ops.cross_attention_mask(None, src_valid),
}
shapes = {"encoder (BERT)": (6, 6), "decoder (GPT)": (4, 4), "cross-attention (target x source)": (4, 6)}
viz.mask_patterns({k: jnp.broadcast_to(m, (1, 1) + shapes[k])[0, 0] for k, m in masks.items()},
                  title="Who may attend to whom")

# %% [markdown]
# ## How an encoder learns: masked words (BERT)
#
# 15% of the tokens are chosen; 80% of those become `[MASK]`, 10% a random token, 10% stay. The
# loss asks the model to recover the originals at the chosen positions only. (The course names the
# encoder but no objective for it; this is BERT's.)

# %%
text = "the encoder reads the whole sentence in both directions at once"
tok = CharTokenizer.train(text, special_tokens=BERT_SPECIAL_TOKENS)
ids = jnp.array([tok.encode(text)])
corrupted, chosen = ops.mlm_mask(jax.random.key(3), ids, jnp.ones_like(ids, bool),
                                 mask_id=tok.special_tokens["[MASK]"], vocab_size=tok.vocab_size, rate=0.3)
show = lambda row: "".join("_" if t == tok.special_tokens["[MASK]"] else tok.decode([int(t)]) for t in row)
print("original: ", text)
print("corrupted:", show(corrupted[0]))
print("loss at:  ", "".join("^" if c else " " for c in chosen[0]))

# %% [markdown]
# ## An encoder-decoder that writes numbers in words
#
# The built-in `numbers` task: digits in, English words out ("40213" -> "forty thousand two hundred
# thirteen"), with some numbers held out of training. The original Transformer's layout (post-LN,
# sinusoidal positions, shared embeddings) in a small size; the run reports its held-out exact match.

# %%
run = notebook.run_dir("numbers")
code = tfd_jax_cli(["train", "--task", "seq2seq", "--out", str(run), "--force", "--no-progress",
                    "--steps", str(notebook.pick(1500, 8)), "--batch-size", str(notebook.batch_size(notebook.pick(64, 8))),
                    "--eval-every", str(notebook.pick(250, 4)), "--log-every", str(notebook.pick(50, 2))])
assert code == 0
viz.metric_curves(run, ["token_accuracy"], title="Teacher-forced token accuracy")

# %%
model, tok = load_for_inference(run, log=None)
source = "40213"
out, lengths = generate(model, None, 40, source=[tok.encode(source)], eos_id=tok.eos_id, pad_id=tok.pad_id)
words = [int(t) for t in out[0, : lengths[0]] if int(t) != tok.eos_id]
print(source, "->", tok.decode(words))

# %% [markdown]
# ## Cross-attention: which digit each word looks at
#
# Each row is one written character of the answer (the decoder's query), each column one source
# digit. A trained model lines words up with the digits they spell out.

# %%
src = jnp.array([tok.encode(source)])
tgt_in = jnp.array([[tok.bos_id] + words[:-1]]) if words else jnp.array([[tok.bos_id]])
maps = model.cross_attention_weights(src, tgt_in)
target_labels = [repr(tok.decode([t]))[1:-1] or " " for t in (words or [tok.bos_id])]
viz.attention_map(maps[-1], list(source), query_tokens=target_labels, heads=range(min(2, maps[-1].shape[1])),
                  annotate=False, title="Last decoder layer's cross-attention")
