"""What one transformer block is made of, as a frozen dataclass of its own (Chapters 5-9, 19).

Models translate their configuration (``GPTConfig``, ``BertConfig``, ...) into a ``BlockConfig``, so
``tfd_jax.nn`` never needs to know which model it is part of. The fields say where blocks differ:
the course's block is post-LN with ReLU and no attention biases; GPT-2 pre-LN with GELU; BERT post-LN
with exact GELU; Llama pre-RMSNorm with SwiGLU, RoPE and fewer key/value heads than query heads; T5
scales its scores by 1 and adds a learned bias.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigMixin:
    """What every configuration dataclass of the library offers: dtypes by name, ``replace``,
    ``to_dict`` / ``from_dict`` (the form run directories store) and named presets
    (``PRESET_TABLE``, a class attribute set by the model module)."""

    PRESET_TABLE: ClassVar[dict[str, dict[str, Any]]] = {}

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def remat_policy(self) -> str:
        """The remat setting as a name from ``tfd_jax.nn.REMAT_POLICIES``."""
        from tfd_jax.nn.stack import remat_name

        return remat_name(self.remat)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """The inverse of :meth:`to_dict`; fields added in later versions take their defaults."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any):
        """A named configuration with optional field overrides (see ``PRESET_TABLE``)."""
        if name not in cls.PRESET_TABLE:
            raise ValueError(f"unknown preset {name!r} for {cls.__name__}; choose one of {sorted(cls.PRESET_TABLE)}")
        return cls(**{**cls.PRESET_TABLE[name], **overrides})


@dataclass(frozen=True)
class BlockConfig(ConfigMixin):
    """One block's shape and choices.

    Sizes: ``d_model`` M, ``num_heads`` H query heads, ``num_kv_heads`` K key/value heads (K divides H;
    K < H is grouped-query attention), ``head_dim`` D (need not be M / H), ``d_ff`` F.
    ``num_layers`` only scales the initialisation of residual projections (``init="gpt2"``).
    """

    d_model: int
    num_heads: int
    head_dim: int
    d_ff: int
    num_kv_heads: int = 0  # 0: as many as num_heads
    num_layers: int = 1
    norm_position: str = "pre"  # "post": LN(x + Dropout(Sublayer(x))); "pre": x + Dropout(Sublayer(LN(x)))
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    activation: str = "gelu_tanh"
    gated_ffn: bool = False
    qkv_bias: bool = True
    out_bias: bool = True
    ffn_bias: bool = True
    dropout: float = 0.0
    rope: bool = False
    rope_base: float = 10000.0
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    init: str = "gpt2"
    attention_impl: str = "reference"
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}: "
                "each key/value head must serve the same number of query heads"
            )

