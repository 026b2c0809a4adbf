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
# # 5. Training, hyperparameters and the usual problems (Chapters 11, 14-16)
#
# Training is a loop: predict the next token, measure the **cross-entropy** (how surprised the
# model was by the right answer), follow the gradient downhill with **Adam(W)**. This notebook
#
# 1. checks the loss a fresh model should start at (Ch. 11);
# 2. trains a small GPT on the embedded corpus with the library's `Trainer`, its batch sharded over
#    every device of this runtime (1 on a CPU or GPU, 8 on a TPU v2-8), and draws its curves;
# 3. looks at the learning-rate schedule (Ch. 14) and at fp16's limits (Ch. 15);
# 4. breaks a run on purpose (Ch. 16) and fixes it.

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
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax import notebook, ops, viz
from tfd_jax.decode import generate
from tfd_jax.models import GPT, GPTConfig
from tfd_jax.train import OptimConfig, TrainConfig, Trainer, TrainingError, lr_schedule
from tfd_jax.train.checkpoint import load_for_inference

print(notebook.summary())

# %% [markdown]
# ## Chapter 11: where the loss starts
#
# A fresh model knows nothing, so it spreads its bets evenly: its loss should be close to
# `ln(V)`, the cross-entropy of a uniform guess over V tokens.

# %%
V = 1000
model = GPT(GPTConfig.preset("tiny", vocab_size=V), rngs=nnx.Rngs(0))
tokens = jax.random.randint(jax.random.key(0), (4, 33), 0, V)
loss = float(ops.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]))
print(f"initial loss {loss:.3f}, ln({V}) = {math.log(V):.3f}")
assert abs(loss - math.log(V)) < 0.1

# %% [markdown]
# ## Train a small GPT
#
# The same run as `tfd-jax train`, from Python. `notebook.batch_size(16)` rounds the batch up to a
# multiple of the device count, so the mesh's data axis splits it over every device.

# %%
common = dict(
    data="pystdlib", max_bytes=notebook.pick(3_000_000, 200_000),
    tokenizer=notebook.pick("spm", "char"), vocab_size=2048,
    preset=notebook.pick("small", "tiny"), seq_len=notebook.pick(128, 32),
    batch_size=notebook.batch_size(notebook.pick(16, 2)),
    log_every=notebook.pick(10, 2), eval_every=notebook.pick(100, 6), eval_batches=notebook.pick(8, 2),
    samples=0, progress=not notebook.test_mode(), force=True,
)
steps = notebook.pick(300, 12)
good_dir = notebook.run_dir("training/good")
summary = Trainer(TrainConfig(out=str(good_dir), steps=steps, **common)).run()
print({k: summary[k] for k in ("steps", "final_loss", "val_loss", "tokens_per_s")})
viz.training_curves(good_dir, title="A healthy run: warmup, then cosine decay")

# %%
model, tokenizer = load_for_inference(good_dir, log=None)
out, lengths = generate(model, [tokenizer.encode("def ")], notebook.pick(80, 20), temperature=0.8, seed=0)
print("def " + tokenizer.decode(list(out[0, : lengths[0]])))  # generate returns the new tokens

# %% [markdown]
# ## Chapter 14: the learning-rate schedule
#
# Warmup, then a cosine down to a floor. The course's formula has no warmup offset and no floor, and
# its table matches neither version (erratum 5); the library's schedule is the shifted one with the
# floor: 5.64e-4 / 3.48e-4 / 7.4e-5 / 6e-5 at steps 20k / 50k / 90k / 100k.

# %%
schedule = lr_schedule(OptimConfig.course_schedule(), 100_000)
for step in (4_000, 20_000, 50_000, 90_000, 100_000):
    print(f"step {step:>7,}: lr {float(schedule(step)):.3g}")

# %% [markdown]
# ## Chapter 15: what fp16 can and cannot hold
#
# The course gets three fp16 facts wrong (erratum 6). The library trains in bf16 on accelerators
# (no loss scaling needed) and offers fp16 with dynamic loss scaling (`precision="fp16"`).

# %%
print("fp16(1234.567) =", np.float16(1234.567), "(not 1234.5)")
print("fp16(1.234e-5) =", np.float16(1.234e-5), "(a subnormal: it does not underflow to 0)")
print("fp16(1234.567 * 1024) =", np.float16(1234.567 * 1024), "(overflow: the largest fp16 is 65,504)")

# %% [markdown]
# ## Chapter 16: a run that diverges, and the fix
#
# A learning rate far too high with no warmup and no gradient clipping: the updates overshoot and
# the loss climbs to thousands instead of falling; the `Trainer` reports each spike as it happens.
# Had the steps turned non-finite (NaN), it would have stopped after a few of them in a row, naming
# the last good checkpoint and the usual fixes. The fix is the healthy run above: a sane peak,
# warmup and clipping.

# %%
bad_dir = notebook.run_dir("training/diverges")
bad = TrainConfig(out=str(bad_dir), steps=steps, max_nonfinite_streak=3, **common,
                  optim=OptimConfig(lr=notebook.pick(3.0, 10.0), min_lr=notebook.pick(3.0, 10.0), warmup_steps=0,
                                    schedule="constant", clip_norm=None, weight_decay=0.0))
try:
    Trainer(bad).run()
    print("the run finished")
except TrainingError as e:
    print("the run stopped:", str(e).splitlines()[0][:300])
viz.compare_runs({"lr 10x too high, no warmup, no clipping": bad_dir, "lr 2e-3, warmup, clipping": good_dir},
                 log_y=True, title="Divergence (Chapter 16) and the fix")
