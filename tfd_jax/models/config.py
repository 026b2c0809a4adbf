"""Model configuration: one frozen dataclass and named presets (Chapters 9 and 14).

The course's own model, GPT-2 and the Llama family are all presets of one configurable decoder; the
fields say where they differ (``norm_position``, ``final_norm``, ``activation``, ``positions``, ``tie_embeddings``,
biases). Use ``dataclasses.replace`` or ``GPTConfig.preset(name, **overrides)`` to vary one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tfd_jax.nn.config import DTYPES as _DTYPES
from tfd_jax.nn.config import BlockConfig, ConfigMixin
from tfd_jax.nn.stack import REMAT_POLICIES
from tfd_jax.ops.feedforward import ACTIVATIONS
from tfd_jax.ops.head import LOGITS_DTYPES


@dataclass(frozen=True)
class GPTConfig(ConfigMixin):
    """Everything that defines a decoder-only transformer.

    Sizes: ``vocab_size`` V, ``context_length`` (longest sequence), ``d_model`` M, ``num_heads`` H,
    ``num_layers`` L, ``d_ff`` F (0 means 4M), ``num_kv_heads`` K (0 means H; fewer is grouped-query
    attention, Chapter 19 Part 7), ``head_dim`` D (0 means M / H).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    num_heads: int = 12
    num_layers: int = 12
    d_ff: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    dropout: float = 0.0
    embed_dropout: float = 0.0
    norm_position: str = "pre"  # "post": the course (LN after the residual add); "pre": GPT-2
    final_norm: bool = True
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    activation: str = "gelu_tanh"
    gated_ffn: bool = False  # SwiGLU-style gate (with activation="silu")
    positions: str = "learned"  # "sinusoidal" (the course), "learned" (GPT-2), "rope", "none"
    rope_base: float = 10000.0
    tie_embeddings: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    ffn_bias: bool = True
    lm_head_bias: bool = False
    init: str = "gpt2"  # "gpt2": N(0, 0.02) with residual projections scaled by 1/sqrt(2L); "xavier": the course
    attention_impl: str = "reference"  # "reference" | "xla" | "cudnn" | "splash" (TPU) | "auto"
    dtype: str = "float32"  # compute dtype; parameters stay in param_dtype
    param_dtype: str = "float32"
    remat: bool | str = False  # activation checkpointing: False/"none", True/"full", "dots", "dots_no_batch"
    # Store the blocks' parameters stacked [L, ...] and run them as one lax.scan: the compiler sees
    # one block instead of L, so compile time stops growing with depth. Changes the parameter paths
    # (blocks/attn/q/kernel instead of blocks/3/attn/q/kernel): checkpoints restore into the layout
    # they were saved with; models.gpt.with_layout converts between the two.
    scan_layers: bool = False
    # The output head's matmul runs on a vocabulary padded with zero rows to a multiple of this
    # (logits are cut back to vocab_size): matrix units need aligned shapes and GPT-2's 50,257 is
    # odd. 0 = automatic: 128 on GPU/TPU, none on CPU. Parameters keep their true shape.
    vocab_pad_multiple: int = 0
    # The dtype the output head writes its logits in: "float32" (the course's numbers) or, as an
    # opt-in for mixed-precision training, "bfloat16": training's fused head and loss keep the
    # [B, T, V] logits (the largest array of a GPT-2 step) at half the size; loss and softmax stay
    # float32 (ops.head_cross_entropy), and the logits the model returns are float32 arrays.
    logits_dtype: str = "float32"
    # LoRA adapters on the Linear layers whose paths end with one of lora_targets (comma-separated;
    # Chapter 18, beyond the course; tfd_jax.nn.lora): 0 = none. With adapters, training updates
    # only them (and a task's fresh head), and the model with its adapters off is the base model.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "attn.q,attn.v"

    def __post_init__(self):
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        divisible = self.num_heads > 0 and self.d_model % self.num_heads == 0
        if self.head_dim == 0 and divisible:
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        checks = [
            (self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}"),
            (self.context_length > 0, f"context_length must be positive, got {self.context_length}"),
            (self.d_model > 0 and self.num_heads > 0 and self.num_layers > 0, "d_model, num_heads and num_layers must be positive"),
            (self.d_ff > 0, f"d_ff must be positive (0 means 4 x d_model), got {self.d_ff}"),
            (
                self.head_dim > 0,
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                f"pick a head count that divides it (e.g. {_divisors_hint(self.d_model)}) or set head_dim",
            ),
            (
                self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
            ),
            (self.norm_position in ("pre", "post"), f"norm_position must be 'pre' or 'post', got {self.norm_position!r}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (self.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"),
            (
                self.positions in ("sinusoidal", "learned", "rope", "none"),
                f"positions must be 'sinusoidal', 'learned', 'rope' or 'none', got {self.positions!r}",
            ),
            (self.positions != "rope" or self.head_dim % 2 == 0, f"RoPE needs an even head dim, got {self.head_dim}"),
            (0.0 <= self.dropout < 1.0 and 0.0 <= self.embed_dropout < 1.0, "dropout rates must be in [0, 1)"),
            (0.0 < self.norm_eps < 1.0, f"norm_eps must be in (0, 1), got {self.norm_eps}"),
            (1.0 < self.rope_base < float("inf"), f"rope_base must be a finite number > 1, got {self.rope_base}"),
            (self.init in ("gpt2", "xavier"), f"init must be 'gpt2' or 'xavier', got {self.init!r}"),
            (isinstance(self.lora_rank, int) and self.lora_rank >= 0, f"lora_rank must be an integer >= 0, got {self.lora_rank!r}"),
            (self.lora_rank == 0 or bool(self.lora_targets.strip(" ,")), "lora_targets must name at least one layer"),
            (
                self.attention_impl in ("reference", "xla", "cudnn", "splash", "auto"),
                f"attention_impl must be 'reference', 'xla', 'cudnn', 'splash' or 'auto', got {self.attention_impl!r}",
            ),
            (self.dtype in _DTYPES and self.param_dtype in _DTYPES, f"dtypes must be among {sorted(_DTYPES)}"),
            (self.logits_dtype in LOGITS_DTYPES, f"logits_dtype must be one of {LOGITS_DTYPES}, got {self.logits_dtype!r}"),
            (
                isinstance(self.vocab_pad_multiple, int) and self.vocab_pad_multiple >= 0,
                f"vocab_pad_multiple must be 0 (automatic) or a positive int, got {self.vocab_pad_multiple!r}",
            ),
            (
                self.remat in (True, False) or self.remat in REMAT_POLICIES,
                f"remat must be True/False or one of {sorted(REMAT_POLICIES)}, got {self.remat!r}",
            ),
            (isinstance(self.scan_layers, bool), f"scan_layers must be True or False, got {self.scan_layers!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid GPTConfig: {msg}")

    def block(self) -> BlockConfig:
        """What each of the L blocks is (``tfd_jax.nn.BlockConfig``)."""
        return BlockConfig(
            d_model=self.d_model, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            d_ff=self.d_ff, num_layers=self.num_layers, norm_position=self.norm_position, norm=self.norm,
            norm_eps=self.norm_eps, norm_bias=self.norm_bias, activation=self.activation, gated_ffn=self.gated_ffn,
            qkv_bias=self.qkv_bias, out_bias=self.out_bias, ffn_bias=self.ffn_bias, dropout=self.dropout,
            rope=self.positions == "rope", rope_base=self.rope_base, init=self.init,
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        )

    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with ``changes``. Sizes this config derived (``d_ff`` = 4M, ``head_dim`` = M / H,
        ``num_kv_heads`` = H) are derived again from the new sizes unless they were set to something
        else or are among the changes, so ``replace`` agrees with ``preset(name, **changes)``."""
        derived = {"d_ff": ({"d_model"}, 4 * self.d_model),
                   "head_dim": ({"d_model", "num_heads"}, self.d_model // self.num_heads),
                   "num_kv_heads": ({"num_heads"}, self.num_heads)}
        for name, (depends_on, default) in derived.items():
            if name not in changes and depends_on & set(changes) and getattr(self, name) == default:
                changes[name] = 0
        return dataclasses.replace(self, **changes)

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Parameter count from the formula (equals the model's actual count; tested)."""
        M, F, V, L = self.d_model, self.d_ff, self.vocab_size, self.num_layers
        norm = M * (2 if (self.norm == "layernorm" and self.norm_bias) else 1)
        HD, KD = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = 2 * M * HD + 2 * M * KD + ((HD + 2 * KD) if self.qkv_bias else 0) + (M if self.out_bias else 0)
        if self.gated_ffn:
            ffn = 3 * M * F
        else:
            ffn = 2 * M * F + ((F + M) if self.ffn_bias else 0)
        total = L * (attn + ffn + 2 * norm) + (norm if self.final_norm else 0)
        if include_embeddings:
            total += V * M
            if self.positions == "learned":
                total += self.context_length * M
            if not self.tie_embeddings:
                total += M * V + (V if self.lm_head_bias else 0)
        return total


def _divisors_hint(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)


_GPT2 = dict(
    vocab_size=50257,
    context_length=1024,
    norm_position="pre",
    final_norm=True,
    activation="gelu_tanh",
    positions="learned",
    tie_embeddings=True,
    qkv_bias=True,
    out_bias=True,
    ffn_bias=True,
    init="gpt2",
)

_COURSE = dict(
    norm_position="post",
    final_norm=False,
    activation="relu",
    positions="sinusoidal",
    tie_embeddings=False,
    qkv_bias=False,
    out_bias=False,
    ffn_bias=True,
    init="xavier",
)

# The modern decoder (Chapter 19, Part 7): pre-RMSNorm, SwiGLU, rotary positions, grouped-query
# attention, no biases, an untied head; Hugging Face's LlamaForCausalLM (tfd_jax.interop.load_hf_llama).
_LLAMA = dict(
    norm="rmsnorm",
    norm_eps=1e-5,
    norm_position="pre",
    final_norm=True,
    activation="silu",
    gated_ffn=True,
    positions="rope",
    tie_embeddings=False,
    qkv_bias=False,
    out_bias=False,
    ffn_bias=False,
    init="gpt2",
)

PRESETS: dict[str, dict[str, Any]] = {
    # The course's toy model (Chapters 3-9): 6 wide, 2 heads of 3, FFN 24, 3 post-LN layers.
    "course": dict(_COURSE, vocab_size=50000, context_length=512, d_model=6, num_heads=2, d_ff=24, num_layers=3, dropout=0.1),
    "gpt2": dict(_GPT2, d_model=768, num_heads=12, num_layers=12),
    "gpt2-medium": dict(_GPT2, d_model=1024, num_heads=16, num_layers=24),
    "gpt2-large": dict(_GPT2, d_model=1280, num_heads=20, num_layers=36),
    "gpt2-xl": dict(_GPT2, d_model=1600, num_heads=25, num_layers=48),
    # Small GPT-2-style models that train on a laptop CPU.
    "tiny": dict(_GPT2, vocab_size=512, context_length=128, d_model=64, num_heads=4, num_layers=2),
    "small": dict(_GPT2, vocab_size=4096, context_length=256, d_model=128, num_heads=4, num_layers=4),
    "mini": dict(_GPT2, vocab_size=8192, context_length=256, d_model=384, num_heads=6, num_layers=6),
    # The Llama family. Shapes of published models (load their weights with interop.load_hf_llama),
    # and a CPU-sized one. Llama 3.x checkpoints also rescale RoPE frequencies, which is not built yet.
    "llama-tiny": dict(_LLAMA, vocab_size=512, context_length=128, d_model=64, num_heads=4, num_kv_heads=2,
                       num_layers=2, d_ff=176),
    "llama2-7b": dict(_LLAMA, vocab_size=32000, context_length=4096, d_model=4096, num_heads=32, num_layers=32,
                      d_ff=11008),
    "tinyllama-1.1b": dict(_LLAMA, vocab_size=32000, context_length=2048, d_model=2048, num_heads=32, num_kv_heads=4,
                           num_layers=22, d_ff=5632),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, context_length=8192, d_model=576, num_heads=9, num_kv_heads=3,
                         num_layers=30, d_ff=1536, rope_base=100000.0, tie_embeddings=True),
    "qwen2.5-0.5b": dict(_LLAMA, vocab_size=151936, context_length=32768, d_model=896, num_heads=14, num_kv_heads=2,
                         num_layers=24, d_ff=4864, norm_eps=1e-6, rope_base=1000000.0, tie_embeddings=True,
                         qkv_bias=True),
}

GPTConfig.PRESET_TABLE = PRESETS
