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
# # 8. GPT-2 from Hugging Face weights, and what changes at scale (Chapters 9, 13 and 21)
#
# The course's model is 6 numbers wide; GPT-2 small is 768 wide with 12 layers and 124M parameters,
# and the same code runs both. Here we
#
# 1. load OpenAI's GPT-2 weights from the Hugging Face Hub into `tfd_jax.models.GPT` (reading the
#    safetensors file directly: no PyTorch needed) and its byte-level BPE tokenizer;
# 2. let it write, with the KV-cache decode loop;
# 3. look at what its attention heads do;
# 4. compare sizes: the course's toy, GPT-2's family and GPT-3.
#
# In test mode (no network) a small random GPT-2-shaped model written in the same file format
# stands in for the download.

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
from tfd_jax.decode import generate
from tfd_jax.interop import load_hf_gpt2
from tfd_jax.models import GPT, GPTConfig, count_params
from tfd_jax.nn import record_attention_weights
from tfd_jax.tokenizers import load_hf_tokenizer

print(notebook.summary())

# %%
if notebook.test_mode():
    path = notebook.offline_gpt2(notebook.run_dir("gpt2-offline"))
else:
    from huggingface_hub import snapshot_download  # preinstalled on Colab

    path = snapshot_download("openai-community/gpt2", allow_patterns=["*.json", "*.txt", "*.safetensors"])
on_accelerator = jax.default_backend() != "cpu"
model = load_hf_gpt2(path, compute_dtype="bfloat16" if on_accelerator else None)
tokenizer = load_hf_tokenizer(path)
cfg = model.config
print(f"{cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, vocabulary {cfg.vocab_size:,}, "
      f"context {cfg.context_length}")

# %% [markdown]
# ## Let it write
#
# Greedy decoding repeats itself quickly; sampling at temperature 0.8 with top-p 0.95 reads better.

# %%
prompt = "The meaning of life is"
ids = tokenizer.encode(prompt)
print("prompt tokens:", [tokenizer.decode([i]) for i in ids])
for settings in (dict(temperature=0.0), dict(temperature=0.8, top_p=0.95, seed=0)):
    out, lengths = generate(model, [ids], notebook.pick(40, 12), **settings)
    print(f"\n{settings}:\n{prompt}{tokenizer.decode(list(out[0, : lengths[0]]))}")

# %% [markdown]
# ## What the heads look at
#
# Some heads of a trained GPT-2 attend to the previous token, some to the first token (a "sink"
# where a head parks attention it does not need), some to the same word earlier on.

# %%
text = "The cat sat on the mat because the cat was tired."
tokens = jnp.array([tokenizer.encode(text)])
_, weights = record_attention_weights(model, lambda: model(tokens))
layer = min(4, cfg.num_layers - 1)
labels = [tokenizer.decode([int(i)]) for i in tokens[0]]
viz.attention_map(weights[layer], labels, mask=ops.causal_mask(tokens.shape[1]), heads=range(min(4, cfg.num_heads)),
                  title=f"GPT-2, layer {layer}, heads 0-3")

# %% [markdown]
# ## What changes at scale
#
# Parameters counted from shapes alone (`nnx.eval_shape` allocates nothing), training FLOPs per
# token (about `6 N`), and the KV cache per token in bf16. GPT-3's row comes from the course's scale
# table (Chapter 21): 2,048x wider, 48x more heads, 32x deeper than the toy.

# %%
from tfd_jax.decode.cache import bytes_per_token

def count(cfg):
    return count_params(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))  # shapes only, no memory

rows = [("course (toy)", GPTConfig.preset("course", vocab_size=50_000))]
rows += [(name, GPTConfig.preset(name)) for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")]
print(f"{'model':<14}{'d_model':>8}{'heads':>6}{'layers':>7}{'parameters':>18}{'GFLOP/token':>13}{'KV KiB/token':>14}")
for name, c in rows:
    n = count(c)
    kv = bytes_per_token(c.replace(dtype="bfloat16")) / 1024
    print(f"{name:<14}{c.d_model:>8}{c.num_heads:>6}{c.num_layers:>7}{n:>18,}{6 * n / 1e9:>13.2f}{kv:>14.1f}")
print(f"{'GPT-3':<14}{12288:>8}{96:>6}{96:>7}{'~175,000,000,000':>18}{6 * 175:>13.0f}{2 * 96 * 12288 * 2 / 1024:>14.1f}")
