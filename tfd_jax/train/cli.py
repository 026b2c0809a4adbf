"""``tfd-jax train``: flags mapped onto :class:`tfd_jax.train.TrainConfig`."""
from __future__ import annotations

import argparse
import dataclasses
import signal

from tfd_jax.cli import UserError


def register(subparsers) -> None:
    from tfd_jax.train.loop import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a model (default: a small GPT on the Python standard library, a few minutes on a CPU; --task mlm: a BERT)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--task", default=d.task, choices=["lm", "mlm", "seq2seq", "sft", "dpo", "reward", "ppo"],
                   help="the objective: next-token language modelling (GPT), masked-LM pre-training (BERT), "
                        "encoder-decoder training (pairs such as --data numbers, or span corruption of a text corpus), "
                        "or supervised fine-tuning on conversations (--data chat: the built-in task, or a JSONL file "
                        "of {\"messages\": [...]}; Chapter 18), or DPO on preference pairs (--data prefs, or a JSONL file of "
                        "{\"prompt\", \"chosen\", \"rejected\"}; starts from --init-from's weights, a frozen copy of them "
                        "is the reference), or a reward model on the same pairs (a GPT with a scalar head), or RLHF with PPO "
                        "(--data prompts, or a JSONL file of {\"prompt\"}; needs --init-from and --reward-model)")
    p.add_argument("--arch", default=None, choices=["gpt", "bert", "transformer", "t5", "bart", "reward"],
                   help="the model family (default: the task's: gpt, bert, transformer)")
    p.add_argument("--preset", default=None,
                   help="model preset: GPT course, tiny, small (default), mini, gpt2, llama-tiny, ...; BERT tiny (default), "
                        "course-encoder, bert-base, bert-large; encoder-decoders tiny (default), course-seq2seq, "
                        "transformer-base, t5-small, t5-base, t5-v1_1-small, bart-base")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from these weights instead of random ones: a run directory or a Hugging Face model "
                        "directory (its tokenizer comes too; fine-tuning, Chapter 18)")
    p.add_argument("--reference", default=None, metavar="RUN",
                   help="--task dpo / ppo: the frozen reference model's weights (default: the starting weights)")
    p.add_argument("--reward-model", default=None, metavar="RUN",
                   help="--task ppo: the reward model that scores the answers (a run of --task reward)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="train LoRA adapters of this rank instead of the weights (GPT; a new head still trains); "
                        "for dpo / ppo the model with its adapters off is the reference")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA's scale numerator (alpha / rank; default 16)")
    p.add_argument("--lora-targets", default=None, metavar="SUFFIXES",
                   help="comma-separated layer path suffixes to adapt (default attn.q,attn.v; e.g. attn.q,attn.k,attn.v,"
                        "attn.o,ffn.w_in,ffn.w_out)")
    p.add_argument("--data", default=d.data,
                   help="pystdlib, tinyshakespeare, or a text file / directory / glob; for --task seq2seq also the "
                        "built-in task numbers (its default) or a .jsonl / .tsv file of source/target pairs")
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="use at most this much training text (0 = all)")
    p.add_argument("--tokenizer", default=d.tokenizer, choices=["spm", "bpe", "char"])
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="tokenizer vocabulary (spm, bpe)")
    p.add_argument("--out", default=d.out, help="run directory (config, tokenizer, checkpoints, metrics)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (sequences per step)")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.optim.lr, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=d.optim.min_lr, help="end of the cosine decay")
    p.add_argument("--warmup", type=int, default=d.optim.warmup_steps, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=d.optim.weight_decay)
    p.add_argument("--beta2", type=float, default=d.optim.b2)
    p.add_argument("--optimizer", default=d.optim.name, choices=["adamw", "adam"])
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any model config field, e.g. --model d_model=256 --model num_layers=6 (repeatable)",
    )
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU/TPU, fp32 on CPU")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    p.add_argument("--steps-per-call", type=int, default=d.steps_per_call,
                   help="training steps per compiled call (one lax.scan), so the host's work per call is shared "
                        "by them; steps before one that logs, evaluates or saves run alone, and a second program "
                        "is compiled (default: 4 in a one-process CPU run of 100 or more steps, else 1)")
    p.add_argument("--sampling", default=d.sampling, choices=["random", "epochs"],
                   help="where training windows start: uniformly at random (nanoGPT's) or each token once per epoch")
    p.add_argument(
        "--remat",
        nargs="?",
        const="full",
        default=None,
        choices=["none", "full", "dots", "dots_no_batch"],
        help="recompute activations in the backward pass (Chapter 15); a policy name says what to keep",
    )
    p.add_argument("--scan-layers", action="store_true",
                   help="store the blocks stacked and run them as one scan over layers: compile time no longer grows with depth")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=int, default=d.eval_batches)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest intact checkpoint, with its own settings; only --steps, "
                        "the logging/eval/checkpoint cadence, --mesh, --grad-accum, --steps-per-call, --remat, --attention and --model logits_dtype may change")
    p.add_argument("--force", action="store_true",
                   help="replace the run in --out with a new one (only a run directory, and only once the new run's settings and data are checked)")
    p.add_argument("--samples", type=int, default=d.samples, help="samples to print at the end (0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", default=None, metavar="DIR", help="write a JAX profiler trace of a few steps to DIR")
    p.add_argument("--attention", default=None, choices=["reference", "xla", "cudnn", "splash", "auto"],
                   help="attention implementation (splash: the Pallas TPU kernel, opt-in)")
    p.add_argument("--debug-nan-at", type=int, action="append", default=[], metavar="STEP", help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    _track_given(p)


class _Given(argparse.Action):
    """Wraps an argparse action and records, in ``namespace._given``, that its flag was given."""

    def __init__(self, inner: argparse.Action):
        self.inner = inner
        super().__init__(inner.option_strings, inner.dest, nargs=inner.nargs, const=inner.const,
                         default=inner.default, type=inner.type, choices=inner.choices,
                         required=inner.required, help=inner.help, metavar=inner.metavar)

    def __call__(self, parser, namespace, values, option_string=None):
        self.inner(parser, namespace, values, option_string)
        given = set(getattr(namespace, "_given", ()))
        given.add(self.dest)
        namespace._given = given


def _track_given(parser: argparse.ArgumentParser) -> None:
    """Make the parser note which flags were given, so a resume applies only those (and compares
    only those with the run), whatever their defaults."""
    for i, action in enumerate(parser._actions):
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            wrapped = _Given(action)
            parser._actions[i] = wrapped
            for opt in action.option_strings:
                parser._option_string_actions[opt] = wrapped
            for group in parser._action_groups:
                group._group_actions[:] = [wrapped if a is action else a for a in group._group_actions]


def config_from_args(args, base: "TrainConfig | None" = None) -> "TrainConfig":  # noqa: F821
    """The run's settings from the flags. ``base`` (a resumed run's settings): only the flags that
    were given change it; without it every flag applies (a new run)."""
    from tfd_jax.train.loop import TrainConfig

    given = getattr(args, "_given", None)
    if base is None or given is None:
        _apply_task_defaults(args)
        base, given = TrainConfig(), None

    def was(*dests):
        return given is None or any(d in given for d in dests)

    overrides = dict(base.model_overrides)
    if was("model"):
        from tfd_jax.train.tasks import TASKS

        arch = args.arch or (base.arch if given is not None else None) or TASKS[args.task].arch
        overrides.update(parse_model_overrides(args.model, arch))
    if was("dropout") and args.dropout is not None:
        overrides["dropout"] = args.dropout
    if was("remat") and args.remat:
        overrides["remat"] = args.remat
    if was("attention") and args.attention:
        overrides["attention_impl"] = args.attention
    if was("scan_layers") and args.scan_layers:
        overrides["scan_layers"] = True
    for dest, field in (("lora", "lora_rank"), ("lora_alpha", "lora_alpha"), ("lora_targets", "lora_targets")):
        if was(dest) and getattr(args, dest) is not None:
            overrides[field] = getattr(args, dest)
    optim_flags = {"optimizer": "name", "lr": "lr", "min_lr": "min_lr", "warmup": "warmup_steps",
                   "weight_decay": "weight_decay", "beta2": "b2"}
    optim = dataclasses.replace(base.optim, **{field: getattr(args, dest) for dest, field in optim_flags.items() if was(dest)})
    direct = {
        "data": args.data, "max_bytes": args.max_bytes or None, "tokenizer": args.tokenizer,
        "vocab_size": args.vocab_size, "preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "grad_accum": args.grad_accum, "steps_per_call": args.steps_per_call,
        "sampling": args.sampling,
        "precision": args.precision, "mesh": args.mesh, "seed": args.seed, "log_every": args.log_every,
        "eval_every": args.eval_every, "eval_batches": args.eval_batches, "ckpt_every": args.ckpt_every,
        "samples": args.samples, "task": args.task, "arch": args.arch, "init_from": args.init_from,
        "reference": args.reference, "reward_model": args.reward_model,
    }
    changes = {k: v for k, v in direct.items() if was(k)}
    if was("no_progress"):
        changes["progress"] = not args.no_progress
    if was("debug_nan_at"):
        changes["debug_nan_steps"] = tuple(args.debug_nan_at)
    if was("profile"):
        changes["profile_dir"] = args.profile
    changes["out"] = args.out  # the directory named here, wherever the run was started from
    return dataclasses.replace(base, model_overrides=overrides, optim=optim, resume=args.resume, force=args.force,
                               **changes)


def _apply_task_defaults(args) -> None:
    """A new run of a task takes the task's own defaults (``Task.cli_defaults``) for the flags not given."""
    from tfd_jax.train.tasks import TASKS

    task = TASKS.get(args.task)
    given = getattr(args, "_given", set()) or set()
    for dest, value in (task.cli_defaults if task else {}).items():
        if dest not in given:
            setattr(args, dest, value)


def parse_model_overrides(items: list[str], arch: str = "gpt") -> dict:
    """``["d_model=256", "tie_embeddings=false"]`` -> typed overrides of ``GPTConfig`` (or, for
    ``arch="bert"``, ``BertConfig``) fields."""
    from tfd_jax.models import registry

    fields = {f.name: f for f in dataclasses.fields(registry.ARCHS[arch][0])}
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise UserError(f"--model {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        default = fields[name].default
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[name] = value.lower() in ("true", "1")
            elif isinstance(default, int):
                out[name] = int(value)
            elif isinstance(default, float):
                out[name] = float(value)
            else:
                out[name] = value
        except ValueError:
            raise UserError(f"--model {item!r}: {value!r} is not a valid {type(default).__name__}") from None
    return out


def run(args) -> int:
    from tfd_jax.train import checkpoint as ckpt
    from tfd_jax.train import rundir
    from tfd_jax.train.config import TrainConfig
    from tfd_jax.train.loop import summary_json, train

    base = None
    if args.resume and rundir.is_run(args.out):
        # a resumed run keeps its own settings: only the flags given here change (or are refused)
        base = TrainConfig.from_dict(ckpt.read_config(args.out)["train"])
    summary = train(config_from_args(args, base))
    print(summary_json(summary))
    stopped = summary.get("stopped_by_signal")
    return 128 + int(getattr(signal.Signals, stopped)) if stopped else 0
