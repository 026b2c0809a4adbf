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
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    """Save and restore training state (and optionally the data iterator) every K steps, keep N."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
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
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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
        self.manager.wait_until_finished()
        self.manager.close()


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
    return json.loads(path.read_text())


def load_for_inference(run_dir: str | os.PathLike, *, step: int | None = None, dtype: str | None = None):
    """(model, tokenizer) from a run directory's latest (or given) checkpoint, in eval mode.

    Only the parameters are read; the optimizer state is skipped. A run trained with
    ``scan_layers`` comes back with its blocks one by one (``model.blocks[i]``), the layout
    decoding and inspection want.
    """
    from flax import nnx

    from tfd_jax.models import GPT, GPTConfig, with_layout
    from tfd_jax.tokenizers import load_tokenizer

    cfg = read_config(run_dir)
    model_cfg = GPTConfig.from_dict(cfg["model"])
    # No dropout at inference, so the model carries no RNG state at all.
    model_cfg = model_cfg.replace(dropout=0.0, embed_dropout=0.0, **({"dtype": dtype} if dtype else {}))
    model = nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_params, rest = nnx.split(model, nnx.Param, ...)
    ckpt_dir = Path(run_dir).absolute() / CHECKPOINT_DIR
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; has the run saved one yet?")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_params)
    with warnings.catch_warnings():
        # Only the parameters are restored, onto one device; orbax notes it read their layout from disk.
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        restored = mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True)),
        )
    mngr.close()
    params = restored["state"]["params"]
    model = with_layout(nnx.merge(graphdef, params, rest), scan_layers=False)
    model.eval()
    tok_dir = Path(run_dir) / TOKENIZER_DIR
    tokenizer = load_tokenizer(tok_dir) if tok_dir.exists() else None
    return model, tokenizer
