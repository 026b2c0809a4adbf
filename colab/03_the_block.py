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
# # 3. The block: feed-forward, residuals, LayerNorm, stacking (Chapters 7-9)
#
# After attention has mixed information *between* tokens, each token is processed on its own:
#
# - **Feed-forward network** (Ch. 7): widen to `d_ff = 4 d_model`, apply a non-linearity, narrow back.
# - **Residual connection** (Ch. 8): add the sublayer's output to its input, `x + f(x)`.
# - **LayerNorm** (Ch. 8): standardise each token's vector (mean 0, variance 1), then scale and shift.
# - **Stacking** (Ch. 9): the same block, repeated; the course uses 3, GPT-2 12, GPT-3 96.
#
# The course puts LayerNorm after the residual add (post-LN); GPT-2 puts it before the sublayer
# (pre-LN). We measure why that matters for deep stacks.

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
import numpy as np
from flax import nnx

from tfd_jax import explain, notebook, ops
from tfd_jax.models import GPT, GPTConfig, count_params

print(notebook.summary())

# %% [markdown]
# ## Chapter 7: the non-linearity
#
# Without it, two linear layers would collapse into one. The course uses ReLU; GPT-2 uses GELU (its
# tanh approximation), Llama SiLU inside a gate.

# %%
x = jnp.linspace(-4, 4, 200)
fig, ax = plt.subplots(figsize=(6, 3.5))
for name in ("relu", "gelu", "gelu_tanh", "silu"):
    ax.plot(x, ops.activation_fn(name)(x), label=name)
ax.legend(); ax.grid(alpha=0.3); ax.set_title("Activation functions (ops.activation_fn)")
plt.show()

# %% [markdown]
# ## Chapter 8: the course's residual and LayerNorm numbers
#
# The walkthrough recomputes them; LayerNorm uses the population variance (divide by M) with
# `eps` inside the square root.

# %%
steps = {s.name: s for s in explain.run(None).steps}
for name in ("ffn_hidden", "ffn_relu", "residual", "ln_mean", "ln_variance", "layer_norm"):
    s = steps[name]
    print(f"{s.label}:\n   ours {np.round(np.asarray(s.ours, float), 4)}   ({s.status or 'not printed by the course'})")

x = jnp.asarray(steps["residual"].ours, jnp.float32)
y = ops.layer_norm(x, None, None)
print("after LayerNorm: mean", round(float(y.mean()), 6), "variance", round(float(y.var()), 4))

# %% [markdown]
# ## Chapter 9: how many parameters?
#
# The course says "~5,000" for its toy model, forgetting the 50,000 x 6 embedding table
# (erratum 19). The library counts:

# %%
def count(cfg):
    return count_params(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))  # shapes only, no memory

course = GPTConfig.preset("course", vocab_size=50_000)
for tied in (False, True):
    print(f"course model, {'tied' if tied else 'untied'} head: {count(course.replace(tie_embeddings=tied)):,}")
print(f"without the embedding table and the output head: {count(course) - 2 * 50_000 * 6:,}")

# %% [markdown]
# ## Post-LN versus pre-LN in a deep stack
#
# At initialisation, how large is the gradient that reaches each layer? Post-LN normalises the
# residual stream after every block, so the gradient has to pass through every LayerNorm on its way
# down; pre-LN keeps an untouched path `x + f(LN(x))` from the loss to the first layer.

# %%
L = notebook.pick(24, 6)
tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, 256)

def grad_norms(norm_position):
    cfg = GPTConfig.preset("tiny", vocab_size=256, num_layers=L, norm_position=norm_position,
                           final_norm=norm_position == "pre")
    model = GPT(cfg, rngs=nnx.Rngs(0))
    grads = nnx.jit(nnx.grad(lambda m: ops.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:])))(model)
    flat = nnx.to_flat_state(nnx.state(grads, nnx.Param))
    per_layer = np.zeros(L)
    for path, leaf in flat:
        if path[0] == "blocks":
            per_layer[int(path[1])] += float(jnp.sum(jnp.square(leaf[...])))
    return np.sqrt(per_layer)

fig, ax = plt.subplots(figsize=(6, 3.5))
for pos in ("post", "pre"):
    ax.plot(range(L), grad_norms(pos), "o-", label=f"{pos}-LN")
ax.set_yscale("log"); ax.set_xlabel("layer"); ax.set_ylabel("gradient norm")
ax.set_title(f"Gradient reaching each of {L} layers at initialisation"); ax.legend(); ax.grid(alpha=0.3)
plt.show()
