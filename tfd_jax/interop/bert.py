r"""Hugging Face BERT weights in and out of ``tfd_jax.models.bert.Bert`` (Chapters 18 and 19).

BERT is the encoder of Chapter 19: post-LN blocks without a causal mask, learned positions plus a
token-type (segment) embedding, a LayerNorm on the embeddings, and task heads on top: the pooler
(``tanh`` of a dense layer on the first token), the masked-LM head (dense, GELU, LayerNorm, then the
tied token embeddings plus a bias) and, for ``BertForSequenceClassification``, a linear classifier
on the pooled vector. Hugging Face keeps ``torch.nn.Linear`` weights ``[out, in]``; ours are
``[in, out]``, so every dense weight is transposed.

===========================================================  =================================  ============
Hugging Face key (``bert.`` + where marked \*)               ``Bert`` parameter                 stored shape
===========================================================  =================================  ============
\* ``embeddings.word_embeddings.weight``                     ``tok_embed.embedding``            ``[V, M]``
\* ``embeddings.position_embeddings.weight``                 ``pos_embed.embedding``            ``[P, M]``
\* ``embeddings.token_type_embeddings.weight``               ``type_embed.embedding``           ``[Y, M]``
\* ``embeddings.LayerNorm.weight`` / ``.bias``               ``embed_norm.scale`` / ``.bias``   ``[M]``
\* ``encoder.layer.{i}.attention.self.{query,key,value}.*``  ``blocks[i].attn.{q,k,v}.*``       ``[M, M]``
\* ``encoder.layer.{i}.attention.output.dense.*``            ``blocks[i].attn.o.*``             ``[M, M]``
\* ``encoder.layer.{i}.attention.output.LayerNorm.*``        ``blocks[i].ln1.*``                ``[M]``
\* ``encoder.layer.{i}.intermediate.dense.*``                ``blocks[i].ffn.w_in.*``           ``[F, M]``
\* ``encoder.layer.{i}.output.dense.*``                      ``blocks[i].ffn.w_out.*``          ``[M, F]``
\* ``encoder.layer.{i}.output.LayerNorm.*``                  ``blocks[i].ln2.*``                ``[M]``
\* ``pooler.dense.weight`` / ``.bias``                       ``pooler.kernel`` / ``.bias``      ``[M, M]``
``cls.predictions.transform.dense.weight`` / ``.bias``       ``mlm_dense.kernel`` / ``.bias``   ``[M, M]``
``cls.predictions.transform.LayerNorm.weight`` / ``.bias``   ``mlm_norm.scale`` / ``.bias``     ``[M]``
``cls.predictions.bias``                                     ``mlm_bias``                       ``[V]``
``classifier.weight`` / ``.bias``                            ``classifier.kernel`` / ``.bias``  ``[C, M]``
===========================================================  =================================  ============

(``.*`` is ``.weight`` -> ``.kernel`` and ``.bias`` -> ``.bias``.) ``cls.predictions.decoder.weight``
is the token embedding matrix again (weight tying) and ``cls.predictions.decoder.bias`` is
``cls.predictions.bias``: when stored they are checked, not loaded. ``BertModel`` checkpoints store
their keys without the ``bert.`` prefix, and old uploads (``bert-base-uncased``) name LayerNorm
parameters ``gamma`` / ``beta``; both load. The next-sentence head of ``BertForPreTraining``
(``cls.seq_relationship.*``) is not part of ``Bert`` and is skipped.

**Missing heads.** A checkpoint without the pooler (``BertForMaskedLM`` has none) or without the
masked-LM head (``BertModel``, ``BertForSequenceClassification``) still loads: those parameters keep
``Bert``'s own fresh initialisation (seeded by ``seed``), and a one-line ``UserWarning`` names them.
The encoder itself is never left partly initialised: its tensors are all required. A classifier is
loaded when the checkpoint has one (``num_labels`` from its shape); ``num_labels=`` asks for one
that the checkpoint lacks (fresh, with the same warning) or checks the one it has.

Shape letters: V vocabulary, P positions, Y token types, M model width, F FFN width, C labels.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from tfd_jax.interop import files, weightmap
from tfd_jax.interop.weightmap import TRANSPOSE, Entry, entry
from tfd_jax.models.bert import Bert, BertConfig
from tfd_jax.nn import with_layout

__all__ = ["bert_config_from_hf", "bert_config_to_hf", "bert_weight_map", "load_hf_bert", "save_hf_bert"]

#: Hugging Face ``hidden_act`` -> our ``BertConfig.activation``. BERT's "gelu" is the exact (erf) GELU.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

#: What ``transformers.BertConfig`` assumes for a field that config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

#: BertConfig fields a caller may set when loading: they change how the model runs, not its weights.
_LOAD_OVERRIDES = frozenset({"dropout", "attention_impl", "remat", "scan_layers"})

_PREFIX = "bert."
#: Tensors outside the ``bert.`` prefix: the heads.
_HEAD_KEY = re.compile(r"^(cls|classifier)\.")
#: Stored but not weights of ours: position/token-type id buffers, the next-sentence head, and the
#: tied copies of the token embeddings and the MLM bias (checked separately).
_SKIPPED = re.compile(
    r"^(embeddings\.(position_ids|token_type_ids)|cls\.seq_relationship\.(weight|bias)"
    r"|cls\.predictions\.decoder\.(weight|bias))$"
)


def _modern_name(key: str) -> str:
    """Old TensorFlow-converted uploads say ``LayerNorm.gamma`` / ``.beta`` for ``.weight`` / ``.bias``."""
    if ".LayerNorm." in key or key.startswith("LayerNorm."):
        return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
    return key


# -- configs ------------------------------------------------------------------------------------------


def _hf_num_labels(hf: Mapping[str, Any]) -> int:
    """How many labels a ``BertForSequenceClassification`` config has (0 for other architectures)."""
    if "BertForSequenceClassification" not in (hf.get("architectures") or []):
        return 0
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def bert_config_from_hf(hf: Mapping[str, Any], *, num_labels: int | None = None, **overrides: Any) -> BertConfig:
    """Translate a Hugging Face BERT ``config.json`` (as a dict) into a :class:`BertConfig`.

    Args:
      hf: the config dict; fields it leaves out take ``transformers.BertConfig``'s defaults.
      num_labels: the classifier's size; by default ``len(id2label)`` when ``architectures`` says
        ``BertForSequenceClassification``, else 0 (no classifier).
      **overrides: passed on to ``BertConfig`` (dtypes, dropout, attention implementation). Dropout
        is 0 unless set here (config.json's ``hidden_dropout_prob`` is for training).

    Raises:
      ValueError: the config is not BERT, or uses an option our model does not implement (relative
        position embeddings, a decoder or cross-attention, an untied MLM decoder, another activation);
        each is named by its field.
    """
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"expected a BERT config (model_type 'bert'), got model_type {model_type!r}")
    c = {**_HF_DEFAULTS, **hf}

    problems = []
    act = c["hidden_act"]
    if act not in _ACT_FROM_HF:
        problems.append(f"hidden_act={act!r} (supported: {sorted(_ACT_FROM_HF)})")
    if c["position_embedding_type"] != "absolute":
        problems.append(
            f"position_embedding_type={c['position_embedding_type']!r} (learned absolute positions only: 'absolute')"
        )
    if c["is_decoder"]:
        problems.append("is_decoder=True (a causal BERT; ours is an encoder)")
    if c["add_cross_attention"]:
        problems.append("add_cross_attention=True (cross-attention layers)")
    if not c["tie_word_embeddings"]:
        problems.append("tie_word_embeddings=False (the MLM decoder is tied to the token embeddings here)")
    if problems:
        raise ValueError("unsupported BERT config option(s): " + "; ".join(problems))

    pad = c["pad_token_id"]
    return BertConfig(
        vocab_size=int(c["vocab_size"]),
        context_length=int(c["max_position_embeddings"]),
        type_vocab_size=int(c["type_vocab_size"]),
        d_model=int(c["hidden_size"]),
        num_heads=int(c["num_attention_heads"]),
        num_layers=int(c["num_hidden_layers"]),
        d_ff=int(c["intermediate_size"]),
        activation=_ACT_FROM_HF[act],
        norm_eps=float(c["layer_norm_eps"]),
        num_labels=_hf_num_labels(c) if num_labels is None else int(num_labels),
        pad_id=0 if pad is None else int(pad),
        positions="learned",
        embed_norm=True,
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        init="bert",
        **{"dropout": 0.0, **overrides},
    )


def bert_config_to_hf(cfg: BertConfig) -> dict[str, Any]:
    """The ``config.json`` dict (``transformers.BertConfig`` fields) for ``cfg``.

    ``architectures`` is ``BertForSequenceClassification`` when ``cfg.num_labels > 0`` (with
    ``id2label`` ``LABEL_0``...), else ``BertForMaskedLM``.

    Raises:
      ValueError: listing every field that makes ``cfg`` something Hugging Face's BERT cannot
        represent (sinusoidal positions, no embedding LayerNorm, missing biases, no token types, ...).
    """
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (supported: {sorted(_ACT_TO_HF)})")
    need(cfg.positions == "learned", f"positions={cfg.positions!r} (BERT learns its positions: 'learned')")
    need(cfg.embed_norm, "embed_norm=False (BERT normalises its embeddings)")
    need(
        cfg.qkv_bias and cfg.out_bias and cfg.ffn_bias,
        "qkv_bias/out_bias/ffn_bias must all be True (BERT has biases everywhere)",
    )
    need(cfg.type_vocab_size > 0, "type_vocab_size=0 (BERT always adds a token-type embedding)")
    if problems:
        raise ValueError("this model has no Hugging Face BERT form: " + "; ".join(problems))
    out: dict[str, Any] = {
        "architectures": ["BertForSequenceClassification" if cfg.num_labels else "BertForMaskedLM"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": 0.0,  # our model has no dropout on the attention weights
        "max_position_embeddings": cfg.context_length,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.norm_eps,
        "pad_token_id": cfg.pad_id,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "classifier_dropout": None,
        "use_cache": True,
        "dtype": cfg.param_dtype,
    }
    if cfg.num_labels:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return out


# -- the weight map -------------------------------------------------------------------------------------


def _dense(key: str, shape: tuple[int, int], path: tuple, optional: str = "") -> list[Entry]:
    """A torch ``Linear`` (weight ``[out, in]`` transposed, bias as is) -> our ``kernel`` and ``bias``."""
    return [
        entry(key + ".weight", shape, path + ("kernel",), TRANSPOSE, optional=optional),
        entry(key + ".bias", (shape[0],), path + ("bias",), optional=optional),
    ]


def _norm(key: str, M: int, path: tuple, optional: str = "") -> list[Entry]:
    return [
        entry(key + ".weight", (M,), path + ("scale",), optional=optional),
        entry(key + ".bias", (M,), path + ("bias",), optional=optional),
    ]


def bert_weight_map(cfg: BertConfig) -> list[Entry]:
    """Every Hugging Face tensor (encoder keys without ``bert.``, stored shape) and the parameter it feeds.

    The pooler and the masked-LM head are optional (a checkpoint may lack them); the classifier is
    mapped when ``cfg.num_labels > 0``.
    """
    V, P, Y, M, F = cfg.vocab_size, cfg.context_length, cfg.type_vocab_size, cfg.d_model, cfg.d_ff
    e = "embeddings."
    entries = [
        entry(e + "word_embeddings.weight", (V, M), ("tok_embed", "embedding")),
        entry(e + "position_embeddings.weight", (P, M), ("pos_embed", "embedding")),
        entry(e + "token_type_embeddings.weight", (Y, M), ("type_embed", "embedding")),
        *_norm(e + "LayerNorm", M, ("embed_norm",)),
    ]
    for i in range(cfg.num_layers):
        h, b = f"encoder.layer.{i}.", ("blocks", i)
        entries += [
            *_dense(h + "attention.self.query", (M, M), b + ("attn", "q")),
            *_dense(h + "attention.self.key", (M, M), b + ("attn", "k")),
            *_dense(h + "attention.self.value", (M, M), b + ("attn", "v")),
            *_dense(h + "attention.output.dense", (M, M), b + ("attn", "o")),
            *_norm(h + "attention.output.LayerNorm", M, b + ("ln1",)),
            *_dense(h + "intermediate.dense", (F, M), b + ("ffn", "w_in")),
            *_dense(h + "output.dense", (M, F), b + ("ffn", "w_out")),
            *_norm(h + "output.LayerNorm", M, b + ("ln2",)),
        ]
    mlm = "masked-LM head"
    entries += [
        *_dense("pooler.dense", (M, M), ("pooler",), optional="pooler"),
        *_dense("cls.predictions.transform.dense", (M, M), ("mlm_dense",), optional=mlm),
        *_norm("cls.predictions.transform.LayerNorm", M, ("mlm_norm",), optional=mlm),
        entry("cls.predictions.bias", (V,), ("mlm_bias",), optional=mlm),
    ]
    if cfg.num_labels:
        entries += _dense("classifier", (cfg.num_labels, M), ("classifier",), optional="classifier")
    return entries


def _model_entries(cfg: BertConfig, paths: set) -> list[Entry]:
    """The map restricted to the heads the model has (a ``Bert`` without a pooler or MLM head)."""
    return [e for e in bert_weight_map(cfg) if all(t in paths for t in e.targets)]


def _param_paths(model: nnx.Module) -> set:
    return {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# -- loading and saving -----------------------------------------------------------------------------------


def load_hf_bert(
    source: Any,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    num_labels: int | None = None,
    **overrides: Any,
) -> Bert:
    """A Hugging Face BERT as a :class:`~tfd_jax.models.bert.Bert` with the same weights and outputs.

    Args:
      source: a ``transformers`` ``BertModel``, ``BertForMaskedLM``, ``BertForSequenceClassification``
        (or ``BertForPreTraining``) object, a directory written by ``save_pretrained`` or
        :func:`save_hf_bert`, or a Hub name such as ``"bert-base-uncased"``.
      dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      compute_dtype: activation dtype (defaults to ``dtype``).
      revision: Hub branch, tag or commit (Hub names only).
      seed: seeds the initialisation of heads the checkpoint lacks, and dropout.
      num_labels: the classifier's size. By default the checkpoint's (``classifier.weight``), or none.
        A value for a checkpoint without a classifier adds a fresh one (fine-tuning).
      **overrides: ``dropout``, ``attention_impl``, ``remat`` or ``scan_layers``. Dropout is 0 unless set here.

    Returns:
      A ``Bert`` whose ``encode``, ``pooled``, ``mlm_logits`` (and classifier) outputs match the
      Hugging Face model's on the same tokens ``[B, T]``, token types and attention mask.

    The encoder is built abstractly (shapes only) and filled one tensor at a time. Heads the
    checkpoint lacks keep a fresh initialisation, with a one-line warning (see the module docstring).

    Raises:
      FileNotFoundError: a directory without config.json or weights.
      ValueError: an unsupported config option (named by its field), a missing, unexpected or wrongly
        shaped tensor (named by its key), a tied decoder weight that differs from the token
        embeddings, or a ``num_labels`` that disagrees with the checkpoint's classifier.
      OSError / ImportError: a Hub name that cannot be fetched, or a missing optional package.
    """
    scan_layers = weightmap.load_options("load_hf_bert", overrides, _LOAD_OVERRIDES, also=["num_labels"])
    ckpt = files.open_checkpoint(
        source, revision=revision, family="BERT", hub_example="bert-base-uncased", writer="save_hf_bert"
    )
    short, stored = files.strip_prefix(ckpt.loaders, _PREFIX, ckpt.origin, rename=_modern_name)

    def name(key: str) -> str:
        return stored.get(key, key if _HEAD_KEY.match(key) else _PREFIX + key)

    if "classifier.weight" in short:
        stored_labels = int(short["classifier.weight"]().shape[0])
        if num_labels is not None and num_labels != stored_labels:
            raise ValueError(
                f"{ckpt.origin}: num_labels={num_labels}, but {name('classifier.weight')} has {stored_labels} rows"
            )
        num_labels = stored_labels
    cfg = bert_config_from_hf(
        ckpt.config, num_labels=num_labels or 0, param_dtype=dtype, dtype=compute_dtype or dtype, **overrides
    )

    why = "BERT's masked-LM decoder is tied to the token embeddings (and its bias to cls.predictions.bias) here"
    word = "embeddings.word_embeddings.weight"
    weightmap.check_tied(short, "cls.predictions.decoder.weight", word, origin=ckpt.origin, name=name, why=why)
    weightmap.check_tied(
        short, "cls.predictions.decoder.bias", "cls.predictions.bias", origin=ckpt.origin, name=name, why=why
    )

    def build() -> Bert:
        return Bert(cfg, rngs=nnx.Rngs(seed))

    entries = _model_entries(cfg, _param_paths(nnx.eval_shape(build)))
    mapped = {e.key for e in entries}
    heads = {e.key for e in bert_weight_map(cfg)} - mapped  # heads this Bert does not have

    model = weightmap.load(
        entries,
        short,
        build,
        origin=ckpt.origin,
        name=name,
        ignore=lambda key: bool(_SKIPPED.match(key)) or key in heads,
        unexpected_hint=f"a plain BERT ({cfg.num_layers} layers per its config) has no such weights",
        shape_hint=(
            f" (hidden_size={cfg.d_model}, intermediate_size={cfg.d_ff}, vocab_size={cfg.vocab_size}, "
            f"max_position_embeddings={cfg.context_length}, type_vocab_size={cfg.type_vocab_size})"
        ),
    )
    return with_layout(model, scan_layers=scan_layers)


def save_hf_bert(model: Bert, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a checkpoint that ``BertForMaskedLM`` (or, with a classifier,
    ``BertForSequenceClassification``) ``.from_pretrained`` loads.

    The directory gets ``config.json`` (see :func:`bert_config_to_hf`) and ``model.safetensors``:
    encoder and pooler keys prefixed ``bert.``, the MLM head as ``cls.predictions.*`` without the tied
    decoder weight, the classifier as ``classifier.*``; heads the model does not have are not
    written. Tensors keep the parameter dtype; :func:`load_hf_bert` reads the directory back bit for bit.
    The files are staged in a sibling directory that then takes ``directory``'s place.

    Args:
      model: a ``Bert`` with learned positions, an embedding LayerNorm, token types and all biases
        (the ``bert-base`` / ``bert-large`` / ``tiny`` presets; not ``course-encoder``).
      directory: where to write; created with its parents if needed.
      overwrite: replace a non-empty ``directory``. Its previous contents are all removed.

    Returns:
      The directory, as a ``Path``.

    Raises:
      ValueError: the config has no Hugging Face BERT form.
      FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
    """
    model = with_layout(model, scan_layers=False)  # the weight map names blocks one by one
    hf_config = bert_config_to_hf(model.config)
    files.check_writable(directory, overwrite=overwrite)
    tensors = weightmap.save(_model_entries(model.config, _param_paths(model)), model)
    return files.write_checkpoint(
        directory,
        hf_config,
        {(k if _HEAD_KEY.match(k) else _PREFIX + k): v for k, v in tensors.items()},
        overwrite=overwrite,
    )
