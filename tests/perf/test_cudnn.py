"""The cuDNN attention path (flash attention on NVIDIA GPUs) gives the XLA path's results in bf16.

tests/conftest.py points JAX at the CPU unless JAX_PLATFORMS is already set, so on a GPU machine run

    JAX_PLATFORMS=cuda python -m pytest tests/perf/test_cudnn.py
"""
import warnings

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops
from tfd_jax.models import GPT, GPTConfig
from tfd_jax.train.tasks import lm_loss

if jax.default_backend() != "gpu":
    pytest.skip(
        "needs a GPU: the cuDNN attention path runs only on NVIDIA GPUs (with a GPU, run with JAX_PLATFORMS=cuda)",
        allow_module_level=True,
    )

# Small, but in shapes cuDNN's flash attention takes: head dim 32, bf16, T a multiple of 64.
CFG = GPTConfig.preset("tiny", vocab_size=256, context_length=128, d_model=128, num_heads=4, num_layers=2, dtype="bfloat16")


def _loss_and_grads(impl: str, tokens, targets):
    model = GPT(CFG.replace(attention_impl=impl), rngs=nnx.Rngs(0))  # the same weights for every impl
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def f(params):
        m = nnx.merge(graphdef, params, rest)
        s, c, _ = lm_loss(m, {"tokens": tokens, "targets": targets, "mask": jnp.ones(tokens.shape, bool)})
        return s / c

    loss, grads = jax.value_and_grad(f)(params)
    return float(loss), jnp.concatenate([g.ravel().astype(jnp.float32) for g in jax.tree.leaves(grads)])


def test_cudnn_loss_equals_xla_loss_in_bf16():
    rows = jax.random.randint(jax.random.key(1), (4, CFG.context_length + 1), 0, CFG.vocab_size)
    tokens, targets = rows[:, :-1], rows[:, 1:]
    loss_xla, g_xla = _loss_and_grads("xla", tokens, targets)
    loss_cudnn, g_cudnn = _loss_and_grads("cudnn", tokens, targets)
    assert np.isfinite(loss_cudnn)
    assert abs(loss_cudnn - loss_xla) <= 2e-2 * abs(loss_xla), (loss_cudnn, loss_xla)
    rel = float(jnp.linalg.norm(g_cudnn - g_xla) / jnp.linalg.norm(g_xla))
    assert rel < 0.1, rel


@pytest.mark.parametrize("T", [64, 256])
def test_cudnn_attention_matches_the_reference(T):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    shape = (2, T, 4, 64)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16) for key in (kq, kk, kv))
    mask = ops.causal_mask(T)
    ref = ops.attention(q, k, v, mask=mask, impl="reference").astype(jnp.float32)
    fused = jax.jit(lambda q, k, v: ops.attention(q, k, v, is_causal=True, impl="cudnn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to XLA would warn: fail instead
        hlo = fused.lower(q, k, v).compile().as_text()
    assert "cudnn" in hlo.lower(), "the compiled program has no cuDNN attention call"
    got = fused(q, k, v).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=3e-2, rtol=3e-2)
