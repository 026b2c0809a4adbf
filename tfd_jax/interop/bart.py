r"""Hugging Face BART weights in and out of ``tfd_jax.models.seq2seq.EncoderDecoder`` (Chapters 18 and 19).

BART is the 2017 encoder-decoder with BERT's habits: post-LN blocks with biases everywhere, GELU,
learned positions (rows ``position + 2``: fairseq kept two rows in front), a LayerNorm on each
stack's embeddings, one token table for both stacks and the output head, and a bias on the logits
(``final_logits_bias``, a buffer rather than a parameter in ``transformers``). Hugging Face keeps
``torch.nn.Linear`` weights ``[out, in]``; ours are ``[in, out]``, so every dense weight is transposed.

=======================================================  ====================================  ============
Hugging Face key (``model.`` + where marked \*)          ``EncoderDecoder`` parameter          stored shape
=======================================================  ====================================  ============
\* ``shared.weight``                                     ``tok_embed.embedding``               ``[V, M]``
\* ``{s}.embed_positions.weight``                        ``{s}.pos_embed.embedding``           ``[P+2, M]``
\* ``{s}.layernorm_embedding.weight`` / ``.bias``        ``{s}.embed_norm.scale`` / ``.bias``  ``[M]``
\* ``{s}.layers.{i}.self_attn.{q,k,v}_proj.*``           ``{s}.blocks[i].attn.{q,k,v}.*``      ``[M, M]``
\* ``{s}.layers.{i}.self_attn.out_proj.*``               ``{s}.blocks[i].attn.o.*``            ``[M, M]``
\* ``{s}.layers.{i}.self_attn_layer_norm.*``             ``{s}.blocks[i].ln1.*``               ``[M]``
\* ``decoder.layers.{i}.encoder_attn.{q,k,v}_proj.*``    ``decoder.blocks[i].cross_attn.*``    ``[M, M]``
\* ``decoder.layers.{i}.encoder_attn.out_proj.*``        ``decoder.blocks[i].cross_attn.o.*``  ``[M, M]``
\* ``decoder.layers.{i}.encoder_attn_layer_norm.*``      ``decoder.blocks[i].ln_cross.*``      ``[M]``
\* ``{s}.layers.{i}.fc1.*``                              ``{s}.blocks[i].ffn.w_in.*``          ``[F, M]``
\* ``{s}.layers.{i}.fc2.*``                              ``{s}.blocks[i].ffn.w_out.*``         ``[M, F]``
\* ``{s}.layers.{i}.final_layer_norm.*``                 ``{s}.blocks[i].ln2.*``               ``[M]``
``final_logits_bias``                                    ``final_logits_bias``                 ``[1, V]``
``lm_head.weight`` (``tie_word_embeddings=False`` only)  ``lm_head.kernel``                    ``[V, M]``
=======================================================  ====================================  ============

``{s}`` is ``encoder`` or ``decoder``; ``.*`` is ``.weight`` -> ``.kernel`` (transposed) / ``.scale``
and ``.bias`` -> ``.bias``. ``encoder.embed_tokens.weight``, ``decoder.embed_tokens.weight`` and a tied
``lm_head.weight`` are ``shared.weight`` again: when stored they are checked, not loaded. A checkpoint
without ``final_logits_bias`` gets zeros, as in ``transformers``. ``BartModel`` checkpoints store their
keys without the ``model.`` prefix; they load too (with the zero logits bias).

``scale_embedding=True`` (token embeddings times sqrt(M), as in the 2017 model) is
``scale_embeddings``; an untied head is ``lm_head``. The pre-LN variant (mBART's
``normalize_before`` / ``add_final_layer_norm``) is a different model and is refused.

Shape letters: V vocabulary, P positions (``max_position_embeddings``), M model width, F FFN width.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from tfd_jax.interop import files, weightmap
from tfd_jax.interop.weightmap import TRANSPOSE, Entry, entry, reshape
from tfd_jax.models.seq2seq import EncoderDecoder, Seq2SeqConfig
from tfd_jax.nn import with_layout

__all__ = ["bart_config_from_hf", "bart_config_to_hf", "bart_weight_map", "load_hf_bart", "save_hf_bart"]

#: Hugging Face ``activation_function`` -> our ``Seq2SeqConfig.activation``. "gelu" is the exact (erf) GELU.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

#: What ``transformers.BartConfig`` assumes for a field that config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50265,
    "max_position_embeddings": 1024,
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "activation_function": "gelu",
    "scale_embedding": False,
    "pad_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
    "is_encoder_decoder": True,
    "is_decoder": False,
    "tie_word_embeddings": True,
}

#: BART's LayerNorms are ``torch.nn.LayerNorm`` with its default epsilon (config.json has no field).
_NORM_EPS = 1e-5
#: BART's learned positions start at row 2.
_POSITION_OFFSET = 2

#: Seq2SeqConfig fields a caller may set when loading: they change how the model runs, not its weights.
_LOAD_OVERRIDES = frozenset({"dropout", "attention_impl", "remat", "scan_layers"})

_PREFIX = "model."
_HEAD = "lm_head.weight"
_LOGITS_BIAS = "final_logits_bias"
_SHARED = "shared.weight"
#: Copies of ``shared.weight`` that a module's state dict (or an old checkpoint) holds.
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
#: fairseq version markers some converted checkpoints carry (transformers skips them too).
_SKIPPED = ("encoder.version", "decoder.version")


# -- configs ------------------------------------------------------------------------------------------


def _single_id(c: Mapping[str, Any], field: str, problems: list[str]) -> int | None:
    value = c.get(field)
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            problems.append(f"{field}={value!r} (one id only)")
            return None
        value = value[0]
    return None if value is None else int(value)


def bart_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Seq2SeqConfig:
    """Translate a Hugging Face BART ``config.json`` (as a dict) into a :class:`Seq2SeqConfig`.

    Args:
      hf: the config dict; fields it leaves out take ``transformers.BartConfig``'s defaults.
      **overrides: passed on to ``Seq2SeqConfig`` (dtypes, dropout, attention implementation).
        Dropout is 0 unless set here (config.json's ``dropout`` is for training).

    Raises:
      ValueError: the config is not BART, or uses an option our model does not implement (another
        activation, encoder and decoder of different widths or head counts, pre-LN blocks, a
        decoder-only config); each is named by its field and value.
    """
    model_type = hf.get("model_type", "bart")
    if model_type != "bart":
        raise ValueError(f"expected a BART config (model_type 'bart'), got model_type {model_type!r}")
    c = {**_HF_DEFAULTS, **hf}

    problems: list[str] = []
    act = c["activation_function"]
    if act not in _ACT_FROM_HF:
        problems.append(f"activation_function={act!r} (supported: {sorted(_ACT_FROM_HF)})")
    for enc, dec, what in (("encoder_ffn_dim", "decoder_ffn_dim", "FFN width"),
                           ("encoder_attention_heads", "decoder_attention_heads", "head count")):  # fmt: skip
        if c[enc] != c[dec]:
            problems.append(f"{enc}={c[enc]} with {dec}={c[dec]} (both stacks have one {what} here)")
    for field in ("normalize_before", "add_final_layer_norm"):
        if c.get(field):
            problems.append(f"{field}=True (pre-LN blocks with a final norm are mBART's; BART is post-LN)")
    if not c["is_encoder_decoder"]:
        problems.append("is_encoder_decoder=False (an encoder-decoder is converted here)")
    if c["is_decoder"]:
        problems.append("is_decoder=True (a decoder-only BART)")
    pad = _single_id(c, "pad_token_id", problems)
    eos = _single_id(c, "eos_token_id", problems)
    start = _single_id(c, "decoder_start_token_id", problems)
    if problems:
        raise ValueError("unsupported BART config option(s): " + "; ".join(problems))

    eos = 2 if eos is None else eos
    return Seq2SeqConfig(
        family="bart",
        vocab_size=int(c["vocab_size"]),
        context_length=int(c["max_position_embeddings"]),
        d_model=int(c["d_model"]),
        num_heads=int(c["encoder_attention_heads"]),
        num_layers=int(c["encoder_layers"]),
        num_decoder_layers=int(c["decoder_layers"]),
        d_ff=int(c["encoder_ffn_dim"]),
        activation=_ACT_FROM_HF[act],
        gated_ffn=False,
        norm="layernorm",
        norm_position="post",
        norm_eps=_NORM_EPS,
        norm_bias=True,
        final_norm=False,
        embed_norm=True,
        qkv_bias=True,
        out_bias=True,
        ffn_bias=True,
        positions="learned",
        position_offset=_POSITION_OFFSET,
        attn_scale=None,
        scale_embeddings=bool(c["scale_embedding"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        head_scale=False,
        logits_bias=True,
        pad_id=1 if pad is None else pad,
        eos_id=eos,
        decoder_start_id=eos if start is None else start,
        init="bert",
        **{"dropout": 0.0, **overrides},
    )


def bart_config_to_hf(cfg: Seq2SeqConfig) -> dict[str, Any]:
    """The ``config.json`` dict (``transformers.BartConfig`` fields) for a BART-shaped ``cfg``.

    A model without ``logits_bias`` is written with no ``final_logits_bias`` (``transformers`` then
    uses zeros, the same logits).

    Raises:
      ValueError: listing every field that makes ``cfg`` something ``BartForConditionalGeneration``
        cannot represent (pre-LN, RMSNorm, other positions, missing biases, a gated FFN, ...).
    """
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(cfg.norm == "layernorm" and cfg.norm_bias, f"norm={cfg.norm!r}, norm_bias={cfg.norm_bias} "
         "(BART uses LayerNorm with a bias)")  # fmt: skip
    need(cfg.norm_eps == _NORM_EPS, f"norm_eps={cfg.norm_eps} (BART's LayerNorms use torch's default {_NORM_EPS})")
    need(cfg.norm_position == "post", f"norm_position={cfg.norm_position!r} (BART is post-norm: 'post')")
    need(not cfg.final_norm, "final_norm=True (BART's stacks end without a norm)")
    need(cfg.embed_norm, "embed_norm=False (BART normalises its embeddings)")
    need(cfg.positions == "learned" and cfg.position_offset == _POSITION_OFFSET,
         f"positions={cfg.positions!r}, position_offset={cfg.position_offset} (BART learns its positions, "
         f"offset by {_POSITION_OFFSET})")  # fmt: skip
    need(cfg.qkv_bias and cfg.out_bias and cfg.ffn_bias,
         "qkv_bias/out_bias/ffn_bias must all be True (BART has biases everywhere)")
    need(not cfg.gated_ffn, "gated_ffn=True (BART's FFN is not gated)")
    need(cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (supported: {sorted(_ACT_TO_HF)})")
    need(cfg.attn_scale is None, f"attn_scale={cfg.attn_scale!r} (BART divides its scores by sqrt(D): None)")
    need(cfg.head_dim * cfg.num_heads == cfg.d_model,
         f"head_dim={cfg.head_dim} with num_heads={cfg.num_heads} (BART's heads split d_model={cfg.d_model})")
    need(not (cfg.tie_embeddings and cfg.head_scale), "head_scale=True (BART's head does not scale its input)")
    if problems:
        raise ValueError("this model has no Hugging Face BART form: " + "; ".join(problems))
    return {
        "architectures": ["BartForConditionalGeneration"],
        "model_type": "bart",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.num_layers,
        "decoder_layers": cfg.num_decoder_layers,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "encoder_attention_heads": cfg.num_heads,
        "decoder_attention_heads": cfg.num_heads,
        "encoder_layerdrop": 0.0,
        "decoder_layerdrop": 0.0,
        "activation_function": _ACT_TO_HF[cfg.activation],
        "dropout": cfg.dropout,
        "attention_dropout": 0.0,  # our model has no dropout on the attention weights
        "activation_dropout": 0.0,
        "init_std": 0.02,
        "scale_embedding": cfg.scale_embeddings,
        "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True,
        "is_decoder": False,
        "use_cache": True,
        "pad_token_id": cfg.pad_id,
        "eos_token_id": cfg.eos_id,
        "forced_eos_token_id": cfg.eos_id,
        "decoder_start_token_id": cfg.decoder_start_id,
        "dtype": cfg.param_dtype,
    }


# -- the weight map -------------------------------------------------------------------------------------


def _dense(key: str, shape: tuple[int, int], path: tuple) -> list[Entry]:
    """A torch ``Linear`` (weight ``[out, in]`` transposed, bias as is) -> our ``kernel`` and ``bias``."""
    return [
        entry(key + ".weight", shape, path + ("kernel",), TRANSPOSE),
        entry(key + ".bias", (shape[0],), path + ("bias",)),
    ]


def _norm(key: str, M: int, path: tuple) -> list[Entry]:
    return [entry(key + ".weight", (M,), path + ("scale",)), entry(key + ".bias", (M,), path + ("bias",))]


def _attention(key: str, M: int, path: tuple) -> list[Entry]:
    return [
        *_dense(key + ".q_proj", (M, M), path + ("q",)),
        *_dense(key + ".k_proj", (M, M), path + ("k",)),
        *_dense(key + ".v_proj", (M, M), path + ("v",)),
        *_dense(key + ".out_proj", (M, M), path + ("o",)),
    ]


def bart_weight_map(cfg: Seq2SeqConfig) -> list[Entry]:
    """Every Hugging Face tensor (key without ``model.``, except ``final_logits_bias`` and
    ``lm_head.weight``; stored shape) and the parameter it feeds."""
    V, M, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
    entries = [entry(_SHARED, (V, M), ("tok_embed", "embedding"))]
    for side, layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        entries += [
            entry(f"{side}.embed_positions.weight", (cfg.context_length + cfg.position_offset, M),
                  (side, "pos_embed", "embedding")),
            *_norm(f"{side}.layernorm_embedding", M, (side, "embed_norm")),
        ]  # fmt: skip
        for i in range(layers):
            h, b = f"{side}.layers.{i}.", (side, "blocks", i)
            entries += [*_attention(h + "self_attn", M, b + ("attn",)),
                        *_norm(h + "self_attn_layer_norm", M, b + ("ln1",))]  # fmt: skip
            if side == "decoder":
                entries += [*_attention(h + "encoder_attn", M, b + ("cross_attn",)),
                            *_norm(h + "encoder_attn_layer_norm", M, b + ("ln_cross",))]  # fmt: skip
            entries += [
                *_dense(h + "fc1", (F, M), b + ("ffn", "w_in")),
                *_dense(h + "fc2", (M, F), b + ("ffn", "w_out")),
                *_norm(h + "final_layer_norm", M, b + ("ln2",)),
            ]
    if cfg.logits_bias:
        entries.append(entry(_LOGITS_BIAS, (1, V), ("final_logits_bias",), reshape((V,))))
    if not cfg.tie_embeddings:
        entries.append(entry(_HEAD, (V, M), ("lm_head", "kernel"), TRANSPOSE))
    return entries


# -- loading and saving -----------------------------------------------------------------------------------


def load_hf_bart(
    source: Any,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> EncoderDecoder:
    """A Hugging Face BART as an :class:`~tfd_jax.models.seq2seq.EncoderDecoder` with the same weights and outputs.

    Args:
      source: a ``transformers`` ``BartForConditionalGeneration`` (or ``BartModel``) object, a
        directory written by ``save_pretrained`` or :func:`save_hf_bart` (safetensors, sharded or
        not, or PyTorch pickles), or a Hub name such as ``"facebook/bart-base"``.
      dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      compute_dtype: activation dtype (defaults to ``dtype``); norms, softmax and logits stay float32.
      revision: Hub branch, tag or commit (Hub names only).
      seed: seeds the dropout streams when ``dropout`` is above 0.
      **overrides: ``dropout``, ``attention_impl``, ``remat`` or ``scan_layers``. Dropout is 0 unless set here.

    Returns:
      An ``EncoderDecoder`` whose logits ``[B, T, V]`` for a source ``[B, S]`` (with its attention
      mask) and decoder input ``[B, T]`` match the Hugging Face model's.

    The model is built abstractly (shapes only) and filled one tensor at a time, never initialised.

    Raises:
      FileNotFoundError: a directory without config.json or weights.
      ValueError: an unsupported config option (named by its field), a missing, unexpected or wrongly
        shaped tensor (named by its key), or a stored copy of the token table (a tied head, a
        stack's ``embed_tokens``) that differs from ``shared.weight``.
      OSError / ImportError: a Hub name that cannot be fetched, or a missing optional package.
    """
    scan_layers = weightmap.load_options("load_hf_bart", overrides, _LOAD_OVERRIDES)
    ckpt = files.open_checkpoint(
        source, revision=revision, family="BART", hub_example="facebook/bart-base", writer="save_hf_bart"
    )
    cfg = bart_config_from_hf(ckpt.config, param_dtype=dtype, dtype=compute_dtype or dtype, **overrides)
    short, stored = files.strip_prefix(ckpt.loaders, _PREFIX, ckpt.origin)

    def name(key: str) -> str:
        return stored.get(key, key if key in (_HEAD, _LOGITS_BIAS) else _PREFIX + key)

    if _SHARED not in short:  # a checkpoint may keep the table under one of its tied names only
        for copy in _EMBED_COPIES:
            if copy in short:
                short[_SHARED] = short.pop(copy)
                stored[_SHARED] = stored.pop(copy)
                break
    if _LOGITS_BIAS not in short:  # transformers starts a missing logits bias at zero
        short[_LOGITS_BIAS] = lambda: np.zeros((1, cfg.vocab_size), np.float32)

    for copy in _EMBED_COPIES:
        weightmap.check_tied(
            short, copy, _SHARED, origin=ckpt.origin, name=name,
            why="Both stacks read their tokens from the one table shared.weight here (transformers 5.x gives "
            "each stack a table of its own when tie_word_embeddings=False; BART has one)",
        )  # fmt: skip
    if cfg.tie_embeddings:
        weightmap.check_tied(
            short, _HEAD, _SHARED, origin=ckpt.origin, name=name,
            why="config.json says tie_word_embeddings=True, so the output head is the token table; "
            "set tie_word_embeddings=False to load a head of its own",
        )  # fmt: skip

    def ignore(key: str) -> bool:
        return key in _EMBED_COPIES or key in _SKIPPED or (cfg.tie_embeddings and key == _HEAD)

    model = weightmap.load(
        bart_weight_map(cfg),
        short,
        lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(seed)),
        origin=ckpt.origin,
        name=name,
        ignore=ignore,
        unexpected_hint=(
            f"a BartForConditionalGeneration with {cfg.num_layers} encoder and {cfg.num_decoder_layers} decoder "
            "layers (per its config) has no such weights"
        ),
        shape_hint=(
            f" (d_model={cfg.d_model}, encoder_ffn_dim={cfg.d_ff}, vocab_size={cfg.vocab_size}, "
            f"max_position_embeddings={cfg.context_length})"
        ),
    )
    return with_layout(model, scan_layers=scan_layers)


def save_hf_bart(model: EncoderDecoder, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a checkpoint that ``BartForConditionalGeneration.from_pretrained`` loads.

    The directory gets ``config.json`` (see :func:`bart_config_to_hf`) and ``model.safetensors``: the
    ``model.``-prefixed keys ``save_pretrained`` writes, ``final_logits_bias`` ``[1, V]`` and, for an
    untied head, ``lm_head.weight`` and both stacks' ``embed_tokens.weight`` (copies of the token
    table, which transformers 5.x does not tie to ``shared.weight`` then), in the parameter dtype.
    :func:`load_hf_bart` reads it back bit for bit. The files are staged in a sibling directory that
    then takes ``directory``'s place.

    Args:
      model: a BART-shaped ``EncoderDecoder`` (the ``bart-*`` presets).
      directory: where to write; created with its parents if needed.
      overwrite: replace a non-empty ``directory``. Its previous contents are all removed.

    Returns:
      The directory, as a ``Path``.

    Raises:
      ValueError: the model is not BART-shaped (the message lists why).
      FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
    """
    model = with_layout(model, scan_layers=False)  # the weight map names blocks one by one
    hf_config = bart_config_to_hf(model.config)
    files.check_writable(directory, overwrite=overwrite)
    tensors = weightmap.save(bart_weight_map(model.config), model)
    if not model.config.tie_embeddings:
        # transformers 5.x ties the stacks' tables to shared.weight only along with the head: an
        # untied model needs them stored, or they would start from random values.
        tensors.update({copy: tensors[_SHARED] for copy in _EMBED_COPIES})
    return files.write_checkpoint(
        directory,
        hf_config,
        {(k if k in (_HEAD, _LOGITS_BIAS) else _PREFIX + k): v for k, v in tensors.items()},
        overwrite=overwrite,
    )
