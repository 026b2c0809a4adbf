"""Model families by name, so run directories and the CLI can say ``"arch": "bert"`` and mean a class.

A run's ``config.json`` records its ``arch`` beside the model config's fields; these functions turn
the two back into a model. ``"gpt"`` (decoder-only: the course's model, GPT-2, the Llama family) and
``"bert"`` (encoder-only) for now.
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from tfd_jax.models.bert import Bert, BertConfig
from tfd_jax.models.config import GPTConfig
from tfd_jax.models.gpt import GPT

ARCHS: dict[str, tuple[type, type]] = {"gpt": (GPTConfig, GPT), "bert": (BertConfig, Bert)}
#: the preset a run uses when it names none
DEFAULT_PRESET = {"gpt": "small", "bert": "tiny"}


def _family(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch]


def config_preset(arch: str, preset: str | None, **overrides: Any):
    """``GPTConfig.preset`` or ``BertConfig.preset`` by architecture name (None: its default preset)."""
    return _family(arch)[0].preset(preset or DEFAULT_PRESET[arch], **overrides)


def presets(arch: str) -> list[str]:
    """The preset names of an architecture."""
    return sorted(_family(arch)[0].PRESET_TABLE)


def config_from_dict(arch: str, d: dict):
    """A model config from its ``to_dict()`` (fields this version added take their defaults)."""
    return _family(arch)[0].from_dict(d)


def build(arch: str, config, rngs: nnx.Rngs) -> nnx.Module:
    """The model of that architecture for ``config``."""
    return _family(arch)[1](config, rngs=rngs)


def arch_of(model_or_config) -> str:
    """The architecture name of a model or a model config."""
    for name, (cfg_cls, model_cls) in ARCHS.items():
        if isinstance(model_or_config, (cfg_cls, model_cls)):
            return name
    raise ValueError(f"{type(model_or_config).__name__} is not one of the known architectures {sorted(ARCHS)}")
