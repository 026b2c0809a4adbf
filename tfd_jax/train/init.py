"""Where a run's first weights come from when they are not random: ``--init-from`` (Chapter 18).

Chapter 18 starts from a pretrained model instead of from scratch. ``--init-from`` takes either

- a tfd_jax run directory: its model config, its tokenizer and the parameters of its newest intact
  checkpoint (only the weights: a new run, with its own optimizer, schedule and step count), or
- a Hugging Face model directory (``save_pretrained``): GPT-2, Llama / Qwen2 or BERT weights
  through ``tfd_jax.interop``, and its tokenizer through ``tfd_jax.tokenizers.load_hf_tokenizer``.

The new run keeps the source's architecture, sizes and vocabulary; ``--model`` overrides that do
not change the weights' shapes (dropout, remat, attention) still apply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from tfd_jax.train.config import TrainingError

#: Hugging Face ``model_type`` -> (our architecture, loader name in ``tfd_jax.interop``)
HF_FAMILIES = {"gpt2": ("gpt", "load_hf_gpt2"), "llama": ("gpt", "load_hf_llama"),
               "qwen2": ("gpt", "load_hf_llama"), "bert": ("bert", "load_hf_bert")}


@dataclass
class Source:
    """An opened ``--init-from``: what it is, its architecture, model config and tokenizer."""

    path: Path
    kind: str  # "run" or "hf"
    arch: str
    model_config: Any
    tokenizer: Any

    def describe(self) -> dict:
        return {"path": str(self.path), "kind": self.kind}


def open_source(path: str) -> Source:
    """Read ``--init-from``'s config and tokenizer (no weights yet); a clear error for anything else."""
    from tfd_jax.models import registry
    from tfd_jax.train import checkpoint as ckpt

    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a directory" if p.exists() else "no such directory"
        raise TrainingError(f"--init-from {path}: {what} (give a tfd_jax run directory or a Hugging Face "
                            "model directory)")
    config_file = p / "config.json"
    if not config_file.is_file():
        raise TrainingError(f"--init-from {path}: no config.json; it is neither a run directory nor a Hugging Face model")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"--init-from {path}: config.json cannot be read ({e})") from None
    if "train" in config and "model" in config:  # one of our runs
        from tfd_jax.tokenizers import load_tokenizer

        arch = config.get("arch", "gpt")
        try:
            model_config = registry.config_from_dict(arch, config["model"])
            tokenizer = load_tokenizer(p / ckpt.TOKENIZER_DIR)
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise TrainingError(f"--init-from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        ckpt_dir = p / ckpt.CHECKPOINT_DIR
        if not (ckpt_dir.is_dir() and any(c.name.isdigit() for c in ckpt_dir.iterdir())):
            raise TrainingError(f"--init-from {path}: the run has no checkpoint in {ckpt_dir} yet; its weights are "
                                "saved every --ckpt-every steps and at its end")
        return _checked(Source(p, "run", arch, model_config, tokenizer))
    model_type = config.get("model_type")
    if model_type in ("t5", "bart"):
        raise TrainingError(f"--init-from {path}: a Hugging Face {model_type.upper()} model loads as a library call "
                            f"(tfd_jax.interop.load_hf_{model_type}) but cannot start a training run yet")
    if model_type not in HF_FAMILIES:
        raise TrainingError(f"--init-from {path}: Hugging Face model_type {model_type!r} is not one this library "
                            f"loads ({', '.join(sorted(HF_FAMILIES))})")
    from tfd_jax import interop
    from tfd_jax.tokenizers import load_hf_tokenizer

    arch, _ = HF_FAMILIES[model_type]
    convert = {"gpt2": "gpt2_config_from_hf", "llama": "llama_config_from_hf", "qwen2": "llama_config_from_hf",
               "bert": "bert_config_from_hf"}[model_type]
    try:
        model_config = getattr(interop, convert)(config)
        tokenizer = load_hf_tokenizer(p)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"--init-from {path}: {e}") from None
    return _checked(Source(p, "hf", arch, model_config, tokenizer))


def _checked(source: Source) -> Source:
    """A tokenizer with more ids than the model has embeddings would train on ids past the table
    (JAX clamps out-of-range gathers silently): refuse it. Fewer is fine (Qwen2 pads its table)."""
    n_tok, n_model = source.tokenizer.vocab_size, source.model_config.vocab_size
    if n_tok > n_model:
        raise TrainingError(f"--init-from {source.path}: its tokenizer has {n_tok:,} tokens but the model only "
                            f"{n_model:,} embeddings; the tokenizer files do not belong to these weights")
    return source


#: model fields a run started from other weights may set differently from them: they change how
#: the model runs (precision, dropout, memory, attention kernel, layout), not what it computes
#: from its weights; ``context_length`` too (learned positions must keep their shape, which
#: :func:`load_weights` checks; RoPE has none); and LoRA adapters, which start at zero
FREE_FIELDS = frozenset({"dropout", "embed_dropout", "remat", "attention_impl", "scan_layers", "dtype",
                         "param_dtype", "vocab_pad_multiple", "context_length", "lora_rank", "lora_alpha",
                         "lora_targets"})


