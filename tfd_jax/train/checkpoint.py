"""Checkpoints of a training run, through orbax's ``CheckpointManager`` (Chapter 15).

A run directory looks like::

    run_dir/
      config.json        model + training settings (written once, at the start)
      tokenizer/         the tokenizer, saved by its own ``save``
      checkpoints/<step>/state   params, optimizer state, step, RNG, loss scale, counters
      checkpoints/<step>/data    the data iterator's position (when there is one)
      metrics.jsonl, loss.png

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a crash or
``kill -9`` during a save leaves the previous checkpoint intact; saves run in the background
(async) while training continues. Restoring takes the target shardings, so a checkpoint written
on one mesh restores onto another.

A checkpoint can still be damaged afterwards (a truncated tensor file, a deleted metadata file, a
stray empty step directory). :func:`restore_newest_intact` tries the checkpoints newest first,
says in one line which one is damaged and why, and uses the newest one that restores; when
training resumes, damaged checkpoints are moved to ``checkpoints_damaged/`` (kept, not deleted)
so that the run can write those steps again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from tfd_jax.faults import FAILED_READ, silence_orbax_aftermath
from tfd_jax.train.config import TrainingError
from tfd_jax.train.rundir import CONFIG_FILE

TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
#: in each complete step directory: the name and size of every file of the checkpoint
FILE_LIST = "files.json"


class NoIntactCheckpoint(TrainingError):
    """Every checkpoint of the run is damaged."""


class Checkpointer:
    """Save and restore training state (and optionally the data iterator) every K steps, keep N."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 cleanup_tmp: bool = False):
        """``cleanup_tmp``: delete unfinished saves a killed process left behind (only safe while
        holding the run's lock: nobody else can be writing one)."""
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self._async = async_save
        self._in_flight: int | None = None  # the step being saved in the background
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._list_files) if async_save else None,
        )
        with _quiet_orbax():  # damaged step directories are reported when restoring
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_args: Any = None, *, force: bool = False) -> bool:
        """Start saving ``state`` (and ``data_args``, an orbax args object for the data iterator)."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_args is not None:
            items["data"] = data_args
        self.manager.wait_until_finished()  # the previous save, file list included, is complete
        self._in_flight = step
        started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if started and not self._async:
            self._in_flight = None
            if jax.process_index() == 0:
                write_file_list(self.directory / str(step))
        return started

    def _list_files(self) -> None:
        """Orbax calls this in its background thread once a save's files are all written, just
        before it renames the temporary directory into place: the list moves in with them."""
        step, self._in_flight = self._in_flight, None
        if step is None or jax.process_index() != 0:
            return
        tmp = sorted(self.directory.glob(f"{step}.orbax-checkpoint-tmp*"), key=lambda p: p.stat().st_mtime)
        write_file_list(tmp[-1] if tmp else self.directory / str(step))

    def restore_newest_intact(self, abstract_state: dict, make_data_args: Callable[[], Any] | None = None, *,
                              log: Callable[[str], None] = print) -> tuple[int | None, dict | None, Any]:
        """Restore the newest checkpoint that is intact: ``(step, state, data item)``, or
        ``(None, None, None)`` when the run has saved none yet.

        Damaged checkpoints are reported (one line each) and, once an intact one is found, moved to
        ``checkpoints_damaged/`` (process 0 moves; every process must call this). ``make_data_args`` builds a fresh orbax
        args object for the data iterator for each attempt. Raises :class:`NoIntactCheckpoint`
        when every checkpoint is damaged.
        """

        def attempt(step):
            data_args = make_data_args() if make_data_args is not None else None
            return self.restore(abstract_state, step=step, data_args=data_args)

        def report(step, reason):
            log(f"checkpoint step {step} in {self.directory} is damaged ({reason}); trying the one before it")

        step, out, damaged = newest_intact(self.directory, self.all_steps(), attempt, on_damaged=report)
        if damaged:  # only now that an intact one was found: with none, nothing is moved
            moved = [quarantine(self.directory, s) for s in damaged]
            log(f"moved the damaged checkpoint(s) to {moved[0].parent}; continuing from step {step}")
            self.manager.reload()
        return (None, None, None) if step is None else (step, *out)

    def restore(self, abstract_state: dict, *, step: int | None = None, data_args: Any = None) -> tuple[dict, Any]:
        """Restore onto ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings).

        Returns (state, restored data item or None).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_args is not None:
            items["data"] = data_args
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], (out["data"] if data_args is not None else None)

    def wait(self) -> None:
        """Block until background saves have finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax and asyncio log every failed tensor read of a damaged checkpoint (a screenful each),
    and orbax warns about each step directory it cannot parse; the caller reports the damage in
    one line instead."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def write_file_list(step_dir: Path) -> None:
    """Record the name and size of every file of a complete checkpoint's items (``state/``,
    ``data/``) in ``FILE_LIST``, so that a file truncated or deleted later is found without
    reading the tensors. (Orbax's own files at the top may still change as it commits.)"""
    files = {p.relative_to(step_dir).as_posix(): p.stat().st_size
             for p in sorted(step_dir.rglob("*")) if p.is_file() and len(p.relative_to(step_dir).parts) > 1}
    tmp = step_dir / (FILE_LIST + ".tmp")
    tmp.write_text(json.dumps({"files": files}))
    os.replace(tmp, step_dir / FILE_LIST)


def damage_of(step_dir: Path) -> str | None:
    """What is visibly wrong with a step directory (None: nothing seen; restoring is the final test).

    A checkpoint saved by this module lists its files (``FILE_LIST``): each must be there with its
    size. Without the list (a process killed right after the save), only the layout is checked.
    """
    if not step_dir.is_dir():
        return "its directory is missing"
    if not any(step_dir.iterdir()):
        return "its directory is empty"
    try:
        listed = json.loads((step_dir / FILE_LIST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    for name, size in (listed or {}).items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size:,} of its {size:,} bytes"
    state = step_dir / "state"
    if not state.is_dir():
        return "state/ is missing"
    if not (state / "_METADATA").is_file():
        return "state/_METADATA is missing"
    return None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if FAILED_READ in text or "tensorstore" in text.lower() or "OCDBT" in text:
        return "a tensor file is truncated or unreadable"
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _all_processes_ok(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def newest_intact(directory: Path, steps, attempt: Callable[[int], Any], *,
                  on_damaged: Callable[[int, str], None]) -> tuple[int | None, Any, list[int]]:
    """Call ``attempt(step)`` on ``steps`` newest first until one succeeds on every process;
    ``on_damaged(step, reason)`` for each that fails. Returns (step, its result, the damaged steps
    newer than it); ``(None, None, [])`` when there are no steps."""
    steps = sorted(steps, reverse=True)
    if not steps:
        return None, None, []
    reasons, damaged = [], []
    for step in steps:
        reason = damage_of(directory / str(step))
        result = None
        if reason is None:
            with _quiet_orbax():
                try:
                    result = attempt(step)
                except Exception as e:  # noqa: BLE001 - any failure to read means this one is damaged
                    reason = _reason(e)
                    silence_orbax_aftermath()
        if _all_processes_ok(reason is None):
            return step, result, damaged
        reason = reason or "another process could not read its part"
        reasons.append(f"step {step}: {reason}")
        damaged.append(step)
        on_damaged(step, reason)
    raise NoIntactCheckpoint(
        f"no intact checkpoint in {directory} ({'; '.join(reasons)}); nothing was changed there: restore "
        "the files from a backup, or start the run again with --force"
    )


def quarantine(ckpt_dir: Path, step: int) -> Path:
    """Move a damaged step directory out of the way (process 0; kept, not deleted). Returns where to."""
    target_dir = ckpt_dir.parent / DAMAGED_DIR
    target = target_dir / str(step)
    n = 1
    while target.exists():
        target, n = target_dir / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
        target_dir.mkdir(exist_ok=True)
        os.rename(ckpt_dir / str(step), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"quarantined_{step}")
    return target


def abstract_with_shardings(tree, shardings):
    """``ShapeDtypeStruct``s carrying the target shardings, for restoring onto a (new) mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_config(run_dir: str | os.PathLike, config: dict) -> None:
    """Write ``config.json`` atomically."""
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no {CONFIG_FILE}); pass the --out of a `tfd-jax train` run")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise TrainingError(f"{path} is damaged ({e}); it holds the run's settings, so the run cannot be read") from None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_for_inference(run_dir: str | os.PathLike, *, step: int | None = None, dtype: str | None = None,
                       log: Callable[[str], None] | None = _stderr):
    """(model, tokenizer) from a run directory's newest intact (or the given) checkpoint, in eval mode.

    A damaged newest checkpoint is reported through ``log`` (one line) and the one before it is
    used; nothing in the run directory is changed.

    Only the parameters are read; the optimizer state is skipped. A run trained with
    ``scan_layers`` comes back with its blocks one by one (``model.blocks[i]``), the layout
    decoding and inspection want.
    """
    from flax import nnx

    from tfd_jax.models import registry, with_layout
    from tfd_jax.tokenizers import load_tokenizer

    cfg = read_config(run_dir)
    arch = cfg.get("arch", "gpt")
    model_cfg = registry.config_from_dict(arch, cfg["model"])
    # No dropout at inference, so the model carries no RNG state at all.
    no_dropout = {k: 0.0 for k in ("dropout", "embed_dropout") if hasattr(model_cfg, k)}
    model_cfg = model_cfg.replace(**no_dropout, **({"dtype": dtype} if dtype else {}))
    model = nnx.eval_shape(lambda: registry.build(arch, model_cfg, nnx.Rngs(0)))
    from tfd_jax.train.step import merge_model, split_trainable
    from tfd_jax.train.tasks import TASKS, Task, trainable_filter

    # The state holds what trained under "params" and the rest (e.g. a LoRA run's base weights) under "fixed".
    graphdef, abstract_params, abstract_fixed, rest = split_trainable(
        model, trainable_filter(TASKS.get(cfg.get("task", "lm"), Task), model_cfg))
    ckpt_dir = Path(run_dir).absolute() / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; has the run saved one yet?")
    with _quiet_orbax():
        mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params)

    item = {"params": target}
    if jax.tree.leaves(abstract_fixed):
        item["fixed"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_fixed)
    # Restore arguments from the target say where each array goes (one device here), whatever the
    # devices the run saved from: a checkpoint of an 8-device run loads on one.
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)

    def attempt(s):
        return mngr.restore(
            s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                      partial_restore=True)),
        )

    def report(s, reason):
        if log is not None:
            log(f"checkpoint step {s} in {ckpt_dir} is damaged ({reason}); trying the one before it")

    steps = mngr.all_steps() if step is None else [step]
    if step is not None and step not in mngr.all_steps():
        raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt_dir}; it has {sorted(mngr.all_steps()) or 'none'}")
    try:
        found, restored, _ = newest_intact(ckpt_dir, steps, attempt, on_damaged=report)
    finally:
        mngr.close()
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; has the run saved one yet?")
    params = restored["state"]["params"]
    fixed = restored["state"].get("fixed", nnx.State({}))
    model = with_layout(merge_model(graphdef, params, fixed, rest), scan_layers=False)
    model.eval()
    tok_dir = Path(run_dir) / TOKENIZER_DIR
    tokenizer = load_tokenizer(tok_dir) if tok_dir.exists() else None
    return model, tokenizer
