"""The layer stack: L blocks run one after another, unrolled or as one ``lax.scan``, with remat (Chapters 9, 15).

A model keeps its blocks in ``model.blocks``: an ``nnx.List`` of L blocks, or (``scan_layers``) one
block whose every variable is stacked ``[L, ...]``. The functions here run either layout the same
way, so models only say what one block does with its input.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax.nn.cache import KVCache
from tfd_jax.nn.layers import Dropout

# Activation checkpointing (Chapter 15) by name: what each block keeps from its forward pass.
REMAT_POLICIES = {
    "none": None,  # keep everything (no recomputation)
    "full": "nothing_saveable",  # keep only the block inputs, recompute the rest
    "dots": "checkpoint_dots",  # keep matmul outputs, recompute the cheap elementwise ops
    "dots_no_batch": "dots_with_no_batch_dims_saveable",  # keep weight matmuls, recompute attention
}


def remat_name(remat: bool | str) -> str:
    """A remat setting (True/False or a name) as a name from :data:`REMAT_POLICIES`."""
    if remat is True:
        return "full"
    if remat is False:
        return "none"
    return remat


def make_blocks(make: Callable[[], nnx.Module], num_layers: int, *, scan_layers: bool):
    """``num_layers`` blocks from ``make()``, stored one by one or stacked (see :func:`stack_blocks`).

    Both layouts are built from the same L blocks, so they start from the same weights."""
    blocks = [make() for _ in range(num_layers)]
    return stack_blocks(blocks) if scan_layers else nnx.List(blocks)


def run_blocks(blocks, x: jax.Array, run: Callable, *, scanned: bool, remat: bool | str = False,
               collect: bool = False):
    """``x = run(block, x)`` for every block, in order.

    Args:
      blocks: ``model.blocks`` (a list, or one stacked block when ``scanned``).
      x: the stack's input ``[B, T, M]``.
      run: ``(block, x) -> x``.
      remat: activation checkpointing per block (a :data:`REMAT_POLICIES` name, or True/False).
      collect: also return every block's output.
    Returns:
      the last output, or with ``collect`` ``(last, [input, output of block 0, ..., of block L-1])``.
    """
    policy = REMAT_POLICIES[remat_name(remat)]
    saveable = None if policy is None else getattr(jax.checkpoint_policies, policy)
    if scanned:
        return _scan_blocks(blocks, run, x, saveable, collect)
    outs = [x]
    for block in blocks:
        x = run(block, x) if saveable is None else nnx.remat(run, policy=saveable)(block, x)
        outs.append(x)
    return (x, outs) if collect else x


def _scan_blocks(blocks, run, x: jax.Array, saveable, collect: bool):
    """:func:`run_blocks` over stacked blocks as one ``lax.scan``.

    The scan body rebuilds one block from its slice of the stacked variables ``[L, ...]``. When
    dropout is drawing (training, rate > 0), each layer's advanced stream counters come out of
    the scan and are written back, so the masks are those of the unrolled model; otherwise
    nothing is written, and the model can be closed over by any JAX transform.
    """
    graphdef, params, rest = nnx.split(blocks, nnx.Param, ...)
    drawing = any(isinstance(m, Dropout) and m.rate > 0 and not m.deterministic for _, m in nnx.iter_graph(blocks))

    def body(h, slices):
        block = nnx.merge(graphdef, *slices)
        h = run(block, h)
        return h, ((nnx.state(block, nnx.RngCount) if drawing else None), (h if collect else None))

    if saveable is not None:
        body = jax.checkpoint(body, policy=saveable, prevent_cse=False)
    out, (counts, hs) = jax.lax.scan(body, x, (params, rest))
    if drawing:
        nnx.update(blocks, counts)
    if collect:
        return out, [x, *(hs[i] for i in range(hs.shape[0]))]
    return out


def cached_blocks(blocks, x: jax.Array, cache: KVCache, num_valid: jax.Array, *, positions: jax.Array,
                  mask: jax.Array, per_layer: dict | None = None, **shared) -> tuple[jax.Array, KVCache]:
    """Run new tokens ``x [B, T, M]`` through unstacked blocks over a KV cache (Chapter 13).

    Each block writes its new keys/values at ``cache.lengths`` and attends over its whole cache row
    under ``mask``; the returned cache's lengths advance by ``num_valid [B]`` (how many of the ``T``
    tokens of each row are real). ``per_layer``: further arguments of ``block.cached``, one value
    per layer (an encoder-decoder's ``cross_kv``); ``shared``: further arguments for every block.
    """
    new_k, new_v = [], []
    for i, block in enumerate(blocks):
        extra = {name: values[i] for name, values in (per_layer or {}).items()}
        x, k, v = block.cached(x, cache.k[i], cache.v[i], positions=positions, start=cache.lengths, mask=mask,
                               **shared, **extra)
        new_k.append(k)
        new_v.append(v)
    return x, KVCache(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + num_valid.astype(jnp.int32))


def stack_blocks(blocks) -> nnx.Module:
    """Blocks of one shape -> one block whose every variable has a leading layer axis ``[L, ...]``.

    This is how a ``scan_layers`` model stores its blocks (parameter paths ``blocks/attn/q/kernel``
    instead of ``blocks/3/attn/q/kernel``).
    """
    blocks = list(blocks)
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(b) for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))


def unstack_blocks(stacked: nnx.Module, num_layers: int) -> list:
    """The inverse of :func:`stack_blocks`: ``num_layers`` blocks, each with its slice of the variables."""
    graphdef, state = nnx.split(stacked)
    return [nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf[i], state)) for i in range(num_layers)]


def with_layout(model, *, scan_layers: bool):
    """The same model (same weights, dropout streams and mode) with its blocks stored stacked for
    ``scan_layers=True`` or one by one for ``False``. Works for any model with ``model.blocks`` (or
    sub-modules with ``blocks``, as an encoder-decoder's two stacks) and a ``model.config`` with
    ``scan_layers``. Returns ``model`` itself when it already has that layout; otherwise a new model
    with variables of its own (the arrays outside the blocks are shared, which is safe: JAX arrays
    are immutable).

    Use it to load a checkpoint trained with one layout into code that wants the other, or to decode
    from a scanned model without slicing its stacked parameters at every step.
    """
    if model.config.scan_layers == scan_layers:
        return model
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state, copy=True)  # new variables: the two models never write to each other
    new.config = model.config.replace(scan_layers=scan_layers)
    owners = [new] if hasattr(new, "blocks") else [m for m in vars(new).values()
                                                   if isinstance(m, nnx.Module) and hasattr(m, "blocks")]
    for owner in owners:
        owner.config = new.config
        if scan_layers:
            owner.blocks = stack_blocks(owner.blocks)
        else:
            num_layers = jax.tree.leaves(nnx.state(owner.blocks, nnx.Param))[0].shape[0]
            owner.blocks = nnx.List(unstack_blocks(owner.blocks, num_layers))
    return new
