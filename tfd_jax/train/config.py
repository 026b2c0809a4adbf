"""A training run's settings, their checks, and what may change when a run is resumed (Chapter 17).

``TrainConfig`` is everything ``tfd-jax train`` can set; a run directory's ``config.json`` holds it
(``"train"``) beside the model's config (``"model"``) and the precision the run trains in.

Resuming continues *the same run*: its model, tokenizer, data, optimizer, batch, precision and seed
come from ``config.json``. Only the settings in :data:`RESUMABLE` may differ on resume (more or
fewer ``steps``, logging / evaluation / checkpoint cadence, the mesh and other choices of how the
same computation is laid out); they are applied and recorded in ``config.json``. Any other
difference is refused by :func:`check_resume` with the difference named.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tfd_jax.train.optim import OptimConfig


class TrainingError(RuntimeError):
    """The run stopped for a reason the user should read (bad settings, a run directory it may not use, ...)."""

    exit_code = 2  # what ``tfd-jax`` exits with; subclasses for runs that started say 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``tfd-jax train`` can set. Defaults: the README's main job (a few minutes on a laptop CPU)."""

    out: str = "runs/pystdlib"
    task: str = "lm"  # the objective: "lm" (next token, GPT) or "mlm" (masked-LM, BERT); see train.tasks
    arch: str | None = None  # "gpt" or "bert"; None: the task's own
    init_from: str | None = None  # start from these weights (a run directory or a Hugging Face model dir)
    reference: str | None = None  # DPO / PPO: the frozen reference's weights (None: the starting weights)
    reward_model: str | None = None  # PPO: the run directory of a reward model (--task reward)
    data: str = "pystdlib"
    max_bytes: int | None = 3_000_000  # cap on the training text, for quick runs (None = all)
    tokenizer: str = "spm"  # "spm" (sentencepiece BPE), "bpe" (the course's, from scratch), "char"
    vocab_size: int = 2048
    preset: str | None = None  # None: the architecture's default, "small" (GPT) or "tiny" (BERT)
    model_overrides: dict = field(default_factory=dict)
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    sampling: str = "random"  # where training windows start: "random" (nanoGPT's) or "epochs"
    grad_accum: int = 1
    # training steps per compiled call (make_multi_step); None: 4 in a one-process CPU run of 100
    # steps or more (the host's work per call then takes less from the cores the step runs on), else 1
    steps_per_call: int | None = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=30, b2=0.99))
    precision: str | None = None  # None: bf16 on GPU/TPU, fp32 on CPU (on resume: the run's)
    mesh: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = False
    force: bool = False
    max_nonfinite_streak: int = 5
    spike_factor: float = 2.0  # report a loss spike above this multiple of the running average
    samples: int = 3
    sample_tokens: int = 60
    sample_prompts: tuple[str, ...] | None = None
    progress: bool = True
    profile_dir: str | None = None  # write a JAX profiler trace of a few steps here
    profile_steps: int = 5
    debug_nan_steps: tuple[int, ...] = ()  # poison these steps' loss with NaN, to rehearse the failure path

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"] = dataclasses.asdict(self.optim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of :meth:`to_dict` (JSON lists become the tuples the fields hold)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainingError(f"the run's settings hold fields this version does not know: {', '.join(unknown)}")
        d = dict(d)
        if isinstance(d.get("optim"), dict):
            optim_known = {f.name for f in dataclasses.fields(OptimConfig)}
            bad = sorted(set(d["optim"]) - optim_known)
            if bad:
                raise TrainingError(f"the run's optimizer settings hold fields this version does not know: {', '.join(bad)}")
            d["optim"] = OptimConfig(**d["optim"])
        for name in ("sample_prompts", "debug_nan_steps"):
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return cls(**d)


#: Settings that may differ when a run is resumed: they change when things happen, how the same
#: computation is laid out, or what this invocation prints, not what the model learns. ``steps``
#: too: it extends (or ends earlier) the run, and the learning-rate schedule follows the new total.
RESUMABLE = frozenset({
    "out", "resume", "force", "steps", "log_every", "eval_every", "eval_batches", "ckpt_every",
    "keep_checkpoints", "mesh", "grad_accum", "steps_per_call", "samples", "sample_tokens", "sample_prompts", "progress",
    "profile_dir", "profile_steps", "debug_nan_steps", "max_nonfinite_streak", "spike_factor",
})
#: Model settings that may differ on resume: how the same model is computed, not what it is.
RESUMABLE_MODEL = frozenset({"remat", "attention_impl", "logits_dtype"})

#: ``tfd-jax train`` flag of each setting, for messages (the rest are ``--field-name``, and optimizer
#: settings without a flag are named as ``TrainConfig.optim`` fields).
FLAGS = {
    "optim.lr": "--lr", "optim.min_lr": "--min-lr", "optim.warmup_steps": "--warmup",
    "optim.weight_decay": "--weight-decay", "optim.b2": "--beta2", "optim.name": "--optimizer",
    "model.dropout": "--dropout", "model.scan_layers": "--scan-layers", "model.remat": "--remat",
    "model.attention_impl": "--attention", "profile_dir": "--profile", "progress": "--no-progress",
    "debug_nan_steps": "--debug-nan-at",
}


