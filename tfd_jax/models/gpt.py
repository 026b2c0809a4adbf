"""The decoder-only transformer (GPT), top to bottom (Chapters 3-10, 12, 13 and 19 Part 7).

tokens -> embeddings (+ positions) -> L blocks with causal self-attention -> [final norm] -> logits.

The same class is the course's 6-wide post-LN toy, GPT-2 and the Llama family (RMSNorm, SwiGLU,
RoPE, fewer key/value heads): ``GPTConfig`` says which.

Shape letters: B batch, T sequence length, M model width, V vocabulary, S_max cache length.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.models.config import GPTConfig
from tfd_jax.nn import Block, Dropout, Embed, KVCache, Linear, allocate_cache, make_blocks, make_norm, normal_init
from tfd_jax.nn import run_blocks, stack_blocks, unstack_blocks, with_layout, xavier_init
from tfd_jax.nn.stack import cached_blocks

__all__ = ["GPT", "count_params", "stack_blocks", "unstack_blocks", "with_layout"]


class GPT(nnx.Module):
    """A configurable GPT. ``GPT(GPTConfig.preset("course"), rngs=nnx.Rngs(0))`` is the course's model;
    ``GPTConfig.preset("gpt2")`` gives GPT-2 small.

    Call it on int tokens ``[B, T]`` to get float32 logits ``[B, T, V]``. ``model.eval()`` turns
    dropout off and ``model.train()`` back on. Build with ``rngs=nnx.Rngs(params=0, dropout=1)``
    (or just ``nnx.Rngs(0)``) when training with dropout.

    ``model.blocks`` holds the L blocks one by one, or, with ``config.scan_layers``, one ``Block``
    whose variables are stacked ``[L, ...]`` and run as a ``lax.scan``;
    ``with_layout(model, scan_layers=False).blocks`` gives them one by one.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        embed_init = xavier_init() if cfg.init == "xavier" else normal_init(0.02)
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.tok_embed = Embed(cfg.vocab_size, cfg.d_model, init=embed_init, rngs=rngs, **dt)
        if cfg.positions == "learned":
            self.pos_embed = Embed(cfg.context_length, cfg.d_model, init=normal_init(0.02), rngs=rngs, **dt)
        else:
            self.pos_embed = None
        self.embed_drop = Dropout(cfg.embed_dropout, rngs=rngs)
        block = cfg.block()
        self.blocks = make_blocks(lambda: Block(block, rngs=rngs), cfg.num_layers, scan_layers=cfg.scan_layers)
        self.final_norm = (
            make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype) if cfg.final_norm else None
        )
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                cfg.d_model, cfg.vocab_size, use_bias=cfg.lm_head_bias, kernel_init=embed_init, rngs=rngs, **dt
            )
        if cfg.lora_rank:
            from tfd_jax.nn.lora import add_lora

            add_lora(self, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                     targets=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()), rngs=rngs)

    # -- the pieces, in the order the course introduces them ------------------------------------

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token embeddings plus position information: ``[B, T]`` -> ``[B, T, M]`` (Chapters 3-4).

        Sinusoidal positions are added without scaling the embeddings by sqrt(M), as in the course.
        RoPE positions are applied inside attention instead (to queries and keys).
        """
        x = self.tok_embed(tokens)
        if self.config.positions == "learned":
            x = x + self.pos_embed(positions)
        elif self.config.positions == "sinusoidal":
            table = ops.sinusoidal_positions(self.config.context_length, self.config.d_model)
            x = x + jnp.take(table, positions, axis=0).astype(x.dtype)
        return self.embed_drop(x)

    def hidden_states(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        padding_mask: jax.Array | None = None,
        all_layers: bool = False,
    ):
        """The blocks: ``x [B, T, M]`` (output of :meth:`embed`) -> ``[B, T, M]`` before the final norm.

        With ``all_layers`` also the list of L + 1 states: the input, then each block's output
        (what Hugging Face calls ``hidden_states``, except that it applies the final norm to the last).
        """
        B, T = x.shape[:2]
        if positions is None:
            positions = ops.default_positions(B, T)
        # Causality is passed as a flag (fused kernels then skip the masked half); only packing and
        # padding need an explicit mask on top of it.
        mask = ops.attention_mask(q_segments=segment_ids, k_valid=padding_mask)

        def run(block: Block, h: jax.Array) -> jax.Array:
            return block(h, mask=mask, is_causal=True, positions=positions)

        return run_blocks(self.blocks, x, run, scanned=self.config.scan_layers, remat=self.config.remat,
                          collect=all_layers)

    def logits(self, h: jax.Array) -> jax.Array:
        """Output head in float32: ``[B, T, M]`` -> ``[B, T, V]`` (Chapter 10)."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.lm_head is None:
            return self.tok_embed.attend(h, pad_multiple=self._vocab_pad(), logits_dtype=self.config.logits_dtype)
        out = ops.head_matmul(h, self.lm_head.weight(), "mv", self.config.compute_dtype, self._vocab_pad(),
                              self.config.logits_dtype)
        if self.lm_head.bias is not None:
            out = out + self.lm_head.bias[...].astype(jnp.float32)
        return out

    def _vocab_pad(self) -> int:
        """The head's vocabulary padding multiple: the config's, or 128 on accelerators and 1 on CPU."""
        return self.config.vocab_pad_multiple or (1 if jax.default_backend() == "cpu" else 128)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        padding_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for every position.

        Args:
          tokens: int ``[B, T]``, ``T <= context_length``.
          positions: int ``[B, T]``; defaults to ``0..T-1`` (packed rows restart them per document).
          segment_ids: int ``[B, T]``; tokens attend only within their own segment (packing).
          padding_mask: bool ``[B, T]``; False marks padding keys nobody should attend to.
        Returns:
          float32 ``[B, T, V]``.
        """
        x, positions = self._embed_input(tokens, positions)
        return self.forward_embeddings(x, positions=positions, segment_ids=segment_ids, padding_mask=padding_mask)

    def forward_embeddings(self, x: jax.Array, **kwargs) -> jax.Array:
        """Everything after the embedding: ``x [B, T, M]`` (output of :meth:`embed`) -> logits ``[B, T, V]``.

        The model as a function of a continuous input, so one can differentiate through it (e.g. to
        show causality: logits at ``t`` have zero gradient with respect to ``x`` after ``t``).
        Keyword arguments as in ``__call__``; ``positions`` only matter here for RoPE.
        """
        return self.logits(self.hidden_states(x, **kwargs))

    def token_losses(
        self,
        tokens: jax.Array,
        targets: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token cross-entropy at every position, float32 ``[B, T]`` (Chapter 11).

        Equal to ``ops.token_cross_entropy(self(tokens, ...), targets)``; the output head and the
        loss run as one operation (``ops.head_cross_entropy``), which is cheaper to differentiate.
        ``targets``: int ``[B, T]``.
        """
        x, positions = self._embed_input(tokens, positions)
        h = self.hidden_states(x, positions=positions, segment_ids=segment_ids)
        if self.lm_head is not None and self.lm_head.bias is not None:  # a biased head is rare: plain path
            return ops.token_cross_entropy(self.logits(h), targets)
        if self.final_norm is not None:
            h = self.final_norm(h)
        dtype, pad, ldt = self.config.compute_dtype, self._vocab_pad(), self.config.logits_dtype
        if self.lm_head is None:
            return ops.head_cross_entropy(h, self.tok_embed.embedding[...], "vm", dtype, targets, pad, ldt)
        return ops.head_cross_entropy(h, self.lm_head.weight(), "mv", dtype, targets, pad, ldt)

    def check_input(self, tokens: jax.Array) -> None:
        """Shape and dtype checks that give a clear error instead of a failure deep inside JAX."""
        check_tokens(tokens, self.config.context_length)

    def _embed_input(self, tokens: jax.Array, positions: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Checked tokens -> (embeddings ``[B, T, M]``, positions ``[B, T]``, ``0..T-1`` by default)."""
        self.check_input(tokens)
        if positions is None:
            positions = ops.default_positions(*tokens.shape)
        return self.embed(tokens, positions), positions

    # -- what decoding needs (Chapter 13): the loop itself is tfd_jax.decode ---------------------

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_length`` tokens: per layer
        ``[B, K, S_max, D]`` buffers (only the key/value heads), in the compute dtype by default."""
        cfg = self.config
        if not 1 <= max_length <= cfg.context_length:
            raise ValueError(f"cache length must be in [1, context_length={cfg.context_length}], got {max_length}")
        return allocate_cache(cfg.num_layers, batch_size, cfg.num_kv_heads, max_length, cfg.head_dim,
                              dtype or cfg.compute_dtype)

    def forward_cached(self, tokens: jax.Array, cache: KVCache, num_valid: jax.Array) -> tuple[jax.Array, KVCache]:
        """Run ``tokens [B, T]`` appended to each cache row: hidden states ``[B, T, M]`` (for
        :meth:`logits`) and the cache with their keys/values written.

        Row ``b``'s tokens sit at positions ``cache.lengths[b] + 0..T-1`` and attend to every cached
        key at or before their own position (a mask from positions, never a ``tril`` over the padded
        buffer); ``num_valid [B]`` says how many of them are real. Prefill is one call on the prompts,
        each decoding step one call on a single token.
        """
        B, T = tokens.shape
        S = cache.max_length
        # Finished rows may sit at S; clamping keeps their (ignored) positions inside the tables.
        positions = jnp.minimum(ops.default_positions(B, T, cache.lengths), S - 1)
        mask = ops.attention_mask(q_positions=positions, k_positions=jnp.arange(S), causal=True)
        blocks = unstack_blocks(self.blocks, self.config.num_layers) if self.config.scan_layers else self.blocks
        return cached_blocks(blocks, self.embed(tokens, positions), cache, num_valid, positions=positions, mask=mask)


def check_tokens(tokens: jax.Array, context_length: int) -> None:
    """Raise a clear ``ValueError`` for token arrays a model cannot take: not ``[B, T]`` integers,
    empty, or longer than ``context_length``."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    T = tokens.shape[1]
    if T > context_length:
        raise ValueError(
            f"sequence length {T} exceeds the model's context length {context_length}; "
            "truncate the input or use a config with a longer context_length"
        )
    if T == 0:
        raise ValueError("tokens is empty (sequence length 0)")


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves)."""
    state = nnx.state(model, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
