"""Model families by name, so run directories and the CLI can say ``"arch": "bert"`` and mean a class.

A run's ``config.json`` records its ``arch`` beside the model config's fields; these functions turn
the two back into a model. ``"gpt"`` (decoder-only: the course's model, GPT-2, the Llama family) and
``"bert"`` (encoder-only), and ``"transformer"``, ``"t5"``, ``"bart"`` (encoder-decoders: one class,
``Seq2SeqConfig.family`` says which).
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from tfd_jax.models.bert import Bert, BertConfig
from tfd_jax.models.config import GPTConfig
from tfd_jax.models.gpt import GPT
from tfd_jax.models.reward import RewardModel
from tfd_jax.models.seq2seq import EncoderDecoder, Seq2SeqConfig

ARCHS: dict[str, tuple[type, type]] = {
    "gpt": (GPTConfig, GPT), "bert": (BertConfig, Bert), "transformer": (Seq2SeqConfig, EncoderDecoder),
    "t5": (Seq2SeqConfig, EncoderDecoder), "bart": (Seq2SeqConfig, EncoderDecoder),
    "reward": (GPTConfig, RewardModel),  # a GPT with a scalar head (Chapter 18)
}
#: the preset a run uses when it names none
DEFAULT_PRESET = {"gpt": "small", "bert": "tiny", "transformer": "tiny", "t5": "t5-tiny", "bart": "bart-tiny",
                  "reward": "small"}


def _family(arch: str):
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    return ARCHS[arch]


def config_preset(arch: str, preset: str | None, **overrides: Any):
    """``GPTConfig.preset``, ``BertConfig.preset`` or ``Seq2SeqConfig.preset`` by architecture name
    (None: its default preset; for ``t5`` and ``bart``, ``"tiny"`` means ``"t5-tiny"`` / ``"bart-tiny"``)."""
    config_cls = _family(arch)[0]
    preset = preset or DEFAULT_PRESET[arch]
    if arch in ("t5", "bart") and preset == "tiny":
        preset = f"{arch}-tiny"
    config = config_cls.preset(preset, **overrides)
    if config_cls is Seq2SeqConfig and config.family != arch:
        raise ValueError(f"preset {preset!r} is a {config.family} model, not {arch}; choose --arch {config.family}")
    return config


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
    if isinstance(model_or_config, RewardModel):
        return "reward"
    if isinstance(model_or_config, (Seq2SeqConfig, EncoderDecoder)):
        return model_or_config.config.family if isinstance(model_or_config, EncoderDecoder) else model_or_config.family
    for name, (cfg_cls, model_cls) in ARCHS.items():
        if isinstance(model_or_config, (cfg_cls, model_cls)):
            return name
    raise ValueError(f"{type(model_or_config).__name__} is not one of the known architectures {sorted(ARCHS)}")
