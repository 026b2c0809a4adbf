r"""Hugging Face T5 weights in and out of ``tfd_jax.models.seq2seq.EncoderDecoder`` (Chapters 18 and 19).

T5 is the encoder-decoder of Chapter 19 with pre-RMSNorm blocks (no bias, no mean subtraction), no
biases anywhere, no absolute positions, and a learned scalar per relative-position bucket and head
added to the attention scores (which are not divided by sqrt(D)). Two generations are supported:

- **T5 v1.0** (``t5-small``, ``t5-base``, ...): ``feed_forward_proj="relu"``, a ReLU FFN, and an output
  head tied to the token embeddings, applied to the decoder output times ``d_model**-0.5``;
- **T5 v1.1** (``google/t5-v1_1-*``, Flan-T5): ``feed_forward_proj="gated-gelu"``, a gated FFN with the
  tanh GELU (``act(x W_gate) * (x W_in)``), and an output head of its own, not scaled.

Hugging Face keeps ``torch.nn.Linear`` weights ``[out, in]``; ours are ``[in, out]``, so every
projection is transposed. Each stack stores its relative-position table once, in its first block;
here it is the stack's ``rel_bias`` (shared by its layers in both libraries).

====================================================================  ==================================  ============
Hugging Face key                                                      ``EncoderDecoder`` parameter        stored shape
====================================================================  ==================================  ============
``shared.weight``                                                     ``tok_embed.embedding``             ``[V, M]``
``{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight``  ``{s}.rel_bias.embedding``          ``[R, H]``
``{s}.block.{i}.layer.0.SelfAttention.{q,k,v}.weight``                ``{s}.blocks[i].attn.{q,k,v}``      ``[H*D, M]``
``{s}.block.{i}.layer.0.SelfAttention.o.weight``                      ``{s}.blocks[i].attn.o``            ``[M, H*D]``
``{s}.block.{i}.layer.0.layer_norm.weight``                           ``{s}.blocks[i].ln1.scale``         ``[M]``
``decoder.block.{i}.layer.1.EncDecAttention.{q,k,v}.weight``          ``decoder.blocks[i].cross_attn.*``  ``[H*D, M]``
``decoder.block.{i}.layer.1.EncDecAttention.o.weight``                ``decoder.blocks[i].cross_attn.o``  ``[M, H*D]``
``decoder.block.{i}.layer.1.layer_norm.weight``                       ``decoder.blocks[i].ln_cross``      ``[M]``
``{s}.block.{i}.layer.{f}.DenseReluDense.wi.weight`` (v1.0)           ``{s}.blocks[i].ffn.w_in``          ``[F, M]``
``{s}.block.{i}.layer.{f}.DenseReluDense.wi_0.weight`` (v1.1)         ``{s}.blocks[i].ffn.w_gate``        ``[F, M]``
``{s}.block.{i}.layer.{f}.DenseReluDense.wi_1.weight`` (v1.1)         ``{s}.blocks[i].ffn.w_in``          ``[F, M]``
``{s}.block.{i}.layer.{f}.DenseReluDense.wo.weight``                  ``{s}.blocks[i].ffn.w_out``         ``[M, F]``
``{s}.block.{i}.layer.{f}.layer_norm.weight``                         ``{s}.blocks[i].ln2.scale``         ``[M]``
``{s}.final_layer_norm.weight``                                       ``{s}.final_norm.scale``            ``[M]``
``lm_head.weight`` (v1.1)                                             ``lm_head.kernel``                  ``[V, M]``
====================================================================  ==================================  ============

``{s}`` is ``encoder`` or ``decoder``; ``{f}`` is the FFN sublayer, 1 in the encoder and 2 in the
decoder (whose sublayer 1 is the cross-attention). Linear weights map to ``.kernel``, transposed.
``encoder.embed_tokens.weight`` and ``decoder.embed_tokens.weight`` are ``shared.weight`` again, as is
``lm_head.weight`` of a v1.0 model: when stored they are checked, not loaded. Some checkpoints also
store an unused ``decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight``; it is
skipped, as ``transformers`` skips it.

**Which head.** ``transformers`` 4.x read ``tie_word_embeddings`` as "v1.0 head" (tied and scaled) or
"v1.1 head" (untied, not scaled). 5.x always writes ``tie_word_embeddings=True`` and says whether the
decoder output is scaled in ``scale_decoder_outputs``; the head is untied when the checkpoint stores
an ``lm_head.weight`` that differs from ``shared.weight``. Both forms are read: a scaled head is the
tied one (``head_scale=True``), an unscaled one is ``lm_head`` (or, when the checkpoint has no
``lm_head.weight``, the token table without scaling, as ``transformers`` then ties it). A scaled
head of its own has no ``EncoderDecoder`` form and is refused.

Shape letters: V vocabulary, M model width (``d_model``), H heads, D head dim (``d_kv``), F FFN width,
R relative-position buckets.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from tfd_jax.interop import files, weightmap
from tfd_jax.interop.weightmap import TRANSPOSE, Entry, entry
from tfd_jax.models.seq2seq import EncoderDecoder, Seq2SeqConfig
from tfd_jax.nn import with_layout

__all__ = ["load_hf_t5", "save_hf_t5", "t5_config_from_hf", "t5_config_to_hf", "t5_weight_map"]

#: ``feed_forward_proj`` -> (our activation, gated FFN, the ``dense_act_fn`` transformers derives).
#: "gated-gelu" runs transformers' ``gelu_new``: the tanh approximation.
_FFN_FROM_HF = {"relu": ("relu", False, "relu"), "gated-gelu": ("gelu_tanh", True, "gelu_new")}
_FFN_TO_HF = {(act, gated): proj for proj, (act, gated, _) in _FFN_FROM_HF.items()}

#: What ``transformers.T5Config`` assumes for a field that config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_decoder_layers": None,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
    "is_encoder_decoder": True,
    "is_decoder": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": None,
    "n_positions": 512,
}

#: Seq2SeqConfig fields a caller may set when loading: they change how the model runs, not its
#: weights. T5 has no position table, so its context length is free too (config.json's
#: ``n_positions``, else 512).
_LOAD_OVERRIDES = frozenset({"dropout", "attention_impl", "remat", "scan_layers", "context_length"})

_HEAD = "lm_head.weight"
_SHARED = "shared.weight"
#: Copies of ``shared.weight`` that a module's state dict (or an old checkpoint) holds.
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
#: A table ``transformers`` never uses (cross-attention has no position bias).
_UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


# -- configs ------------------------------------------------------------------------------------------


def _scaled_head(c: Mapping[str, Any]) -> bool:
    """Whether the decoder output is multiplied by ``d_model**-0.5`` before the head (see the
    module docstring: 5.x says ``scale_decoder_outputs``, 4.x ``tie_word_embeddings``)."""
    if "scale_decoder_outputs" in c:
        return bool(c["scale_decoder_outputs"])
    return c.get("tie_word_embeddings", True) is not False


def _single_id(c: Mapping[str, Any], field: str, problems: list[str]) -> int | None:
    value = c.get(field)
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            problems.append(f"{field}={value!r} (one id only)")
            return None
        value = value[0]
    return None if value is None else int(value)


def t5_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> Seq2SeqConfig:
    """Translate a Hugging Face T5 ``config.json`` (as a dict) into a :class:`Seq2SeqConfig`.

    Args:
      hf: the config dict; fields it leaves out take ``transformers.T5Config``'s defaults.
      **overrides: passed on to ``Seq2SeqConfig`` (dtypes, dropout, attention implementation,
        ``context_length``). Dropout is 0 unless set here (``dropout_rate`` is for training).

    The head follows the config: tied and scaled (v1.0) or untied (v1.1); see the module docstring.

    Raises:
      ValueError: the config is not T5, or uses an option our model does not implement (another
        ``feed_forward_proj``, an ``is_gated_act`` or ``dense_act_fn`` that contradicts it, a
        decoder-only config); each is named by its field and value.
    """
    model_type = hf.get("model_type", "t5")
    if model_type != "t5":
        raise ValueError(f"expected a T5 config (model_type 't5'), got model_type {model_type!r}")
    c = {**_HF_DEFAULTS, **hf}

    problems: list[str] = []
    proj = c["feed_forward_proj"]
    activation, gated, act_fn = _FFN_FROM_HF.get(proj, (None, None, None))
    if activation is None:
        problems.append(f"feed_forward_proj={proj!r} (supported: {sorted(_FFN_FROM_HF)})")
    else:
        if "is_gated_act" in c and bool(c["is_gated_act"]) != gated:
            problems.append(f"is_gated_act={c['is_gated_act']!r} (feed_forward_proj={proj!r} means {gated})")
        if "dense_act_fn" in c and c["dense_act_fn"] != act_fn:
            problems.append(f"dense_act_fn={c['dense_act_fn']!r} (feed_forward_proj={proj!r} means {act_fn!r})")
    if not c["is_encoder_decoder"]:
        problems.append("is_encoder_decoder=False (an encoder-decoder is converted here)")
    if c["is_decoder"]:
        problems.append("is_decoder=True (a decoder-only T5 stack)")
    pad = _single_id(c, "pad_token_id", problems)
    eos = _single_id(c, "eos_token_id", problems)
    start = _single_id(c, "decoder_start_token_id", problems)
    if problems:
        raise ValueError("unsupported T5 config option(s): " + "; ".join(problems))

    scaled = _scaled_head(c)
    pad = 0 if pad is None else pad
    layers = int(c["num_layers"])
    dec_layers = c["num_decoder_layers"]
    # No position table: the context length is config.json's n_positions unless the caller sets it.
    overrides = {"dropout": 0.0, "context_length": int(c.get("n_positions") or 512), **overrides}
    return Seq2SeqConfig(
        family="t5",
        vocab_size=int(c["vocab_size"]),
        d_model=int(c["d_model"]),
        num_heads=int(c["num_heads"]),
        head_dim=int(c["d_kv"]),
        num_layers=layers,
        num_decoder_layers=layers if dec_layers is None else int(dec_layers),
        d_ff=int(c["d_ff"]),
        activation=activation,
        gated_ffn=gated,
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=float(c["layer_norm_epsilon"]),
        norm_bias=False,
        final_norm=True,
        embed_norm=False,
        qkv_bias=False,
        out_bias=False,
        ffn_bias=False,
        positions="relative",
        position_offset=0,
        relative_buckets=int(c["relative_attention_num_buckets"]),
        relative_max_distance=int(c["relative_attention_max_distance"]),
        attn_scale=1.0,
        scale_embeddings=False,
        tie_embeddings=scaled,
        head_scale=scaled,
        logits_bias=False,
        pad_id=pad,
        eos_id=1 if eos is None else eos,
        decoder_start_id=pad if start is None else start,
        init="bert",
        **overrides,
    )


def t5_config_to_hf(cfg: Seq2SeqConfig) -> dict[str, Any]:
    """The ``config.json`` dict (``transformers.T5Config`` fields) for a T5-shaped ``cfg``.

    The head is written in both forms (``tie_word_embeddings`` for 4.x, ``scale_decoder_outputs``
    for 5.x); :func:`save_hf_t5` stores ``lm_head.weight`` whenever the head is not scaled.

    Raises:
      ValueError: listing every field that makes ``cfg`` something ``T5ForConditionalGeneration``
        cannot represent (LayerNorm, post-LN, absolute positions, biases, another FFN, ...).
    """
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (T5 uses 'rmsnorm')")
    need(cfg.norm_position == "pre", f"norm_position={cfg.norm_position!r} (T5 is pre-norm: 'pre')")
    need(cfg.final_norm, "final_norm=False (each T5 stack ends with a norm)")
    need(not cfg.embed_norm, "embed_norm=True (T5 does not normalise its embeddings)")
    need(cfg.positions == "relative", f"positions={cfg.positions!r} (T5 uses relative position buckets: 'relative')")
    need(cfg.attn_scale == 1.0, f"attn_scale={cfg.attn_scale!r} (T5 does not scale its scores: 1.0)")
    need(not cfg.scale_embeddings, "scale_embeddings=True (T5 does not scale its embeddings)")
    need(not (cfg.qkv_bias or cfg.out_bias), "qkv_bias/out_bias=True (T5's attention has no biases)")
    need(not cfg.ffn_bias or cfg.gated_ffn, "ffn_bias=True (T5's FFN has no biases)")
    need(not cfg.logits_bias, "logits_bias=True (T5's head has no bias)")
    need((cfg.activation, cfg.gated_ffn) in _FFN_TO_HF,
         f"activation={cfg.activation!r} with gated_ffn={cfg.gated_ffn} (T5's FFN is 'relu' ungated (v1.0) or "
         "'gelu_tanh' gated (v1.1))")  # fmt: skip
    if problems:
        raise ValueError("this model has no Hugging Face T5 form: " + "; ".join(problems))
    scaled = cfg.tie_embeddings and cfg.head_scale
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "dropout_rate": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": 1.0,
        "feed_forward_proj": _FFN_TO_HF[(cfg.activation, cfg.gated_ffn)],
        "is_encoder_decoder": True,
        "is_decoder": False,
        "use_cache": True,
        "pad_token_id": cfg.pad_id,
        "eos_token_id": cfg.eos_id,
        "decoder_start_token_id": cfg.decoder_start_id,
        "n_positions": cfg.context_length,
        "tie_word_embeddings": scaled,
        "scale_decoder_outputs": scaled,
        "dtype": cfg.param_dtype,
    }


# -- the weight map -------------------------------------------------------------------------------------


def _linear(key: str, shape: tuple[int, int], path: tuple) -> Entry:
    """A bias-free torch ``Linear`` weight ``[out, in]`` -> our ``[in, out]`` kernel."""
    return entry(key + ".weight", shape, path + ("kernel",), TRANSPOSE)


def _attention(key: str, cfg: Seq2SeqConfig, path: tuple) -> list[Entry]:
    M, HD = cfg.d_model, cfg.num_heads * cfg.head_dim
    return [
        _linear(key + ".q", (HD, M), path + ("q",)),
        _linear(key + ".k", (HD, M), path + ("k",)),
        _linear(key + ".v", (HD, M), path + ("v",)),
        _linear(key + ".o", (M, HD), path + ("o",)),
    ]


def _ffn(key: str, cfg: Seq2SeqConfig, path: tuple) -> list[Entry]:
    M, F = cfg.d_model, cfg.d_ff
    if cfg.gated_ffn:
        inputs = [_linear(key + ".wi_0", (F, M), path + ("w_gate",)), _linear(key + ".wi_1", (F, M), path + ("w_in",))]
    else:
        inputs = [_linear(key + ".wi", (F, M), path + ("w_in",))]
    return [*inputs, _linear(key + ".wo", (M, F), path + ("w_out",))]


def t5_weight_map(cfg: Seq2SeqConfig) -> list[Entry]:
    """Every Hugging Face tensor (key, stored shape) and the parameter it feeds, for ``cfg``'s FFN
    (``wi`` or ``wi_0`` / ``wi_1``) and head (``lm_head.weight`` only when untied)."""
    M, V, R, H = cfg.d_model, cfg.vocab_size, cfg.relative_buckets, cfg.num_heads
    entries = [entry(_SHARED, (V, M), ("tok_embed", "embedding"))]
    for side, layers in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        entries.append(entry(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (R, H),
                             (side, "rel_bias", "embedding")))  # fmt: skip
        for i in range(layers):
            h, b = f"{side}.block.{i}.layer.", (side, "blocks", i)
            entries += [
                *_attention(h + "0.SelfAttention", cfg, b + ("attn",)),
                entry(h + "0.layer_norm.weight", (M,), b + ("ln1", "scale")),
            ]
            ff = 1
            if side == "decoder":
                entries += [
                    *_attention(h + "1.EncDecAttention", cfg, b + ("cross_attn",)),
                    entry(h + "1.layer_norm.weight", (M,), b + ("ln_cross", "scale")),
                ]
                ff = 2
            entries += [
                *_ffn(f"{h}{ff}.DenseReluDense", cfg, b + ("ffn",)),
                entry(f"{h}{ff}.layer_norm.weight", (M,), b + ("ln2", "scale")),
            ]
        entries.append(entry(f"{side}.final_layer_norm.weight", (M,), (side, "final_norm", "scale")))
    if not cfg.tie_embeddings:
        entries.append(entry(_HEAD, (V, M), ("lm_head", "kernel"), TRANSPOSE))
    return entries


# -- loading and saving -----------------------------------------------------------------------------------


def load_hf_t5(
    source: Any,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> EncoderDecoder:
    """A Hugging Face T5 as an :class:`~tfd_jax.models.seq2seq.EncoderDecoder` with the same weights and outputs.

    Args:
      source: a ``transformers`` ``T5ForConditionalGeneration`` (or ``T5Model``) object, a directory
        written by ``save_pretrained`` or :func:`save_hf_t5` (safetensors, sharded or not, or
        PyTorch pickles), or a Hub name such as ``"google-t5/t5-small"``.
      dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      compute_dtype: activation dtype (defaults to ``dtype``); norms, softmax and logits stay float32.
      revision: Hub branch, tag or commit (Hub names only).
      seed: seeds the dropout streams when ``dropout`` is above 0.
      **overrides: ``dropout``, ``attention_impl``, ``remat``, ``scan_layers`` or ``context_length``
        (the longest source or target; T5 has no position table). Dropout is 0 unless set here.

    Returns:
      An ``EncoderDecoder`` whose logits ``[B, T, V]`` for a source ``[B, S]`` (with its attention
      mask) and decoder input ``[B, T]`` match the Hugging Face model's.

    The model is built abstractly (shapes only) and filled one tensor at a time, never initialised.

    Raises:
      FileNotFoundError: a directory without config.json or weights.
      ValueError: an unsupported config option (named by its field), a missing, unexpected or wrongly
        shaped tensor (named by its key), a stored copy of the token table that differs from
        ``shared.weight``, or a scaled head with weights of its own.
      OSError / ImportError: a Hub name that cannot be fetched, or a missing optional package.
    """
    scan_layers = weightmap.load_options("load_hf_t5", overrides, _LOAD_OVERRIDES)
    ckpt = files.open_checkpoint(
        source, revision=revision, family="T5", hub_example="google-t5/t5-small", writer="save_hf_t5"
    )
    cfg = t5_config_from_hf(ckpt.config, param_dtype=dtype, dtype=compute_dtype or dtype, **overrides)
    loaders = dict(ckpt.loaders)
    if _SHARED not in loaders:  # a checkpoint may keep the table under one of its tied names only
        for copy in _EMBED_COPIES:
            if copy in loaders:
                loaders[_SHARED] = loaders.pop(copy)
                break
    if not cfg.tie_embeddings and _HEAD not in loaders and _SHARED in loaders:
        # An unscaled head that was never untied: transformers ties it to the table on load.
        cfg = cfg.replace(tie_embeddings=True)

    def check(copy: str, why: str) -> None:
        weightmap.check_tied(loaders, copy, _SHARED, origin=ckpt.origin, why=why)

    for copy in _EMBED_COPIES:
        check(copy, "Both stacks read their tokens from the one table shared.weight")
    if cfg.tie_embeddings:
        why = ("the head is the token table here" if not cfg.head_scale else
               "config.json says the decoder output is scaled by d_model**-0.5 (T5 v1.0: scale_decoder_outputs=True, "
               "or tie_word_embeddings not False), which goes with the tied head; a scaled head of its own has no "
               "EncoderDecoder form")  # fmt: skip
        check(_HEAD, why)

    def ignore(key: str) -> bool:
        return key in _EMBED_COPIES or key == _UNUSED or (cfg.tie_embeddings and key == _HEAD)

    model = weightmap.load(
        t5_weight_map(cfg),
        loaders,
        lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(seed)),
        origin=ckpt.origin,
        ignore=ignore,
        unexpected_hint=(
            f"a T5ForConditionalGeneration with {cfg.num_layers} encoder and {cfg.num_decoder_layers} decoder "
            f"layers and feed_forward_proj={_FFN_TO_HF[(cfg.activation, cfg.gated_ffn)]!r} (per its config) has no "
            "such weights"
        ),
        shape_hint=(
            f" (d_model={cfg.d_model}, num_heads={cfg.num_heads}, d_kv={cfg.head_dim}, d_ff={cfg.d_ff}, "
            f"vocab_size={cfg.vocab_size}, relative_attention_num_buckets={cfg.relative_buckets})"
        ),
    )
    return with_layout(model, scan_layers=scan_layers)


def save_hf_t5(model: EncoderDecoder, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a checkpoint that ``T5ForConditionalGeneration.from_pretrained`` loads.

    The directory gets ``config.json`` (see :func:`t5_config_to_hf`) and ``model.safetensors`` with
    the keys ``save_pretrained`` writes: ``shared.weight``, both stacks, and ``lm_head.weight`` when
    the head is not scaled (a copy of the token table when that head is tied), in the parameter
    dtype. :func:`load_hf_t5` reads it back bit for bit. The files are staged in a sibling
    directory that then takes ``directory``'s place.

    Args:
      model: a T5-shaped ``EncoderDecoder`` (the ``t5-*`` presets).
      directory: where to write; created with its parents if needed.
      overwrite: replace a non-empty ``directory``. Its previous contents are all removed.

    Returns:
      The directory, as a ``Path``.

    Raises:
      ValueError: the model is not T5-shaped (the message lists why).
      FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
    """
    model = with_layout(model, scan_layers=False)  # the weight map names blocks one by one
    cfg = model.config
    hf_config = t5_config_to_hf(cfg)
    files.check_writable(directory, overwrite=overwrite)
    tensors = weightmap.save(t5_weight_map(cfg), model)
    if cfg.tie_embeddings and not cfg.head_scale:
        tensors[_HEAD] = np.array(tensors[_SHARED])  # an unscaled tied head: 4.x then reads it as untied
    return files.write_checkpoint(directory, hf_config, tensors, overwrite=overwrite)
