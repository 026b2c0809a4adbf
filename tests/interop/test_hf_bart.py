"""Parity with Hugging Face BART: tiny random models, a padded source batch, no downloads.

The main model ties its head to the token table, as ``facebook/bart-base`` does; a second one has
``scale_embedding=True``, ReLU and a head of its own. Both have 2 encoder and 3 decoder layers and a
random ``final_logits_bias`` (see ``interop/hf_tiny.py``). torch and transformers are test extras.
"""
import json
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from interop.hf_tiny import BART_SIZES, ragged_eos, seq2seq_batch, tiny_bart, until_eos  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from tfd_jax.decode import generate  # noqa: E402
from tfd_jax.interop import bart_config_from_hf, load_hf_bart, save_hf_bart  # noqa: E402
from tfd_jax.models import count_params  # noqa: E402
from tfd_jax.models.seq2seq import EncoderDecoder, Seq2SeqConfig  # noqa: E402

KINDS = ["tied", "untied"]
L, LD = BART_SIZES["encoder_layers"], BART_SIZES["decoder_layers"]
PAD, EOS, START = 1, 2, 2
N_NEW = 12


@nnx.jit
def _forward(model, src, mask, tgt):
    memory, enc = model.encode(src, src_padding_mask=mask, all_layers=True)
    h, dec = model.decode(tgt, memory, src_padding_mask=mask, all_layers=True)
    return {"logits": model.logits(h), "memory": memory, "enc": enc, "h": h, "dec": dec}


def our_outputs(model, batch) -> dict:
    src, mask, tgt = batch
    out = _forward(model, jnp.asarray(src), jnp.asarray(mask == 1), jnp.asarray(tgt))
    return {k: [np.asarray(s) for s in v] if isinstance(v, list) else np.asarray(v) for k, v in out.items()}


def hf_outputs(model, batch):
    src, mask, tgt = (torch.from_numpy(a) for a in batch)
    with torch.no_grad():
        return model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt, output_hidden_states=True)


def flat_params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b, skip=()):
    a, b = flat_params(a), flat_params(b)
    assert a.keys() == b.keys()
    for path in a:
        if path not in skip:
            np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


@pytest.fixture(scope="module")
def hf():
    return {
        "tied": tiny_bart(),
        "untied": tiny_bart(seed=1, tie_word_embeddings=False, scale_embedding=True, activation_function="relu"),
    }


@pytest.fixture(scope="module")
def ours(hf):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # everything is in the checkpoint: nothing to warn about
        return {k: load_hf_bart(m) for k, m in hf.items()}


@pytest.fixture(scope="module")
def batch():
    return seq2seq_batch(pad=PAD, start=START)


@pytest.fixture(scope="module")
def got(ours, batch):
    return {k: our_outputs(m, batch) for k, m in ours.items()}


@pytest.fixture(scope="module")
def expected(hf, batch):
    return {k: hf_outputs(m, batch) for k, m in hf.items()}


# -- Hugging Face -> ours -----------------------------------------------------------------------------


