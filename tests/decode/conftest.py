"""Shared tiny models for the decoding tests.

Models get their random weights from numpy instead of their initialisers: building a model eagerly
compiles every initialiser for every new shape, which costs seconds on CPU and tests nothing here.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfd_jax.models import GPT, GPTConfig

VOCAB = 97
CONTEXT = 64


def random_gpt(cfg: GPTConfig, seed: int = 0, std: float = 0.1) -> GPT:
    """A ``GPT`` with every parameter drawn from N(0, std^2) (norm scales from N(1, std^2))."""
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    rng = np.random.default_rng(seed)

    def fill(path, x):
        base = 1.0 if path[-1] == "scale" else 0.0
        return jnp.asarray((base + rng.normal(0.0, std, x.shape)).astype(x.dtype))

    params = nnx.from_flat_state([(path, v.replace(fill(path, v.get_value()))) for path, v in nnx.to_flat_state(params)])

    def concrete(x):  # dropout streams: a key and a counter each
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        return jnp.zeros(x.shape, x.dtype)

    return nnx.merge(graphdef, params, jax.tree.map(concrete, rest))


@pytest.fixture(scope="session")
def make_gpt():
    return random_gpt


@pytest.fixture(scope="session")
def tiny_cfg() -> GPTConfig:
    # An untied head; dropout is on so every test also checks that generation switches it off.
    return GPTConfig.preset("tiny", vocab_size=VOCAB, context_length=CONTEXT, tie_embeddings=False, dropout=0.1)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> GPT:
    """A GPT-2-style tiny model with random weights, left in training mode (never call ``.eval()`` on it)."""
    return random_gpt(tiny_cfg)
