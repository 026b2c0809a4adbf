"""Parity with Hugging Face BERT: tiny random models, a padded batch with token types, no downloads.

One encoder is shared by a ``BertForMaskedLM``, a ``BertModel`` and a ``BertForSequenceClassification``
(see ``interop/hf_tiny.py``); a checkpoint with all their heads loads into one ``Bert``, which is then
compared with each. torch and transformers are test extras.
"""
import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from interop.hf_tiny import BERT_LABELS, BERT_SIZES, bert_batch, bert_state_dict, tiny_bert_models  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from tfd_jax.interop import bert_config_from_hf, load_hf_bert, save_hf_bert  # noqa: E402
from tfd_jax.models.bert import Bert, BertConfig  # noqa: E402

L = BERT_SIZES["num_hidden_layers"]


@nnx.jit
def _outputs(model, ids, types, mask):
    kw = dict(token_types=types, padding_mask=mask)
    h, states = model.encode(ids, all_layers=True, **kw)
    out = {"mlm": model.mlm_head(h), "pooled": model.pool(h), "states": states}
    if model.classifier is not None:
        out["classify"] = model.classify(ids, **kw)
    return out


def our_outputs(model: Bert, batch) -> dict:
    ids, types, mask = batch
    out = _outputs(model, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask == 1))
    return {k: [np.asarray(s) for s in v] if k == "states" else np.asarray(v) for k, v in out.items()}


def hf_outputs(models: dict, batch) -> dict:
    ids, types, mask = (torch.from_numpy(a) for a in batch)
    kw = dict(token_type_ids=types, attention_mask=mask)
    with torch.no_grad():
        base = models["base"](ids, output_hidden_states=True, **kw)
        return {
            "mlm": models["masked_lm"](ids, **kw).logits.numpy(),
            "pooled": base.pooler_output.numpy(),
            "states": [h.numpy() for h in base.hidden_states],
            "classify": models["classifier"](ids, **kw).logits.numpy(),
        }


def flat_params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def write_checkpoint(directory, config: dict, state: dict) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.fixture(scope="module")
def hf():
    return tiny_bert_models()


@pytest.fixture(scope="module")
def batch():
    return bert_batch()


@pytest.fixture(scope="module")
def hf_config(hf) -> dict:
    return hf["classifier"].config.to_dict()


@pytest.fixture(scope="module")
def full_dir(hf, hf_config, tmp_path_factory):
    """A checkpoint with the encoder, the pooler, the MLM head and the classifier."""
    d = tmp_path_factory.mktemp("bert_full")
    write_checkpoint(d, hf_config, {k: v.numpy() for k, v in bert_state_dict(hf).items()})
    return d


