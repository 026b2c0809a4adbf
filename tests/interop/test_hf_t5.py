"""Parity with Hugging Face T5 v1.0 and v1.1: tiny random models, a padded source batch, no downloads.

v1.0 has a ReLU FFN and the head tied to the token table (scaled by ``d_model**-0.5``); v1.1 a gated
GELU FFN and a head of its own. Both have 2 encoder and 3 decoder layers and 8 relative-position
buckets up to distance 20 (see ``interop/hf_tiny.py``). torch and transformers are test extras.
"""
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from interop.hf_tiny import T5_SIZES, ragged_eos, seq2seq_batch, tiny_t5, until_eos  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from tfd_jax.decode import generate  # noqa: E402
from tfd_jax.interop import load_hf_t5, save_hf_t5, t5_config_from_hf  # noqa: E402
from tfd_jax.models import count_params  # noqa: E402
from tfd_jax.models.seq2seq import EncoderDecoder, Seq2SeqConfig  # noqa: E402

VERSIONS = ["v1_0", "v1_1"]
L, LD = T5_SIZES["num_layers"], T5_SIZES["num_decoder_layers"]
N_NEW = 12


@nnx.jit
def _forward(model, src, mask, tgt):
    memory, enc = model.encode(src, src_padding_mask=mask, all_layers=True)
    h, dec = model.decode(tgt, memory, src_padding_mask=mask, all_layers=True)
    return {"logits": model.logits(h), "memory": memory, "enc": enc, "h": h, "dec": dec}


def our_outputs(model, batch) -> dict:
    src, mask, tgt = batch
    out = _forward(model, jnp.asarray(src), jnp.asarray(mask == 1), jnp.asarray(tgt))
    return jax_to_numpy(out)


def jax_to_numpy(tree):
    return {k: [np.asarray(s) for s in v] if isinstance(v, list) else np.asarray(v) for k, v in tree.items()}


def hf_outputs(model, batch):
    src, mask, tgt = (torch.from_numpy(a) for a in batch)
    with torch.no_grad():
        return model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_hidden_states=True)


def flat_params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    a, b = flat_params(a), flat_params(b)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


@pytest.fixture(scope="module")
def hf():
    return {"v1_0": tiny_t5(), "v1_1": tiny_t5(v1_1=True)}


@pytest.fixture(scope="module")
def ours(hf):
    return {v: load_hf_t5(m) for v, m in hf.items()}


@pytest.fixture(scope="module")
def batch():
    return seq2seq_batch(pad=0, start=0)


@pytest.fixture(scope="module")
def got(ours, batch):
    return {v: our_outputs(m, batch) for v, m in ours.items()}


@pytest.fixture(scope="module")
def expected(hf, batch):
    return {v: hf_outputs(m, batch) for v, m in hf.items()}


# -- Hugging Face -> ours -----------------------------------------------------------------------------


def test_config(ours):
    for v, model in ours.items():
        cfg = model.config
        assert (cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff) == (32, 4, 8, 48)
        assert (cfg.num_layers, cfg.num_decoder_layers) == (L, LD) and len(model.decoder.blocks) == LD
        assert (cfg.relative_buckets, cfg.relative_max_distance) == (8, 20)
        assert model.encoder.rel_bias.embedding.shape == (8, 4)
        assert (cfg.pad_id, cfg.eos_id, cfg.decoder_start_id, cfg.dropout) == (0, 1, 0, 0.0)
        assert cfg.norm == "rmsnorm" and cfg.attn_scale == 1.0 and not cfg.qkv_bias
    v10, v11 = ours["v1_0"].config, ours["v1_1"].config
    assert (v10.activation, v10.gated_ffn, v10.tie_embeddings, v10.head_scale) == ("relu", False, True, True)
    assert (v11.activation, v11.gated_ffn, v11.tie_embeddings, v11.head_scale) == ("gelu_tanh", True, False, False)
    assert ours["v1_0"].lm_head is None and ours["v1_1"].lm_head.kernel.shape == (32, 99)


@pytest.mark.parametrize("version", VERSIONS)
def test_logits_on_a_padded_batch(got, expected, batch, version):
    assert not (batch[1] == 1).all()  # the sources really are padded
    diff = np.max(np.abs(got[version]["logits"] - expected[version].logits.numpy()))
    assert diff < 1e-4, diff


