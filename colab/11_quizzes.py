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
# # 11. The quizzes, checked live (Chapter 20)
#
# Chapter 20 ends the course with two quizzes, one for kids and one for engineers. Here each answer
# comes with an experiment the library runs to show it is true of this code: the variance of scaled
# scores, the cost of attention, gradients through residuals, LayerNorm's independence from the
# batch, the masks of encoders and decoders, and more. The same checks run from the command line:
# `tfd-jax quiz`.
#
# Try to answer each question before you read the answer.

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
import matplotlib.pyplot as plt

from tfd_jax import notebook, ops
from tfd_jax.quiz import QUESTIONS, format_results, run_quiz

print(notebook.summary())

# %% [markdown]
# ## The questions
#
# Kids: K1-K5. Engineers: E1-E11.

# %%
for q in QUESTIONS:
    print(f"{q.id}. {q.question}")

# %% [markdown]
# ## The answers, each with its check

# %%
results = run_quiz()
print(format_results(results))
assert all(r.passed for r in results), [r.id for r in results if not r.passed]

# %% [markdown]
# ## E1 in a picture: why divide by sqrt(d_k)
#
# The variance of `q . k` grows with the head width; divided by `sqrt(d_k)` it stays at 1 whatever
# the width, and the softmax keeps a spread of weights instead of picking one key.

# %%
widths = [4, 16, 64, 256] if not notebook.test_mode() else [4, 16, 64]
raw, scaled = [], []
for i, d in enumerate(widths):
    q, k = jax.random.normal(jax.random.key(i), (2, 1, 256, 1, d))
    raw.append(float(jnp.var(ops.attention_scores(q, k, scale=1.0))))
    scaled.append(float(jnp.var(ops.attention_scores(q, k))))
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(widths, raw, "o-", label="q . k")
ax.loglog(widths, scaled, "o-", label="q . k / sqrt(d_k)")
ax.set_xlabel("head width d_k"); ax.set_ylabel("variance of the scores"); ax.grid(alpha=0.3, which="both")
ax.legend(); ax.set_title("Scaled scores keep variance 1")
plt.show()
