"""Hugging Face GPT-2 weights in and out of ``tfd_jax.models.GPT`` (Chapters 9, 10 and 18).

Chapter 18's advice is to start from a pretrained model rather than from scratch; GPT-2 is the model
whose sizes Chapter 9 quotes (12, 24, 36 and 48 layers). This module moves its weights between the
Hugging Face layout and ours, without ``torch`` or ``transformers`` for directories holding
safetensors files.

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

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_TORCH_BIN = "pytorch_model.bin"
_TORCH_BIN_INDEX = "pytorch_model.bin.index.json"

ParamPath = tuple  # a parameter's path in the model's state, e.g. ("blocks", 0, "attn", "q", "kernel")


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


def _weight_map(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...], list[ParamPath]]]:
    """Every Hugging Face tensor (key without ``transformer.``, shape) and the parameter(s) it feeds.

    A tensor with several targets is split into equal parts along its last axis, in target order.
    """
    V, P, M, F = cfg.vocab_size, cfg.context_length, cfg.d_model, cfg.d_ff
    entries = [
        ("wte.weight", (V, M), [("tok_embed", "embedding")]),
        ("wpe.weight", (P, M), [("pos_embed", "embedding")]),
    ]
    for i in range(cfg.num_layers):
        h, b = f"h.{i}.", ("blocks", i)
        entries += [
            (h + "ln_1.weight", (M,), [b + ("ln1", "scale")]),
            (h + "ln_1.bias", (M,), [b + ("ln1", "bias")]),
            (h + "attn.c_attn.weight", (M, 3 * M), [b + ("attn", n, "kernel") for n in "qkv"]),
            (h + "attn.c_attn.bias", (3 * M,), [b + ("attn", n, "bias") for n in "qkv"]),
            (h + "attn.c_proj.weight", (M, M), [b + ("attn", "o", "kernel")]),
            (h + "attn.c_proj.bias", (M,), [b + ("attn", "o", "bias")]),
            (h + "ln_2.weight", (M,), [b + ("ln2", "scale")]),
            (h + "ln_2.bias", (M,), [b + ("ln2", "bias")]),
            (h + "mlp.c_fc.weight", (M, F), [b + ("ffn", "w_in", "kernel")]),
            (h + "mlp.c_fc.bias", (F,), [b + ("ffn", "w_in", "bias")]),
            (h + "mlp.c_proj.weight", (F, M), [b + ("ffn", "w_out", "kernel")]),
            (h + "mlp.c_proj.bias", (M,), [b + ("ffn", "w_out", "bias")]),
        ]
    entries += [
        ("ln_f.weight", (M,), [("final_norm", "scale")]),
        ("ln_f.bias", (M,), [("final_norm", "bias")]),
    ]
    return entries


# -- reading ------------------------------------------------------------------------------------------

# A checkpoint as read: its config.json dict, and key -> a function that loads that tensor as numpy
# (tensors are read one at a time so a large checkpoint is never held twice in host memory).
_Loaders = dict[str, Callable[[], np.ndarray]]


def _torch_to_numpy(t) -> np.ndarray:
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds every bf16 value exactly
        t = t.float()
    return t.numpy()


def _from_torch_module(model) -> tuple[dict, _Loaders]:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    state = model.state_dict()
    return config, {k: (lambda t=t: _torch_to_numpy(t)) for k, t in state.items()}


def _safetensors_loaders(files: list[Path]) -> _Loaders:
    from safetensors import safe_open  # numpy framework: no torch needed

    loaders: _Loaders = {}
    for path in files:
        handle = safe_open(str(path), framework="numpy")
        for key in handle.keys():
            loaders[key] = lambda h=handle, k=key: h.get_tensor(k)
    return loaders


def _torch_bin_loaders(files: list[Path]) -> _Loaders:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{files[0].name} is a PyTorch pickle and reading it needs torch; install torch, or convert the "
            "checkpoint to model.safetensors (which needs nothing beyond safetensors)"
        ) from None
    loaders: _Loaders = {}
    for path in files:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the pre-zip format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        loaders.update({k: (lambda t=t: _torch_to_numpy(t)) for k, t in state.items()})
    return loaders


def _shards(directory: Path, index_name: str) -> list[Path]:
    index = json.loads((directory / index_name).read_text())
    return [directory / name for name in sorted(set(index["weight_map"].values()))]


def _from_directory(directory: Path) -> tuple[dict, _Loaders]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"no config.json in {directory}; expected a directory written by save_pretrained or save_hf_gpt2 "
            "(config.json plus model.safetensors or pytorch_model.bin)"
        )
    config = json.loads(config_path.read_text())
    if (directory / _SAFETENSORS).is_file():
        loaders = _safetensors_loaders([directory / _SAFETENSORS])
    elif (directory / _SAFETENSORS_INDEX).is_file():
        loaders = _safetensors_loaders(_shards(directory, _SAFETENSORS_INDEX))
    elif (directory / _TORCH_BIN).is_file():
        loaders = _torch_bin_loaders([directory / _TORCH_BIN])
    elif (directory / _TORCH_BIN_INDEX).is_file():
        loaders = _torch_bin_loaders(_shards(directory, _TORCH_BIN_INDEX))
    else:
        raise FileNotFoundError(
            f"no weights in {directory}: expected {_SAFETENSORS}, {_SAFETENSORS_INDEX}, {_TORCH_BIN} "
            f"or {_TORCH_BIN_INDEX}"
        )
    return config, loaders


def _looks_like_repo_id(name: str) -> bool:
    """``"gpt2"`` or ``"openai-community/gpt2"``: at most one slash, no leading dot or slash."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?", name)) and ".." not in name


