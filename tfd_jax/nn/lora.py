"""LoRA: low-rank adapters on the Linear layers of any model built from ``tfd_jax.nn`` (Chapter 18, beyond the course).

Fine-tuning with LoRA (Hu et al. 2021) freezes a pretrained kernel ``W [in, out]`` and learns a
low-rank change to it instead,

    W_eff = W + (alpha / r) * A @ B,        A: [in, r],  B: [r, out],  r << min(in, out),

so a step trains ``r * (in + out)`` numbers per layer rather than ``in * out``, and the optimiser
keeps moments for those alone. ``B`` starts at zero, so the adapted model starts as the base model.

The usual round trip::

    add_lora(model, rank=8, alpha=16, targets=("attn.q", "attn.v"), rngs=nnx.Rngs(0))
    graphdef, params, fixed, rest = split_trainable(model, LORA_FILTER)   # only A and B train
    ...                                                                  # train
    with lora_disabled(model):                                           # the frozen base model:
        ref_logits = model(tokens)                                       # RLHF's reference policy
    plain = merge_lora(model)                                            # W_eff in the kernels

Because the base weights never change, the model with its adapters switched off *is* the reference
policy of RLHF and DPO (Chapter 18): no second copy of the parameters is needed.

Layers are named by the path of the ``Linear`` in the model, dot-separated (``blocks.0.attn.q``; a
``scan_layers`` model's stacked blocks have no layer index: ``blocks.attn.q``). A target names the
last components of such paths: ``"attn.q"`` matches every self-attention query projection (but not
``cross_attn.q``), ``"ffn.w_in"`` every FFN input kernel, ``"lm_head"`` the untied output head.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from flax import nnx

from tfd_jax.nn.layers import Linear, LoRAParam

__all__ = ["LORA_FILTER", "LoRAParam", "add_lora", "linear_paths", "lora_disabled", "merge_lora"]

#: Selects the LoRA factors, e.g. ``split_trainable(model, LORA_FILTER)`` trains only them.
LORA_FILTER = nnx.OfType(LoRAParam)

DEFAULT_TARGETS = ("attn.q", "attn.v")


def linear_paths(model: nnx.Module) -> list[tuple[str, Linear]]:
    """Every :class:`~tfd_jax.nn.layers.Linear` of ``model`` with its dot-separated path, in graph order."""
    return [(".".join(str(p) for p in path), node) for path, node in nnx.iter_graph(model) if isinstance(node, Linear)]


def _matches(path: str, target: str) -> bool:
    """Whether ``target``'s components are the last components of ``path``."""
    want, have = target.split("."), path.split(".")
    return len(want) <= len(have) and have[-len(want):] == want


def add_lora(
    model: nnx.Module,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """Attach LoRA factors, in place, to every ``Linear`` whose path ends with one of ``targets``.

    Each matched layer gets ``lora_a [..., in, r]`` (``N(0, 1/in)``), ``lora_b [..., r, out]``
    (zeros) and the scale ``alpha / rank``; ``...`` is the kernel's leading axes, ``[L]`` in a
    ``scan_layers`` model's stacked blocks (each layer its own factors). The model computes
    exactly what it computed before until ``lora_b`` moves away from zero.

    Args:
      model: any module built from ``tfd_jax.nn`` layers (GPT, BERT, EncoderDecoder, ...).
      rank: r, the rank of the update (a positive integer).
      alpha: the update's scale numerator; ``alpha / rank`` multiplies ``A @ B``.
      targets: path suffixes such as ``"attn.q"``, ``"attn.k"``, ``"attn.v"``, ``"attn.o"``,
        ``"ffn.w_in"``, ``"ffn.w_gate"``, ``"ffn.w_out"``, ``"cross_attn.q"``, ``"lm_head"``.
      rngs: where ``lora_a`` is drawn from (its ``params`` stream).
    Returns:
      ``model`` itself, for chaining.
    Raises:
      ValueError: a target that matches no Linear (the message lists the model's Linear paths),
        a layer that already has factors, or a rank below 1.
    """
    if isinstance(targets, str):
        targets = (targets,)
    if not targets:
        raise ValueError("add_lora needs at least one target")
    if int(rank) != rank or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    layers = linear_paths(model)
    chosen: dict[str, Linear] = {}
    for target in targets:
        hits = [(path, lin) for path, lin in layers if _matches(path, target)]
        if not hits:
            available = ", ".join(path for path, _ in layers) or "none"
            raise ValueError(f"LoRA target {target!r} matches no Linear layer; "
                             f"the model's Linear paths are: {available}")
        chosen.update(hits)
    for path, lin in chosen.items():
        if lin.lora_a is not None:
            raise ValueError(f"{path} already has LoRA factors")
    for lin in chosen.values():
        lin.attach_lora(int(rank), alpha, rngs=rngs)
    return model


def _adapted(model: nnx.Module) -> list[Linear]:
    return [lin for _, lin in linear_paths(model) if lin.lora_a is not None]


@contextlib.contextmanager
def lora_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """Within the ``with`` block, every adapter of ``model`` is switched off: the model computes
    with its frozen base kernels alone (RLHF's reference policy), and gradients reach no factor.
    Each layer's previous switch is restored on exit, even after an exception."""
    layers = _adapted(model)
    before = [lin.lora_enabled for lin in layers]
    for lin in layers:
        lin.lora_enabled = False
    try:
        yield model
    finally:
        for lin, on in zip(layers, before):
            lin.lora_enabled = on


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A new model whose kernels are ``W + (alpha / r) A @ B`` (computed in the parameter dtype) and
    which holds no LoRA factor: its parameters have the names and shapes of a model never adapted,
    so it saves, exports (e.g. to Hugging Face) and runs as a plain one. Every adapter is folded in,
    whether switched on or not. ``model`` itself is left as it is."""
    merged = nnx.clone(model)  # variables of its own: folding writes nothing into ``model``
    for lin in _adapted(merged):
        lin.fold_lora()
    return merged
