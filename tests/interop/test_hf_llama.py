"""Parity with Hugging Face Llama and Qwen2: tiny random models, no downloads.

Llama here has grouped-query attention (4 query heads, 2 key/value heads) and an untied head; Qwen2
adds Q/K/V biases and ties its head, as Qwen2-0.5B does. torch and transformers are test extras.
"""
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from interop.hf_tiny import LLAMA_SIZES, tiny_llama  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from tfd_jax.decode import generate  # noqa: E402
from tfd_jax.interop import llama_config_from_hf, load_hf_llama, save_hf_llama  # noqa: E402
from tfd_jax.models import GPT, GPTConfig  # noqa: E402

V, T = LLAMA_SIZES["vocab_size"], 16
PROMPTS = [[5, 17, 3], [8, 1, 2, 3, 4, 5, 6, 7, 9], [42, 42, 11, 60, 2]]
N_NEW = 12


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


def our_logits(model: GPT, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(tokens)))


@nnx.jit
def _layers(model, tokens):
    """The input to the blocks, then each block's output, the last one after the final norm."""
    x = model.embed(tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
    _, states = model.hidden_states(x, all_layers=True)
    return states[:-1] + [model.final_norm(states[-1])]


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def flat_params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, V, size=(2, T)).astype(np.int64)


@pytest.fixture(scope="module")
def hf_llama():
    return tiny_llama("llama")


@pytest.fixture(scope="module")
def hf_qwen2():
    return tiny_llama("qwen2", seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama(hf_llama):
    return load_hf_llama(hf_llama)


@pytest.fixture(scope="module")
def qwen2(hf_qwen2):
    return load_hf_llama(hf_qwen2)


# -- Hugging Face -> ours -----------------------------------------------------------------------------


def test_llama_config_and_logits(llama, hf_llama, tokens):
    cfg = llama.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff) == (4, 2, 16, 96)
    assert cfg.norm == "rmsnorm" and cfg.positions == "rope" and cfg.gated_ffn and cfg.activation == "silu"
    assert cfg.rope_base == 1000.0 and not cfg.tie_embeddings and not cfg.qkv_bias
    assert llama.blocks[0].attn.k.kernel.shape == (64, 32)  # [M, Hkv*D]
    diff = np.max(np.abs(our_logits(llama, tokens) - hf_logits(hf_llama, tokens)))
    assert diff < 1e-4, diff


def test_llama_hidden_states_per_layer(llama, hf_llama, tokens):
    """Every layer agrees, not just the logits. Hugging Face's last state is after the final norm."""
    with torch.no_grad():
        theirs = [h.numpy() for h in hf_llama(torch.from_numpy(tokens), output_hidden_states=True).hidden_states]
    ours = [np.asarray(h) for h in _layers(llama, jnp.asarray(tokens))]
    assert len(ours) == len(theirs) == LLAMA_SIZES["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.max(np.abs(a - b)) < 1e-4, i


def test_llama_greedy_generate_equals_hf_generate(llama, hf_llama):
    def hf_greedy(prompt):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                                    pad_token_id=0)
        return out[0, len(prompt):].tolist()

    reference = np.array([hf_greedy(p) for p in PROMPTS])
    assert len(set(reference.ravel().tolist())) > 6, "degenerate reference; change the seed"
    tokens, lengths = generate(llama, PROMPTS, N_NEW)  # one ragged batch; HF ran row by row
    np.testing.assert_array_equal(lengths, [N_NEW] * len(PROMPTS))
    np.testing.assert_array_equal(tokens, reference)


def test_qwen2_biases_tied_head_and_logits(qwen2, hf_qwen2, tokens):
    cfg = qwen2.config
    assert cfg.qkv_bias and not cfg.out_bias and cfg.tie_embeddings and qwen2.lm_head is None
    attn = qwen2.blocks[1].attn
    assert attn.q.bias is not None and attn.k.bias.shape == (32,) and attn.o.bias is None
    theirs = hf_qwen2.model.layers[1].self_attn.v_proj.bias.detach().numpy()
    np.testing.assert_array_equal(np.asarray(attn.v.bias[...]), theirs)
    diff = np.max(np.abs(our_logits(qwen2, tokens) - hf_logits(hf_qwen2, tokens)))
    assert diff < 1e-4, diff


def test_from_save_pretrained_dir_without_torch(hf_llama, llama, tmp_path, monkeypatch):
    hf_llama.save_pretrained(tmp_path)
    for name in ("torch", "transformers", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, name, None)
    model = load_hf_llama(tmp_path)
    monkeypatch.undo()
    before, after = flat_params(llama), flat_params(model)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))


# -- ours -> Hugging Face -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_then_from_pretrained(request, family, tokens, tmp_path):
    model, original = request.getfixturevalue(family), request.getfixturevalue(f"hf_{family}")
    save_hf_llama(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == family and config["num_key_value_heads"] == 2
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (family == "llama")
    assert ("model.layers.0.self_attn.q_proj.bias" in stored) == (family == "qwen2")
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    reloaded = cls.from_pretrained(tmp_path / "ckpt").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(original, tokens))
    back = load_hf_llama(tmp_path / "ckpt")
    before, after = flat_params(model), flat_params(back)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))


def test_save_refuses_non_llama_models(tmp_path):
    gpt2 = nnx.eval_shape(lambda: GPT(GPTConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="norm='layernorm'.*positions='learned'.*gated_ffn=False"):
        save_hf_llama(gpt2, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# -- errors -----------------------------------------------------------------------------------------


def _hf_config(**changes) -> dict:
    return {**LLAMA_SIZES, "model_type": "llama", **changes}


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling=.*llama3"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
         "rope_parameters.rope_type='linear'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
         r"use_sliding_window=True.*layer\(s\) \[1\]"),
        ({"model_type": "mistral"}, "model_type 'mistral'"),
    ],
)
def test_unsupported_config_option(changes, match):
    with pytest.raises(ValueError, match=match):
        llama_config_from_hf(_hf_config(**changes))


def test_config_defaults_and_accepted_options():
    cfg = llama_config_from_hf(_hf_config(num_key_value_heads=None, rope_scaling={"rope_type": "default"},
                                          rope_theta=5e5, head_dim=None))  # fmt: skip
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16 and cfg.rope_base == 5e5
    qwen = llama_config_from_hf(_hf_config(model_type="qwen2", use_sliding_window=True, sliding_window=8,
                                           max_window_layers=2))  # every layer below max_window_layers: full
    assert qwen.qkv_bias and not qwen.out_bias


def test_shape_mismatch_missing_and_unexpected_tensors(hf_llama, tmp_path):
    hf_llama.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    original = load_file(path)

    def write(tensors):
        save_file(tensors, path, metadata={"format": "pt"})

    write({**original, "model.layers.1.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight has shape \(64, 64\).*"
                                         r"num_key_value_heads=2.*\(32, 64\)"):  # fmt: skip
        load_hf_llama(tmp_path)
    write({k: v for k, v in original.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"missing.*lm_head\.weight"):
        load_hf_llama(tmp_path)
    write({**original, "model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.self_attn\.o_proj\.bias"):
        load_hf_llama(tmp_path)


def test_tied_head_that_differs_is_refused(hf_qwen2):
    state = {k: v.numpy() for k, v in hf_qwen2.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.5

    class Fake:  # a module-like source whose tied head was replaced
        config = hf_qwen2.config

        @staticmethod
        def state_dict():
            return {k: torch.from_numpy(v) for k, v in state.items()}

    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight.*0\.5"):
        load_hf_llama(Fake())
