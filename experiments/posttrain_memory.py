"""Peak memory of each post-training stage at GPT-2 size (Chapter 18), measured on the CPU with a short run.

Each stage runs in its own process (``tfd-jax train --task sft|reward|dpo --preset gpt2`` on the
built-in task: GPT-2's 12 blocks of width 768 with the task's character vocabulary, batch 2 x 64,
a few steps) and reports its peak resident memory (``ru_maxrss``). DPO holds the policy with its
AdamW moments plus a frozen reference (parameters only); the reward model is the policy's size
plus a scalar head. Prints one JSON object per stage.

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
cfg = train_cli.config_from_args(parser.parse_args(["train", *sys.argv[1:]]))
summary = Trainer(cfg).run()
print("RESULT " + json.dumps({"num_params": summary["num_params"],
                              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", default="sft,reward,dpo")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            argv = ["--task", stage, "--preset", args.preset, "--out", f"{tmp}/{stage}", "--steps", str(args.steps),
                    "--batch-size", "2", "--seq-len", "64", "--eval-every", str(args.steps), "--eval-batches", "1",
                    "--ckpt-every", str(args.steps), "--no-progress"]
            out = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(json.dumps({"stage": stage, "error": (out.stderr or out.stdout).strip().splitlines()[-1:]}))
                continue
            print(json.dumps({"what": "posttrain_memory", "stage": stage, "preset": args.preset, "batch_size": 2,
                              "seq_len": 64, **json.loads(line[len("RESULT "):]), "device": device_name()}), flush=True)


if __name__ == "__main__":
    main()