def test_config(ours, hf):
    tied, untied = ours["tied"], ours["untied"]
    for model in (tied, untied):
        cfg = model.config
        assert (cfg.d_model, cfg.num_heads, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers) == (32, 4, 48, L, LD)
        assert (cfg.pad_id, cfg.eos_id, cfg.decoder_start_id, cfg.norm_eps, cfg.dropout) == (PAD, EOS, START, 1e-5, 0.0)
        assert cfg.positions == "learned" and cfg.position_offset == 2 and cfg.context_length == 40
        assert model.encoder.pos_embed.embedding.shape == (42, 32) and cfg.embed_norm and cfg.logits_bias
    assert (tied.config.activation, tied.config.scale_embeddings, tied.config.tie_embeddings) == ("gelu", False, True)
    assert (untied.config.activation, untied.config.scale_embeddings, untied.config.tie_embeddings) == ("relu", True,
                                                                                                       False)
    assert tied.lm_head is None and untied.lm_head.kernel.shape == (32, 99)
    theirs = hf["tied"].final_logits_bias.numpy()[0]
    assert np.abs(theirs).max() > 0.1  # random, not the zeros a missing bias would give
    np.testing.assert_array_equal(np.asarray(tied.final_logits_bias[...]), theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_logits_on_a_padded_batch(got, expected, batch, kind):
    assert not (batch[1] == 1).all()  # the sources really are padded
    diff = np.max(np.abs(got[kind]["logits"] - expected[kind].logits.numpy()))
    assert diff < 1e-4, diff


def test_every_layer_hidden_states(got, expected, batch):
    """BART has no final norm: Hugging Face's states are the embeddings (after their LayerNorm) and
    each layer's output, ours too."""
    real = batch[1] == 1
    ours, theirs = got["tied"], expected["tied"]
    assert len(ours["enc"]) == len(theirs.encoder_hidden_states) == L + 1
    for i, (a, b) in enumerate(zip(ours["enc"], theirs.encoder_hidden_states)):
        assert np.max(np.abs(a[real] - b.numpy()[real])) < 1e-4, ("encoder", i)
    np.testing.assert_array_equal(ours["enc"][-1], ours["memory"])
    assert len(ours["dec"]) == len(theirs.decoder_hidden_states) == LD + 1
    for i, (a, b) in enumerate(zip(ours["dec"], theirs.decoder_hidden_states)):
        assert np.max(np.abs(a - b.numpy())) < 1e-4, ("decoder", i)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_equals_hf_generate(hf, ours, batch, kind):
    src, mask, _ = batch
    model = hf[kind]

    def hf_greedy(eos):
        with torch.no_grad():
            out = model.generate(torch.from_numpy(src), attention_mask=torch.from_numpy(mask), do_sample=False,
                                 num_beams=1, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=PAD,
                                 decoder_start_token_id=START, no_repeat_ngram_size=0, min_length=0)
        assert model.generation_config.forced_eos_token_id is None and (out[:, 0] == START).all()
        return out[:, 1:].numpy()

    eos = ragged_eos(hf_greedy(None))
    reference = [until_eos(row, eos) for row in hf_greedy(eos)]
    assert len({len(r) for r in reference}) > 1  # the rows end at different steps
    sources = [row[m == 1].tolist() for row, m in zip(src, mask)]
    tokens, lengths = generate(ours[kind], None, N_NEW, source=sources, eos_id=eos)
    assert lengths.tolist() == [len(r) for r in reference]
    for b, r in enumerate(reference):
        assert tokens[b, : lengths[b]].tolist() == r, b


def test_bart_model_without_head_or_logits_bias(hf, ours):
    """``BartModel`` stores no ``model.`` prefix, no ``lm_head`` and no ``final_logits_bias``: the
    bias starts at zero, as in transformers, without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_hf_bart(hf["tied"].model)
    assert_same_params(model, ours["tied"], skip={("final_logits_bias",)})
    assert not np.asarray(model.final_logits_bias[...]).any()


def test_from_save_pretrained_dir_without_torch(hf, ours, tmp_path, monkeypatch):
    hf["untied"].save_pretrained(tmp_path)
    for name in ("torch", "transformers", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, name, None)
    model = load_hf_bart(tmp_path)
    monkeypatch.undo()
    assert_same_params(model, ours["untied"])


# -- ours -> Hugging Face -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_then_from_pretrained(hf, ours, expected, batch, kind, tmp_path):
    save_hf_bart(ours[kind], tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "bart" and config["tie_word_embeddings"] == (kind == "tied")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert stored["final_logits_bias"].shape == (1, 99)
    # An untied model stores the stacks' copies of the table too (transformers 5.x ties them only with the head).
    assert ("lm_head.weight" in stored) == ("model.encoder.embed_tokens.weight" in stored) == (kind == "untied")
    assert stored["model.decoder.embed_positions.weight"].shape == (42, 32)
    reloaded = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    np.testing.assert_array_equal(hf_outputs(reloaded, batch).logits.numpy(), expected[kind].logits.numpy())
    assert_same_params(load_hf_bart(tmp_path / "ckpt"), ours[kind])


def test_save_refuses_models_without_a_bart_form(tmp_path):
    t5 = nnx.eval_shape(lambda: EncoderDecoder(Seq2SeqConfig.preset("t5-tiny"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="norm='rmsnorm'.*norm_position='pre'.*final_norm=True.*positions='relative'"
                                         ".*qkv_bias.*attn_scale=1.0.*head_scale=True"):  # fmt: skip
        save_hf_bart(t5, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_bart_base_parameter_count_equals_transformers():
    hf_config = transformers.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                                        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    with torch.device("meta"):
        model = transformers.BartForConditionalGeneration(hf_config)
    ours = nnx.eval_shape(lambda: EncoderDecoder(Seq2SeqConfig.preset("bart-base"), rngs=nnx.Rngs(0)))
    # num_parameters() leaves out buffers; final_logits_bias is one there and a parameter here.
    assert count_params(ours) == model.num_parameters() + model.final_logits_bias.numel()
    assert bart_config_from_hf(hf_config.to_dict()) == Seq2SeqConfig.preset("bart-base", dropout=0.0)


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"activation_function": "silu"}, "activation_function='silu'"),
        ({"decoder_ffn_dim": 64}, "encoder_ffn_dim=48 with decoder_ffn_dim=64"),
        ({"decoder_attention_heads": 2}, "encoder_attention_heads=4 with decoder_attention_heads=2"),
        ({"normalize_before": True}, "normalize_before=True"),
        ({"add_final_layer_norm": True}, "add_final_layer_norm=True"),
        ({"is_decoder": True}, "is_decoder=True"),
        ({"model_type": "mbart"}, "model_type 'mbart'"),
    ],
)
def test_unsupported_config_option(changes, match):
    with pytest.raises(ValueError, match=match):
        bart_config_from_hf({**BART_SIZES, "model_type": "bart", **changes})


def test_missing_shape_unexpected_and_tied_head_errors(hf, ours, tmp_path):
    hf["tied"].save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    original = load_file(path)

    def write(tensors):
        save_file(tensors, path, metadata={"format": "pt"})

    key = "model.decoder.layers.2.encoder_attn.v_proj.bias"
    write({k: v for k, v in original.items() if k != key})
    with pytest.raises(ValueError, match=rf"missing.*{key}"):
        load_hf_bart(tmp_path)
    write({**original, "model.encoder.embed_positions.weight": np.zeros((66, 32), np.float32)})
    with pytest.raises(ValueError, match=r"model\.encoder\.embed_positions\.weight has shape \(66, 32\).*"
                                         r"max_position_embeddings=40.*\(42, 32\)"):  # fmt: skip
        load_hf_bart(tmp_path)
    write({**original, "model.encoder.layers.0.encoder_attn.q_proj.weight": np.zeros((32, 32), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected.*model\.encoder\.layers\.0\.encoder_attn\.q_proj\.weight"):
        load_hf_bart(tmp_path)
    write({**original, "lm_head.weight": original["model.shared.weight"] + 0.5})
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.shared\.weight.*0\.5"
                                         r".*tie_word_embeddings=False"):  # fmt: skip
        load_hf_bart(tmp_path)
    # fairseq version markers are skipped, as transformers skips them.
    write({**original, "model.encoder.version": np.array([2.0], np.float32)})
    assert_same_params(load_hf_bart(tmp_path), ours["tied"])
