"""From language model to assistant on the built-in task, stage by stage (Chapter 18): ``tfd-jax pipeline``.

1. **pre-train** a small GPT on the built-in world's plain sentences (its tokenizer already holds the
   chat markers, so the later stages can start from it);
2. **SFT** from it on the built-in conversations (on topic, enthusiastic 20% of the time);
3. a **reward model** from the SFT weights on the rule-labelled, 10%-noisy preference pairs (its
   held-out pairwise accuracy is reported);
4. **PPO** from the SFT weights on the built-in prompts, scored by that reward model, the SFT model
   frozen as its reference (``tfd_jax.posttrain.ppo``);
5. **DPO** from the SFT weights on the preference pairs, the SFT model frozen as its reference.

After each stage the policy answers held-out prompts (about things no fine-tuning data mentions;
``rule_score``) and training prompts (``rule_score_train``), sampled at temperature 1, and the hidden
rule (``data.rule_score``) scores them; ``kl`` is the mean over those answers of the summed log-ratio
``log pi(y|x) - log pi_sft(y|x)`` of the sampled tokens (a k1 estimate of KL(pi || pi_sft) per
answer; 0 for the SFT model itself, and not defined before there is an SFT model). Every stage is an
ordinary run directory under ``--out`` (resumable, with its ``metrics.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tfd_jax.posttrain.data import builtin_charset, builtin_pretraining_text, builtin_prompts, chat_token_ids
from tfd_jax.posttrain.data import render_prompt, rule_score
from tfd_jax.posttrain.tasks import CHAT_TOKENIZER_SPECIALS
from tfd_jax.train.tasks import LMTask

__all__ = ["ChatPretrainTask", "run_pipeline", "sample_and_score"]

#: training steps of each stage by default (about 3 minutes in all on a 2-core CPU with the tiny preset)
DEFAULT_STEPS = {"pretrain": 1500, "sft": 800, "reward": 300, "ppo": 400, "dpo": 400}


class ChatPretrainTask(LMTask):
    """Next-token pre-training whose tokenizer also learns the chat markers (and every character of
    the built-in task), so fine-tuning can start from its weights and tokenizer."""

    name = "lm"
    special_tokens = CHAT_TOKENIZER_SPECIALS

    def tokenizer_text(self, cfg, text: str) -> str:
        return text + builtin_charset()

    def samples(self, model, tokenizer, cfg, log):
        return None


def _stage_config(argv: list[str]):
    """A stage's settings exactly as ``tfd-jax train ARGV`` would make them (the task's defaults)."""
    from tfd_jax.train import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    return train_cli.config_from_args(parser.parse_args(["train", *argv]))


@partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, state, tokens):
    """A model's logits ``[B, T, V]``, compiled once per model structure and shape (not per call)."""
    from flax import nnx

    return nnx.merge(graphdef, state)(tokens)


def sample_and_score(policy, tokenizer, prompts: list[str], *, reference=None, seed: int = 0,
                     max_new_tokens: int = 48) -> dict:
    """Sample one answer per prompt (temperature 1, the chat template) and measure it: the mean
    ``rule_score`` (an unfinished answer scores 0) and, with a ``reference`` model, the mean summed
    log-ratio of the sampled tokens (k1 estimate of KL(policy || reference) per answer)."""
    from tfd_jax.decode import rollout

    end = chat_token_ids(tokenizer)["end"]
    ids = [render_prompt(p, tokenizer) for p in prompts]
    new = min(max_new_tokens, policy.config.context_length - max(len(i) for i in ids))
    out = rollout(policy, ids, new, key=jax.random.key(seed), temperature=1.0, eos_id=end)
    tokens, logps, lengths = (np.asarray(a) for a in jax.device_get((out.tokens, out.log_probs, out.lengths)))
    scores = []
    for k, prompt in enumerate(prompts):
        answer = [int(t) for t in tokens[k, : lengths[k]]]
        finished = bool(answer) and answer[-1] == end
        scores.append(rule_score(prompt, tokenizer.decode(answer[:-1])) if finished else 0.0)
    kls = []
    if reference is not None:  # the reference's log-probs of the same tokens, in one padded forward pass
        from flax import nnx

        seqs = [ids[k] + [int(t) for t in tokens[k, : lengths[k]]] for k in range(len(prompts))]
        width = max(len(s) for s in seqs)
        padded = np.zeros((len(seqs), width), np.int32)
        for k, s in enumerate(seqs):
            padded[k, : len(s)] = s
        graphdef, state = nnx.split(reference)
        logits = _logits(graphdef, state, jnp.asarray(padded[:, :-1]))
        ref_lp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(padded[:, 1:, None]),
                                                axis=-1)[..., 0])
        for k in range(len(prompts)):
            start, stop = len(ids[k]) - 1, len(seqs[k]) - 1
            kls.append(float(logps[k, : lengths[k]].sum() - ref_lp[k, start:stop].sum()))
    return {"rule_score": float(np.mean(scores)), "kl": float(np.mean(kls)) if kls else None}


