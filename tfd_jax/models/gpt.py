"""The decoder-only transformer (GPT), top to bottom (Chapters 3-10 and 12).

tokens -> embeddings (+ positions) -> L blocks with causal self-attention -> [final norm] -> logits.

Shape letters: B batch, T sequence length, M model width, V vocabulary.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.models.config import REMAT_POLICIES, GPTConfig
from tfd_jax.nn import Block, Dropout, Embed, Linear, make_norm, normal_init, xavier_init
from tfd_jax.nn.layers import head_cross_entropy, head_matmul


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
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        # scan_layers: one Block holding every layer's variables stacked [L, ...] (see _scan_blocks);
        # built from the same L blocks, so both layouts start from the same weights.
        self.blocks = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = (
            make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.norm_bias, cfg.params_dtype) if cfg.final_norm else None
        )
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                cfg.d_model, cfg.vocab_size, use_bias=cfg.lm_head_bias, kernel_init=embed_init, rngs=rngs, **dt
            )

    # -- the pieces, in the order the course introduces them ------------------------------------

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """Token embeddings plus position information: ``[B, T]`` -> ``[B, T, M]`` (Chapters 3-4).

        Sinusoidal positions are added without scaling the embeddings by sqrt(M), as in the course.
        """
        x = self.tok_embed(tokens)
        if self.config.positions == "learned":
            x = x + self.pos_embed(positions)
        elif self.config.positions == "sinusoidal":
            table = ops.sinusoidal_positions(self.config.context_length, self.config.d_model)
            x = x + jnp.take(table, positions, axis=0).astype(x.dtype)
        return self.embed_drop(x)

    def logits(self, h: jax.Array) -> jax.Array:
        """Output head in float32: ``[B, T, M]`` -> ``[B, T, V]`` (Chapter 10)."""
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.lm_head is None:
            return self.tok_embed.attend(h, pad_multiple=self._vocab_pad())
        out = head_matmul(h, self.lm_head.kernel[...], "mv", self.config.compute_dtype, self._vocab_pad())
        if self.lm_head.bias is not None:
            out = out + self.lm_head.bias[...].astype(jnp.float32)
        return out

    def _vocab_pad(self) -> int:
        """The head's vocabulary padding multiple: the config's, or 128 on accelerators and 1 on CPU."""
        return self.config.vocab_pad_multiple or (1 if jax.default_backend() == "cpu" else 128)

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
        loss run as one operation (``nn.layers.head_cross_entropy``), which is cheaper to
        differentiate. Training calls this. ``targets``: int ``[B, T]``.
        """
        x, positions = self._embed_input(tokens, positions)
        h = self.hidden_states(x, positions=positions, segment_ids=segment_ids)
        if self.lm_head is not None and self.lm_head.bias is not None:  # a biased head is rare: plain path
            return ops.token_cross_entropy(self.logits(h), targets)
        if self.final_norm is not None:
            h = self.final_norm(h)
        dtype, pad = self.config.compute_dtype, self._vocab_pad()
        if self.lm_head is None:
            return head_cross_entropy(h, self.tok_embed.embedding[...], "vm", dtype, targets, pad)
        return head_cross_entropy(h, self.lm_head.kernel[...], "mv", dtype, targets, pad)

    def check_input(self, tokens: jax.Array) -> None:
        """Shape and dtype checks that give a clear error instead of a failure deep inside JAX."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got {tokens.dtype}")
        T = tokens.shape[1]
        if T > self.config.context_length:
            raise ValueError(
                f"sequence length {T} exceeds the model's context length {self.config.context_length}; "
                "truncate the input or use a config with a longer context_length"
            )
        if T == 0:
            raise ValueError("tokens is empty (sequence length 0)")

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

    def _embed_input(self, tokens: jax.Array, positions: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Checked tokens -> (embeddings ``[B, T, M]``, positions ``[B, T]``, ``0..T-1`` by default)."""
        self.check_input(tokens)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        return self.embed(tokens, positions), positions

    def forward_embeddings(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        padding_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Everything after the embedding: ``x [B, T, M]`` (output of :meth:`embed`) -> logits ``[B, T, V]``.

        The model as a function of a continuous input, so one can differentiate through it (e.g. to
        show causality: logits at ``t`` have zero gradient with respect to ``x`` after ``t``).
        Arguments as in ``__call__``; ``positions`` only matter here for RoPE.
        """
        return self.logits(self.hidden_states(x, positions=positions, segment_ids=segment_ids, padding_mask=padding_mask))

    def hidden_states(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        padding_mask: jax.Array | None = None,
    ) -> jax.Array:
        """The blocks: ``x [B, T, M]`` (output of :meth:`embed`) -> ``[B, T, M]`` before the final norm."""
        B, T = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        # Causality is passed as a flag (fused kernels then skip the masked half); only packing and
        # padding need an explicit mask on top of it.
        mask = None
        if segment_ids is not None:
            mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        if padding_mask is not None:
            mask = ops.combine_masks(mask, ops.padding_mask(padding_mask))
        policy = self.config.remat_policy
        saveable = None if policy == "none" else getattr(jax.checkpoint_policies, REMAT_POLICIES[policy])

        def run(block: Block, h: jax.Array) -> jax.Array:
            return block(h, mask=mask, is_causal=True, positions=positions)

        if self.config.scan_layers:
            return self._scan_blocks(run, x, saveable)
        for block in self.blocks:
            x = run(block, x) if saveable is None else nnx.remat(run, policy=saveable)(block, x)
        return x

    def _scan_blocks(self, run, x: jax.Array, saveable) -> jax.Array:
        """``x = run(block, x)`` for each of the stacked blocks, as one ``lax.scan``.

        The scan body rebuilds one block from its slice of the stacked variables ``[L, ...]``. When
        dropout is drawing (training, rate > 0), each layer's advanced stream counters come out of
        the scan and are written back, so the masks are those of the unrolled model; otherwise
        nothing is written, and the model can be closed over by any JAX transform.
        """
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        drawing = any(
            isinstance(m, Dropout) and m.rate > 0 and not m.deterministic for _, m in nnx.iter_graph(self.blocks)
        )

        def body(h, slices):
            block = nnx.merge(graphdef, *slices)
            return run(block, h), (nnx.state(block, nnx.RngCount) if drawing else None)

        if saveable is not None:
            body = jax.checkpoint(body, policy=saveable, prevent_cse=False)
        x, counts = jax.lax.scan(body, x, (params, rest))
        if drawing:
            nnx.update(self.blocks, counts)
        return x


def stack_blocks(blocks) -> Block:
    """Blocks of one shape -> one ``Block`` whose every variable has a leading layer axis ``[L, ...]``.

    This is how a ``scan_layers`` model stores its blocks (parameter paths ``blocks/attn/q/kernel``
    instead of ``blocks/3/attn/q/kernel``).
    """
    blocks = list(blocks)
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(b) for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))


def unstack_blocks(stacked: Block, num_layers: int) -> list[Block]:
    """The inverse of :func:`stack_blocks`: ``num_layers`` blocks, each with its slice of the variables."""
    graphdef, state = nnx.split(stacked)
    return [nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], state)) for i in range(num_layers)]


def with_layout(model: GPT, *, scan_layers: bool) -> GPT:
    """The same model (same weights, dropout streams and mode) with its blocks stored stacked for
    ``scan_layers=True`` or one by one for ``False``. Returns ``model`` itself when it already has
    that layout; otherwise a new ``GPT`` with variables of its own (the arrays outside the blocks
    are shared, which is safe: JAX arrays are immutable).

    Use it to load a checkpoint trained with one layout into code that wants the other, or to decode
    from a scanned model without slicing its stacked parameters at every step.
    """
    if model.config.scan_layers == scan_layers:
        return model
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state, copy=True)  # new variables: the two models never write to each other
    new.config = model.config.replace(scan_layers=scan_layers)
    if scan_layers:
        new.blocks = stack_blocks(model.blocks)
    else:
        new.blocks = nnx.List(unstack_blocks(model.blocks, model.config.num_layers))
    return new


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` leaves)."""
    state = nnx.state(model, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))
