"""Peak memory of each post-training stage at GPT-2 size (Chapter 18), measured on the CPU with a short run.

Each stage runs in its own process (``tfd-jax train --task sft|reward|ppo|dpo --preset gpt2`` on
the built-in task: GPT-2's 12 blocks of width 768 with the task's character vocabulary, batch 2 x 64
(PPO: 2 prompts of up to 48 tokens with 48-token answers), a few steps) and reports its peak
resident memory (``ru_maxrss``). DPO holds the policy with its AdamW moments plus a frozen reference
(parameters only); the reward model is the policy's size plus a scalar head; PPO holds the policy
with its value head and moments, a frozen reference and the frozen reward model. Variants:
``ppo-bf16`` keeps the two frozen models in bf16; ``ppo-lora`` and ``dpo-lora`` train rank-8 LoRA
adapters (on every attention and FFN kernel), so the moments are tiny and the reference is the
policy with its adapters off (no copy). Every stage after SFT starts from the SFT stage's run
(loading it is part of its peak), and PPO scores with the reward stage's, so those two run first. Prints one JSON object per stage.

    python experiments/posttrain_memory.py --steps 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from machine import device_name

CHILD = """
import json, resource, sys
from tfd_jax.train import cli as train_cli
import argparse
parser = argparse.ArgumentParser(); train_cli.register(parser.add_subparsers())
from tfd_jax.train import Trainer
cfg = train_cli.config_from_args(parser.parse_args(["train", *[a for a in sys.argv[1:] if a != "--frozen-bf16"]]))
task = None
if "--frozen-bf16" in sys.argv:
    from tfd_jax.posttrain.ppo import PPOTask
    task = PPOTask(frozen_dtype="bfloat16")
summary = Trainer(cfg, task).run()
print("RESULT " + json.dumps({"num_params": summary["num_params"],
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", default="sft,reward,ppo,ppo-bf16,ppo-lora,dpo,dpo-lora")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lora = ["--lora", "8", "--lora-targets", "attn.q,attn.k,attn.v,attn.o,ffn.w_in,ffn.w_out"]
        variants = {"ppo-bf16": ["--frozen-bf16"], "ppo-lora": lora, "dpo-lora": lora}
        for stage in args.stages.split(","):
            task = stage.split("-")[0]
            argv = ["--task", task, "--preset", args.preset, "--out", f"{tmp}/{stage}", "--steps", str(args.steps),
                    "--batch-size", "2", "--seq-len", "96" if task == "ppo" else "64", "--eval-every", str(args.steps),
                    "--eval-batches", "1", "--ckpt-every", str(args.steps), "--no-progress", *variants.get(stage, [])]
            if task != "sft":  # every later stage starts from the SFT run, as in the pipeline
                argv += ["--init-from", f"{tmp}/sft"]
            if task == "ppo":
                argv += ["--reward-model", f"{tmp}/reward"]
            out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(json.dumps({"stage": stage, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}))
                continue
            print(json.dumps({"what": "posttrain_memory", "stage": stage, "preset": args.preset, "batch_size": 2,
                              "seq_len": 96 if task == "ppo" else 64, **json.loads(line[len("RESULT "):]),
                              "device": device_name()}), flush=True)


if __name__ == "__main__":
    main()
