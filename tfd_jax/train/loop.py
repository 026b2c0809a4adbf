"""The Trainer: data, model, sharded jitted steps, evaluation, checkpoints, metrics, for any task (Chapter 17).

``train(TrainConfig(...))`` (or ``Trainer(cfg, task).run()``) is what ``tfd-jax train`` runs. The
objective is a task (``tfd_jax.train.tasks``: next-token LM, masked-LM, or one of the caller's own);
everything below holds for every task. In order:

1. check every setting, the mesh and the run directory before anything is written; a new run is
   made in a staging directory and moved into ``out`` whole (``rundir``), a resumed run must keep
   its settings (``config.resume_changes``), and the run directory is locked for as long as the
   run lasts;
2. load the corpus, train the tokenizer (with the task's special tokens; or take the tokenizer of
   ``--init-from``), tokenize train and val splits (on resume: check the run's token files against
   its tokenizer and the identity recorded when it started);
3. build the mesh, initialise the sharded model and optimizer state directly on the devices (or
   load ``--init-from``'s weights onto them);
4. on resume, restore state and data iterator from the newest intact checkpoint (onto this mesh);
5. loop: one jitted, donated step per batch; every ``log_every`` steps pull metrics to the host,
   write ``metrics.jsonl`` and update the progress bar; evaluate every ``eval_every``; save every
   ``ckpt_every`` and at the end; stop cleanly on SIGTERM or SIGINT (saving first) and on repeated
   non-finite steps (not saving: the last good checkpoint stays the newest);
6. draw ``loss.png`` and print a few samples.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax import runtime
from tfd_jax.faults import silence_orbax_aftermath, system_fault
from tfd_jax.models import registry
from tfd_jax.train import checkpoint as ckpt
from tfd_jax.train import metrics as mx
from tfd_jax.train import rundir
from tfd_jax.train import sharding as shd
from tfd_jax.train.config import RESUMABLE_MODEL, TrainConfig, TrainingError, flag, resume_changes, validate
from tfd_jax.train.optim import make_optimizer
from tfd_jax.train.precision import compute_dtype, default_precision
from tfd_jax.train.step import (init_state, make_eval_step, make_multi_step, make_train_step, merge_model, rng_tags,
                                 split_trainable)
from tfd_jax.train.tasks import Task, get_task, trainable_filter

__all__ = ["TrainConfig", "TrainingError", "RunFailed", "Stopped", "Trainer", "train", "model_config_for",
           "summary_json"]


class RunFailed(TrainingError):
    """The run started but could not go on (diverged, a full disk, ...); the message says what is safe."""

    exit_code = 1


class Stopped(TrainingError):
    """Interrupted (a second Ctrl-C) before a checkpoint could be saved."""

    exit_code = 130


# --- setup helpers ---------------------------------------------------------------------------


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _on_main(name: str, fn):
    """Run ``fn`` on process 0 only; if it fails there, every process raises (not just process 0,
    which would leave the others waiting for it forever). Returns ``fn``'s result on process 0."""
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise TrainingError(f"process 0 stopped while it {name}; its output says why")
    if error is not None:
        raise error
    return result


def model_config_for(cfg: TrainConfig, vocab_size: int, precision: str, arch: str = "gpt", base=None,
                     fields: dict | None = None):
    """The model config a run trains: the preset (or ``base``, e.g. ``--init-from``'s) with the
    run's vocabulary, compute dtype, the task's ``fields`` (ids its tokenizer decides) and
    ``--model`` overrides, and a context at least ``seq_len`` long."""
    overrides = {"dtype": compute_dtype(precision), **(fields or {}), **cfg.model_overrides}
    if base is None:
        base = registry.config_preset(arch, cfg.preset, vocab_size=vocab_size, **overrides)
    else:
        base = base.replace(**overrides)
    if cfg.seq_len > base.context_length:
        if base is not None and cfg.init_from:
            raise TrainingError(f"--seq-len {cfg.seq_len} is longer than the context of --init-from's model "
                                f"({base.context_length})")
        base = base.replace(context_length=cfg.seq_len)
    return base


def cpu_data_devices(batch_size: int, grad_accum: int, devices: int) -> int:
    """How many of ``devices`` CPU devices a default mesh trains on: the most that split every
    micro-batch (``batch_size / grad_accum`` rows) evenly, e.g. 6 of 8 for a batch of 12."""
    rows = batch_size // grad_accum if batch_size % grad_accum == 0 else batch_size
    return max(d for d in range(1, max(devices, 1) + 1) if rows % d == 0)


def _make_mesh(cfg: TrainConfig):
    devices = None
    if (cfg.mesh is None and runtime.AUTO_CPU_DEVICES and jax.process_count() == 1
            and jax.default_backend() == "cpu"):
        # the CPU devices are the library's split of the cores (tfd_jax.runtime): a batch that does
        # not split over all of them trains on fewer rather than stopping
        devices = jax.devices()[:cpu_data_devices(cfg.batch_size, cfg.grad_accum, jax.device_count())]
    try:
        mesh = shd.make_mesh(cfg.mesh, devices)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    divisor = shd.batch_divisor(mesh)
    if cfg.batch_size % divisor:
        raise TrainingError(
            f"--batch-size {cfg.batch_size} must be a multiple of data x fsdp = {divisor} on mesh {dict(mesh.shape)}"
        )
    if cfg.batch_size % (cfg.grad_accum * divisor):
        raise TrainingError(
            f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} x data x fsdp "
            f"({divisor}) so every micro-batch splits evenly over the devices"
        )
    if cfg.optim.flat_update and any(n > 1 for name, n in mesh.shape.items() if name != "data"):
        raise TrainingError(
            f"TrainConfig.optim.flat_update keeps the optimizer's moments as flat vectors, which are not sharded: "
            f"use it on a data-only mesh (this one is {dict(mesh.shape)}) or turn it off")
    return mesh


