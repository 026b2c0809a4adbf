"""Parity with Hugging Face GPT-2: a tiny random model, no downloads.

torch and transformers are test extras, so they are imported here and the module is skipped without
them.
"""
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from tfd_jax.interop import gpt2_config_from_hf, load_hf_gpt2, save_hf_gpt2  # noqa: E402
from tfd_jax.models import GPT, GPTConfig  # noqa: E402

V, T = 101, 16
SIZES = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=V)


def make_hf(randomize_ln: bool = True, **config):
    """A tiny GPT2LMHeadModel in eval mode; LayerNorms get random weights if asked (HF starts them at 1/0)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{**SIZES, **config}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    if randomize_ln:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.3)
                    module.bias.normal_(0.0, 0.3)
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def our_logits(model: GPT, tokens: np.ndarray) -> np.ndarray:
    # Jitted, so models with the same config share one compilation.
    return np.asarray(_forward(model, jnp.asarray(tokens)))


def flat_params(model: GPT) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, V, size=(2, T)).astype(np.int64)


@pytest.fixture(scope="module")
def hf_model():
    """Shared by the tests that only read it (the others build their own)."""
    return make_hf()


@pytest.fixture(scope="module")
def native_model():
    """A GPT-2-shaped ``GPT`` whose weights come from our side, not from a Hugging Face model.

    Filled from numpy (quicker than running the initialisers) with non-trivial norms and biases, so a
    swapped scale/bias or q/k/v would show.
    """
    cfg = GPTConfig.preset("gpt2", vocab_size=V, context_length=64, d_model=32, num_heads=4, num_layers=2)
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(2)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        shape = var.get_value().shape
        if path[-1] == "scale":
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            value = (0.3 if path[-1] == "bias" else 0.1) * rng.standard_normal(shape)
        var.set_value(jnp.asarray(value, jnp.float32))
    nnx.update(model, state)
    model.eval()
    return model


# -- Hugging Face -> ours -----------------------------------------------------------------------------


@pytest.mark.parametrize("randomize_ln", [False, True])
def test_from_torch_object_matches_logits(tokens, hf_model, randomize_ln):
    hf = hf_model if randomize_ln else make_hf(randomize_ln=False)
    model = load_hf_gpt2(hf)
    assert model.config.d_model == 32 and model.config.num_layers == 2 and model.config.vocab_size == V
    diff = np.max(np.abs(our_logits(model, tokens) - hf_logits(hf, tokens)))
    assert diff < 1e-4, diff


def test_from_save_pretrained_dir_without_torch(tokens, hf_model, tmp_path, monkeypatch):
    hf_model.save_pretrained(tmp_path)
    # Reading model.safetensors must not touch torch, transformers or the Hub client.
    for name in ("torch", "transformers", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, name, None)
    model = load_hf_gpt2(tmp_path)
    monkeypatch.undo()
    assert np.max(np.abs(our_logits(model, tokens) - hf_logits(hf_model, tokens))) < 1e-4


def test_unprefixed_keys_with_mask_buffers_and_torch_bin(tokens, hf_model, tmp_path):
    """The original "gpt2" upload: keys without "transformer.", causal-mask buffers, a PyTorch pickle."""
    state = {
        k.removeprefix("transformer."): v.clone() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"
    }
    for i in range(SIZES["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    for d in ("st", "bin"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    save_file({k: v.numpy() for k, v in state.items()}, str(tmp_path / "st" / "model.safetensors"))
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    expected = hf_logits(hf_model, tokens)
    for d in ("st", "bin"):
        model = load_hf_gpt2(tmp_path / d)
        assert np.max(np.abs(our_logits(model, tokens) - expected)) < 1e-4, d


def test_non_default_ffn_width_and_activation(tokens):
    hf = make_hf(n_inner=48, activation_function="relu")
    model = load_hf_gpt2(hf)
    assert model.config.d_ff == 48 and model.config.activation == "relu"
    assert np.max(np.abs(our_logits(model, tokens) - hf_logits(hf, tokens))) < 1e-4


def test_bfloat16_load_rounds_each_weight_once(hf_model):
    model = load_hf_gpt2(hf_model, dtype="bfloat16", compute_dtype="float32")
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "float32"
    params = flat_params(model)
    assert {v.dtype for v in params.values()} == {np.dtype(jnp.bfloat16)}
    wte = hf_model.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(params[("tok_embed", "embedding")], wte.astype(jnp.bfloat16))


def test_dropout_override_builds_working_rng_state(tokens, hf_model):
    model = load_hf_gpt2(hf_model, dropout=0.5)
    model.train()
    first, second = our_logits(model, tokens), our_logits(model, tokens)
    assert np.all(np.isfinite(first))
    assert np.max(np.abs(first - hf_logits(hf_model, tokens))) > 1e-2  # dropout really on...
    assert np.max(np.abs(first - second)) > 1e-2  # ...with a key that advances between calls


def test_hub_name_goes_through_snapshot_download(tokens, hf_model, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hf_model.save_pretrained(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path.parent)  # no local directory called "someone/tiny-gpt2"
    model = load_hf_gpt2("someone/tiny-gpt2")
    assert calls == ["someone/tiny-gpt2"]
    assert np.max(np.abs(our_logits(model, tokens) - hf_logits(hf_model, tokens))) < 1e-4


def test_scan_layers_load_and_save(tokens, hf_model, tmp_path):
    """``scan_layers=True`` loads into stacked blocks with the same logits, and saving such a model
    writes the ordinary per-layer checkpoint."""
    model = load_hf_gpt2(hf_model, scan_layers=True)
    assert model.config.scan_layers and model.blocks.attn.q.kernel.shape == (2, 32, 32)
    assert np.max(np.abs(our_logits(model, tokens) - hf_logits(hf_model, tokens))) < 1e-4
    save_hf_gpt2(model, tmp_path / "ckpt")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


# -- ours -> Hugging Face -----------------------------------------------------------------------------


def test_save_then_transformers_from_pretrained(tokens, native_model, tmp_path):
    save_hf_gpt2(native_model, tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied on load
    diff = np.max(np.abs(hf_logits(hf, tokens) - our_logits(native_model, tokens)))
    assert diff < 1e-4, diff


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_save_other_activations_and_ffn_width(tokens, tmp_path, activation):
    hf_act = {"gelu": "gelu", "relu": "relu"}[activation]
    original = make_hf(n_inner=48, activation_function=hf_act)
    model = load_hf_gpt2(original)
    assert model.config.activation == activation
    save_hf_gpt2(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["n_inner"] == 48 and config["activation_function"] == hf_act
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ckpt").eval()
    assert np.max(np.abs(hf_logits(reloaded, tokens) - hf_logits(original, tokens))) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_exact(native_model, hf_model, tmp_path, dtype):
    model = native_model if dtype == "float32" else load_hf_gpt2(hf_model, dtype=dtype)
    save_hf_gpt2(model, tmp_path / "ckpt")
    back = load_hf_gpt2(tmp_path / "ckpt", dtype=dtype)
    fields = ("vocab_size", "context_length", "d_model", "num_heads", "num_layers", "d_ff", "norm_eps", "activation")
    for field in fields:
        assert getattr(back.config, field) == getattr(model.config, field), field
    before, after = flat_params(model), flat_params(back)
    assert before.keys() == after.keys()
    for path in before:
        assert after[path].dtype == np.dtype(dtype), path
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))


def test_save_refuses_non_gpt2_models(tmp_path):
    # Shapes only: refusing needs the config, not initialised weights.
    course = nnx.eval_shape(lambda: GPT(GPTConfig.preset("course", vocab_size=50, context_length=16), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="norm_position='post'.*positions='sinusoidal'.*tie_embeddings=False"):
        save_hf_gpt2(course, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    gated_cfg = GPTConfig.preset("tiny", gated_ffn=True, activation="silu")
    gated = nnx.eval_shape(lambda: GPT(gated_cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="gated_ffn"):
        save_hf_gpt2(gated, tmp_path / "ckpt")


def test_save_refuses_non_empty_directory_unless_overwrite(native_model, tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me?")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf_gpt2(native_model, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    save_hf_gpt2(native_model, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging or set-aside folders left


# -- errors -----------------------------------------------------------------------------------------


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_gpt2(tmp_path)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SIZES))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_hf_gpt2(tmp_path)


@pytest.mark.parametrize(
    "option,match",
    [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"activation_function": "quick_gelu"}, "activation_function='quick_gelu'"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"model_type": "gpt_neo"}, "model_type 'gpt_neo'"),
    ],
)
def test_unsupported_config_option(tmp_path, option, match):
    make_hf().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **option}))
    with pytest.raises(ValueError, match=match):
        load_hf_gpt2(tmp_path)


def test_reorder_and_upcast_attn_is_accepted():
    cfg = gpt2_config_from_hf({**SIZES, "model_type": "gpt2", "reorder_and_upcast_attn": True})
    assert cfg.d_model == 32 and cfg.norm_position == "pre" and cfg.tie_embeddings


def _rewrite_weights(directory, edit):
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_shape_mismatch_names_the_key(tmp_path):
    make_hf().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"transformer.h.1.mlp.c_fc.weight": np.zeros((32, 100), np.float32)}))
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \(32, 100\).*\(32, 128\)"):
        load_hf_gpt2(tmp_path)


def test_config_and_weights_disagree(tmp_path):
    make_hf().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_positions": 32}))
    with pytest.raises(ValueError, match=r"transformer\.wpe\.weight has shape \(64, 32\).*\(32, 32\)"):
        load_hf_gpt2(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    make_hf().save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("transformer.ln_f.bias"))
    with pytest.raises(ValueError, match=r"missing.*transformer\.ln_f\.bias"):
        load_hf_gpt2(tmp_path)
    extra = {"transformer.ln_f.bias": np.zeros(32, np.float32), "score.weight": np.zeros((2, 32), np.float32)}
    _rewrite_weights(tmp_path, lambda t: t.update(extra))
    with pytest.raises(ValueError, match=r"unexpected.*score\.weight"):
        load_hf_gpt2(tmp_path)


def test_untied_lm_head_is_refused():
    hf = make_hf()  # its own copy: the head is replaced below
    hf.lm_head.weight = torch.nn.Parameter(hf.transformer.wte.weight.detach().clone() + 0.5)
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from transformer\.wte\.weight.*0\.5"):
        load_hf_gpt2(hf)


def test_hub_errors_are_clear(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not fetch 'gpt2' from the Hugging Face Hub.*unreachable"):
        load_hf_gpt2("gpt2")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="needs the huggingface_hub package"):
        load_hf_gpt2("gpt2")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf_gpt2(tmp_path / "nowhere")


def test_bad_load_options():
    with pytest.raises(TypeError, match="num_layers"):
        load_hf_gpt2(make_hf(), num_layers=3)
    with pytest.raises(ValueError, match="scan_layers must be True or False"):
        load_hf_gpt2(make_hf(), scan_layers="no")