def _download(name: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(
            f"{name!r} is not a local directory, and fetching it from the Hugging Face Hub needs the "
            "huggingface_hub package (pip install huggingface_hub); or pass a directory written by save_pretrained"
        ) from None
    try:
        path = Path(
            snapshot_download(
                name, revision=revision, allow_patterns=["config.json", "model.safetensors", "model*.safetensors*"]
            )
        )
        if not any(path.glob("*.safetensors")):  # an old repository with PyTorch pickles only
            path = Path(
                snapshot_download(
                    name, revision=revision, allow_patterns=["config.json", "pytorch_model.bin", "pytorch_model*.bin*"]
                )
            )
    except Exception as e:  # offline, unknown repository, no permission, network failure, ...
        raise OSError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). It is not a local "
            "directory either. When offline, fetch it once while online (it is then cached) or pass a "
            "directory written by save_pretrained"
        ) from e
    return path


def _open(source: Any, revision: str | None) -> tuple[dict, _Loaders, str]:
    """(config dict, tensor loaders, a description of the source for error messages)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return (*_from_directory(path), str(path))
        if path.exists():
            raise ValueError(f"{path} is a file; pass the directory that holds config.json and the weights")
        if isinstance(source, str) and _looks_like_repo_id(source):
            return (*_from_directory(_download(source, revision)), f"hub:{source}")
        raise FileNotFoundError(f"no such directory: {path}")
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return (*_from_torch_module(source), type(source).__name__)
    raise TypeError(
        "source must be a transformers GPT-2 model, a directory written by save_pretrained, or a Hub "
        f"name such as 'gpt2'; got {type(source).__name__}"
    )


def _strip_prefix(loaders: _Loaders, origin: str) -> tuple[_Loaders, dict[str, str]]:
    """Drop the optional ``transformer.`` prefix; returns (short key -> loader, short -> stored key)."""
    short: _Loaders = {}
    stored: dict[str, str] = {}
    for key, load in loaders.items():
        s = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if s in short:
            raise ValueError(f"{origin}: both {stored[s]!r} and {key!r} are present; which one is the weight?")
        short[s], stored[s] = load, key
    return short, stored


def _check_lm_head(short: _Loaders, stored: dict[str, str], origin: str) -> None:
    """``lm_head.weight`` must equal ``wte.weight``: our GPT-2 has no separate output matrix."""
    if "lm_head.weight" not in short or "wte.weight" not in short:
        return
    head, wte = short["lm_head.weight"](), short["wte.weight"]()
    if head.shape != wte.shape or not np.array_equal(head, wte):
        detail = (
            f"shape {head.shape} vs {wte.shape}"
            if head.shape != wte.shape
            else f"max abs difference {float(np.max(np.abs(head.astype(np.float32) - wte.astype(np.float32)))):.3g}"
        )
        raise ValueError(
            f"{origin}: lm_head.weight differs from {stored['wte.weight']} ({detail}). GPT-2 ties its output "
            "head to the token embeddings and so does this port; an untied head cannot be loaded without "
            "changing the model's outputs"
        )


# -- building the model ---------------------------------------------------------------------------


def _abstract_model(cfg: GPTConfig, seed: int) -> GPT:
    """The model's structure with ``jax.ShapeDtypeStruct`` leaves: nothing is initialised or allocated."""
    return nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(seed)))


