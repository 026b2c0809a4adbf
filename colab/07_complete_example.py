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
# # 7. The complete example: "I love pizza", number by number (Chapter 17)
#
# The course follows one sentence through its 6-wide model by hand. `tfd_jax.explain` does the same
# with the library's own functions: every printed number of the course is recomputed and compared,
# and the ones the course gets wrong are listed with the right values. (The command line does this
# too: `tfd-jax explain`.)

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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax import explain, notebook, viz
from tfd_jax.models import GPT, GPTConfig

print(notebook.summary())

# %% [markdown]
# ## The walkthrough
#
# Each step: the chapter, what was computed, our value, and whether the course printed the same.

# %%
report = explain.run(None)
words = ["I", "love", "pizza"]
for s in report.steps:
    try:
        value = np.round(np.asarray(s.ours, dtype=float), 3)
        shown = value.tolist() if value.size <= 6 else f"[{' x '.join(map(str, value.shape))}]"
    except (TypeError, ValueError):  # a step that holds several named values
        shown = ", ".join(s.ours) if isinstance(s.ours, dict) else str(s.ours)[:40]
    print(f"ch {s.chapter:>2}  {s.status or '-':<8} {s.label[:60]:<60} {shown}")

# %% [markdown]
# ## Head 1's attention, as the course computes it and as the decoder must
#
# Chapter 5 computes the attention of "I love pizza" with no mask; the model is a decoder, so
# Chapter 12's causal mask applies (erratum 3). The two maps side by side:

# %%
steps = {s.name: s.ours for s in report.steps}
weights = np.stack([steps["weights_bidirectional"], steps["weights_causal"]])  # [2 "heads", T, S]
mask = np.stack([np.ones((3, 3), bool), np.asarray(steps["causal_mask"], bool)])
viz.attention_map(weights, words, mask=mask, title="Left: Chapter 5 (no mask). Right: Chapter 12 (causal)")

# %% [markdown]
# ## Where the course is wrong
#
# Of the course's worked examples, most reproduce; these do not (the right values are in
# `tfd-jax explain --errata`):

# %%
summary = report.to_dict()["summary"]
print(f"{summary['examples']} worked examples: {summary['reproduced']} reproduce, "
      f"{summary['course_errors']} have errors, {summary['not_checkable']} cannot be checked")
for e in report.errata:
    print(f"- {e.id}: {e.why}")
assert report.verdicts_match_record

# %% [markdown]
# ## The same model as a library object
#
# `GPTConfig.preset("course")` is the course's model: d_model 6, 2 heads, d_ff 24, 3 post-LN blocks,
# ReLU, sinusoidal positions, no biases on Q/K/V/O, an untied head over 50,000 tokens. With random
# weights it cannot predict "delicious", but the shapes are the course's.

# %%
model = GPT(GPTConfig.preset("course", vocab_size=50_000), rngs=nnx.Rngs(0))
model.eval()
ids = jnp.array([steps["ids"]])  # "I love pizza" -> [123, 567, 999]
logits = model(ids)
print("ids", ids.tolist(), "-> logits", logits.shape)
print("most likely next id after 'pizza' (random weights):", int(jnp.argmax(logits[0, -1])))
