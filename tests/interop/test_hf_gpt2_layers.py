"""GPT-2 layer by layer: every block's output equals Hugging Face's ``output_hidden_states``.

The logits tests in ``test_hf_gpt2.py`` would pass with two errors that cancel out; this one checks
the embeddings and each block on their own. torch and transformers are test extras.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from interop.hf_tiny import GPT2_SIZES, tiny_gpt2  # noqa: E402

from tfd_jax.interop import load_hf_gpt2  # noqa: E402


@nnx.jit
def _layers(model, tokens):
    """The blocks' input (embeddings), then each block's output; the last after the final norm, as
    Hugging Face reports it."""
    x = model.embed(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
    _, states = model.hidden_states(x, all_layers=True)
    return states[:-1] + [model.final_norm(states[-1])]


def test_every_layer_matches_output_hidden_states():
    hf = tiny_gpt2()
    tokens = np.random.default_rng(0).integers(0, GPT2_SIZES["vocab_size"], size=(2, 16)).astype(np.int64)
    with torch.no_grad():
        theirs = [h.numpy() for h in hf(torch.from_numpy(tokens), output_hidden_states=True).hidden_states]
    ours = [np.asarray(h) for h in _layers(load_hf_gpt2(hf), jnp.asarray(tokens))]
    assert len(ours) == len(theirs) == GPT2_SIZES["n_layer"] + 1
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.max(np.abs(a - b)) < 1e-4, i
