"""The encoder-only transformer (BERT), top to bottom (Chapter 19, Parts 2-4).

tokens (+ positions + token types) -> embedding LayerNorm -> L post-LN blocks with *bidirectional*
self-attention (every token sees every real token; padding is masked) -> contextual vectors
``[B, T, M]``. Heads on top: the masked-LM head (predict a hidden token from both sides), the pooler
(the [CLS] vector through dense + tanh) and a sequence classifier.

Chapter 19 describes the encoder as the course's model without the causal mask: the
``course-encoder`` preset is exactly that (6 wide, 2 heads, 3 post-LN ReLU layers, sinusoidal
positions, no embedding norm). ``bert-base`` and ``bert-large`` are BERT's published shapes, and
:mod:`tfd_jax.interop` loads Hugging Face BERT weights into them.

Shape letters: B batch, T sequence length, M model width, V vocabulary, C classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.models.gpt import check_tokens
from tfd_jax.nn import BlockConfig, Dropout, Embed, LayerNorm, Linear, make_blocks, normal_init, run_blocks
from tfd_jax.nn import Block, xavier_init
from tfd_jax.nn.config import DTYPES, ConfigMixin
from tfd_jax.nn.stack import REMAT_POLICIES
from tfd_jax.ops.feedforward import ACTIVATIONS

__all__ = ["Bert", "BertConfig", "BERT_PRESETS"]


@dataclass(frozen=True)
class BertConfig(ConfigMixin):
    """Everything that defines a BERT-style encoder.

    Sizes: ``vocab_size`` V, ``context_length`` (Hugging Face's ``max_position_embeddings``),
    ``type_vocab_size`` (segment A/B embeddings; 0 for none), ``d_model`` M, ``num_heads`` H,
    ``num_layers`` L, ``d_ff`` F (0 means 4M), ``num_labels`` C (0: no classification head).
    """

    vocab_size: int = 30522
    context_length: int = 512
    type_vocab_size: int = 2
    d_model: int = 768
    num_heads: int = 12
    num_layers: int = 12
    d_ff: int = 0
    activation: str = "gelu"  # BERT's exact (erf) GELU
    norm_eps: float = 1e-12
    dropout: float = 0.1
    positions: str = "learned"  # or "sinusoidal" (the course)
    embed_norm: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    ffn_bias: bool = True
    num_labels: int = 0
    pad_id: int = 0
    init: str = "bert"  # N(0, 0.02); "xavier": the course
    attention_impl: str = "reference"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        checks = [
            (min(self.vocab_size, self.context_length, self.d_model, self.num_heads, self.num_layers) > 0,
             "vocab_size, context_length, d_model, num_heads and num_layers must be positive"),
            (self.d_model % self.num_heads == 0, f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"),
            (self.type_vocab_size >= 0 and self.num_labels >= 0, "type_vocab_size and num_labels must be >= 0"),
            (self.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"),
            (self.positions in ("learned", "sinusoidal"), f"positions must be 'learned' or 'sinusoidal', got {self.positions!r}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (0.0 < self.norm_eps < 1.0, f"norm_eps must be in (0, 1), got {self.norm_eps}"),
            (self.init in ("bert", "xavier"), f"init must be 'bert' or 'xavier', got {self.init!r}"),
            (self.dtype in DTYPES and self.param_dtype in DTYPES, f"dtypes must be among {sorted(DTYPES)}"),
            (self.remat in (True, False) or self.remat in REMAT_POLICIES,
             f"remat must be True/False or one of {sorted(REMAT_POLICIES)}, got {self.remat!r}"),
            (0 <= self.pad_id < self.vocab_size, f"pad_id must be in [0, {self.vocab_size}), got {self.pad_id}"),
            (self.attention_impl in ("reference", "xla", "cudnn", "splash", "auto"),
             f"attention_impl must be 'reference', 'xla', 'cudnn', 'splash' or 'auto', got {self.attention_impl!r}"),
            (isinstance(self.scan_layers, bool), f"scan_layers must be True or False, got {self.scan_layers!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid BertConfig: {msg}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def block(self) -> BlockConfig:
        """Each of the L blocks: post-LN, bidirectional (the mask is the caller's), LayerNorm, no gate."""
        return BlockConfig(
            d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim, d_ff=self.d_ff,
            num_layers=self.num_layers, norm_position="post", norm="layernorm", norm_eps=self.norm_eps,
            activation=self.activation, qkv_bias=self.qkv_bias, out_bias=self.out_bias, ffn_bias=self.ffn_bias,
            dropout=self.dropout, init=self.init, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


BERT_PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(d_model=768, num_heads=12, num_layers=12, d_ff=3072),
    "bert-large": dict(d_model=1024, num_heads=16, num_layers=24, d_ff=4096),
    # A BERT that pre-trains on a laptop CPU in minutes.
    "tiny": dict(vocab_size=512, context_length=128, d_model=64, num_heads=4, num_layers=2, d_ff=256),
    # The course's 6-wide model without the causal mask (Chapter 19): post-LN, ReLU, sinusoidal
    # positions, no Q/K/V/O biases, Xavier init, no segment embeddings and no embedding norm.
    "course-encoder": dict(vocab_size=50000, context_length=512, d_model=6, num_heads=2, d_ff=24, num_layers=3,
                           activation="relu", positions="sinusoidal", type_vocab_size=0, embed_norm=False,
                           qkv_bias=False, out_bias=False, init="xavier", norm_eps=1e-5),
}


BertConfig.PRESET_TABLE = BERT_PRESETS


class Bert(nnx.Module):
    """A configurable BERT. ``Bert(BertConfig.preset("bert-base"), rngs=nnx.Rngs(0))``.

    Inputs everywhere: ``tokens`` int ``[B, T]``; ``token_types`` int ``[B, T]`` (segment A = 0,
    B = 1; zeros by default); ``padding_mask`` bool ``[B, T]``, True on real tokens (Hugging Face's
    ``attention_mask``; all True by default). Pad on the right, any amount: real tokens' outputs do
    not depend on it (positions count from the first token, as in Hugging Face's BERT, so left
    padding would shift them).
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        init = xavier_init() if cfg.init == "xavier" else normal_init(0.02)
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.tok_embed = Embed(cfg.vocab_size, cfg.d_model, init=init, rngs=rngs, **dt)
        self.pos_embed = (Embed(cfg.context_length, cfg.d_model, init=init, rngs=rngs, **dt)
                          if cfg.positions == "learned" else None)
        self.type_embed = (Embed(cfg.type_vocab_size, cfg.d_model, init=init, rngs=rngs, **dt)
                           if cfg.type_vocab_size else None)
        self.embed_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.params_dtype) if cfg.embed_norm else None
        self.embed_drop = Dropout(cfg.dropout, rngs=rngs)
        block = cfg.block()
        self.blocks = make_blocks(lambda: Block(block, rngs=rngs), cfg.num_layers, scan_layers=cfg.scan_layers)
        # Heads: the pooler ([CLS] -> dense -> tanh), the masked-LM head (dense -> act -> LN -> the
        # embedding table, plus a bias), and an optional classifier on the pooled vector.
        self.pooler = Linear(cfg.d_model, cfg.d_model, kernel_init=init, rngs=rngs, **dt)
        self.mlm_dense = Linear(cfg.d_model, cfg.d_model, kernel_init=init, rngs=rngs, **dt)
        self.mlm_norm = LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.params_dtype)
        self.mlm_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.params_dtype))
        self.classifier_drop = Dropout(cfg.dropout, rngs=rngs)
        self.classifier = (Linear(cfg.d_model, cfg.num_labels, kernel_init=init, rngs=rngs, **dt)
                           if cfg.num_labels else None)

    def embed(self, tokens: jax.Array, token_types: jax.Array | None = None,
              positions: jax.Array | None = None) -> jax.Array:
        """Token + position + token-type embeddings, normalised: ``[B, T]`` -> ``[B, T, M]`` (Chapters 3-4)."""
        check_tokens(tokens, self.config.context_length)
        if positions is None:
            positions = ops.default_positions(*tokens.shape)
        x = self.tok_embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            table = ops.sinusoidal_positions(self.config.context_length, self.config.d_model)
            x = x + jnp.take(table, positions, axis=0).astype(x.dtype)
        if self.type_embed is not None:
            x = x + self.type_embed(jnp.zeros_like(tokens) if token_types is None else token_types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.embed_drop(x)

    def encode(self, tokens: jax.Array, *, token_types: jax.Array | None = None,
               padding_mask: jax.Array | None = None, all_layers: bool = False):
        """Contextual vectors for every position, float32 ``[B, T, M]``.

        Attention is bidirectional; the only mask is padding (keys that are not real tokens). With
        ``all_layers`` also the L + 1 states (embeddings, then each block's output), Hugging Face's
        ``hidden_states``.
        """
        x = self.embed(tokens, token_types)
        mask = ops.attention_mask(k_valid=padding_mask)

        def run(block: Block, h: jax.Array) -> jax.Array:
            return block(h, mask=mask)

        out = run_blocks(self.blocks, x, run, scanned=self.config.scan_layers, remat=self.config.remat,
                         collect=all_layers)
        if all_layers:
            return out[0].astype(jnp.float32), [h.astype(jnp.float32) for h in out[1]]
        return out.astype(jnp.float32)

    def pooled(self, tokens: jax.Array, **kwargs) -> jax.Array:
        """The sentence vector: the first ([CLS]) position through dense + tanh, ``[B, M]``."""
        return self.pool(self.encode(tokens, **kwargs))

    def pool(self, h: jax.Array) -> jax.Array:
        """:meth:`pooled` from already encoded ``h [B, T, M]``."""
        return jnp.tanh(self.pooler(h[:, 0])).astype(jnp.float32)

    def mlm_logits(self, tokens: jax.Array, **kwargs) -> jax.Array:
        """Masked-LM logits, float32 ``[B, T, V]``: for each position, which token belongs there."""
        return self.mlm_head(self.encode(tokens, **kwargs))

    def mlm_head(self, h: jax.Array) -> jax.Array:
        """The masked-LM head on encoded ``h [..., M]``: dense, activation, LayerNorm, then the
        (tied) embedding table plus a bias -> float32 ``[..., V]``."""
        act = ops.activation_fn(self.config.activation)
        t = self.mlm_norm(act(self.mlm_dense(h)))
        return self.tok_embed.attend(t) + self.mlm_bias[...].astype(jnp.float32)

    def classify(self, tokens: jax.Array, **kwargs) -> jax.Array:
        """Sequence-classification logits from the pooled vector, float32 ``[B, C]``."""
        if self.classifier is None:
            raise ValueError("this model has no classification head; build it with BertConfig(num_labels=C)")
        pooled = self.classifier_drop(self.pooled(tokens, **kwargs))
        return self.classifier(pooled).astype(jnp.float32)