def _concrete_non_params(cfg: GPTConfig, seed: int) -> nnx.State:
    """Real values for the state that is not a parameter (dropout RNG keys and counters).

    Traced under ``jit`` and returning only that state, so the parameter initialisers never run.
    """
    return jax.jit(lambda: nnx.state(GPT(cfg, rngs=nnx.Rngs(seed)), nnx.Not(nnx.Param)))()


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
    bad = set(overrides) - _LOAD_OVERRIDES
    if bad:
        raise TypeError(
            f"load_hf_gpt2 got unexpected option(s) {sorted(bad)}; the checkpoint fixes the model's shape, "
            f"only {sorted(_LOAD_OVERRIDES)} may be set"
        )
    hf_config, loaders, origin = _open(source, revision)
    scan_layers = overrides.pop("scan_layers", False)  # filled block by block, stacked at the end
    if not isinstance(scan_layers, bool):
        raise ValueError(f"scan_layers must be True or False, got {scan_layers!r}")
    cfg = gpt2_config_from_hf(hf_config, param_dtype=dtype, dtype=compute_dtype or dtype, **overrides)

    short, stored = _strip_prefix(loaders, origin)
    weight_map = _weight_map(cfg)
    wanted = {key for key, _, _ in weight_map}
    missing = sorted(wanted - set(short))
    if missing:
        shown = ", ".join(_PREFIX + k for k in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"{origin}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")
    unexpected = sorted(k for k in short if k not in wanted and k != "lm_head.weight" and not _MASK_BUFFER.match(k))
    if unexpected:
        shown = ", ".join(stored[k] for k in unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise ValueError(
            f"{origin}: unexpected tensor(s) {shown}; a plain GPT-2 ({cfg.num_layers} layers per its config) "
            "has no such weights"
        )
    _check_lm_head(short, stored, origin)

    abstract = _abstract_model(cfg, seed)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
    slots = dict(nnx.to_flat_state(abstract_params))
    values: dict[ParamPath, jax.Array] = {}
    for key, shape, targets in weight_map:
        array = short[key]()
        if tuple(array.shape) != shape:
            raise ValueError(
                f"{origin}: {stored[key]} has shape {tuple(array.shape)}, but config.json "
                f"(n_embd={cfg.d_model}, n_inner={cfg.d_ff}, vocab_size={cfg.vocab_size}, "
                f"n_positions={cfg.context_length}) says {shape}"
            )
        parts = np.split(array, len(targets), axis=-1) if len(targets) > 1 else [array]
        for path, part in zip(targets, parts):
            slot = slots[path].get_value()
            if part.shape != slot.shape:  # the weight map and the model disagree: a bug, not bad input
                raise AssertionError(f"{path}: expected {slot.shape}, got {part.shape} from {stored[key]}")
            values[path] = jnp.asarray(part, dtype=slot.dtype)
        del array, parts
    unfilled = sorted(set(slots) - set(values), key=str)
    if unfilled:
        raise AssertionError(f"the GPT-2 weight map leaves parameters unset: {unfilled}")

    params = nnx.from_flat_state([(path, slots[path].replace(value=values[path])) for path in slots])
    rest = _concrete_non_params(cfg, seed) if jax.tree.leaves(abstract_rest) else abstract_rest
    return with_layout(nnx.merge(graphdef, params, rest), scan_layers=scan_layers)


# -- writing --------------------------------------------------------------------------------------------


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
    cfg = model.config
    hf_config = gpt2_config_to_hf(cfg)
    target = Path(directory).expanduser()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace its contents")

    params = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors: dict[str, np.ndarray] = {}
    for key, shape, targets in _weight_map(cfg):
        parts = [np.asarray(jax.device_get(params[path])) for path in targets]
        array = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
        if array.shape != shape:
            raise AssertionError(f"{key}: expected {shape}, got {array.shape}")
        tensors[_PREFIX + key] = np.ascontiguousarray(array)

    from safetensors.numpy import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        # "format": "pt" tells transformers these are PyTorch-layout tensors (its loader checks it).
        save_file(tensors, str(staging / _SAFETENSORS), metadata={"format": "pt"})
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is set aside first and removed afterwards."""
    if not target.exists():
        os.rename(new, target)
        return
    old = new.with_name(new.name.replace(".tmp-", ".old-"))
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