@pytest.fixture(scope="module")
def ours(full_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every head is in the checkpoint: nothing to warn about
        return load_hf_bert(full_dir)


@pytest.fixture(scope="module")
def expected(hf, batch):
    return hf_outputs(hf, batch)


@pytest.fixture(scope="module")
def got(ours, batch):
    return our_outputs(ours, batch)


# -- Hugging Face -> ours -----------------------------------------------------------------------------


def test_config(ours):
    cfg = ours.config
    assert (cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.d_ff) == (32, 4, 2, 48)
    assert cfg.num_labels == BERT_LABELS and cfg.type_vocab_size == 2 and cfg.context_length == 40
    assert cfg.activation == "gelu" and cfg.norm_eps == 1e-12 and cfg.dropout == 0.0


def test_mlm_logits_on_real_positions(got, expected, batch):
    real = batch[2] == 1
    assert not real.all()  # the batch really is padded
    diff = np.max(np.abs(got["mlm"][real] - expected["mlm"][real]))
    assert diff < 1e-4, diff


def test_pooled_and_classifier_logits(got, expected):
    assert np.max(np.abs(got["pooled"] - expected["pooled"])) < 1e-4
    assert got["classify"].shape == (3, BERT_LABELS)
    assert np.max(np.abs(got["classify"] - expected["classify"])) < 1e-4


def test_every_layer_hidden_states(got, expected, batch):
    real = batch[2] == 1
    assert len(got["states"]) == len(expected["states"]) == L + 1
    for i, (a, b) in enumerate(zip(got["states"], expected["states"])):
        assert np.max(np.abs(a[real] - b[real])) < 1e-4, i


@pytest.mark.parametrize(
    "kind,missing", [("masked_lm", "no pooler"), ("base", "no masked-LM head"), ("classifier", "no masked-LM head")]
)
def test_each_transformers_class_loads(hf, ours, kind, missing):
    """With or without the ``bert.`` prefix; absent heads keep a fresh init, with a warning."""
    with pytest.warns(UserWarning, match=missing):
        model = load_hf_bert(hf[kind])
    assert model.config.num_labels == (BERT_LABELS if kind == "classifier" else 0)
    mine, full = flat_params(model), flat_params(ours)
    fresh = ("pooler",) if kind == "masked_lm" else ("mlm_dense", "mlm_norm", "mlm_bias")
    for path, value in mine.items():
        if path[0] not in fresh:
            np.testing.assert_array_equal(value, full[path], err_msg=str(path))
    kernel = (fresh[0], "kernel")
    assert not np.array_equal(mine[kernel], full[kernel])  # initialised, not read from somewhere


def test_old_names_buffers_and_next_sentence_head(hf, hf_config, ours, tmp_path):
    """``bert-base-uncased`` style: LayerNorm ``gamma``/``beta``, the tied decoder stored, an NSP head."""
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v.numpy()
             for k, v in bert_state_dict(hf).items()}  # fmt: skip
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    state["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
    state["cls.seq_relationship.bias"] = np.zeros(2, np.float32)
    state["bert.embeddings.position_ids"] = np.arange(40)[None]
    write_checkpoint(tmp_path, hf_config, state)
    back, full = flat_params(load_hf_bert(tmp_path)), flat_params(ours)
    assert back.keys() == full.keys()
    for path in full:
        np.testing.assert_array_equal(back[path], full[path], err_msg=str(path))


def test_num_labels_adds_a_fresh_classifier(hf):
    with pytest.warns(UserWarning, match="no classifier"):
        model = load_hf_bert(hf["masked_lm"], num_labels=5)
    assert model.classifier.kernel.shape == (32, 5)
    with pytest.raises(ValueError, match=r"num_labels=5, but classifier\.weight has 3 rows"):
        load_hf_bert(hf["classifier"], num_labels=5)


# -- ours -> Hugging Face -----------------------------------------------------------------------------


def test_save_then_from_pretrained(ours, hf, batch, expected, tmp_path):
    save_hf_bert(ours, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == BERT_LABELS
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "bert.pooler.dense.weight" in stored and "cls.predictions.bias" in stored
    assert "classifier.weight" in stored and "cls.predictions.decoder.weight" not in stored
    reloaded = {
        "masked_lm": transformers.BertForMaskedLM.from_pretrained(tmp_path / "ckpt").eval(),
        "base": transformers.BertModel.from_pretrained(tmp_path / "ckpt").eval(),
        "classifier": transformers.BertForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval(),
    }
    again = hf_outputs(reloaded, batch)
    for key in ("mlm", "pooled", "classify"):
        np.testing.assert_array_equal(again[key], expected[key], err_msg=key)
    back = flat_params(load_hf_bert(tmp_path / "ckpt"))
    for path, value in flat_params(ours).items():
        np.testing.assert_array_equal(back[path], value, err_msg=str(path))


def test_save_without_classifier_writes_masked_lm(hf, tmp_path):
    with pytest.warns(UserWarning, match="no pooler"):
        model = load_hf_bert(hf["masked_lm"])
    save_hf_bert(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and "id2label" not in config
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert not any(k.startswith("classifier.") for k in stored)
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ckpt").eval()
    for name, p in hf["masked_lm"].state_dict().items():
        np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_save_refuses_models_without_a_bert_form(tmp_path):
    course = nnx.eval_shape(lambda: Bert(BertConfig.preset("course-encoder"), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="positions='sinusoidal'.*embed_norm=False.*qkv_bias.*type_vocab_size=0"):
        save_hf_bert(course, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# -- errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
        ({"is_decoder": True}, "is_decoder=True"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
        ({"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ({"model_type": "roberta"}, "model_type 'roberta'"),
    ],
)
def test_unsupported_config_option(changes, match):
    with pytest.raises(ValueError, match=match):
        bert_config_from_hf({**BERT_SIZES, "model_type": "bert", **changes})


def test_missing_shape_and_tied_decoder_errors(hf, hf_config, tmp_path):
    state = {k: v.numpy() for k, v in bert_state_dict(hf).items()}
    write_checkpoint(tmp_path, hf_config, {k: v for k, v in state.items() if "layer.1.output.dense.bias" not in k})
    with pytest.raises(ValueError, match=r"missing.*bert\.encoder\.layer\.1\.output\.dense\.bias"):
        load_hf_bert(tmp_path)
    bad = {**state, "bert.encoder.layer.0.intermediate.dense.weight": np.zeros((40, 32), np.float32)}
    write_checkpoint(tmp_path, hf_config, bad)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight has shape \(40, 32\)"
                                         r".*intermediate_size=48.*\(48, 32\)"):  # fmt: skip
        load_hf_bert(tmp_path)
    untied = {**state, "cls.predictions.decoder.weight": state["bert.embeddings.word_embeddings.weight"] + 1.0}
    write_checkpoint(tmp_path, hf_config, untied)
    with pytest.raises(ValueError, match=r"cls\.predictions\.decoder\.weight differs from "
                                         r"bert\.embeddings\.word_embeddings\.weight"):  # fmt: skip
        load_hf_bert(tmp_path)
    write_checkpoint(tmp_path, hf_config, {**state, "cls.predictions.extra": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected.*cls\.predictions\.extra"):
        load_hf_bert(tmp_path)
