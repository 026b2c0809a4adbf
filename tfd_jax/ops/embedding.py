"""The embedding lookup and the two ways to form its gradient (Chapter 3).

The lookup ``E[ids]`` is a gather; its gradient adds each position's output gradient into the row
of its token, a scatter-add into the ``[V, M]`` table. On a GPU a scatter-add is done with atomic
additions, and frequent tokens make many of them land on the same row.
``grad="sorted"`` sorts the positions by token first and adds them with a segment sum over the
sorted indices: still a scatter-add, but one that tells XLA its indices are sorted, so equal
tokens are neighbours, which may spare the colliding atomics. It adds in float32 (the default
adds in the table's dtype). Both give the same sums up to their order; ``"scatter"`` is the
default, and ``experiments/gpu_check.sh`` measures the other.

Shape letters: V vocabulary (table rows), M width, N looked-up positions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

#: how the lookup's gradient is formed: JAX's own scatter-add, or a sort then a sorted segment sum
EMBED_GRADS = ("scatter", "sorted")


def embedding_lookup(table: jax.Array, ids: jax.Array, grad: str = "scatter") -> jax.Array:
    """``table [V, M]`` at int ``ids [...]`` -> ``[..., M]`` (row ``i`` is token ``i``'s vector).

    ``grad`` chooses how the table's gradient is formed (see the module docstring); the lookup
    itself is the same whichever is chosen.
    """
    if grad == "scatter":
        return jnp.take(table, ids, axis=0)
    if grad == "sorted":
        return _sorted_lookup(table, ids)
    raise ValueError(f"embedding grad must be one of {EMBED_GRADS} (Embed.grad_impl, or embedding_lookup's "
                     f"grad=), got {grad!r}")


@jax.custom_vjp
def _sorted_lookup(table, ids):
    return jnp.take(table, ids, axis=0)


def _sorted_lookup_fwd(table, ids):
    # the table's rows are not needed for the gradient, only its shape and dtype
    return _sorted_lookup(table, ids), (ids, jnp.zeros((0,) + table.shape, table.dtype))


def _sorted_lookup_bwd(res, g):
    ids, like = res
    vocab, width = like.shape[1:]
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids)
    rows = g.reshape(-1, width)[order].astype(jnp.promote_types(g.dtype, jnp.float32))
    summed = jax.ops.segment_sum(rows, flat_ids[order], num_segments=vocab, indices_are_sorted=True)
    return summed.astype(like.dtype), None


_sorted_lookup.defvjp(_sorted_lookup_fwd, _sorted_lookup_bwd)
