"""Training objectives as tasks: a loss function plus what it needs from the run (Chapters 11, 18, 19).

The :class:`~tfd_jax.train.loop.Trainer` runs any task; a task says

- which architecture it trains (``arch``) and which special tokens its tokenizer needs;
- ``setup(tokenizer, model_config)``: read the ids it needs (``[MASK]``, ...) before anything is traced;
- ``prepare(batch, key) -> batch`` (optional): per-step randomness inside the jitted step, from the
  step's key (masking);
- ``loss_fn(model, batch, frozen) -> (loss_sum, count, metrics)``: the summed loss, how many
  things it counted, and further sums (reported per counted thing in ``metrics.jsonl``);
- ``trainable``: an NNX filter of the parameters that train (all by default);
- ``samples(...)``: what to show at the end of a run (text for a language model).

Batches come from the run's token files as ``{"tokens", "targets", "mask"}`` (int ``[B, T]``,
int ``[B, T]``, bool ``[B, T]``; see ``tfd_jax.data.pipeline``). Next-token LM and masked-LM are two
tasks here; a test writes a third (a regression on BERT's pooled vector) without touching this
package.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tfd_jax import ops


def lm_loss(model, batch: dict, frozen: Any = None) -> tuple[jax.Array, jax.Array, dict]:
    """Next-token cross-entropy (Chapter 11): (sum of token losses, number of counted tokens, {}).

    ``batch``: ``tokens``, ``targets``, ``mask`` (all ``[B, T]``), optionally ``positions`` and
    ``segment_ids`` (packed rows)."""
    losses = model.token_losses(
        batch["tokens"], batch["targets"], positions=batch.get("positions"), segment_ids=batch.get("segment_ids")
    )
    mask = batch["mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask), {}


class Task:
    """The base task: every hook but ``loss_fn`` has a default (see the module notes)."""

    name: str = ""
    arch: str = "gpt"
    special_tokens: tuple[str, ...] = ()
    trainable: Any = nnx.Param
    prepare: Callable | None = None

    def setup(self, tokenizer, model_config) -> None:
        """Called once with the run's tokenizer and model config, before the step is traced."""

    def loss_fn(self, model, batch: dict, frozen: Any) -> tuple[jax.Array, jax.Array, dict]:
        raise NotImplementedError

    def samples(self, model, tokenizer, cfg, log) -> list[str] | None:
        """Shown at the end of a run; None: nothing to show."""
        return None


class LMTask(Task):
    """Next-token language modelling (Chapters 11 and 17): GPT on the run's token windows."""

    name = "lm"
    arch = "gpt"

    def loss_fn(self, model, batch, frozen):
        return lm_loss(model, batch, frozen)

    def samples(self, model, tokenizer, cfg, log):
        from tfd_jax.train.loop import print_samples

        return print_samples(model, tokenizer, cfg, log)


class MLMTask(Task):
    """Masked-language-model pre-training for BERT (``ops.mlm_mask``; beyond the course, which names
    no objective for the encoder).

    Each window becomes ``[CLS] ... [SEP]`` (its first and last token are overwritten); then 15% of
    the other real tokens are chosen and corrupted 80/10/10, and the loss is the cross-entropy of
    the original token at the chosen positions. Reports ``mlm_loss`` and ``masked_accuracy``.
    """

    name = "mlm"
    arch = "bert"
    special_tokens = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, rate: float = 0.15):
        self.rate = rate

    def setup(self, tokenizer, model_config) -> None:
        missing = [t for t, i in (("[MASK]", tokenizer.mask_id), ("[CLS]", tokenizer.cls_id), ("[SEP]", tokenizer.sep_id))
                   if i is None]
        if missing:
            raise ValueError(f"masked-LM training needs a tokenizer with {', '.join(missing)}; "
                             f"train one with special_tokens={self.special_tokens}")
        self.mask_id, self.cls_id, self.sep_id = tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id
        self.special = tuple(tokenizer.all_special_ids())
        self.vocab_size = model_config.vocab_size

    def prepare(self, batch: dict, key: jax.Array) -> dict:
        tokens = batch["tokens"]
        tokens = tokens.at[:, 0].set(self.cls_id).at[:, -1].set(self.sep_id)
        real = batch["mask"].astype(bool)
        eligible = real & ~jnp.isin(tokens, jnp.asarray(self.special, tokens.dtype))
        inputs, chosen = ops.mlm_mask(key, tokens, eligible, mask_id=self.mask_id, vocab_size=self.vocab_size,
                                      rate=self.rate)
        return {"tokens": inputs, "targets": tokens, "mask": chosen, "padding_mask": real}

    def loss_fn(self, model, batch, frozen):
        logits = model.mlm_logits(batch["tokens"], padding_mask=batch["padding_mask"])
        losses = ops.token_cross_entropy(logits, batch["targets"])
        chosen = batch["mask"].astype(jnp.float32)
        loss_sum = jnp.sum(losses * chosen)
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * chosen)
        return loss_sum, jnp.sum(chosen), {"mlm_loss": loss_sum, "masked_accuracy": correct}


TASKS: dict[str, type[Task]] = {"lm": LMTask, "mlm": MLMTask}


def get_task(name: str) -> Task:
    """A task by its ``--task`` name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()
