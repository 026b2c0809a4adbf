"""The encoder-decoder transformer, top to bottom (Chapter 19, Part 5): the original Transformer, T5, BART.

source tokens -> embeddings (+ positions) -> N encoder blocks (bidirectional) -> memory [B, S, M]
target tokens -> embeddings (+ positions) -> N decoder blocks, each: causal self-attention,
    cross-attention (queries from the decoder, keys and values from the memory, no causal mask), FFN
    -> [final norm] -> logits over the vocabulary.

The course's translation example is this model: "I love pizza" is encoded once, then the decoder
writes "J'", "aime", "la", "pizza" one token at a time, each step reading the whole source through
cross-attention. ``Seq2SeqConfig`` says which published model it is:

- ``transformer-base``: Vaswani et al. 2017: post-LN, sinusoidal positions, ReLU, one embedding table
  for source, target and output, multiplied by sqrt(M) on the way in.
- ``t5-small`` / ``t5-base`` (T5 v1.0): pre-RMSNorm without bias, no absolute positions but a learned
  bias per relative-position bucket and head (``ops.relative_position_buckets``, shared by the layers of
  a stack), ReLU, scores not divided by sqrt(D), the tied head applied to ``h * M^-0.5``;
  ``t5-v1_1-small``: gated GELU and an untied head.
- ``bart-base``: learned positions offset by 2 (BART's), a LayerNorm on the embeddings, post-LN, GELU,
  a bias on the logits.
- ``course-seq2seq``: the course's 6-wide blocks as encoder and decoder; ``tiny``, ``t5-tiny``,
  ``bart-tiny``: CPU-sized members of each family.

Decoding (``tfd_jax.decode``) encodes the source once in :meth:`EncoderDecoder.init_cache`, computes each
decoder layer's cross-attention keys and values there, and keeps them in the cache beside the
growing self-attention cache: a decoding step never looks at the source again.

Shape letters: B batch, S source length, T target length, M model width, V vocabulary, H heads,
S_max cache length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.models.gpt import check_tokens
from tfd_jax.nn import Block, BlockConfig, Dropout, EncoderDecoderCache, Embed, LayerNorm, Linear, allocate_cache
from tfd_jax.nn import make_blocks, make_norm, normal_init, record_attention_weights, run_blocks, unstack_blocks
from tfd_jax.nn import with_layout, xavier_init
from tfd_jax.nn.cache import as_bshd
from tfd_jax.nn.config import DTYPES, ConfigMixin
from tfd_jax.nn.stack import REMAT_POLICIES, cached_blocks
from tfd_jax.ops.feedforward import ACTIVATIONS

__all__ = ["EncoderDecoder", "Seq2SeqConfig", "SEQ2SEQ_PRESETS"]

FAMILIES = ("transformer", "t5", "bart")


@dataclass(frozen=True)
class Seq2SeqConfig(ConfigMixin):
    """Everything that defines an encoder-decoder.

    Sizes: ``vocab_size`` V (shared by source and target), ``context_length`` (longest source or
    target; the position tables' size), ``d_model`` M, ``num_heads`` H, ``head_dim`` D (0: M / H;
    T5's ``d_kv``), ``num_layers`` encoder blocks, ``num_decoder_layers`` (0: as many), ``d_ff`` F
    (0: 4M).

    ``positions``: ``"sinusoidal"`` (2017), ``"learned"`` (BART; rows ``position + position_offset``)
    or ``"relative"`` (T5: ``relative_buckets`` buckets up to ``relative_max_distance``).
    ``attn_scale``: None for ``1/sqrt(D)``, 1.0 for T5's unscaled scores. ``scale_embeddings``:
    multiply token embeddings by sqrt(M). ``head_scale``: multiply the decoder output by M^-0.5
    before a tied head (T5). ``logits_bias``: a bias on the logits (BART's ``final_logits_bias``).
    ``decoder_start_id``: the token every target starts from (T5: pad; BART: eos).
    """

    family: str = "transformer"  # "transformer", "t5" or "bart": which weights interop maps
    vocab_size: int = 32000
    context_length: int = 512
    d_model: int = 512
    num_heads: int = 8
    head_dim: int = 0
    num_layers: int = 6
    num_decoder_layers: int = 0
    d_ff: int = 0
    activation: str = "relu"
    gated_ffn: bool = False
    norm: str = "layernorm"
    norm_position: str = "post"
    norm_eps: float = 1e-6
    norm_bias: bool = True
    final_norm: bool = False  # a norm after each stack (pre-LN models: T5)
    embed_norm: bool = False  # a LayerNorm on each stack's embeddings (BART)
    qkv_bias: bool = False
    out_bias: bool = False
    ffn_bias: bool = True
    positions: str = "sinusoidal"
    position_offset: int = 0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    attn_scale: float | None = None
    scale_embeddings: bool = True
    tie_embeddings: bool = True
    head_scale: bool = False
    logits_bias: bool = False
    dropout: float = 0.1
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0
    init: str = "xavier"  # "xavier" (the 2017 paper's and the course's), "bert" (N(0, 0.02))
    attention_impl: str = "reference"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool | str = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        if self.num_decoder_layers == 0:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        if self.head_dim == 0 and self.num_heads > 0 and self.d_model % self.num_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        ids = (self.pad_id, self.eos_id, self.decoder_start_id)
        checks = [
            (self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"),
            (min(self.vocab_size, self.context_length, self.d_model, self.num_heads, self.num_layers) > 0,
             "vocab_size, context_length, d_model, num_heads and num_layers must be positive"),
            (self.head_dim > 0, f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; give head_dim"),
            (self.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (self.norm_position in ("pre", "post"), f"norm_position must be 'pre' or 'post', got {self.norm_position!r}"),
            (self.positions in ("sinusoidal", "learned", "relative"),
             f"positions must be 'sinusoidal', 'learned' or 'relative', got {self.positions!r}"),
            (self.relative_buckets >= 4 and self.relative_max_distance > self.relative_buckets // 4,
             "relative_buckets must be >= 4 and relative_max_distance larger than a quarter of them"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (all(0 <= i < self.vocab_size for i in ids),
             f"pad_id, eos_id and decoder_start_id must be in [0, {self.vocab_size}), got {ids}"),
            (self.init in ("bert", "xavier"), f"init must be 'bert' or 'xavier', got {self.init!r}"),
            (self.dtype in DTYPES and self.param_dtype in DTYPES, f"dtypes must be among {sorted(DTYPES)}"),
            (self.remat in (True, False) or self.remat in REMAT_POLICIES,
             f"remat must be True/False or one of {sorted(REMAT_POLICIES)}, got {self.remat!r}"),
            (self.attention_impl in ("reference", "xla", "cudnn", "auto"),
             f"attention_impl must be 'reference', 'xla', 'cudnn' or 'auto', got {self.attention_impl!r}"),
            (isinstance(self.scan_layers, bool), f"scan_layers must be True or False, got {self.scan_layers!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid Seq2SeqConfig: {msg}")

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def is_encoder_decoder(self) -> bool:
        """What ``tfd_jax.decode`` asks: this model decodes from a source (``source=``)."""
        return True

    def block(self, num_layers: int | None = None) -> BlockConfig:
        """The blocks of both stacks (the decoder's add cross-attention)."""
        return BlockConfig(
            d_model=self.d_model, num_heads=self.num_heads, head_dim=self.head_dim, d_ff=self.d_ff,
            num_layers=num_layers or self.num_layers, norm_position=self.norm_position, norm=self.norm,
            norm_eps=self.norm_eps, norm_bias=self.norm_bias, activation=self.activation, gated_ffn=self.gated_ffn,
            qkv_bias=self.qkv_bias, out_bias=self.out_bias, ffn_bias=self.ffn_bias, dropout=self.dropout,
            attn_scale=self.attn_scale, init=self.init, attention_impl=self.attention_impl, dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


_T5 = dict(family="t5", vocab_size=32128, norm="rmsnorm", norm_position="pre", norm_eps=1e-6, norm_bias=False,
           final_norm=True, qkv_bias=False, out_bias=False, ffn_bias=False, positions="relative", attn_scale=1.0,
           scale_embeddings=False, head_scale=True, pad_id=0, eos_id=1, decoder_start_id=0, init="bert")
_T5_V1_1 = dict(_T5, activation="gelu_tanh", gated_ffn=True, tie_embeddings=False, head_scale=False)
_BART = dict(family="bart", vocab_size=50265, context_length=1024, activation="gelu", norm_eps=1e-5, embed_norm=True,
             qkv_bias=True, out_bias=True, positions="learned", position_offset=2, scale_embeddings=False,
             logits_bias=True, pad_id=1, eos_id=2, decoder_start_id=2, init="bert")
_TINY = dict(vocab_size=512, context_length=128, d_model=64, num_heads=4, num_layers=2, d_ff=256, dropout=0.0)

SEQ2SEQ_PRESETS: dict[str, dict[str, Any]] = {
    # Vaswani et al. 2017, "base": 6 + 6 layers of width 512, a 37k shared BPE vocabulary.
    "transformer-base": dict(vocab_size=37000, d_model=512, num_heads=8, num_layers=6, d_ff=2048),
    # The course's 6-wide model (Chapter 17) as both stacks: no Q/K/V/O biases, an untied head and
    # sinusoidal positions added without scaling, as in its decoder.
    "course-seq2seq": dict(vocab_size=50000, d_model=6, num_heads=2, d_ff=24, num_layers=3, scale_embeddings=False,
                           tie_embeddings=False, norm_eps=1e-5),
    "t5-small": dict(_T5, d_model=512, num_heads=8, head_dim=64, num_layers=6, d_ff=2048),
    "t5-base": dict(_T5, d_model=768, num_heads=12, head_dim=64, num_layers=12, d_ff=3072),
    "t5-v1_1-small": dict(_T5_V1_1, d_model=512, num_heads=6, head_dim=64, num_layers=8, d_ff=1024),
    "bart-base": dict(_BART, d_model=768, num_heads=12, num_layers=6, d_ff=3072),
    # CPU-sized: the same families, 2 + 2 layers of width 64.
    "tiny": dict(_TINY),
    "t5-tiny": dict(_T5, **_TINY),
    "bart-tiny": dict(_BART, **{**_TINY, "context_length": 128}),
}
Seq2SeqConfig.PRESET_TABLE = SEQ2SEQ_PRESETS


class Stack(nnx.Module):
    """One side of the model: position information, an optional embedding norm, the blocks and an
    optional final norm. The token table is the model's (shared by both sides)."""

    def __init__(self, cfg: Seq2SeqConfig, num_layers: int, *, decoder: bool, rngs: nnx.Rngs):
        self.config, self.decoder = cfg, decoder
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        init = xavier_init() if cfg.init == "xavier" else normal_init(0.02)
        self.pos_embed = (Embed(cfg.context_length + cfg.position_offset, cfg.d_model, init=init, rngs=rngs, **dt)
                          if cfg.positions == "learned" else None)
        self.rel_bias = (Embed(cfg.relative_buckets, cfg.num_heads, init=init, rngs=rngs, **dt)
                         if cfg.positions == "relative" else None)
        self.embed_norm = (LayerNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.params_dtype)
                           if cfg.embed_norm else None)
        self.embed_drop = Dropout(cfg.dropout, rngs=rngs)
        block = cfg.block(num_layers)
        self.blocks = make_blocks(lambda: Block(block, rngs=rngs, cross_attention=decoder), num_layers,
                                  scan_layers=cfg.scan_layers)
        self.final_norm = (make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype)
                           if cfg.final_norm else None)
        self.final_drop = Dropout(cfg.dropout, rngs=rngs)

    def embed(self, tok_embed: Embed, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token embeddings (times sqrt(M) when configured) plus absolute positions: ``[B, T, M]``."""
        cfg = self.config
        x = tok_embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + cfg.position_offset)
        elif cfg.positions == "sinusoidal":
            table = ops.sinusoidal_positions(cfg.context_length, cfg.d_model)
            x = x + jnp.take(table, positions, axis=0).astype(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.embed_drop(x)

    def position_bias(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array | None:
        """T5's relative-position bias ``[B, H, T, S]`` (None for absolute positions): one learned
        scalar per bucket and head, the same in every layer of the stack."""
        if self.rel_bias is None:
            return None
        cfg = self.config
        buckets = ops.relative_position_buckets(q_positions, k_positions, num_buckets=cfg.relative_buckets,
                                                max_distance=cfg.relative_max_distance,
                                                bidirectional=not self.decoder)
        return jnp.moveaxis(self.rel_bias(buckets), -1, -3).astype(jnp.float32)

    def finish(self, h: jax.Array) -> jax.Array:
        if self.final_norm is not None:
            h = self.final_norm(h)
        return self.final_drop(h)

    def run(self, x: jax.Array, layer, *, all_layers: bool = False):
        """The blocks over ``x [B, T, M]``, then the final norm. ``layer(block, h)`` runs one block."""
        cfg = self.config
        out = run_blocks(self.blocks, x, layer, scanned=cfg.scan_layers, remat=cfg.remat, collect=all_layers)
        if all_layers:
            return self.finish(out[0]), out[1]
        return self.finish(out)

    def unstacked(self):
        n = self.config.num_decoder_layers if self.decoder else self.config.num_layers
        return unstack_blocks(self.blocks, n) if self.config.scan_layers else self.blocks


class EncoderDecoder(nnx.Module):
    """A configurable encoder-decoder. ``EncoderDecoder(Seq2SeqConfig.preset("t5-small"), rngs=nnx.Rngs(0))``.

    Inputs: ``src`` int ``[B, S]`` and ``tgt_in`` int ``[B, T]`` (the target shifted right: it starts
    with ``decoder_start_id``); padding masks are bool, True on real tokens (Hugging Face's
    ``attention_mask`` / ``decoder_attention_mask``), pad on the right. ``model.eval()`` turns
    dropout off.
    """

    def __init__(self, config: Seq2SeqConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        init = xavier_init() if cfg.init == "xavier" else normal_init(1.0 if cfg.family == "t5" else 0.02)
        self.tok_embed = Embed(cfg.vocab_size, cfg.d_model, init=init, rngs=rngs, **dt)
        self.encoder = Stack(cfg, cfg.num_layers, decoder=False, rngs=rngs)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, decoder=True, rngs=rngs)
        self.lm_head = (None if cfg.tie_embeddings else
                        Linear(cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=normal_init(0.02), rngs=rngs,
                               **dt))
        self.final_logits_bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.params_dtype)) if cfg.logits_bias else None

    # -- the encoder -----------------------------------------------------------------------------

    def encode(self, src: jax.Array, *, src_padding_mask: jax.Array | None = None, all_layers: bool = False):
        """The memory the decoder reads: float32 ``[B, S, M]`` (bidirectional attention; padding
        keys masked). With ``all_layers`` also the L + 1 states: the embeddings, then each block's
        output (before the final norm)."""
        check_tokens(src, self.config.context_length)
        B, S = src.shape
        positions = ops.default_positions(B, S)
        mask = ops.attention_mask(k_valid=src_padding_mask)
        bias = self.encoder.position_bias(positions, positions)

        def layer(block: Block, h: jax.Array) -> jax.Array:
            return block(h, mask=mask, bias=bias)

        out = self.encoder.run(self.encoder.embed(self.tok_embed, src, positions), layer, all_layers=all_layers)
        if all_layers:
            return out[0].astype(jnp.float32), out[1]
        return out.astype(jnp.float32)

    # -- the decoder -----------------------------------------------------------------------------

    def decode(self, tgt_in: jax.Array, memory: jax.Array, *, src_padding_mask: jax.Array | None = None,
               tgt_padding_mask: jax.Array | None = None, all_layers: bool = False):
        """Decoder states ``[B, T, M]`` (after the final norm; for :meth:`logits`) from the shifted
        target and the encoder's ``memory [B, S, M]``. Self-attention is causal; cross-attention
        sees every real source token."""
        check_tokens(tgt_in, self.config.context_length)
        B, T = tgt_in.shape
        positions = ops.default_positions(B, T)
        mask = ops.attention_mask(k_valid=tgt_padding_mask)
        cross_mask = ops.attention_mask(k_valid=src_padding_mask)
        bias = self.decoder.position_bias(positions, positions)
        memory = memory.astype(self.config.compute_dtype)

        def layer(block: Block, h: jax.Array) -> jax.Array:
            return block(h, mask=mask, is_causal=True, bias=bias, cross_kv=block.cross_key_value(memory),
                         cross_mask=cross_mask)

        return self.decoder.run(self.decoder.embed(self.tok_embed, tgt_in, positions), layer, all_layers=all_layers)

    def logits(self, h: jax.Array) -> jax.Array:
        """Output head in float32: decoder states ``[B, T, M]`` -> ``[B, T, V]`` (Chapter 10)."""
        h, table, layout = self._head(h)
        out = ops.head_matmul(h, table, layout, self.config.compute_dtype, self._vocab_pad())
        if self.final_logits_bias is not None:
            out = out + self.final_logits_bias[...].astype(jnp.float32)
        return out

    def _head(self, h):
        """(states, weight, layout) of the output head: the tied table (T5 scales the states by
        M^-0.5 first) or the separate head."""
        if self.lm_head is not None:
            return h, self.lm_head.weight(), "mv"
        if self.config.head_scale:
            h = h * jnp.asarray(self.config.d_model**-0.5, h.dtype)
        return h, self.tok_embed.embedding[...], "vm"

    def _vocab_pad(self) -> int:
        return 1 if jax.default_backend() == "cpu" else 128

    def __call__(self, src: jax.Array, tgt_in: jax.Array, *, src_padding_mask: jax.Array | None = None,
                 tgt_padding_mask: jax.Array | None = None) -> jax.Array:
        """Logits for every target position, float32 ``[B, T, V]`` (teacher forcing)."""
        memory = self.encode(src, src_padding_mask=src_padding_mask)
        return self.logits(self.decode(tgt_in, memory, src_padding_mask=src_padding_mask,
                                       tgt_padding_mask=tgt_padding_mask))

    def token_losses(self, src: jax.Array, tgt_in: jax.Array, targets: jax.Array, *,
                     src_padding_mask: jax.Array | None = None) -> jax.Array:
        """Cross-entropy of each target token, float32 ``[B, T]``: ``ops.token_cross_entropy`` of
        :meth:`__call__`'s logits, with the head and the loss fused (``ops.head_cross_entropy``)."""
        memory = self.encode(src, src_padding_mask=src_padding_mask)
        h = self.decode(tgt_in, memory, src_padding_mask=src_padding_mask)
        if self.final_logits_bias is not None:
            return ops.token_cross_entropy(self.logits(h), targets)
        h, table, layout = self._head(h)
        return ops.head_cross_entropy(h, table, layout, self.config.compute_dtype, targets, self._vocab_pad())

    def cross_attention_weights(self, src: jax.Array, tgt_in: jax.Array, *,
                                src_padding_mask: jax.Array | None = None) -> list[jax.Array]:
        """Where each target position looks in the source: one float32 ``[B, H, T, S]`` per decoder
        layer (for pictures; e.g. with a greedy translation as ``tgt_in``)."""
        model = with_layout(self, scan_layers=False)
        _, weights = record_attention_weights(
            model.decoder, lambda: model(src, tgt_in, src_padding_mask=src_padding_mask), which="cross_attn")
        return weights

    # -- what decoding needs: the loop itself is tfd_jax.decode ---------------------------------

    def init_cache(self, batch_size: int, max_length: int, *, source: jax.Array, source_mask: jax.Array | None = None,
                   dtype=None) -> EncoderDecoderCache:
        """Encode ``source [B, S]`` once and make the decoder's cache: each layer's cross-attention
        keys/values ``[B, H, S, D]`` from the memory, and empty self-attention buffers
        ``[B, H, S_max, D]`` for up to ``max_length`` target tokens (both heads-major: a decoding
        step then reads them without a transpose)."""
        cfg = self.config
        if source.shape[0] != batch_size:
            raise ValueError(f"source has batch {source.shape[0]} but the cache is for {batch_size} rows")
        if not 1 <= max_length <= cfg.context_length:
            raise ValueError(f"cache length must be in [1, context_length={cfg.context_length}], got {max_length}")
        if source_mask is None:
            source_mask = jnp.ones(source.shape, bool)
        memory = self.encode(source, src_padding_mask=source_mask).astype(cfg.compute_dtype)
        cross = [block.cross_key_value(memory) for block in self.decoder.unstacked()]
        dtype = dtype or cfg.compute_dtype
        heads_major = lambda a: jnp.swapaxes(a, 1, 2).astype(dtype)  # noqa: E731  (the self-attention cache's layout)
        return EncoderDecoderCache(
            self_attn=allocate_cache(cfg.num_decoder_layers, batch_size, cfg.num_heads, max_length, cfg.head_dim, dtype),
            cross_k=tuple(heads_major(k) for k, _ in cross), cross_v=tuple(heads_major(v) for _, v in cross),
            source_valid=source_mask.astype(bool))

    def forward_cached(self, tokens: jax.Array, cache: EncoderDecoderCache,
                       num_valid: jax.Array) -> tuple[jax.Array, EncoderDecoderCache]:
        """Run target ``tokens [B, T]`` appended to each cache row: decoder states ``[B, T, M]`` (for
        :meth:`logits`) and the cache with their self-attention keys/values written. Positions and
        masks as in ``GPT.forward_cached``; cross-attention reads the cached keys/values."""
        B, T = tokens.shape
        S = cache.max_length
        positions = jnp.minimum(ops.default_positions(B, T, cache.lengths), S - 1)
        k_positions = jnp.arange(S)
        mask = ops.attention_mask(q_positions=positions, k_positions=k_positions, causal=True)
        bias = self.decoder.position_bias(positions, k_positions[None])
        cross_mask = ops.attention_mask(k_valid=cache.source_valid)
        x = self.decoder.embed(self.tok_embed, tokens, positions)
        h, self_attn = cached_blocks(self.decoder.unstacked(), x, cache.self_attn, num_valid, positions=positions,
                                     mask=mask, bias=bias, cross_mask=cross_mask,
                                     per_layer={"cross_kv": [(as_bshd(k), as_bshd(v))
                                                             for k, v in zip(cache.cross_k, cache.cross_v)]})
        new = EncoderDecoderCache(self_attn=self_attn, cross_k=cache.cross_k, cross_v=cache.cross_v,
                                  source_valid=cache.source_valid)
        return self.decoder.finish(h), new