@pytest.mark.parametrize("version", VERSIONS)
def test_every_layer_hidden_states(got, expected, batch, version):
    """Hugging Face's last state of each stack is after its final norm: our memory / decoder output."""
    real = batch[1] == 1
    ours, theirs = got[version], expected[version]
    enc = ours["enc"][:L] + [ours["memory"]]
    assert len(enc) == len(theirs.encoder_hidden_states) == L + 1
    for i, (a, b) in enumerate(zip(enc, theirs.encoder_hidden_states)):
        assert np.max(np.abs(a[real] - b.numpy()[real])) < 1e-4, ("encoder", i)
    dec = ours["dec"][:LD] + [ours["h"]]
    assert len(dec) == len(theirs.decoder_hidden_states) == LD + 1
    for i, (a, b) in enumerate(zip(dec, theirs.decoder_hidden_states)):
        assert np.max(np.abs(a - b.numpy())) < 1e-4, ("decoder", i)


@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_generate_equals_hf_generate(hf, ours, batch, version):
    src, mask, _ = batch
    model = hf[version]

    def hf_greedy(eos):
        with torch.no_grad():
            # No KV cache: transformers 5.x sizes T5's generation cache by num_layers, so a decoder
            # deeper than the encoder (3 > 2 here) fails with it. Recomputing is the same greedy path.
            out = model.generate(torch.from_numpy(src), attention_mask=torch.from_numpy(mask), do_sample=False,
                                 num_beams=1, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0,
                                 decoder_start_token_id=0, no_repeat_ngram_size=0, min_length=0, use_cache=False)
        assert (out[:, 0] == 0).all()  # each row starts from decoder_start_token_id
        return out[:, 1:].numpy()

    eos = ragged_eos(hf_greedy(None))
    reference = [until_eos(row, eos) for row in hf_greedy(eos)]
    assert len({len(r) for r in reference}) > 1  # the rows end at different steps
    sources = [row[m == 1].tolist() for row, m in zip(src, mask)]
    tokens, lengths = generate(ours[version], None, N_NEW, source=sources, eos_id=eos)
    assert lengths.tolist() == [len(r) for r in reference]
    for b, r in enumerate(reference):
        assert tokens[b, : lengths[b]].tolist() == r, b


def test_scan_layers_gives_the_same_logits(hf, got, batch):
    scanned = load_hf_t5(hf["v1_0"], scan_layers=True)
    assert scanned.config.scan_layers
    np.testing.assert_allclose(our_outputs(scanned, batch)["logits"], got["v1_0"]["logits"], atol=1e-5)


def test_load_options(hf):
    """Only what leaves the weights' meaning alone may be set; T5's context length is one of those."""
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['d_model'\]"):
        load_hf_t5(hf["v1_0"], d_model=64)
    model = load_hf_t5(hf["v1_0"], dtype="bfloat16", context_length=64)
    assert model.config.context_length == 64 and model.tok_embed.embedding.dtype == jnp.bfloat16
    assert t5_config_from_hf({**T5_SIZES, "n_positions": 256}).context_length == 256


def test_from_save_pretrained_dir_without_torch(hf, ours, tmp_path, monkeypatch):
    hf["v1_1"].save_pretrained(tmp_path)
    for name in ("torch", "transformers", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, name, None)
    model = load_hf_t5(tmp_path)
    monkeypatch.undo()
    assert_same_params(model, ours["v1_1"])


