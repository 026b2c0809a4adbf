"""Hugging Face GPT-2 weights in and out of ``tfd_jax.models.GPT`` (Chapters 9, 10 and 18).

Chapter 18's advice is to start from a pretrained model rather than from scratch; GPT-2 is the model
whose sizes Chapter 9 quotes (12, 24, 36 and 48 layers). This module holds GPT-2's config
translation and weight map; reading and writing the files is :mod:`tfd_jax.interop.files`, applying
the map :mod:`tfd_jax.interop.weightmap`. Neither ``torch`` nor ``transformers`` is needed for
directories holding safetensors files.

The two layouts differ only in names and in one fused matrix. Hugging Face's GPT-2 keeps its linear
layers as ``Conv1D`` modules whose weights are stored ``[in, out]``, the same orientation as our
``y = x @ kernel``, so nothing is transposed:

=====================================  ============================================  ============
Hugging Face key (``transformer.`` +)  ``GPT`` parameter                             shape
=====================================  ============================================  ============
``wte.weight``                         ``tok_embed.embedding`` (tied output head)    ``[V, M]``
``wpe.weight``                         ``pos_embed.embedding``                       ``[P, M]``
``h.{i}.ln_1.weight`` / ``.bias``      ``blocks[i].ln1.scale`` / ``.bias``           ``[M]``
``h.{i}.attn.c_attn.weight``           ``blocks[i].attn.{q,k,v}.kernel`` (split)     ``[M, 3M]``
``h.{i}.attn.c_attn.bias``             ``blocks[i].attn.{q,k,v}.bias`` (split)       ``[3M]``
``h.{i}.attn.c_proj.weight`` / bias    ``blocks[i].attn.o.kernel`` / ``.bias``       ``[M, M]``
``h.{i}.ln_2.weight`` / ``.bias``      ``blocks[i].ln2.scale`` / ``.bias``           ``[M]``
``h.{i}.mlp.c_fc.weight`` / bias       ``blocks[i].ffn.w_in.kernel`` / ``.bias``     ``[M, F]``
``h.{i}.mlp.c_proj.weight`` / bias     ``blocks[i].ffn.w_out.kernel`` / ``.bias``    ``[F, M]``
``ln_f.weight`` / ``.bias``            ``final_norm.scale`` / ``.bias``              ``[M]``
=====================================  ============================================  ============

``c_attn`` holds Q, K and V side by side along its output axis, in that order. ``lm_head.weight`` is
the transposed view of ``wte.weight`` (weight tying, Chapter 10), so it is never stored separately.

Shape letters: V vocabulary, P positions (context length), M model width, F FFN width, L layers.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax import nnx

from tfd_jax.interop import files, weightmap
from tfd_jax.interop.weightmap import Entry, entry, split
from tfd_jax.models.config import GPTConfig
from tfd_jax.models.gpt import GPT, with_layout

__all__ = ["gpt2_config_from_hf", "gpt2_config_to_hf", "load_hf_gpt2", "save_hf_gpt2"]

#: Hugging Face ``activation_function`` -> our ``GPTConfig.activation``. ``gelu_new`` and
#: ``gelu_pytorch_tanh`` are both the tanh approximation of GELU that GPT-2 was trained with.
_ACT_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

#: What ``transformers.GPT2Config`` assumes for a field that config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

#: GPTConfig fields a caller may set when loading: they change how the model runs, not its weights.
_LOAD_OVERRIDES = frozenset({"dropout", "embed_dropout", "attention_impl", "remat", "scan_layers"})

_PREFIX = "transformer."
#: Old checkpoints (the original "gpt2" upload among them) also store each layer's causal mask as a
#: buffer. It is not a weight: our model builds its mask from positions.
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")



# -- configs ------------------------------------------------------------------------------------------


def gpt2_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """Translate a Hugging Face GPT-2 ``config.json`` (as a dict) into a :class:`GPTConfig`.

    Fields config.json leaves out take ``transformers.GPT2Config``'s defaults. ``overrides`` are
    passed on to ``GPTConfig.preset("gpt2", ...)`` (dtypes, dropout, attention implementation).

    Raises:
      ValueError: the config is not GPT-2, or uses an option our model does not implement.
    """
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"expected a GPT-2 config (model_type 'gpt2'), got model_type {model_type!r}")
    c = {**_HF_DEFAULTS, **hf}

    problems = []
    act = c["activation_function"]
    if act not in _ACT_FROM_HF:
        problems.append(f"activation_function={act!r} (supported: {sorted(_ACT_FROM_HF)})")
    if not c["scale_attn_weights"]:
        problems.append("scale_attn_weights=False (our attention always divides scores by sqrt(D))")
    if c["scale_attn_by_inverse_layer_idx"]:
        problems.append("scale_attn_by_inverse_layer_idx=True (per-layer attention scaling)")
    if c["add_cross_attention"]:
        problems.append("add_cross_attention=True (cross-attention layers in a decoder-only model)")
    if not c["tie_word_embeddings"]:
        problems.append("tie_word_embeddings=False (a separate output head; GPT-2 ties it to wte)")
    # reorder_and_upcast_attn only changes where the 1/sqrt(D) is applied and computes the scores in
    # float32; the function is the same, and our attention already takes its softmax in float32.
    if problems:
        raise ValueError("unsupported GPT-2 config option(s): " + "; ".join(problems))

    n_inner = c["n_inner"]
    return GPTConfig.preset(
        "gpt2",
        vocab_size=int(c["vocab_size"]),
        context_length=int(c["n_positions"]),
        d_model=int(c["n_embd"]),
        num_heads=int(c["n_head"]),
        num_layers=int(c["n_layer"]),
        d_ff=0 if n_inner is None else int(n_inner),
        norm_eps=float(c["layer_norm_epsilon"]),
        activation=_ACT_FROM_HF[act],
        **overrides,
    )


def gpt2_config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """The ``config.json`` dict (``transformers.GPT2Config`` fields) for a GPT-2-shaped config.

    Raises:
      ValueError: listing every field that makes ``cfg`` something GPT-2 cannot represent (post-LN,
        no final norm, RMSNorm, sinusoidal or rotary positions, an untied head, missing biases, ...).
    """
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(cfg.norm_position == "pre", f"norm_position={cfg.norm_position!r} (GPT-2 is pre-LN: 'pre')")
    need(cfg.final_norm, "final_norm=False (GPT-2 has a final LayerNorm)")
    need(
        cfg.norm == "layernorm" and cfg.norm_bias,
        f"norm={cfg.norm!r}, norm_bias={cfg.norm_bias} (GPT-2 uses LayerNorm with a bias)",
    )
    need(cfg.positions == "learned", f"positions={cfg.positions!r} (GPT-2 learns its positions: 'learned')")
    need(cfg.tie_embeddings, "tie_embeddings=False (GPT-2 ties its output head to the token embeddings)")
    need(
        cfg.qkv_bias and cfg.out_bias and cfg.ffn_bias,
        "qkv_bias/out_bias/ffn_bias must all be True (GPT-2 has biases everywhere)",
    )
    need(not cfg.gated_ffn, "gated_ffn=True (GPT-2's FFN is not gated)")
    need(cfg.activation in _ACT_TO_HF, f"activation={cfg.activation!r} (supported: {sorted(_ACT_TO_HF)})")
    if problems:
        raise ValueError("this model is not GPT-2-shaped, so it has no Hugging Face GPT-2 form: " + "; ".join(problems))

    gpt2_vocab = cfg.vocab_size == 50257  # GPT-2's own tokenizer; its <|endoftext|> is id 50256
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": None if cfg.d_ff == 4 * cfg.d_model else cfg.d_ff,
        "activation_function": _ACT_TO_HF[cfg.activation],
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.embed_dropout,
        "attn_pdrop": 0.0,  # our model has no dropout on the attention weights
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": 50256 if gpt2_vocab else None,
        "eos_token_id": 50256 if gpt2_vocab else None,
        "dtype": cfg.param_dtype,
    }


# -- the weight map -------------------------------------------------------------------------------------


def gpt2_weight_map(cfg: GPTConfig) -> list[Entry]:
    """Every Hugging Face tensor (key without ``transformer.``, shape) and the parameter(s) it feeds.

    ``c_attn`` is split into three equal parts along its last axis, Q, K and V in that order.
    """
    V, P, M, F = cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.d_ff
    entries = [
        entry("wte.weight", (V, M), ("tok_embed", "embedding")),
        entry("wpe.weight", (P, M), ("pos_embed", "embedding")),
    ]
    for i in range(cfg.num_layers):
        h, b = f"h.{i}.", ("blocks", i)
        entries += [
            entry(h + "ln_1.weight", (M,), b + ("ln1", "scale")),
            entry(h + "ln_1.bias", (M,), b + ("ln1", "bias")),
            entry(h + "attn.c_attn.weight", (M, 3 * M), [b + ("attn", n, "kernel") for n in "qkv"], split(3)),
            entry(h + "attn.c_attn.bias", (3 * M,), [b + ("attn", n, "bias") for n in "qkv"], split(3)),
            entry(h + "attn.c_proj.weight", (M, M), b + ("attn", "o", "kernel")),
            entry(h + "attn.c_proj.bias", (M,), b + ("attn", "o", "bias")),
            entry(h + "ln_2.weight", (M,), b + ("ln2", "scale")),
            entry(h + "ln_2.bias", (M,), b + ("ln2", "bias")),
            entry(h + "mlp.c_fc.weight", (M, F), b + ("ffn", "w_in", "kernel")),
            entry(h + "mlp.c_fc.bias", (F,), b + ("ffn", "w_in", "bias")),
            entry(h + "mlp.c_proj.weight", (F, M), b + ("ffn", "w_out", "kernel")),
            entry(h + "mlp.c_proj.bias", (M,), b + ("ffn", "w_out", "bias")),
        ]
    entries += [
        entry("ln_f.weight", (M,), ("final_norm", "scale")),
        entry("ln_f.bias", (M,), ("final_norm", "bias")),
    ]
    return entries


# -- loading and saving -----------------------------------------------------------------------------------


def load_hf_gpt2(
    source: Any,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> GPT:
    """A Hugging Face GPT-2 as a :class:`~tfd_jax.models.GPT` with the same weights and outputs.

    Args:
      source: one of
        - a ``transformers`` ``GPT2LMHeadModel`` (or ``GPT2Model``) object;
        - a directory written by ``save_pretrained`` or :func:`save_hf_gpt2`: ``config.json`` plus
          ``model.safetensors`` (read with safetensors' numpy backend: neither torch nor
          transformers is needed), sharded safetensors, or ``pytorch_model.bin`` (needs torch);
        - a Hub name such as ``"gpt2"`` or ``"openai-community/gpt2-xl"`` (needs huggingface_hub and,
          the first time, a network connection).
      dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      compute_dtype: activation dtype (defaults to ``dtype``); norms, softmax and logits stay float32.
      revision: Hub branch, tag or commit (Hub names only).
      seed: seeds the dropout streams when ``dropout``/``embed_dropout`` is above 0.
      **overrides: ``dropout``, ``embed_dropout``, ``attention_impl``, ``remat`` or ``scan_layers``. Dropout is 0 unless
        set here (the Hub configs' 0.1 is for training, and a new model starts in training mode).

    Returns:
      A ``GPT`` whose logits ``[B, T, V]`` match the Hugging Face model's on the same tokens ``[B, T]``.

    The model is first built abstractly (shapes only) and then filled, so a 1.5B-parameter checkpoint
    is never randomly initialised and is read one tensor at a time.

    Raises:
      FileNotFoundError: a directory without config.json or weights.
      ValueError: an unsupported config option, a missing, unexpected or wrongly shaped tensor
        (named by its key), or an ``lm_head.weight`` that differs from ``wte.weight``.
      OSError / ImportError: a Hub name that cannot be fetched, or a missing optional package.
    """
    scan_layers = weightmap.load_options("load_hf_gpt2", overrides, _LOAD_OVERRIDES)
    ckpt = files.open_checkpoint(source, revision=revision, family="GPT-2", hub_example="gpt2", writer="save_hf_gpt2")
    cfg = gpt2_config_from_hf(ckpt.config, param_dtype=dtype, dtype=compute_dtype or dtype, **overrides)

    short, stored = files.strip_prefix(ckpt.loaders, _PREFIX, ckpt.origin)

    def name(key: str) -> str:
        return stored.get(key, _PREFIX + key)

    weightmap.check_tied(
        short, "lm_head.weight", "wte.weight", origin=ckpt.origin, name=name,
        why="GPT-2 ties its output head to the token embeddings and so does this port; an untied head cannot "
        "be loaded without changing the model's outputs",
    )  # fmt: skip
    model = weightmap.load(
        gpt2_weight_map(cfg),
        short,
        lambda: GPT(cfg, rngs=nnx.Rngs(seed)),
        origin=ckpt.origin,
        name=name,
        ignore=lambda key: key == "lm_head.weight" or bool(_MASK_BUFFER.match(key)),
        unexpected_hint=f"a plain GPT-2 ({cfg.num_layers} layers per its config) has no such weights",
        shape_hint=(
            f" (n_embd={cfg.d_model}, n_inner={cfg.d_ff}, vocab_size={cfg.vocab_size}, "
            f"n_positions={cfg.context_length})"
        ),
    )
    return with_layout(model, scan_layers=scan_layers)


def save_hf_gpt2(model: GPT, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face GPT-2 checkpoint that ``GPT2LMHeadModel.from_pretrained`` loads.

    The directory gets ``config.json`` (``GPT2Config`` fields, ``architectures: ["GPT2LMHeadModel"]``)
    and ``model.safetensors`` with ``transformer.``-prefixed keys and no ``lm_head.weight`` (it is
    tied to ``transformer.wte.weight``), the layout ``save_pretrained`` writes. Tensors keep the
    parameter dtype. :func:`load_hf_gpt2` reads the directory back bit for bit.

    The files are written to a temporary sibling directory that then takes ``directory``'s place, so
    a reader never sees half a checkpoint.

    Args:
      model: a GPT-2-shaped ``GPT`` (pre-LN, final LayerNorm, learned positions, tied head, biases).
      directory: where to write; created with its parents if needed.
      overwrite: replace a non-empty ``directory``. Its previous contents are all removed.

    Returns:
      The directory, as a ``Path``.

    Raises:
      ValueError: the model is not GPT-2-shaped (the message lists why).
      FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
    """
    model = with_layout(model, scan_layers=False)  # the weight map names blocks one by one
    hf_config = gpt2_config_to_hf(model.config)
    files.check_writable(directory, overwrite=overwrite)
    tensors = weightmap.save(gpt2_weight_map(model.config), model)
    return files.write_checkpoint(
        directory, hf_config, {_PREFIX + k: v for k, v in tensors.items()}, overwrite=overwrite
    )
