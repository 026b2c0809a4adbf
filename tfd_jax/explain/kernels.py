"""The library functions ``explain`` calls, each compiled as one program.

Run eagerly, JAX compiles every primitive of every call separately; for the course's tiny arrays
that compile time is nearly all of the run time. Wrapping each :mod:`tfd_jax.ops` function in
``jax.jit`` (shape-like arguments static) compiles it once per shape instead. Results are the same
functions' results; inputs may be numpy arrays or Python numbers.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from tfd_jax import ops

sinusoidal_positions = jax.jit(ops.sinusoidal_positions, static_argnames=("num_positions", "d_model", "base"))
causal_mask = jax.jit(ops.causal_mask, static_argnames=("T", "S"))
split_heads = jax.jit(ops.split_heads, static_argnames=("num_heads",))
attention_weights = jax.jit(ops.attention_weights)
attention = jax.jit(ops.attention, static_argnames=("impl",))
layer_norm = jax.jit(ops.layer_norm, static_argnames=("eps",))
feed_forward = jax.jit(ops.feed_forward, static_argnames=("activation",))
dropout = jax.jit(ops.dropout, static_argnames=("rate", "deterministic"))
apply_temperature = jax.jit(ops.apply_temperature)
top_k_filter = jax.jit(ops.top_k_filter, static_argnames=("k",))
top_p_filter = jax.jit(ops.top_p_filter)
token_cross_entropy = jax.jit(ops.token_cross_entropy)
relu = jax.jit(ops.activation_fn("relu"))
softmax = jax.jit(jax.nn.softmax)
# d loss / d logits of the next-token cross-entropy (Chapter 11's backward pass starts here).
cross_entropy_grad = jax.jit(jax.grad(ops.token_cross_entropy))


def f64(x) -> np.ndarray:
    """A JAX result as a float64 numpy array (for printing and comparing)."""
    return np.asarray(x, dtype=np.float64)


@functools.lru_cache(maxsize=None)
def adam_step(lr: float, b1: float, b2: float, eps: float):
    """``(params, grads, mu, nu) -> (new params, mu, nu)`` for one ``optax.adam`` step from moments mu, nu."""
    opt = optax.adam(lr, b1=b1, b2=b2, eps=eps)

    @jax.jit
    def step(params, grads, mu, nu):
        state = opt.init(params)
        state = (state[0]._replace(mu=mu, nu=nu),) + tuple(state[1:])
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state[0].mu, state[0].nu

    return step


@functools.lru_cache(maxsize=None)
def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, end_value: float):
    """``optax.warmup_cosine_decay_schedule`` from 0, compiled once."""
    return jax.jit(optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps, end_value=end_value))