# -- ours -> Hugging Face -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_save_then_from_pretrained(hf, ours, expected, batch, version, tmp_path):
    save_hf_t5(ours[version], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["feed_forward_proj"] == ("gated-gelu" if version == "v1_1" else "relu")
    assert config["scale_decoder_outputs"] == config["tie_word_embeddings"] == (version == "v1_0")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (version == "v1_1") and "encoder.embed_tokens.weight" not in stored
    assert stored["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (8, 4)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    assert (reloaded.lm_head.weight is reloaded.shared.weight) == (version == "v1_0")
    np.testing.assert_array_equal(hf_outputs(reloaded, batch).logits.numpy(), expected[version].logits.numpy())
    assert_same_params(load_hf_t5(tmp_path / "ckpt"), ours[version])


def test_head_forms_of_both_transformers_generations(hf, ours, batch, tmp_path):
    """4.x configs say v1.1 with ``tie_word_embeddings=False``; 5.x with ``scale_decoder_outputs=False``
    (and ``tie_word_embeddings=True``). An unscaled head without ``lm_head.weight`` is the token table."""
    hf["v1_1"].save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] and not config["scale_decoder_outputs"]  # what 5.x writes
    old = {k: v for k, v in config.items() if k != "scale_decoder_outputs"}
    for form in (config, {**old, "tie_word_embeddings": False}):
        cfg = t5_config_from_hf(form)
        assert not cfg.tie_embeddings and not cfg.head_scale
    assert t5_config_from_hf(old).head_scale  # 4.x: tie_word_embeddings=True is v1.0's scaled head

    path = str(tmp_path / "model.safetensors")
    write = lambda tensors: save_file(tensors, path, metadata={"format": "pt"})  # noqa: E731
    state = load_file(path)
    write({k: v for k, v in state.items() if k != "lm_head.weight"})
    tied = load_hf_t5(tmp_path)
    assert (tied.config.tie_embeddings, tied.config.head_scale, tied.lm_head) == (True, False, None)
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reference.lm_head.weight is reference.shared.weight
    diff = np.max(np.abs(our_outputs(tied, batch)["logits"] - hf_outputs(reference, batch).logits.numpy()))
    assert diff < 1e-4 * T5_SIZES["d_model"] ** 0.5, diff  # unscaled: these logits are sqrt(M) times larger

    (tmp_path / "config.json").write_text(json.dumps({**config, "scale_decoder_outputs": True}))
    write(state)  # a scaled head with weights of its own
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from shared\.weight.*scale_decoder_outputs"):
        load_hf_t5(tmp_path)


def test_save_refuses_models_without_a_t5_form(tmp_path):
    bart = nnx.eval_shape(lambda: EncoderDecoder(Seq2SeqConfig.preset("bart-tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="norm='layernorm'.*norm_position='post'.*positions='learned'.*logits_bias"):
        save_hf_t5(bart, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("preset", ["t5-small", "t5-v1_1-small"])
def test_preset_parameter_counts_equal_transformers(preset):
    hf_config = dict(
        t5_small=transformers.T5Config(),  # T5Config's defaults are t5-small's
        t5_v1_1_small=transformers.T5Config(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                                            feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    )[preset.replace("-", "_")]
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(hf_config)
        if not hf_config.scale_decoder_outputs:  # 5.x ties every new T5's head; a v1.1 checkpoint unties it
            model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    ours = nnx.eval_shape(lambda: EncoderDecoder(Seq2SeqConfig.preset(preset), rngs=nnx.Rngs(0)))
    assert count_params(ours) == model.num_parameters()
    assert t5_config_from_hf(hf_config.to_dict()) == Seq2SeqConfig.preset(preset, dropout=0.0)


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'"),
        ({"feed_forward_proj": "gelu"}, "feed_forward_proj='gelu'"),
        ({"feed_forward_proj": "relu", "is_gated_act": True}, "is_gated_act=True"),
        ({"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu"}, "dense_act_fn='gelu'"),
        ({"is_decoder": True}, "is_decoder=True"),
        ({"is_encoder_decoder": False}, "is_encoder_decoder=False"),
        ({"eos_token_id": [1, 2]}, r"eos_token_id=\[1, 2\]"),
        ({"model_type": "mt5"}, "model_type 'mt5'"),
    ],
)
def test_unsupported_config_option(changes, match):
    with pytest.raises(ValueError, match=match):
        t5_config_from_hf({**T5_SIZES, "model_type": "t5", **changes})


def test_missing_shape_unexpected_and_tied_copy_errors(hf, ours, tmp_path):
    hf["v1_0"].save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    original = load_file(path)

    def write(tensors):
        save_file(tensors, path, metadata={"format": "pt"})

    key = "decoder.block.2.layer.2.DenseReluDense.wo.weight"
    write({k: v for k, v in original.items() if k != key})
    with pytest.raises(ValueError, match=rf"missing.*{key}"):
        load_hf_t5(tmp_path)
    write({**original, "encoder.block.1.layer.1.DenseReluDense.wi.weight": np.zeros((40, 32), np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi\.weight has shape "
                                         r"\(40, 32\).*d_ff=48.*\(48, 32\)"):  # fmt: skip
        load_hf_t5(tmp_path)
    write({**original, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": np.zeros((48, 32), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected.*wi_0\.weight.*feed_forward_proj='relu'"):
        load_hf_t5(tmp_path)
    write({**original, "encoder.embed_tokens.weight": original["shared.weight"] + 1.0})
    with pytest.raises(ValueError, match=r"encoder\.embed_tokens\.weight differs from shared\.weight"):
        load_hf_t5(tmp_path)
    # The table under a tied name only, and the unused cross-attention bias table, still load.
    unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    write({**{k: v for k, v in original.items() if k != "shared.weight"},
           "decoder.embed_tokens.weight": original["shared.weight"], unused: np.zeros((8, 4), np.float32)})
    assert_same_params(load_hf_t5(tmp_path), ours["v1_0"])
