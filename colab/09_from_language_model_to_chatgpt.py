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
# # 9. From language model to ChatGPT (Chapter 18)
#
# ChatGPT is a pre-trained GPT, then **instruction tuning** (supervised fine-tuning on
# conversations), then **RLHF**: a reward model learns which of two answers people prefer, and the
# policy is trained with PPO to earn more reward while a KL penalty keeps it close to where it
# started. DPO reaches for the same goal without a reward model.
#
# The library runs the whole chain on a built-in task whose hidden rule plays the human rater (half
# a point for answering about the thing asked, half for enthusiasm). Every stage is an ordinary
# `tfd-jax train` run (`tfd-jax pipeline` on the command line); on a TPU or GPU the full settings
# take a few minutes, on a laptop CPU about three.

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
from tfd_jax import notebook, viz
from tfd_jax.posttrain.chat import reply
from tfd_jax.posttrain.data import builtin_prompts, rule_score
from tfd_jax.posttrain.pipeline import DEFAULT_STEPS, format_table, run_pipeline
from tfd_jax.train.checkpoint import load_for_inference

print(notebook.summary())

# %% [markdown]
# ## The whole chain
#
# Pre-training (characters of simple English), SFT, the reward model, PPO and DPO, each starting
# from the stage it needs. After each stage the model answers held-out prompts (about things no
# fine-tuning data mentions) and training prompts, and the hidden rule scores the answers; KL is
# measured against the SFT model.

# %%
out = notebook.run_dir("chatgpt")
steps = notebook.pick(DEFAULT_STEPS, {"pretrain": 20, "sft": 10, "reward": 10, "ppo": 4, "dpo": 4})
records = run_pipeline(out, steps=steps, eval_prompts=notebook.pick(100, 8), force=True, log=lambda _: None)
print(format_table(records))
assert [r["stage"] for r in records] == ["pretrain", "sft", "reward", "ppo", "dpo"]
assert all(0.0 <= r["rule_score"] <= 1.0 for r in records if r["stage"] != "reward")

# %% [markdown]
# ## RLHF's two curves
#
# PPO's reward (the reward model's score of freshly sampled answers) goes up; the KL to the SFT
# model is the price, held in check by its coefficient.

# %%
viz.rlhf_curves(out / "ppo", title="PPO: reward and KL")

# %%
viz.metric_curves(out / "dpo", ["preference_accuracy", "reward_margin"], title="DPO: preferences learned")

# %% [markdown]
# ## Talk to it
#
# The same prompt to the SFT model and to the PPO model, each answer scored by the hidden rule.

# %%
prompts = builtin_prompts("train", n=notebook.pick(3, 1), seed=7)
for stage in ("sft", "ppo"):
    model, tokenizer = load_for_inference(out / stage, log=None)
    for prompt in prompts:
        answer = reply(model, tokenizer, [{"role": "user", "content": prompt}], temperature=0.7,
                       max_new_tokens=notebook.pick(64, 16))
        print(f"[{stage}] {prompt!r} -> {answer!r}  (rule score {rule_score(prompt, answer)})")
