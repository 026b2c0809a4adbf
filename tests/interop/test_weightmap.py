"""The declarative weight map on its own: transforms, shape checks, missing/unexpected keys, heads that
keep a fresh initialisation. A toy module, numpy tensors; no torch."""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfd_jax.interop import weightmap
from tfd_jax.interop.weightmap import TRANSPOSE, entry, reshape, split


class Toy(nnx.Module):
    """q/k/v kernels [4, 2], [4, 1], [4, 1] (fused in the checkpoint), a per-head table [2, 3] and a head."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.q = nnx.Param(jnp.zeros((4, 2)))
        self.k = nnx.Param(jnp.zeros((4, 1)))
        self.v = nnx.Param(jnp.zeros((4, 1)))
        self.table = nnx.Param(jnp.zeros((2, 3)))
        self.head = nnx.Param(jax_normal(rngs, (4, 5)))


def jax_normal(rngs, shape):
    return nnx.initializers.normal(1.0)(rngs.params(), shape)


ENTRIES = [
    # torch layout [out, in] = [4, 4]: transposed, then split 2 + 1 + 1 along the output axis.
    entry("attn.qkv.weight", (4, 4), [("q",), ("k",), ("v",)], TRANSPOSE, split(3, axis=-1, sizes=(2, 1, 1))),
    entry("table", (6,), ("table",), reshape((2, 3))),
    entry("head.weight", (5, 4), ("head",), TRANSPOSE, optional="output head"),
]


def stored():
    rng = np.random.default_rng(0)
    return {
        "attn.qkv.weight": rng.standard_normal((4, 4)).astype(np.float32),
        "table": np.arange(6, dtype=np.float32),
        "head.weight": rng.standard_normal((5, 4)).astype(np.float32),
    }


def loaders(tensors):
    return {k: (lambda v=v: v) for k, v in tensors.items()}


def build():
    return Toy(rngs=nnx.Rngs(0))


def test_load_applies_transforms_and_save_inverts_them():
    tensors = stored()
    model = weightmap.load(ENTRIES, loaders(tensors), build)
    fused = tensors["attn.qkv.weight"].T  # [in, out]
    np.testing.assert_array_equal(np.asarray(model.q[...]), fused[:, :2])
    np.testing.assert_array_equal(np.asarray(model.v[...]), fused[:, 3:])
    np.testing.assert_array_equal(np.asarray(model.table[...]), [[0, 1, 2], [3, 4, 5]])
    back = weightmap.save(ENTRIES, model)
    assert back.keys() == tensors.keys()
    for key in tensors:
        np.testing.assert_array_equal(back[key], tensors[key], err_msg=key)


def test_optional_entries_keep_the_models_own_init_with_a_warning():
    tensors = stored()
    del tensors["head.weight"]
    with pytest.warns(UserWarning, match=r"ckpt has no output head \(head\.weight\): .*fresh random initialisation"):
        model = weightmap.load(ENTRIES, loaders(tensors), build, origin="ckpt")
    np.testing.assert_array_equal(np.asarray(model.head[...]), np.asarray(build().head[...]))
    two_part = [*ENTRIES, entry("head.bias", (5,), ("head_bias",), optional="output head")]
    with pytest.raises(ValueError, match=r"the output head is incomplete, 1 tensor\(s\) missing: head\.bias"):
        weightmap.load(two_part, loaders(stored()), build)


def test_errors_name_the_key():
    tensors = stored()
    with pytest.raises(ValueError, match=r"ckpt: 1 tensor\(s\) missing from the checkpoint: table"):
        weightmap.load(ENTRIES, loaders({k: v for k, v in tensors.items() if k != "table"}), build, origin="ckpt")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) extra; the model has no such weights"):
        weightmap.load(ENTRIES, loaders({**tensors, "extra": np.zeros(1)}), build, origin="ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weightmap.load(ENTRIES, loaders({**tensors, "extra": np.zeros(1)}), build, ignore=lambda k: k == "extra")
    with pytest.raises(ValueError, match=r"table has shape \(7,\), but config.json \(n=6\) says \(6,\)"):
        weightmap.load(ENTRIES, loaders({**tensors, "table": np.zeros(7)}), build, shape_hint=" (n=6)")


def test_a_map_that_does_not_fit_the_model_is_a_bug():
    tensors = stored()
    with pytest.raises(AssertionError, match=r"leaves parameters of the Toy unset: \[\('table',\)\]"):
        weightmap.load([e for e in ENTRIES if e.key != "table"], loaders({**tensors, "table": None}), build,
                       ignore=lambda k: k == "table")  # fmt: skip
    wrong = [entry("attn.qkv.weight", (4, 4), [("q",), ("k",), ("v",)], split(3, sizes=(1, 2, 1))), *ENTRIES[1:]]
    with pytest.raises(AssertionError, match=r"gives \('q',\) shape \(4, 1\), the Toy has \(4, 2\)"):
        weightmap.load(wrong, loaders(tensors), build)  # checked before any tensor is read
    with pytest.raises(AssertionError, match=r"targets \('nope',\)"):
        weightmap.save([*ENTRIES, entry("x", (1,), ("nope",))], weightmap.load(ENTRIES, loaders(tensors), build))


def test_check_tied():
    a = np.ones((2, 3), np.float32)
    weightmap.check_tied(loaders({"copy": a, "w": a}), "copy", "w", origin="o", why="tied.")
    weightmap.check_tied(loaders({"w": a}), "copy", "w", origin="o", why="tied.")  # absent copy: fine
    with pytest.raises(ValueError, match=r"o: copy differs from w \(max abs difference 0\.5\)\. tied\."):
        weightmap.check_tied(loaders({"copy": a + 0.5, "w": a}), "copy", "w", origin="o", why="tied.")