def check_model_config(path: str, source_cfg, model_cfg) -> None:
    """Refuse a ``--model`` override that changes the architecture of ``--init-from``'s weights.

    Some change no shape (``num_heads`` with the same ``d_model``, ``norm_eps``, ``activation``,
    ``rope_base``, ...): the weights would load and silently compute something else."""
    a, b = source_cfg.to_dict(), model_cfg.to_dict()
    grown = b.get("vocab_size", 0) > a.get("vocab_size", 0)  # new tokens: new rows (see load_weights)
    changed = sorted(k for k in a.keys() | b.keys()
                     if k not in FREE_FIELDS and a.get(k) != b.get(k) and not (k == "vocab_size" and grown))
    if changed:
        shown = ", ".join(f"{k}={a.get(k)!r} there, {b.get(k)!r} here" for k in changed)
        raise TrainingError(f"--init-from {path}: --model cannot change the architecture of the weights it loads "
                            f"({shown}); only {', '.join(sorted(FREE_FIELDS))} may differ")


def source_tokenizer(source: Source, task, *, lora: bool, log):
    """``--init-from``'s tokenizer for a run of ``task``: with the task's ``extra_special_tokens``
    added when it lacks them (new ids after its last; :func:`load_weights` gives the model as many
    new embedding rows, started at the mean of the others). Refused, as a ``TrainingError``, for a
    tokenizer that cannot grow and for LoRA (the new rows would never train)."""
    given = source.tokenizer
    if not task.extra_special_tokens:
        return given
    needed = ", ".join(task.extra_special_tokens)
    try:
        grown = given.with_special_tokens(task.extra_special_tokens)
    except ValueError as e:
        raise TrainingError(f"--init-from {source.path}: --task {task.name} needs the special tokens {needed}, "
                            f"and {e}") from None
    if grown is given:
        return given
    if lora:
        raise TrainingError(f"--init-from {source.path}: its tokenizer lacks {needed}, whose new embeddings must "
                            "train, and with --lora only the adapters do; fine-tune without --lora (or from a run "
                            "that has them)")
    added = ", ".join(t for t in grown.special_tokens if t not in given.special_tokens)
    log(f"--init-from's tokenizer gains {added} (ids {given.vocab_size}..{grown.vocab_size - 1}; their embeddings "
        "start at the mean of the others)")
    return grown


def _grow_vocab(value, shape, vocab_size: int):
    """A token table (or output head) of ``vocab_size`` entries along one axis, extended to
    ``shape`` with new entries equal to the mean of the old ones (a neutral start for added
    special tokens); anything else is returned as it is."""
    value = np.asarray(value)
    if value.ndim != len(shape) or value.shape == tuple(shape):
        return value
    axes = [i for i, (a, b) in enumerate(zip(value.shape, shape)) if a != b]
    if len(axes) != 1 or value.shape[axes[0]] != vocab_size or shape[axes[0]] < vocab_size:
        return value
    ax = axes[0]
    mean = value.mean(axis=ax, keepdims=True)
    extra = np.repeat(mean, shape[ax] - vocab_size, axis=ax).astype(value.dtype)
    return np.concatenate([value, extra], axis=ax)


def load_weights(path: str, arch: str, model_cfg, graphdef, params, fixed, rest, shardings, *, fresh=(), log=None):
    """The parameters of ``--init-from``, placed like ``params`` and ``fixed`` (the freshly
    initialised trees, whose paths and shapes they must match): ``(params, fixed)``. Parameters under
    the top-level names in ``fresh`` (a task's new head) may be missing there and keep their fresh
    values, as do this model's LoRA adapters (a source's own adapters are folded into its kernels)."""
    from tfd_jax import interop
    from tfd_jax.nn import with_layout
    from tfd_jax.train import checkpoint as ckpt

    source = open_source(path)
    check_model_config(path, source.model_config, model_cfg)
    if source.kind == "run":
        model, _ = ckpt.load_for_inference(source.path)
    else:
        model_type = json.loads((source.path / "config.json").read_text())["model_type"]
        model = getattr(interop, HF_FAMILIES[model_type][1])(source.path)
    from tfd_jax.nn.lora import merge_lora

    # A source fine-tuned with LoRA gives its effective kernels; this run's own adapters start at
    # zero, so with them switched off it is exactly the source (the reference of DPO and PPO).
    model = with_layout(merge_lora(model), scan_layers=model_cfg.scan_layers)
    loaded = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out, kept = [], set()
    for tree, sharding in zip((params, fixed), shardings):
        flat = []
        for key, var in nnx.to_flat_state(tree):
            if key not in loaded and (key[0] in fresh or key[-1] in ("lora_a", "lora_b")):
                kept.add("LoRA adapters" if key[-1] in ("lora_a", "lora_b") else str(key[0]))
                flat.append((key, var))
                continue
            if key not in loaded:
                raise TrainingError(f"--init-from {path}: the source has no parameter {'/'.join(map(str, key))}")
            value = loaded[key].get_value()
            if key[0] in ("tok_embed", "lm_head"):
                value = _grow_vocab(value, var.get_value().shape, source.model_config.vocab_size)
            if value.shape != var.get_value().shape:
                raise TrainingError(f"--init-from {path}: {'/'.join(map(str, key))} has shape {value.shape} there, "
                                    f"{var.get_value().shape} here")
            flat.append((key, var.replace(value=value.astype(var.get_value().dtype))))
        out.append(jax.device_put(nnx.from_flat_state(flat), sharding))
    if kept and log is not None:
        log(f"--init-from {path} has no {', '.join(sorted(kept))}: freshly initialised")
    return tuple(out)