@dataclass
class _Run:
    """A run directory opened for training: its lock (process 0) and what it holds."""

    out: Path
    cfg: TrainConfig  # the settings this process trains with (a resumed run: the run's, plus the allowed changes)
    arch: str
    model_cfg: Any
    precision: str
    tokenizer: Any
    train_tokens: Any
    val_tokens: Any
    lock: rundir.RunLock | None
    changes: dict  # on resume: setting -> (the run's, now)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _open_run(cfg: TrainConfig, task: Task, log) -> _Run:
    out = Path(cfg.out)
    mode = rundir.plan(out, resume=cfg.resume, force=cfg.force)  # read-only: every process, same verdict
    if mode == "resume":
        lock = _on_main("took the run's lock", lambda: rundir.RunLock.acquire(out))
        try:
            return _resume_run(cfg, task, out, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    precision = cfg.precision or default_precision()
    arch = cfg.arch or task.arch
    source = None
    if cfg.init_from:
        from tfd_jax.train.init import open_source

        source = open_source(cfg.init_from)  # read-only: every process
        if source.arch != arch and source.arch not in task.init_archs:
            raise TrainingError(f"--init-from {cfg.init_from} holds a {source.arch} model, and --task {task.name} "
                                f"trains a {arch}")
    # bad model settings fail here, before any data is read
    planned = model_config_for(cfg, cfg.vocab_size, precision, arch, base=source.model_config if source else None)
    if source is not None:
        from tfd_jax.train.init import check_model_config

        check_model_config(cfg.init_from, source.model_config, planned)
    try:  # the model itself (e.g. LoRA targets that name no layer), still before anything is written
        nnx.eval_shape(lambda: registry.build(arch, planned, nnx.Rngs(0)))
    except ValueError as e:
        raise TrainingError(str(e)) from None

    def make():
        replacing = rundir.RunLock.acquire(out) if mode == "replace" else None
        try:
            staging = rundir.NewRun(out, replacing)
        except BaseException:
            if replacing is not None:
                replacing.release()
            raise
        try:
            given = None
            if source is not None:
                from tfd_jax.train.init import source_tokenizer

                given = source_tokenizer(source, task, lora=bool(getattr(planned, "lora_rank", 0)), log=log)
            tokenizer, train_tf, val_tf = _prepare_data(cfg, task, staging.path, log, tokenizer=given)
            _check_iterators(cfg, task, tokenizer, train_tf, val_tf)
            model_cfg = model_config_for(cfg, tokenizer.vocab_size, precision, arch,
                                         base=source.model_config if source else None,
                                         fields=task.model_fields(tokenizer))
            if tokenizer.vocab_size > model_cfg.vocab_size:  # a tokenizer that grew: as many more embeddings
                model_cfg = model_cfg.replace(vocab_size=tokenizer.vocab_size)
            from tfd_jax.data.tokenized import identity

            record = {
                "arch": arch, "task": task.name, "model": model_cfg.to_dict(), "train": cfg.to_dict(),
                "precision": precision, "data": {"train": identity(train_tf), "val": identity(val_tf)},
            }
            if source is not None:
                record["init_from"] = source.describe()
            ckpt.write_config(staging.path, record)
            lock = staging.commit()
        except BaseException:
            staging.discard()
            raise
        if mode == "replace":
            log(f"replaced the run in {out} with a new one")
        return lock

    lock = _on_main("prepared the run directory", make)
    try:
        tokenizer, train_tf, val_tf = _load_run_data(out)
        model_cfg = registry.config_from_dict(arch, ckpt.read_config(out)["model"])
        return _Run(out, cfg, arch, model_cfg, precision, tokenizer, train_tf, val_tf, lock, {})
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _resume_run(cfg: TrainConfig, task: Task, out: Path, lock) -> _Run:
    run = ckpt.read_config(out)
    arch = run.get("arch", "gpt")
    precision = run.get("precision") or cfg.precision or default_precision()
    tokenizer, train_tf, val_tf = _load_run_data(out)
    run_model = registry.config_from_dict(arch, run["model"])
    run = dict(run, model=run_model.to_dict())  # fields added since the run started: their defaults
    try:
        # a run started from other weights has no preset to rebuild: the given flags apply to its model
        given_model = model_config_for(cfg, tokenizer.vocab_size, precision, arch,
                                       base=run_model if run.get("init_from") else None,
                                       fields=task.model_fields(tokenizer))
    except ValueError as e:
        raise TrainingError(f"--resume: {e}") from None
    changes = resume_changes(run, cfg, given_model.to_dict())
    model_cfg = run_model.replace(**{k: getattr(given_model, k) for k in RESUMABLE_MODEL if hasattr(given_model, k)})
    from tfd_jax.data.tokenized import identity

    recorded = run.get("data") or {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        if split in recorded and recorded[split] != identity(tf):
            then, now = recorded[split], identity(tf)
            raise TrainingError(
                f"the token files in {out / 'data'} changed since the run started ({split}: {then['tokens']:,} tokens "
                f"from {then['source']!r} then, {now['tokens']:,} from {now['source']!r} now); a resumed run must see "
                "the same data: put the original files back, or start a new run with another --out"
            )
    cfg = dataclasses.replace(cfg, precision=TrainConfig.from_dict(run["train"]).precision)
    return _Run(out, cfg, arch, model_cfg, precision, tokenizer, train_tf, val_tf, lock, changes)


def _load_run_data(out: Path):
    """(tokenizer, train TokenFile, val TokenFile) of a run directory, checked against each other."""
    from tfd_jax.data.tokenized import check_tokenizer, load_tokens
    from tfd_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(out / ckpt.TOKENIZER_DIR)
    splits = []
    for split in ("train", "val"):
        tf = load_tokens(out / "data" / split)
        try:
            check_tokenizer(tf, tokenizer)
        except ValueError as e:
            raise TrainingError(f"{e} (the run's is {out / ckpt.TOKENIZER_DIR})") from None
        splits.append(tf)
    return tokenizer, *splits


def _prepare_data(cfg: TrainConfig, task: Task, directory: Path, log, tokenizer=None):
    """Load the corpus, train the tokenizer (unless one is given) and write the token files into
    ``directory``: (tokenizer, train TokenFile, val TokenFile)."""
    from tfd_jax.data.tokenized import write_tokens

    t0 = time.time()
    train_corpus = task.corpus(cfg, "train", cfg.max_bytes)
    val_corpus = task.corpus(cfg, "val", None if cfg.max_bytes is None else max(cfg.max_bytes // 10, 1))
    log(f"corpus {cfg.data!r}: {train_corpus.num_chars:,} train / {val_corpus.num_chars:,} val characters")
    # A character vocabulary must cover the validation text too (nanoGPT builds it from all of the
    # text); BPE and sentencepiece fall back to bytes, so they see only training text.
    text = train_corpus.text + (val_corpus.text if cfg.tokenizer == "char" else "")
    if tokenizer is None:
        tokenizer = _train_tokenizer(cfg, task.tokenizer_text(cfg, text), task.special_tokens)
    tokenizer.save(directory / ckpt.TOKENIZER_DIR)
    encoder = task.token_encoder(tokenizer)
    train_tf = write_tokens(train_corpus, encoder, directory / "data" / "train", progress=cfg.progress)
    val_tf = write_tokens(val_corpus, encoder, directory / "data" / "val", progress=cfg.progress)
    kind = cfg.tokenizer if not cfg.init_from else f"from {cfg.init_from}"
    log(f"tokenizer {kind} ({tokenizer.vocab_size} tokens) and data ready in {time.time() - t0:.1f}s")
    return tokenizer, train_tf, val_tf


def _check_iterators(cfg: TrainConfig, task: Task, tokenizer, train_tf, val_tf) -> None:
    """A corpus too small for one batch fails here, with the numbers, before the run exists."""
    task.iterator(cfg, train_tf, tokenizer, seed=cfg.seed)
    try:
        task.iterator(cfg, val_tf, tokenizer, seed=cfg.seed + VAL_SEED_OFFSET)
    except ValueError as e:
        raise TrainingError(f"validation split too small: {e}") from None


def _train_tokenizer(cfg: TrainConfig, text: str, special_tokens=()):
    from tfd_jax.tokenizers import BPETokenizer, CharTokenizer, SentencePieceTokenizer

    special = {"special_tokens": tuple(special_tokens)} if special_tokens else {}
    if cfg.tokenizer == "spm":
        return SentencePieceTokenizer.train(text, cfg.vocab_size, **special)
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(text, cfg.vocab_size, **special)
    if cfg.tokenizer == "char":
        return CharTokenizer.train(text, **special)
    raise TrainingError(f"unknown tokenizer {cfg.tokenizer!r}; choose 'spm', 'bpe' or 'char'")


def _record_resume(run: _Run, step: int) -> None:
    """config.json: the settings now in force, and one entry per resume that changed any."""
    config = ckpt.read_config(run.out)
    config["train"] = run.cfg.to_dict()
    config["model"] = run.model_cfg.to_dict()
    shown = {k: list(v) for k, v in run.changes.items() if k not in ("out", "resume", "force")}
    if shown:
        config.setdefault("resumes", []).append(
            {"step": step, "at": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": shown})
    ckpt.write_config(run.out, config)


def _describe_changes(changes: dict) -> str:
    parts = [f"{flag(k)} {a} -> {b}" for k, (a, b) in changes.items() if k not in ("out", "resume", "force")]
    return ", ".join(parts)


# --- the run ---------------------------------------------------------------------------------


class Trainer:
    """Trains one task as ``cfg`` says: ``Trainer(cfg).run()``, or ``Trainer(cfg, task).run()`` with a
    task object of one's own (a :class:`~tfd_jax.train.tasks.Task`: its loss, its architecture).

    The Trainer owns the mesh, the run directory (lock, staging, resume checks), initialisation
    (the task's model from a preset, a run's checkpoint, or Hugging Face weights with
    ``cfg.init_from``), the jitted step, evaluation, checkpoints, metrics, signals and progress; the
    task owns the loss. ``run()`` returns a summary dict (final losses, timings).

    Raises ``TrainingError`` for settings, data or a run directory that cannot be used (nothing is
    written then), :class:`RunFailed` when a started run cannot go on (the message names the
    newest complete checkpoint).
    """

    def __init__(self, cfg: TrainConfig, task: Task | None = None):
        if task is not None and cfg.task != task.name:
            cfg = dataclasses.replace(cfg, task=task.name)
        self.cfg = cfg
        self.custom_task = task is not None
        self.task = task

    def run(self) -> dict:
        shd.maybe_initialize_distributed()
        is_main = jax.process_index() == 0

        def log(msg: str) -> None:
            if is_main:
                print(msg, flush=True)

        cfg = self.cfg
        validate(cfg, self.task if self.custom_task else None)
        task = self.task or get_task(cfg.task)
        mesh = _make_mesh(cfg)
        run = _open_run(cfg, task, log)
        try:
            return _train(run, task, mesh, log, is_main)
        finally:
            run.release()


def train(cfg: TrainConfig, task: Task | None = None) -> dict:
    """Run (or resume) training as configured: ``Trainer(cfg, task).run()``."""
    return Trainer(cfg, task).run()


def _safe_point(checkpointer, out: Path, *, fault: bool = True) -> str:
    try:
        checkpointer.manager.reload()
        last = checkpointer.latest_step()
    except Exception:  # noqa: BLE001 - the disk may be unreadable too; say what we can
        last = None
    where = (f"the newest complete checkpoint is step {last} in {out / ckpt.CHECKPOINT_DIR}" if last is not None
             else "no checkpoint was completed yet")
    then = "once that is fixed, continue with" if fault else "continue with"
    return f"{where}; {then}: tfd-jax train --out {out} --resume"


@dataclass
class _Model:
    """The model as the step sees it: its structure, the sharded training state, and how to make one."""

    graphdef: Any
    rest: Any  # non-parameter state (dropout streams)
    state: dict
    state_sh: dict
    param_shardings: tuple  # (trainable, fixed)
    abstract_state: dict
    new_state: Any  # (params, fixed) -> a fresh training state
    optimizer: Any
    schedule: Any
    dropout_tags: tuple
    num_params: int
    num_embed: int  # token, position and segment tables
    num_matmul: int  # parameters in matrix products (MFU): all but the lookup tables; a tied table counts once
    frozen: Any = None  # trees the loss reads but never trains (a reference model), sharded like the params


def _build_model(run: _Run, task: Task, mesh, log) -> _Model:
    """The task's model initialised directly on the devices with its shardings (or ``--init-from``'s
    weights placed there), and a fresh training state around it."""
    cfg, model_cfg = run.cfg, run.model_cfg

    def make_model():  # structure first, without allocating; then initialised with the shardings
        return registry.build(run.arch, model_cfg, nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))

    abstract_model = nnx.eval_shape(make_model)
    trainable = trainable_filter(task, model_cfg)
    graphdef, abstract_params, abstract_fixed, _ = split_trainable(abstract_model, trainable)
    p_sh = shd.param_shardings(abstract_params, mesh)
    f_sh = shd.param_shardings(abstract_fixed, mesh)

    @jax.jit
    def init_params_and_rest():
        _, p, f, r = split_trainable(make_model(), trainable)
        return jax.lax.with_sharding_constraint(p, p_sh), jax.lax.with_sharding_constraint(f, f_sh), r

    with jax.set_mesh(mesh):
        params, fixed, rest = init_params_and_rest()
    # A task with a frozen copy of the starting weights (a reference model) needs them on resume too.
    wants_frozen = type(task).frozen is not Task.frozen
    if cfg.init_from and (not cfg.resume or wants_frozen):
        from tfd_jax.train.init import load_weights

        params, fixed = load_weights(cfg.init_from, run.arch, model_cfg, graphdef, params, fixed, rest, (p_sh, f_sh),
                                     fresh=task.fresh_params, log=log)
        log(f"initialised from {cfg.init_from}")
    n_params = sum(int(x.size) for x in jax.tree.leaves((params, fixed)))
    sizes = {}
    for tree in (params, fixed):
        for path, x in nnx.to_flat_state(tree):
            sizes[path[0]] = sizes.get(path[0], 0) + int(x.size)
    n_embed = sum(sizes.get(k, 0) for k in ("tok_embed", "pos_embed", "type_embed"))
    # The token table is also the output head unless the model has a head of its own.
    n_matmul = n_params - n_embed + (0 if "lm_head" in sizes else sizes.get("tok_embed", 0))

    optimizer, schedule = make_optimizer(cfg.optim, cfg.steps)

    buffer = task.experience_buffer() if task.experience is not None else None

    def new_state(p, f):
        return init_state(p, optimizer, cfg.seed, run.precision, fixed=f, buffer=buffer)

    abstract_state = jax.eval_shape(new_state, params, fixed)
    state_sh = _state_shardings(abstract_state, optimizer, p_sh, shd.replicated(mesh), f_sh, cfg.optim.flat_update)
    state = jax.jit(new_state, out_shardings=state_sh)(params, fixed)
    tags = rng_tags(abstract_model) if _has_dropout(model_cfg) else ()
    frozen = None
    if wants_frozen and cfg.reference:  # another run's weights as the reference
        from tfd_jax.train.init import load_weights

        frozen = task.frozen(*load_weights(cfg.reference, run.arch, model_cfg, graphdef, params, fixed, rest,
                                           (p_sh, f_sh), fresh=task.fresh_params))
        log(f"reference model: {cfg.reference}")
    elif wants_frozen:
        frozen = task.frozen(params, fixed)
    if frozen is not None:  # its own buffers: the training state's are donated step by step
        frozen = jax.jit(lambda t: jax.tree.map(jnp.copy, t))(frozen)
    return _Model(graphdef, rest, state, state_sh, (p_sh, f_sh), abstract_state, new_state, optimizer, schedule, tags,
                  n_params, n_embed, n_matmul, frozen)


def _restore(run: _Run, task: Task, m: _Model, checkpointer, log, is_main: bool):
    """On resume: the newest intact checkpoint's state and data iterator, or (no checkpoint yet) the
    fresh state from step 0. Returns ``(state, data iterator, start step)``."""
    from tfd_jax.data.pipeline import IteratorRestore

    cfg, out = run.cfg, run.out
    state, data_it, start_step = m.state, task.iterator(cfg, run.train_tokens, run.tokenizer, seed=cfg.seed), 0
    target = ckpt.abstract_with_shardings(m.abstract_state, m.state_sh)
    fresh_its = []

    def data_args():
        fresh_its.append(task.iterator(cfg, run.train_tokens, run.tokenizer, seed=cfg.seed))  # one per attempt
        return IteratorRestore(fresh_its[-1])

    try:
        found, restored, _ = checkpointer.restore_newest_intact(target, data_args, log=log)
    except TrainingError:
        checkpointer.close()
        raise
    changed = _describe_changes(run.changes)
    if found is None:
        log(f"{out} has no checkpoint yet: starting from step 0 with the run's settings"
            + (f"; changed: {changed}" if changed else ""))
        if cfg.init_from:  # step 0 of this run is --init-from's weights, not random ones
            from tfd_jax.train.init import load_weights

            p, f = load_weights(cfg.init_from, run.arch, run.model_cfg, m.graphdef, state["params"],
                                state.get("fixed", nnx.State({})), m.rest, m.param_shardings,
                                fresh=task.fresh_params)
            state = jax.jit(m.new_state, out_shardings=m.state_sh)(p, f)
            log(f"initialised from {cfg.init_from}")
    else:
        state, data_it = restored, fresh_its[-1]
        start_step = int(jax.device_get(state["step"]))
        log(f"resumed from step {start_step} ({out / ckpt.CHECKPOINT_DIR})" + (f"; changed: {changed}" if changed else ""))
    if "steps" in run.changes and cfg.optim.decay_steps is None:
        log(f"the learning-rate schedule now runs over {cfg.steps} steps")
    if is_main:
        _record_resume(run, start_step)
    return state, data_it, start_step


#: what every step reports; anything else in a step's metrics is the task's own
_STEP_METRICS = {"loss", "grad_norm", "lr", "update_ratio", "finite", "loss_finite", "overflow", "tokens"}


def steps_per_call(cfg: TrainConfig, start_step: int = 0, task: Task | None = None) -> int:
    """Training steps per compiled call: ``cfg.steps_per_call``, or when unset 4 on a CPU for 100
    or more steps to go in a single process (a second program to compile, a few seconds, for about
    a quarter more tokens per second on a 2-core machine) and 1 elsewhere: on a GPU or TPU the host
    runs ahead anyway, and a task that makes its own data in the step (PPO's rollouts) is long
    beside the host's work."""
    if cfg.steps_per_call is not None:
        return cfg.steps_per_call
    if task is not None and task.experience is not None:
        return 1
    # (several processes: measured on one only, so they keep one step per call unless asked)
    return 4 if _one_cpu_process() and cfg.steps - start_step >= 100 else 1


def _one_cpu_process() -> bool:
    """This run is one process on the CPU: where the CPU fast paths were measured and are picked."""
    return jax.default_backend() == "cpu" and jax.process_count() == 1


def _compile(run: _Run, task: Task, m: _Model, mesh, per_call: int = 1):
    """The jitted, sharded train step (state donated), the same for ``--steps-per-call`` steps at once
    (None when that is 1) and the eval step for the task: ``(step_fn, multi_fn, eval_fn)``."""
    cfg, rep = run.cfg, shd.replicated(mesh)
    # On the CPU a data-parallel step sums each device's gradients in one flat all-reduce (XLA's CPU
    # runtime meets the devices once per reduced buffer otherwise); see make_train_step.
    local_rows = mesh if (_one_cpu_process() and task.rows_add_up and mesh.shape["data"] == mesh.devices.size > 1) else None
    train_step = make_train_step(
        m.graphdef,
        m.rest,
        m.optimizer,
        m.schedule,
        task.loss_fn,
        prepare=task.prepare,
        experience=task.experience,
        grad_accum=cfg.grad_accum,
        dropout_tags=m.dropout_tags,
        fp16=run.precision == "fp16",
        local_rows=local_rows,
    )
    frozen_sh = rep if m.frozen is None else jax.tree.map(lambda x: x.sharding, m.frozen)
    step_fn = jax.jit(
        train_step,
        in_shardings=(m.state_sh, shd.batch_sharding(mesh, 1), rep, frozen_sh),
        out_shardings=(m.state_sh, rep),
        donate_argnums=0,
    )
    multi_fn = None
    if per_call > 1:  # several steps in one call: the batches stacked on a leading axis
        multi_fn = jax.jit(
            make_multi_step(train_step, per_call),
            in_shardings=(m.state_sh, shd.batch_sharding(mesh, 1, steps=True), rep, frozen_sh),
            out_shardings=(m.state_sh, rep),
            donate_argnums=0,
        )
    if task.experience is not None:  # its loss reads its own experience: no held-out batches to score
        return step_fn, multi_fn, None
    eval_fn = jax.jit(make_eval_step(m.graphdef, m.rest, task.loss_fn, prepare=task.prepare, seed=cfg.seed),
                      in_shardings=(m.state_sh["params"], m.state_sh.get("fixed", rep), shd.batch_sharding(mesh, 1),
                                    frozen_sh))
    return step_fn, multi_fn, eval_fn


def _steps_this_call(cfg: TrainConfig, step: int, start_step: int, k: int, profiling: bool) -> int:
    """How many steps the next call runs: ``k`` (steps per call) unless one of them before the last
    would log, evaluate, save or take a NaN rehearsal, or the run ends sooner; the first step (which
    compiles, and is timed apart) and profiled steps run one per call."""
    if k == 1 or step == start_step or profiling or cfg.profile_dir or step + k > cfg.steps:
        return 1
    inner = range(step + 1, step + k)  # the steps before the call's last
    if any(s % cfg.log_every == 0 or s % cfg.eval_every == 0 or s % cfg.ckpt_every == 0 for s in inner):
        return 1
    if any(s in cfg.debug_nan_steps for s in range(step + 1, step + k + 1)):
        return 1
    return k


def _per_step(pending: list, host: list) -> list[tuple[int, dict]]:
    """``(step, metrics)`` for every step of the pulled calls (a multi-step call's metrics are stacked)."""
    out = []
    for (last, _, k), hm in zip(pending, host):
        if k == 1:
            out.append((last, hm))
        else:
            out.extend((last - k + 1 + i, {name: v[i] for name, v in hm.items()}) for i in range(k))
    return out


def _train(run: _Run, task: Task, mesh, log, is_main: bool) -> dict:
    cfg, out, model_cfg, precision = run.cfg, run.out, run.model_cfg, run.precision
    tokenizer, val_tokens = run.tokenizer, run.val_tokens
    try:
        task.configure(cfg)
        task.setup(tokenizer, model_cfg)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    m = _build_model(run, task, mesh, log)
    graphdef, rest, n_params, n_embed = m.graphdef, m.rest, m.num_params, m.num_embed
    rep = shd.replicated(mesh)

    # We hold the run's lock, so unfinished saves in the directory are a killed process's leftovers.
    checkpointer = ckpt.Checkpointer(out, keep=cfg.keep_checkpoints, cleanup_tmp=True)
    if cfg.resume:
        state, data_it, start_step = _restore(run, task, m, checkpointer, log, is_main)
    else:
        state, data_it, start_step = m.state, task.iterator(cfg, run.train_tokens, tokenizer, seed=cfg.seed), 0
    m.state = None  # the loop owns the state now (it is donated step by step)
    if start_step >= cfg.steps:
        log(f"nothing to do: the run is already at step {start_step} of {cfg.steps}")
    per_call = steps_per_call(cfg, start_step, task)
    step_fn, multi_fn, eval_fn = _compile(run, task, m, mesh, per_call)
    frozen = m.frozen

    matmul = m.num_matmul
    fpt = mx.flops_per_token(matmul, model_cfg.num_layers, model_cfg.d_model, cfg.seq_len)
    peak = mx.peak_flops_per_device()
    metrics_log = mx.MetricsLog(out, resume_step=start_step if cfg.resume else None, warn=log)
    trains = sum(int(x.size) for x in jax.tree.leaves(state["params"]))
    log(
        f"{task.name} task, {run.arch} model {cfg.init_from or cfg.preset or registry.DEFAULT_PRESET[run.arch]}: {n_params:,} parameters"
        + (f" ({trains:,} trained)" if trains != n_params else "") + f" ({n_params - n_embed:,} without embeddings), "
        f"{model_cfg.num_layers} layers, d_model {model_cfg.d_model}, vocab {model_cfg.vocab_size}; "
        f"precision {precision}; mesh {dict(mesh.shape)} over {mesh.devices.size} {jax.devices()[0].platform} device(s)"
    )

    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        stop["signal"] = signum
        if is_main:
            more = " (Ctrl-C again to stop at once, without saving)" if signum == signal.SIGINT else ""
            print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping{more}",
                  file=sys.stderr, flush=True)

    old_handlers = {}
    if threading_main():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old_handlers[sig] = signal.signal(sig, on_signal)

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = _progress(cfg, start_step, is_main)
    summary = {"run_dir": str(out), "start_step": start_step}
    ema = None
    last_t, last_step = None, start_step
    first_t = None  # when the first step (with its compilation) was done
    step = start_step
    pending = []  # (last step, device metrics, steps in the call) not yet pulled to the host
    t_start = time.perf_counter()
    profiling = False
    # Made once on the devices, so the loop sends nothing but the batch. (Made by a jitted function:
    # device_put checks that every process passes equal values, and NaN never equals itself.)
    poison_one, poison_nan = jax.jit(lambda: (jnp.float32(1.0), jnp.float32(jnp.nan)), out_shardings=(rep, rep))()
    val_loss = None
    last_scale = None
    failed = False
    try:
        while step < cfg.steps:
            if cfg.profile_dir and step == start_step + 2:  # after compilation and one warm step
                jax.profiler.start_trace(cfg.profile_dir)
                profiling = True
            k = _steps_this_call(cfg, step, start_step, per_call, profiling)
            if k == 1:
                batch = shd.global_batch(next(data_it), mesh)
                state, m = step_fn(state, batch, poison_nan if (step + 1) in cfg.debug_nan_steps else poison_one, frozen)
            else:  # k steps, none of which logs, evaluates, saves or rehearses a NaN but perhaps the last
                locals_ = [next(data_it) for _ in range(k)]
                batch = shd.global_batch({name: np.stack([b[name] for b in locals_]) for name in locals_[0]}, mesh,
                                         steps=True)
                state, m = multi_fn(state, batch, poison_one, frozen)
            step += k
            pending.append((step, m, k))
            if profiling and (step >= start_step + 2 + cfg.profile_steps or step == cfg.steps):
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
                log(f"profiler trace of {cfg.profile_steps} steps written to {cfg.profile_dir} (open it with TensorBoard or Perfetto)")
            if step == start_step + 1:
                jax.block_until_ready(m)  # the first step includes compilation: time from here on
                if multi_fn is not None:  # and so does the several-step program: compiled now, off the clock
                    stacked = {name: jax.ShapeDtypeStruct((per_call, *x.shape), x.dtype,
                                                          sharding=shd.batch_sharding(mesh, x.ndim + 1, steps=True))
                               for name, x in batch.items()}
                    multi_fn = multi_fn.lower(state, stacked, poison_one, frozen).compile()
                first_t = last_t = time.perf_counter()
                last_step = step
                summary["compile_and_first_step_s"] = round(last_t - t_start, 2)
            save_now = step % cfg.ckpt_every == 0 or step == cfg.steps or stop["signal"]
            log_now = step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == cfg.steps or stop["signal"]
            if not (save_now or log_now):
                continue
            host = _per_step(pending, jax.device_get([mm for _, mm, _ in pending]))
            now = time.perf_counter()
            tps = tokens_per_step * (step - last_step) / max(now - last_t, 1e-9) if step > last_step else None
            last_t, last_step = now, step
            state_counts = jax.device_get({k: state[k] for k in ("nonfinite", "nonfinite_streak", "loss_scale")})
            for s, hm in host:
                loss = float(hm["loss"])
                if bool(hm["overflow"]):
                    pass  # fp16 loss-scale search: reported below as the scale changes
                elif not bool(hm["finite"]):
                    log(f"step {s}: non-finite loss or gradients; the update was skipped")
                elif (ema is not None and loss > cfg.spike_factor * ema and loss - ema > SPIKE_MIN_RISE
                      and task.experience is None):  # (a policy-gradient loss has no scale to spike against)
                    log(f"step {s}: loss spike {loss:.3f} (running average {ema:.3f})")
                if bool(hm["finite"]):
                    ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            skipped = sum(bool(hm["overflow"]) for _, hm in host)
            pending.clear()
            last = host[-1][1]
            record = {
                "step": step,
                "loss": float(last["loss"]) if bool(last["loss_finite"]) else None,
                "lr": float(last["lr"]),
                "grad_norm": float(last["grad_norm"]) if bool(last["finite"]) else None,
                "update_ratio": float(last["update_ratio"]) if bool(last["finite"]) else None,
                "tokens_per_s": tps,
                "mfu": mx.mfu(tps, fpt, mesh.devices.size, peak) if tps else None,
                "nonfinite_steps": int(state_counts["nonfinite"]),
            }
            for name in sorted(set(last) - _STEP_METRICS):  # the task's own, e.g. mlm_loss, masked_accuracy
                record[name] = float(last[name]) if bool(last["finite"]) else None
            if precision == "fp16":
                scale = float(state_counts["loss_scale"])
                record["loss_scale"] = scale
                if skipped and scale != last_scale:
                    log(f"step {step}: fp16 loss scale now {scale:g} ({skipped} update(s) skipped while it settles)")
                last_scale = scale
            streak = int(state_counts["nonfinite_streak"])
            if streak >= cfg.max_nonfinite_streak:
                raise RunFailed(_diverged_message(step, streak, checkpointer))
            if eval_fn is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_loss, val_metrics = _evaluate(cfg, task, tokenizer, eval_fn, state, val_tokens, mesh, frozen)
                record["val_loss"] = val_loss
                record.update({f"val_{k}": v for k, v in val_metrics.items()})
            if log_now:  # (a checkpoint step only checks the counters above; it logs nothing)
                metrics_log.write(record)
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{record['loss']:.3f}" if record["loss"] is not None else "nan", tok_s=f"{tps or 0:,.0f}")
            if save_now:
                # Mid-streak a periodic save is skipped, so the newest checkpoint stays the one from
                # before the trouble began; the last one of a run (or of a stop) is always written:
                # its parameters are the last good update's, as skipped steps change none.
                if streak > 0 and step != cfg.steps and not stop["signal"]:
                    log(f"step {step}: checkpoint skipped during a run of non-finite steps")
                else:
                    checkpointer.save(step, state, _iterator_save(data_it), force=True)
            if stop["signal"]:
                checkpointer.wait()
                name = signal.Signals(stop["signal"]).name
                log(f"received {name}: saved step {step} to {out / ckpt.CHECKPOINT_DIR}; "
                    f"continue with: tfd-jax train --out {out} --resume")
                summary["stopped_by_signal"] = name
                break
        checkpointer.wait()
    except KeyboardInterrupt:
        failed = True
        raise Stopped(f"interrupted at step {step} before saving; {_safe_point(checkpointer, out, fault=False)}") from None
    except TrainingError:
        failed = True
        raise
    except Exception as e:
        failed = True
        fault = system_fault(e)
        if fault is None:
            raise
        silence_orbax_aftermath()  # the save's other writes fail too, later, in orbax's threads
        raise RunFailed(f"{fault}; {_safe_point(checkpointer, out)}") from e
    finally:
        if profiling:
            jax.profiler.stop_trace()
        if bar is not None:
            bar.close()
        try:
            checkpointer.close()
        except Exception:  # noqa: BLE001 - a save that failed; the error in flight (or below) says so
            if not failed:
                raise
        metrics_log.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    records = mx.read_metrics(out, warn=log)
    done_after_first = step - (start_step + 1)
    summary.update(
        {
            "steps": step,
            "final_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
            "val_loss": val_loss,
            # this process's own speed, from the end of its first (compiling) step to its last
            "tokens_per_s": (tokens_per_step * done_after_first / max(last_t - first_t, 1e-9)
                             if first_t is not None and done_after_first > 0 else None),
            "num_params": n_params,
        }
    )
    finished = not summary.get("stopped_by_signal")
    want_samples = finished and (cfg.samples or type(task).final_metrics is not Task.final_metrics)
    if want_samples and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        host_params = multihost_utils.process_allgather(state["params"], tiled=True)  # a collective: all processes
        host_fixed = multihost_utils.process_allgather(state.get("fixed", nnx.State({})), tiled=True)
    elif want_samples:
        host_params, host_fixed = jax.device_get((state["params"], state.get("fixed", nnx.State({}))))
    if is_main:
        png = mx.plot_loss(out)
        if png:
            log(f"loss curve: {png}")
        if want_samples:
            model = merge_model(graphdef, host_params, host_fixed, rest)
            model.eval()
            measured = task.final_metrics(model, tokenizer, out, cfg, log)
            if measured:
                summary.update(measured)
            samples = task.samples(model, tokenizer, cfg, log) if cfg.samples else None
            if samples is not None:
                summary["samples"] = samples
    return summary


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


def _has_dropout(model_cfg) -> bool:
    return bool(getattr(model_cfg, "dropout", 0.0) or getattr(model_cfg, "embed_dropout", 0.0))


def _state_shardings(abstract_state, optimizer, p_sh, rep, f_sh=None, flat=False):
    """The training state's shardings: the parameters' own, the optimizer's moments as their
    parameters (replicated when ``flat``: ``OptimConfig.flat_update``'s vectors), the rest replicated."""
    import optax

    if flat:
        opt_sh = jax.tree.map(lambda _: rep, abstract_state["opt_state"])
    else:
        opt_sh = optax.tree_utils.tree_map_params(
            optimizer,
            lambda _, s: s,
            abstract_state["opt_state"],
            p_sh,
            transform_non_params=lambda _: rep,
            is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
        )
    special = {"params": p_sh, "opt_state": opt_sh, "fixed": f_sh}
    if "buffer" in abstract_state:  # a task's experience: rows over the batch axes, like a batch
        rows = shd.batch_sharding(rep.mesh, 1)
        special["buffer"] = jax.tree.map(lambda x: rows if x.ndim else rep, abstract_state["buffer"])
    return {k: special[k] if special.get(k) is not None else jax.tree.map(lambda _: rep, abstract_state[k])
            for k in abstract_state}


#: a loss spike is also at least this much above the running average (near zero loss, doubling is noise)
SPIKE_MIN_RISE = 0.05

#: the validation iterator's seed is the run's plus this (other windows than training's, fixed per run)
VAL_SEED_OFFSET = 12345


def _iterator_save(it):
    from tfd_jax.data.pipeline import IteratorSave

    return IteratorSave(it)


def _evaluate(cfg: TrainConfig, task: Task, tokenizer, eval_fn, state, val_tokens, mesh,
              frozen=None) -> tuple[float, dict]:
    """Mean validation loss (and the task's metrics) over ``eval_batches`` fixed batches (the same
    ones every time)."""
    it = task.iterator(cfg, val_tokens, tokenizer, seed=cfg.seed + VAL_SEED_OFFSET)
    total, count, sums = 0.0, 0.0, {}
    fixed = state.get("fixed", nnx.State({}))
    for _ in range(cfg.eval_batches):
        s, c, extra = jax.device_get(eval_fn(state["params"], fixed, shd.global_batch(next(it), mesh), frozen))
        total, count = total + float(s), count + float(c)
        for k, v in extra.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    n = max(count, 1.0)
    return total / n, {k: v / n for k, v in sums.items()}


def _diverged_message(step: int, streak: int, checkpointer) -> str:
    last = checkpointer.latest_step()
    where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"
    return (
        f"training diverged: {streak} steps in a row up to step {step} had non-finite loss or gradients "
        f"(those updates were skipped); {where}. Likely fixes (Chapter 16): lower --lr (e.g. 10x), keep "
        "gradient clipping at 1.0, use bf16 instead of fp16, check the data for corrupt examples, and "
        "check the LayerNorm eps (1e-5)."
    )


def _progress(cfg: TrainConfig, start: int, is_main: bool):
    if not (cfg.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def print_samples(model, tokenizer, cfg: TrainConfig, log) -> list[str]:
    """Generate and print a few continuations of short prompts; returns the texts."""
    from tfd_jax.decode import generate

    prompts = list(cfg.sample_prompts or (("def ", "class ", "import ") if cfg.data == "pystdlib" else ("\n",)))
    prompts = prompts[: cfg.samples]
    ids = [tokenizer.encode(p) or [tokenizer.encode("\n")[0]] for p in prompts]
    limit = model.config.context_length - max(len(i) for i in ids)
    new_tokens, lengths = generate(model, ids, min(cfg.sample_tokens, limit), temperature=0.8, top_k=50, seed=cfg.seed)
    new_tokens, lengths = np.asarray(new_tokens), np.asarray(lengths)
    texts = []
    for p, row, n in zip(prompts, new_tokens, lengths):
        text = p + tokenizer.decode([int(t) for t in row[: int(n)]])
        texts.append(text)
        log("--- sample " + "-" * 50 + "\n" + text)
    return texts


def summary_json(summary: dict) -> str:
    """The run summary as one JSON line (samples were already printed)."""
    return json.dumps({k: v for k, v in summary.items() if k != "samples"}, default=str)