def flag(name: str) -> str:
    """The command-line spelling of a setting: ``"batch_size"`` -> ``--batch-size``,
    ``"model.d_model"`` -> ``--model d_model``."""
    if name in FLAGS:
        return FLAGS[name]
    if name.startswith("model."):
        return f"--model {name[len('model.'):]}"
    if name.startswith("optim."):
        return f"TrainConfig.optim.{name[len('optim.'):]}"
    return "--" + name.split(".")[-1].replace("_", "-")


def _show(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def validate(cfg: TrainConfig, task=None) -> None:
    """Range-check every setting; one ``TrainingError`` listing all that are wrong. ``task``: a task
    object that replaces ``cfg.task`` (a loss of the caller's own)."""
    from tfd_jax.data.pipeline import SAMPLINGS
    from tfd_jax.models import registry
    from tfd_jax.train.precision import PRECISIONS
    from tfd_jax.train.tasks import TASKS, Task

    problems = []

    def need(ok: bool, name: str, what: str, value: Any) -> None:
        if not ok:
            problems.append(f"{flag(name)} must be {what}, got {_show(value)}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need(cfg.steps_per_call is None or (is_int(cfg.steps_per_call) and cfg.steps_per_call >= 1), "steps_per_call",
         "an integer >= 1 (or unset: the library's choice)", cfg.steps_per_call)
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "ckpt_every",
                 "eval_batches", "keep_checkpoints", "max_nonfinite_streak", "profile_steps"):
        v = getattr(cfg, name)
        need(is_int(v) and v >= 1, name, "an integer >= 1", v)
    for name in ("samples", "sample_tokens"):
        v = getattr(cfg, name)
        need(is_int(v) and v >= 0, name, "an integer >= 0", v)
    need(is_int(cfg.seed) and 0 <= cfg.seed < 2**31, "seed", "an integer in 0..2^31-1", cfg.seed)
    need(cfg.max_bytes is None or (is_int(cfg.max_bytes) and cfg.max_bytes > 0), "max_bytes",
         "a positive number of bytes (0 on the command line: all)", cfg.max_bytes)
    need(is_int(cfg.vocab_size) and 2 <= cfg.vocab_size <= 2**31 - 1, "vocab_size", "an integer >= 2", cfg.vocab_size)
    need(is_num(cfg.spike_factor) and cfg.spike_factor > 1, "spike_factor", "a number > 1", cfg.spike_factor)
    task_arch = task.arch if task is not None else (TASKS[cfg.task].arch if cfg.task in TASKS else "gpt")
    arch = cfg.arch or task_arch
    presets = registry.presets(arch) if arch in registry.ARCHS else None
    if task is None and cfg.task not in TASKS:
        problems.append(f"unknown --task {cfg.task!r}; choose one of {', '.join(sorted(TASKS))}")
    elif cfg.arch is not None and cfg.arch not in (task or TASKS[cfg.task]).archs():
        problems.append(f"--task {cfg.task} trains --arch {' or '.join((task or TASKS[cfg.task]).archs())}, not {cfg.arch}")
    if presets is None:
        problems.append(f"unknown --arch {cfg.arch!r}; choose one of {', '.join(sorted(registry.ARCHS))}")
    elif cfg.preset is not None and cfg.preset not in presets and cfg.init_from is None:
        problems.append(f"unknown --preset {cfg.preset!r} for --arch {arch}; choose one of {', '.join(presets)}")
    if cfg.tokenizer not in ("spm", "bpe", "char"):
        problems.append(f"unknown --tokenizer {cfg.tokenizer!r}; choose spm, bpe or char")
    if cfg.sampling not in SAMPLINGS:
        problems.append(f"unknown --sampling {cfg.sampling!r}; choose one of {', '.join(SAMPLINGS)}")
    if cfg.precision is not None and cfg.precision not in PRECISIONS:
        problems.append(f"unknown --precision {cfg.precision!r}; choose one of {', '.join(sorted(PRECISIONS))}")
    o = cfg.optim
    need(is_num(o.lr) and o.lr > 0, "optim.lr", "a positive number", o.lr)
    need(is_num(o.min_lr) and 0 <= o.min_lr, "optim.min_lr", "a number >= 0", o.min_lr)
    if is_num(o.lr) and is_num(o.min_lr) and o.min_lr > o.lr:
        problems.append(f"--min-lr {o.min_lr} is above the peak --lr {o.lr}")
    need(is_int(o.warmup_steps) and o.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", o.warmup_steps)
    need(is_num(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", "a number >= 0", o.weight_decay)
    need(is_num(o.b1) and 0 <= o.b1 < 1, "optim.b1", "in [0, 1)", o.b1)
    need(is_num(o.b2) and 0 < o.b2 < 1, "optim.b2", "in (0, 1)", o.b2)
    need(is_num(o.eps) and o.eps > 0, "optim.eps", "a positive number", o.eps)
    need(o.clip_norm is None or (is_num(o.clip_norm) and o.clip_norm > 0), "optim.clip_norm", "positive or none", o.clip_norm)
    need(o.name in ("adamw", "adam"), "optim.name", "adamw or adam", o.name)
    need(o.schedule in ("cosine", "constant"), "optim.schedule", "cosine or constant", o.schedule)
    need(isinstance(o.flat_update, bool), "optim.flat_update", "true or false", o.flat_update)
    need(o.decay_steps is None or (is_int(o.decay_steps) and o.decay_steps >= 1), "optim.decay_steps",
         "an integer >= 1 or none", o.decay_steps)
    for key in ("dropout", "embed_dropout"):
        v = cfg.model_overrides.get(key, 0.0)
        need(is_num(v) and 0 <= v < 1, f"model.{key}", "in [0, 1)", v)
    bad_steps = [s for s in cfg.debug_nan_steps if not (is_int(s) and s >= 1)]
    if bad_steps:
        problems.append(f"--debug-nan-at takes step numbers >= 1, got {bad_steps}")
    chosen = task if task is not None else (TASKS[cfg.task] if cfg.task in TASKS else None)
    if chosen is not None:
        task_cls = chosen if isinstance(chosen, type) else type(chosen)
        fields = {f.name for f in dataclasses.fields(registry.ARCHS[arch][0])} if arch in registry.ARCHS else set()
        if any(k in cfg.model_overrides for k in ("lora_rank", "lora_alpha", "lora_targets")) and fields \
                and "lora_rank" not in fields:
            problems.append(f"--lora: LoRA adapters are for GPT models (--arch gpt or reward), not --arch {arch}")
        if cfg.reference and cfg.model_overrides.get("lora_rank"):
            problems.append("--reference with --lora: with adapters the reference is the model with them switched "
                            "off; drop one of the two")
        if cfg.reference and task_cls.frozen is Task.frozen:
            problems.append(f"--reference is for tasks with a reference model (dpo, ppo), not --task {cfg.task}")
        if cfg.reward_model and not getattr(task_cls, "takes_reward_model", False):
            problems.append(f"--reward-model is for --task ppo, not --task {cfg.task}")
    if not problems and (task is not None or cfg.task in TASKS):
        problems += (task or TASKS[cfg.task]()).check(cfg)
    if problems:
        raise TrainingError("; ".join(problems))


def _may_change(name: str) -> bool:
    if name.startswith("model."):
        return name[len("model."):] in RESUMABLE_MODEL
    return name in RESUMABLE


def resume_changes(run: dict, given: TrainConfig, given_model: dict | None = None) -> dict[str, tuple]:
    """What ``given`` changes in the run whose ``config.json`` is ``run``: ``{setting: (run's, given)}``.

    Raises ``TrainingError`` naming every change that a resumed run may not make (anything outside
    :data:`RESUMABLE` / :data:`RESUMABLE_MODEL`). ``given_model``: the model config (a dict) the
    given settings would build, compared field by field with the run's; ``precision`` None means
    "whatever the run trains in".
    """
    stored = TrainConfig.from_dict(run["train"])
    changes: dict[str, tuple] = {}
    ours, theirs = stored.to_dict(), given.to_dict()
    for name in ours:
        if name in ("optim", "model_overrides", "precision"):
            continue
        if ours[name] != theirs[name]:
            changes[name] = (ours[name], theirs[name])
    for name, value in ours["optim"].items():
        if value != theirs["optim"][name]:
            changes[f"optim.{name}"] = (value, theirs["optim"][name])
    run_precision = run.get("precision", stored.precision)
    if given.precision is not None and given.precision != run_precision:
        changes["precision"] = (run_precision, given.precision)
    for name, value in (given_model or {}).items():
        if name != "vocab_size" and run["model"].get(name) != value:
            changes[f"model.{name}"] = (run["model"].get(name), value)
    refused = [k for k in changes if not _may_change(k)]
    if "preset" in refused:  # the model fields that differ follow from it
        refused = [k for k in refused if not k.startswith("model.")]
    if refused:
        listed = ", ".join(f"{flag(k)} {_show(changes[k][1])} (the run has {_show(changes[k][0])})" for k in refused)
        raise TrainingError(
            f"--resume continues the run with its own settings, and this command changes some: {listed}. "
            "Drop those flags to resume, or start a new run with another --out"
        )
    return changes


def resume_config(out: str, **changes: Any) -> TrainConfig:
    """The settings of the run in ``out``, ready to resume it, with ``changes`` (settings from
    :data:`RESUMABLE`, e.g. ``steps=2000, mesh="data=8"``) applied: ``train(resume_config(out))``."""
    from tfd_jax.train.checkpoint import read_config

    return dataclasses.replace(TrainConfig.from_dict(read_config(out)["train"]), out=str(out), resume=True,
                               force=False, **changes)
