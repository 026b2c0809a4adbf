"""Hugging Face checkpoint files in and out, whatever the model family (Chapter 18).

A checkpoint is read into a :class:`Checkpoint`: its ``config.json`` as a dict and, for every stored
tensor, a function that loads it as a numpy array. Tensors are read one at a time, when the weight
map asks for them, so a large checkpoint is never held twice in host memory. Sources:

- a ``transformers`` model object (a ``torch.nn.Module`` with ``.config`` and ``.state_dict()``);
- a directory written by ``save_pretrained``: ``config.json`` plus ``model.safetensors``, sharded
  safetensors (``model.safetensors.index.json``), ``pytorch_model.bin`` or its shards (torch needed
  for the pickles only; safetensors files are read with safetensors' numpy backend);
- a Hub name such as ``"gpt2"`` or ``"Qwen/Qwen2-0.5B"`` (huggingface_hub downloads it once, then
  reads it from its cache).

Writing is :func:`write_checkpoint`: ``config.json`` plus one ``model.safetensors``, staged in a
sibling directory that then takes the target's place, so a reader never sees half a checkpoint.

Nothing here knows a model family: key names, shapes and config fields belong to the family modules
(``gpt2``, ``llama``, ``bert``) and to :mod:`tfd_jax.interop.weightmap`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Checkpoint",
    "Loaders",
    "check_writable",
    "open_checkpoint",
    "strip_prefix",
    "write_checkpoint",
]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

#: Stored key -> a function that reads that tensor as a numpy array.
Loaders = dict[str, Callable[[], np.ndarray]]


@dataclass
class Checkpoint:
    """A checkpoint as opened: ``config`` (config.json as a dict), ``loaders`` (key -> numpy reader),
    and ``origin``, a short description of the source for error messages."""

    config: dict
    loaders: Loaders
    origin: str


# -- reading ------------------------------------------------------------------------------------------


def _torch_to_numpy(t) -> np.ndarray:
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds every bf16 value exactly
        t = t.float()
    return t.numpy()


def _from_torch_module(model) -> tuple[dict, Loaders]:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    state = model.state_dict()
    return config, {k: (lambda t=t: _torch_to_numpy(t)) for k, t in state.items()}


def _safetensors_loaders(files: list[Path]) -> Loaders:
    from safetensors import safe_open  # numpy framework: no torch needed

    loaders: Loaders = {}
    for path in files:
        handle = safe_open(str(path), framework="numpy")
        for key in handle.keys():
            loaders[key] = lambda h=handle, k=key: h.get_tensor(k)
    return loaders


def _torch_bin_loaders(files: list[Path]) -> Loaders:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{files[0].name} is a PyTorch pickle and reading it needs torch; install torch, or convert the "
            "checkpoint to model.safetensors (which needs nothing beyond safetensors)"
        ) from None
    loaders: Loaders = {}
    for path in files:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the pre-zip format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        loaders.update({k: (lambda t=t: _torch_to_numpy(t)) for k, t in state.items()})
    return loaders


def _shards(directory: Path, index_name: str) -> list[Path]:
    index = json.loads((directory / index_name).read_text())
    return [directory / name for name in sorted(set(index["weight_map"].values()))]


def _from_directory(directory: Path, writer: str) -> tuple[dict, Loaders]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no config.json in {directory}; expected a directory written by save_pretrained or {writer} "
            "(config.json plus model.safetensors or pytorch_model.bin)"
        )
    config = json.loads(config_path.read_text())
    if (directory / SAFETENSORS).is_file():
        loaders = _safetensors_loaders([directory / SAFETENSORS])
    elif (directory / SAFETENSORS_INDEX).is_file():
        loaders = _safetensors_loaders(_shards(directory, SAFETENSORS_INDEX))
    elif (directory / TORCH_BIN).is_file():
        loaders = _torch_bin_loaders([directory / TORCH_BIN])
    elif (directory / TORCH_BIN_INDEX).is_file():
        loaders = _torch_bin_loaders(_shards(directory, TORCH_BIN_INDEX))
    else:
        raise FileNotFoundError(
            f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} "
            f"or {TORCH_BIN_INDEX}"
        )
    return config, loaders


def _looks_like_repo_id(name: str) -> bool:
    """``"gpt2"`` or ``"openai-community/gpt2"``: at most one slash, no leading dot or slash."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name)) and ".." not in name


