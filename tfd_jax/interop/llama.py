"""Hugging Face Llama and Qwen2 weights in and out of ``tfd_jax.models.GPT`` (Chapters 9, 18 and 19).

Llama is GPT-2's decoder with the variations Chapter 19 lists: RMSNorm instead of LayerNorm, rotary
positions (RoPE) instead of a learned table, a gated SiLU FFN (SwiGLU), no biases, grouped-query
attention (fewer key/value heads than query heads) and, usually, an output head of its own. Qwen2 is
the same with biases on Q, K and V. All of these are ``GPTConfig`` fields, so both load into a
:class:`~tfd_jax.models.GPT`:

``GPTConfig(norm="rmsnorm", positions="rope", activation="silu", gated_ffn=True, qkv_bias=<Qwen2>,
out_bias=False, ffn_bias=False, num_kv_heads=..., head_dim=..., tie_embeddings=...)``.

Hugging Face keeps ``torch.nn.Linear`` weights ``[out, in]``; ours are ``[in, out]`` (``y = x @
kernel``), so every projection is transposed. RoPE needs no permutation: both rotate the two halves
of each head's features (the GPT-NeoX layout).

==============================================  ===============================  ====================
Hugging Face key (``model.`` +)                 ``GPT`` parameter                stored shape
==============================================  ===============================  ====================
``embed_tokens.weight``                         ``tok_embed.embedding``          ``[V, M]``
``layers.{i}.input_layernorm.weight``           ``blocks[i].ln1.scale``          ``[M]``
``layers.{i}.self_attn.q_proj.weight``          ``blocks[i].attn.q.kernel``      ``[H*D, M]``
``layers.{i}.self_attn.k_proj.weight``          ``blocks[i].attn.k.kernel``      ``[K*D, M]``
``layers.{i}.self_attn.v_proj.weight``          ``blocks[i].attn.v.kernel``      ``[K*D, M]``
``layers.{i}.self_attn.{q,k,v}_proj.bias``      ``....bias`` (Qwen2 only)        ``[H*D]``, ``[K*D]``
``layers.{i}.self_attn.o_proj.weight``          ``blocks[i].attn.o.kernel``      ``[M, H*D]``
``layers.{i}.post_attention_layernorm.weight``  ``blocks[i].ln2.scale``          ``[M]``
``layers.{i}.mlp.gate_proj.weight``             ``blocks[i].ffn.w_gate.kernel``  ``[F, M]``
``layers.{i}.mlp.up_proj.weight``               ``blocks[i].ffn.w_in.kernel``    ``[F, M]``
``layers.{i}.mlp.down_proj.weight``             ``blocks[i].ffn.w_out.kernel``   ``[M, F]``
``norm.weight``                                 ``final_norm.scale``             ``[M]``
``lm_head.weight`` (no prefix)                  ``lm_head.kernel``               ``[V, M]``
==============================================  ===============================  ====================

``lm_head.weight`` is absent (or a copy of ``embed_tokens.weight``) when ``tie_word_embeddings``.

Shape letters: V vocabulary, M model width, H query heads, K key/value heads, D head dim, F FFN width.
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
from tfd_jax.models.config import GPTConfig
from tfd_jax.models.gpt import GPT, with_layout

__all__ = ["llama_config_from_hf", "llama_config_to_hf", "llama_weight_map", "load_hf_llama", "save_hf_llama"]

#: What ``transformers.LlamaConfig`` / ``Qwen2Config`` assume for a field config.json leaves out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "head_dim": None,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": None,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
    },
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

#: GPTConfig fields a caller may set when loading: they change how the model runs, not its weights.
_LOAD_OVERRIDES = frozenset({"dropout", "embed_dropout", "attention_impl", "remat", "scan_layers"})

_PREFIX = "model."
_HEAD = "lm_head.weight"
#: Older checkpoints also store each layer's RoPE frequencies; ours are computed from rope_theta.
_ROPE_BUFFER = re.compile(r"^layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


# -- configs ------------------------------------------------------------------------------------------


def _rope_theta(c: Mapping[str, Any], problems: list[str]) -> float:
    """RoPE's base from either form transformers writes: ``rope_theta`` + ``rope_scaling`` (4.x) or
    ``rope_parameters`` (5.x). Only plain RoPE is implemented, so any scaling is a problem."""
    params = c.get("rope_parameters") or {}
    theta = params.get("rope_theta", c.get("rope_theta"))
    scaling = c.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        problems.append(f"rope_scaling={scaling!r} (only plain RoPE is implemented: rope_scaling None)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        problems.append(f"rope_parameters.rope_type={kind!r} (only plain RoPE is implemented: 'default')")
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial} (RoPE on every feature of a head only)")
    return 10000.0 if theta is None else float(theta)


def _sliding_layers(c: Mapping[str, Any]) -> list[int]:
    """The layers that attend within a sliding window (Qwen2: from ``max_window_layers`` on)."""
    types = c.get("layer_types")
    if types is None:
        if not c.get("use_sliding_window") or c.get("sliding_window") is None:
            return []
        types = ["sliding_attention" if i >= c["max_window_layers"] else "full_attention"
                 for i in range(c["num_hidden_layers"])]  # fmt: skip
    return [i for i, t in enumerate(types) if t != "full_attention"]


def llama_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """Translate a Hugging Face Llama or Qwen2 ``config.json`` (as a dict) into a :class:`GPTConfig`.

    Fields config.json leaves out take ``transformers``' defaults (``LlamaConfig`` or
    ``Qwen2Config``, by ``model_type``). ``overrides`` are passed on to ``GPTConfig`` (dtypes,
    dropout, attention implementation).

    Raises:
      ValueError: the config is neither Llama nor Qwen2, or uses an option our model does not
        implement (RoPE scaling, biases Llama does not have, sliding-window attention, an activation
        other than SiLU); each is named by its config.json field.
    """
    model_type = hf.get("model_type", "llama")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(
            f"expected a Llama or Qwen2 config (model_type 'llama' or 'qwen2'), got model_type {model_type!r}"
        )
    c = {**_HF_DEFAULTS[model_type], **hf}

    problems: list[str] = []
    act = c["hidden_act"]
    if act not in ("silu", "swish"):
        problems.append(f"hidden_act={act!r} (the gated FFN is SwiGLU: 'silu')")
    theta = _rope_theta(c, problems)
    if model_type == "llama":
        for field in ("attention_bias", "mlp_bias"):
            if c.get(field):
                problems.append(f"{field}=True (Llama's projections have no biases in this port)")
    sliding = _sliding_layers(c)
    if sliding:
        field = "use_sliding_window=True" if c.get("use_sliding_window") else f"layer_types={c.get('layer_types')!r}"
        problems.append(
            f"{field} (sliding-window attention of {c.get('sliding_window')} tokens in layer(s) {sliding}; "
            "ours attends to the whole context)"
        )
    if problems:
        raise ValueError(f"unsupported {model_type} config option(s): " + "; ".join(problems))

    M, H = int(c["hidden_size"]), int(c["num_attention_heads"])
    kv = c["num_key_value_heads"]
    head_dim = c["head_dim"]
    return GPTConfig(
        vocab_size=int(c["vocab_size"]),
        context_length=int(c["max_position_embeddings"]),
        d_model=M,
        num_heads=H,
        num_layers=int(c["num_hidden_layers"]),
        d_ff=int(c["intermediate_size"]),
        num_kv_heads=H if kv is None else int(kv),
        head_dim=M // H if head_dim is None else int(head_dim),
        norm_position="pre",
        final_norm=True,
        norm="rmsnorm",
        norm_eps=float(c["rms_norm_eps"]),
        norm_bias=False,
        activation="silu",
        gated_ffn=True,
        positions="rope",
        rope_base=theta,
        tie_embeddings=bool(c["tie_word_embeddings"]),
        qkv_bias=model_type == "qwen2",
        out_bias=False,
        ffn_bias=False,
        lm_head_bias=False,
        init="gpt2",
        **overrides,
    )


def llama_config_to_hf(cfg: GPTConfig, *, model_type: str | None = None) -> dict[str, Any]:
    """The ``config.json`` dict (``LlamaConfig`` or ``Qwen2Config`` fields) for a Llama-shaped config.

    Args:
      cfg: a pre-RMSNorm, RoPE, SwiGLU ``GPTConfig`` without output or FFN biases.
      model_type: ``"llama"`` or ``"qwen2"``; by default Qwen2 when ``cfg.qkv_bias`` (its Q/K/V
        biases are the only difference), else Llama.

    Raises:
      ValueError: listing every field that makes ``cfg`` something neither can represent.
    """
    model_type = model_type or ("qwen2" if cfg.qkv_bias else "llama")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"model_type must be 'llama' or 'qwen2', got {model_type!r}")
    problems = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    need(cfg.norm_position == "pre", f"norm_position={cfg.norm_position!r} (Llama is pre-norm: 'pre')")
    need(cfg.final_norm, "final_norm=False (Llama has a final RMSNorm)")
    need(cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (Llama uses 'rmsnorm')")
    need(cfg.positions == "rope", f"positions={cfg.positions!r} (Llama uses rotary positions: 'rope')")
    need(
        cfg.gated_ffn and cfg.activation == "silu",
        f"gated_ffn={cfg.gated_ffn}, activation={cfg.activation!r} (Llama's FFN is SwiGLU: gated, 'silu')",
    )
    need(not cfg.out_bias, "out_bias=True (the attention output projection has no bias)")
    need(not cfg.ffn_bias or cfg.gated_ffn, "ffn_bias=True (the FFN has no biases)")
    need(not cfg.lm_head_bias, "lm_head_bias=True (the output head has no bias)")
    if model_type == "llama":
        need(not cfg.qkv_bias, "qkv_bias=True (Llama has no Q/K/V biases; Qwen2 does: model_type='qwen2')")
    else:
        need(cfg.qkv_bias, "qkv_bias=False (Qwen2 has Q/K/V biases; without them it is Llama)")
    if problems:
        raise ValueError(
            f"this model is not {model_type}-shaped, so it has no Hugging Face {model_type} form: "
            + "; ".join(problems)
        )

    out: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Both forms, so transformers 4.x (rope_theta) and 5.x (rope_parameters) read the same base.
        "rope_theta": cfg.rope_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": cfg.param_dtype,
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
                   layer_types=["full_attention"] * cfg.num_layers)  # fmt: skip
    return out


# -- the weight map -------------------------------------------------------------------------------------


def llama_weight_map(cfg: GPTConfig) -> list[Entry]:
    """Every Hugging Face tensor (key without ``model.``, stored shape) and the parameter it feeds.

    Each ``nn.Linear`` weight ``[out, in]`` is transposed into our ``[in, out]`` kernel.
    """
    V, M, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
    HD, KD = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    entries = [entry("embed_tokens.weight", (V, M), ("tok_embed", "embedding"))]
    for i in range(cfg.num_layers):
        h, b = f"layers.{i}.", ("blocks", i)
        entries += [
            entry(h + "input_layernorm.weight", (M,), b + ("ln1", "scale")),
            entry(h + "self_attn.q_proj.weight", (HD, M), b + ("attn", "q", "kernel"), TRANSPOSE),
            entry(h + "self_attn.k_proj.weight", (KD, M), b + ("attn", "k", "kernel"), TRANSPOSE),
            entry(h + "self_attn.v_proj.weight", (KD, M), b + ("attn", "v", "kernel"), TRANSPOSE),
        ]
        if cfg.qkv_bias:
            entries += [
                entry(h + "self_attn.q_proj.bias", (HD,), b + ("attn", "q", "bias")),
                entry(h + "self_attn.k_proj.bias", (KD,), b + ("attn", "k", "bias")),
                entry(h + "self_attn.v_proj.bias", (KD,), b + ("attn", "v", "bias")),
            ]
        entries += [
            entry(h + "self_attn.o_proj.weight", (M, HD), b + ("attn", "o", "kernel"), TRANSPOSE),
            entry(h + "post_attention_layernorm.weight", (M,), b + ("ln2", "scale")),
            entry(h + "mlp.gate_proj.weight", (F, M), b + ("ffn", "w_gate", "kernel"), TRANSPOSE),
            entry(h + "mlp.up_proj.weight", (F, M), b + ("ffn", "w_in", "kernel"), TRANSPOSE),
            entry(h + "mlp.down_proj.weight", (M, F), b + ("ffn", "w_out", "kernel"), TRANSPOSE),
        ]
    entries.append(entry("norm.weight", (M,), ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        entries.append(entry(_HEAD, (V, M), ("lm_head", "kernel"), TRANSPOSE))
    return entries


# -- loading and saving -----------------------------------------------------------------------------------


def load_hf_llama(
    source: Any,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    **overrides: Any,
) -> GPT:
    """A Hugging Face Llama or Qwen2 as a :class:`~tfd_jax.models.GPT` with the same weights and outputs.

    Args:
      source: a ``transformers`` ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (or ``LlamaModel``, then
        with a tied head only) object, a directory written by ``save_pretrained`` or
        :func:`save_hf_llama` (safetensors, sharded or not, or PyTorch pickles), or a Hub name such as
        ``"Qwen/Qwen2-0.5B"``.
      dtype: parameter dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      compute_dtype: activation dtype (defaults to ``dtype``); norms, softmax and logits stay float32.
      revision: Hub branch, tag or commit (Hub names only).
      seed: seeds the dropout streams when ``dropout``/``embed_dropout`` is above 0.
      **overrides: ``dropout``, ``embed_dropout``, ``attention_impl``, ``remat`` or ``scan_layers``.

    Returns:
      A ``GPT`` whose logits ``[B, T, V]`` match the Hugging Face model's on the same tokens ``[B, T]``.

    The model is built abstractly (shapes only) and filled one tensor at a time, never initialised.

    Raises:
      FileNotFoundError: a directory without config.json or weights.
      ValueError: an unsupported config option (named by its field), a missing, unexpected or wrongly
        shaped tensor (named by its key), or a tied ``lm_head.weight`` that differs from
        ``embed_tokens.weight``.
      OSError / ImportError: a Hub name that cannot be fetched, or a missing optional package.
    """
    scan_layers = weightmap.load_options("load_hf_llama", overrides, _LOAD_OVERRIDES)
    ckpt = files.open_checkpoint(
        source, revision=revision, family="Llama or Qwen2", hub_example="Qwen/Qwen2-0.5B", writer="save_hf_llama"
    )
    cfg = llama_config_from_hf(ckpt.config, param_dtype=dtype, dtype=compute_dtype or dtype, **overrides)

    short, stored = files.strip_prefix(ckpt.loaders, _PREFIX, ckpt.origin)

    def name(key: str) -> str:
        return stored.get(key, key if key == _HEAD else _PREFIX + key)

    if cfg.tie_embeddings:
        weightmap.check_tied(
            short, _HEAD, "embed_tokens.weight", origin=ckpt.origin, name=name,
            why="config.json says tie_word_embeddings=True, so the output head is the token embedding matrix; "
            "set tie_word_embeddings=False to load a head of its own",
        )  # fmt: skip

    def ignore(key: str) -> bool:
        return bool(_ROPE_BUFFER.match(key)) or (cfg.tie_embeddings and key == _HEAD)

    model = weightmap.load(
        llama_weight_map(cfg),
        short,
        lambda: GPT(cfg, rngs=nnx.Rngs(seed)),
        origin=ckpt.origin,
        name=name,
        ignore=ignore,
        unexpected_hint=f"a plain {ckpt.config.get('model_type', 'llama')} ({cfg.num_layers} layers per its config) "
        "has no such weights",
        shape_hint=(
            f" (hidden_size={cfg.d_model}, num_attention_heads={cfg.num_heads}, "
            f"num_key_value_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim}, intermediate_size={cfg.d_ff}, "
            f"vocab_size={cfg.vocab_size})"
        ),
    )
    return with_layout(model, scan_layers=scan_layers)


def save_hf_llama(
    model: GPT, directory: str | os.PathLike, *, overwrite: bool = False, model_type: str | None = None
) -> Path:
    """Write ``model`` as a checkpoint that ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM``) ``.from_pretrained`` loads.

    The directory gets ``config.json`` (see :func:`llama_config_to_hf`) and ``model.safetensors``
    with ``model.``-prefixed keys plus ``lm_head.weight`` when the head is untied, the layout
    ``save_pretrained`` writes, in the parameter dtype. :func:`load_hf_llama` reads it back bit for bit.
    The files are staged in a sibling directory that then takes ``directory``'s place.

    Args:
      model: a Llama-shaped ``GPT`` (pre-RMSNorm, RoPE, SwiGLU, no output or FFN biases).
      directory: where to write; created with its parents if needed.
      overwrite: replace a non-empty ``directory``. Its previous contents are all removed.
      model_type: ``"llama"`` or ``"qwen2"``; by default Qwen2 when the model has Q/K/V biases.

    Returns:
      The directory, as a ``Path``.

    Raises:
      ValueError: the model is not Llama-shaped (the message lists why).
      FileExistsError: ``directory`` is not empty and ``overwrite`` is False.
    """
    model = with_layout(model, scan_layers=False)  # the weight map names blocks one by one
    hf_config = llama_config_to_hf(model.config, model_type=model_type)
    files.check_writable(directory, overwrite=overwrite)
    tensors = weightmap.save(llama_weight_map(model.config), model)
    return files.write_checkpoint(
        directory, hf_config, {(k if k == _HEAD else _PREFIX + k): v for k, v in tensors.items()}, overwrite=overwrite
    )