def run_pipeline(out: str | Path, *, preset: str = "tiny", steps: dict | None = None, seed: int = 0,
                 eval_prompts: int = 100, force: bool = False, log=print) -> list[dict]:
    """Run every stage into ``out/<stage>`` and return one record per stage: ``stage``,
    ``rule_score``, ``kl`` (against the SFT model), the stage's own figure (``pairwise_accuracy``
    for the reward model) and its wall time."""
    from tfd_jax.train import Trainer
    from tfd_jax.train.checkpoint import load_for_inference

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {**DEFAULT_STEPS, **(steps or {})}
    prompts = builtin_prompts("val", n=eval_prompts, seed=seed + 1)
    train_prompts = builtin_prompts("train", n=eval_prompts, seed=seed + 2)
    text = out / "pretrain.txt"
    if not text.exists():
        text.write_text(builtin_pretraining_text(n_chars=400_000, seed=seed), encoding="utf-8")
    common = ["--preset", preset, "--seed", str(seed), "--no-progress", "--samples", "0"] + (["--force"] if force else [])
    from tfd_jax.posttrain.ppo import PPOTask
    from tfd_jax.posttrain.tasks import DPOTask, SFTTask

    # Each stage's own end-of-run rule score samples as many held-out prompts as the table does
    # (the table's figures are the pipeline's own, below).
    plan = [
        ("pretrain", ["--data", str(text), "--tokenizer", "char", "--seq-len", "128", "--lr", "2e-3"], ChatPretrainTask()),
        ("sft", ["--task", "sft", "--init-from", str(out / "pretrain")], SFTTask(eval_prompts=eval_prompts)),
        ("reward", ["--task", "reward", "--init-from", str(out / "sft")], None),
        ("ppo", ["--task", "ppo", "--init-from", str(out / "sft"), "--reward-model", str(out / "reward")],
         PPOTask(eval_prompts=eval_prompts)),
        ("dpo", ["--task", "dpo", "--init-from", str(out / "sft")], DPOTask(eval_prompts=eval_prompts)),
    ]
    records, sft_model = [], None
    for stage, argv, task in plan:
        t0 = time.time()
        cfg = _stage_config([*argv, *common, "--out", str(out / stage), "--steps", str(steps[stage]),
                             "--eval-every", str(steps[stage])])
        summary = Trainer(cfg, task).run()
        record = {"stage": stage, "steps": steps[stage], "wall_s": round(time.time() - t0, 1)}
        if stage == "reward":
            last = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
            record["pairwise_accuracy"] = next(r["val_pairwise_accuracy"] for r in reversed(last)
                                               if "val_pairwise_accuracy" in r)
            record.update(rule_score=None, kl=None, rule_score_train=None)
        else:
            model, tokenizer = load_for_inference(out / stage, log=None)
            if stage == "sft":
                sft_model = model
            record.update(sample_and_score(model, tokenizer, prompts, reference=sft_model, seed=seed))
            record["rule_score_train"] = sample_and_score(model, tokenizer, train_prompts, seed=seed)["rule_score"]
        record["val_loss"] = summary.get("val_loss")
        log(json.dumps(record))
        records.append(record)
    return records


def format_table(records: list[dict]) -> str:
    """The stages as a plain-text table: rule score, KL against the SFT model, and notes."""
    lines = [f"{'stage':<10}{'steps':>7}{'rule score':>12}{'(train)':>9}{'KL vs SFT':>11}  {'notes'}"]

    def num(value, fmt):
        return "" if value is None else format(value, fmt)

    for r in records:
        note = f"held-out pairwise accuracy {r['pairwise_accuracy']:.3f}" if "pairwise_accuracy" in r else ""
        lines.append(f"{r['stage']:<10}{r['steps']:>7}{num(r.get('rule_score'), '.3f'):>12}"
                     f"{num(r.get('rule_score_train'), '.3f'):>9}{num(r.get('kl'), '.2f'):>11}  {note}")
    return "\n".join(lines)


def register(subparsers) -> None:
    """``tfd-jax pipeline``."""
    p = subparsers.add_parser(
        "pipeline",
        help="pre-train, SFT, reward model, PPO and DPO on the built-in task; a table of the rule's score and KL per stage",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--out", default="runs/pipeline", help="one run directory per stage goes in here")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts answered after each stage")
    for stage, n in DEFAULT_STEPS.items():
        p.add_argument(f"--{stage}-steps", type=int, default=n)
    p.add_argument("--force", action="store_true", help="replace the stages' run directories")
    p.add_argument("--json", action="store_true", help="one JSON object per stage instead of the table")
    p.set_defaults(func=_run)


def _run(args) -> int:
    steps = {s: getattr(args, f"{s}_steps") for s in DEFAULT_STEPS}
    quiet = (lambda _msg: None) if args.json else print
    records = run_pipeline(args.out, preset=args.preset, steps=steps, seed=args.seed, eval_prompts=args.eval_prompts,
                           force=args.force, log=quiet)
    if args.json:
        for r in records:
            print(json.dumps(r))
    else:
        print(format_table(records))
    return 0