def _download(name: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(
            f"{name!r} is not a local directory, and fetching it from the Hugging Face Hub needs the "
            "huggingface_hub package (pip install huggingface_hub); or pass a directory written by save_pretrained"
        ) from None
    try:
        path = Path(
            snapshot_download(
                name, revision=revision, allow_patterns=["config.json", "model.safetensors", "model*.safetensors*"]
            )
        )
        if not any(path.glob("*.safetensors")):  # an old repository with PyTorch pickles only
            path = Path(
                snapshot_download(
                    name, revision=revision, allow_patterns=["config.json", "pytorch_model.bin", "pytorch_model*.bin*"]
                )
            )
    except Exception as e:  # offline, unknown repository, no permission, network failure, ...
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). It is not a local "
            "directory either. When offline, fetch it once while online (it is then cached) or pass a "
            "directory written by save_pretrained"
        ) from e
    return path


def open_checkpoint(
    source: Any,
    *,
    revision: str | None = None,
    family: str = "Hugging Face",
    hub_example: str = "gpt2",
    writer: str = "this package",
) -> Checkpoint:
    """Open ``source`` (a transformers model object, a ``save_pretrained`` directory or a Hub name).

    Args:
      source: see the module docstring.
      revision: Hub branch, tag or commit (Hub names only).
      family, hub_example, writer: how error messages name the expected model (``"GPT-2"``), a Hub
        name to suggest (``"gpt2"``) and the function that writes such directories (``"save_hf_gpt2"``).

    Raises:
      FileNotFoundError: no such directory, or a directory without config.json or weights.
      ValueError: ``source`` is a file, not a directory.
      TypeError: ``source`` is none of the accepted kinds.
      OSError / ImportError: a Hub name that cannot be fetched, or a missing optional package.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return Checkpoint(*_from_directory(path, writer), str(path))
        if path.exists():
            raise ValueError(f"{path} is a file; pass the directory that holds config.json and the weights")
        if isinstance(source, str) and _looks_like_repo_id(source):
            return Checkpoint(*_from_directory(_download(source, revision), writer), f"hub:{source}")
        raise FileNotFoundError(f"no such directory: {path}")
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return Checkpoint(*_from_torch_module(source), type(source).__name__)
    raise TypeError(
        f"source must be a transformers {family} model, a directory written by save_pretrained, or a Hub "
        f"name such as {hub_example!r}; got {type(source).__name__}"
    )


def strip_prefix(
    loaders: Mapping[str, Callable[[], np.ndarray]],
    prefix: str,
    origin: str,
    rename: Callable[[str], str] | None = None,
) -> tuple[Loaders, dict[str, str]]:
    """Drop an optional key prefix (``"transformer."``, ``"model."``, ``"bert."``).

    Checkpoints of the bare model (``GPT2Model``, ``BertModel``) store their keys without it, those
    of a model with a head (``GPT2LMHeadModel``, ``BertForMaskedLM``) with it. ``rename`` is applied
    to each short key afterwards (old BERT uploads say ``LayerNorm.gamma`` for ``LayerNorm.weight``).

    Returns:
      (short key -> loader, short key -> key as stored), the latter for error messages.

    Raises:
      ValueError: two stored keys give the same short key (both ``x`` and ``prefix + x``).
    """
    short: Loaders = {}
    stored: dict[str, str] = {}
    for key, load in loaders.items():
        s = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if rename is not None:
            s = rename(s)
        if s in short:
            raise ValueError(f"{origin}: both {stored[s]!r} and {key!r} are present; which one is the weight?")
        short[s], stored[s] = load, key
    return short, stored


# -- writing --------------------------------------------------------------------------------------------


def check_writable(directory: str | os.PathLike, *, overwrite: bool) -> Path:
    """``directory`` as a ``Path``, after checking that it may be written.

    Raises:
      FileExistsError: it exists and is not a directory, or is not empty and ``overwrite`` is False.
    """
    target = Path(directory).expanduser()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace its contents")
    return target


def write_checkpoint(
    directory: str | os.PathLike, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *, overwrite: bool
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (``tensors``, key -> array) into ``directory``.

    The files go to a temporary sibling directory that then takes ``directory``'s place (created with
    its parents if needed); with ``overwrite=True`` the previous contents are all removed.

    Returns:
      The directory, as a ``Path``.

    Raises:
      FileExistsError: as :func:`check_writable`.
    """
    from safetensors.numpy import save_file

    target = check_writable(directory, overwrite=overwrite)
    arrays = {key: np.ascontiguousarray(array) for key, array in tensors.items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        (staging / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        # "format": "pt" tells transformers these are PyTorch-layout tensors (its loader checks it).
        save_file(arrays, str(staging / SAFETENSORS), metadata={"format": "pt"})
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is set aside first and removed afterwards."""
    if not target.exists():
        os.rename(new, target)
        return
    old = new.with_name(new.name.replace(".tmp-", ".old-"))
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
