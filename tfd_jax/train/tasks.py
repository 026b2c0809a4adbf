"""Training objectives as tasks: a loss function plus what it needs from the run (Chapters 11, 18, 19).

The :class:`~tfd_jax.train.loop.Trainer` runs any task; a task says

- which architecture it trains (``arch``) and which special tokens its tokenizer needs;
- ``setup(tokenizer, model_config)``: read the ids it needs (``[MASK]``, ...) before anything is traced;
- ``prepare(batch, key) -> batch`` (optional): per-step randomness inside the jitted step, from the
  step's key (masking);
- ``loss_fn(model, batch, frozen) -> (loss_sum, count, metrics)``: the summed loss, how many
  things it counted, and further sums (reported per counted thing in ``metrics.jsonl``);
- ``trainable``: an NNX filter of the parameters that train (all by default);
- ``samples(...)``: what to show at the end of a run (text for a language model);
- ``cli_defaults``: ``tfd-jax train`` flags (by their argparse names) whose default differs for
  this task; flags given on the command line win;
- the data: ``corpus(cfg, split, max_bytes)`` (the text documents; ``--data`` through
  ``tfd_jax.data.load_corpus`` by default), ``token_encoder(tokenizer)`` (what writes them into the
  run's token files), ``iterator(cfg, tokens, tokenizer, seed=)`` (the batches; windows of
  ``seq_len`` by default), ``tokenizer_text(cfg, text)`` (what a new tokenizer learns from) and
  ``model_fields(tokenizer)`` (model config fields its ids decide);
- ``final_metrics(model, tokenizer, run_dir, cfg, log)``: figures measured once at the end of a run
  (merged into the summary);
- ``frozen(params, fixed)``: trees the loss reads but never trains (a reference model), made from
  the starting weights (or ``--reference``'s);
- ``experience(policy, frozen, buffer, batch, step, key) -> (buffer, batch)`` with
  ``experience_buffer()``: data the task makes from the current weights inside the step (PPO's
  rollouts), kept in the training state (see ``tfd_jax.train.step``);
- ``check(cfg) -> [problems]`` (settings refused before anything is written) and ``configure(cfg)``
  (read the run's settings before ``setup``).

By default batches come from the run's token files as ``{"tokens", "targets", "mask"}`` (int
``[B, T]``, int ``[B, T]``, bool ``[B, T]``; see ``tfd_jax.data.pipeline``). Next-token LM, masked-LM
and seq2seq (translation-style pairs, or T5's span corruption of a corpus) are the tasks here; a
test writes another (a regression on BERT's pooled vector) without touching this package.
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
    experience: Callable | None = None  # (policy, frozen, buffer, batch, step, key) -> (buffer, batch)
    cli_defaults: dict[str, Any] = {}
    # special tokens added to --init-from's tokenizer when it lacks them (a chat template on Hugging
    # Face GPT-2): new ids after its last, new embedding rows started at the mean of the others
    extra_special_tokens: tuple[str, ...] = ()
    init_archs: tuple[str, ...] = ()  # other architectures whose weights --init-from may start this one from
    fresh_params: tuple[str, ...] = ()  # top-level parameters --init-from's weights may lack (a new head)
    # loss_fn's sums over part of a batch add up to the whole batch's (no batch-wide statistics): the
    # CPU's data-parallel step may then sum each device's rows (make_train_step's local_rows)
    rows_add_up: bool = True

    @classmethod
    def archs(cls) -> tuple[str, ...]:
        """The architectures this task can train (``arch``, its default, first)."""
        return (cls.arch, *getattr(cls, "other_archs", ()))

    def check(self, cfg) -> list[str]:
        """What is wrong with the run's settings for this task (one line each); checked with the
        other settings, before anything is written."""
        return []

    def configure(self, cfg) -> None:
        """Called once with the run's settings, before :meth:`setup`."""

    def setup(self, tokenizer, model_config) -> None:
        """Called once with the run's tokenizer and model config, before the step is traced."""

    def experience_buffer(self):
        """The zeros a task with ``experience`` starts its buffer from (fixed shapes)."""
        raise NotImplementedError

    def loss_fn(self, model, batch: dict, frozen: Any) -> tuple[jax.Array, jax.Array, dict]:
        raise NotImplementedError

    def samples(self, model, tokenizer, cfg, log) -> list[str] | None:
        """Shown at the end of a run; None: nothing to show."""
        return None

    def final_metrics(self, model, tokenizer, run_dir, cfg, log) -> dict | None:
        """Measured once at the end of a run (merged into the summary); None: nothing."""
        return None

    def frozen(self, params, fixed):
        """Trees the loss reads but never trains, made once from the starting weights (``params``
        and ``fixed``, after ``--init-from``) and passed to ``loss_fn`` as ``frozen``: e.g. a
        reference model. Kept sharded like the parameters, with no optimizer state. Override it
        only when needed (the Trainer then also reloads ``--init-from``'s weights on resume)."""
        return None

    # -- data ------------------------------------------------------------------------------------

    def corpus(self, cfg, split: str, max_bytes: int | None):
        """The documents of one split (before tokenization)."""
        from tfd_jax.data import load_corpus

        return load_corpus(cfg.data, split=split, max_bytes=max_bytes)

    def token_encoder(self, tokenizer):
        """What turns the documents into the run's token files (anything with ``encode_batch``)."""
        return tokenizer

    def tokenizer_text(self, cfg, text: str) -> str:
        """The text a new run's tokenizer is trained on (the training documents by default)."""
        return text

    def model_fields(self, tokenizer) -> dict:
        """Model config fields decided by the run's tokenizer (e.g. an encoder-decoder's pad id)."""
        return {}

    def iterator(self, cfg, tokens, tokenizer, *, seed: int):
        """The batches of one split: windows of ``cfg.seq_len`` tokens (``tfd_jax.data.pipeline``)."""
        from tfd_jax.data.pipeline import make_iterator

        return make_iterator(tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=seed, sampling=cfg.sampling)


def trainable_filter(task, model_config):
    """The parameters a run of ``task`` trains: the task's ``trainable``, or with LoRA adapters in
    the model (``lora_rank > 0``) the adapters and the task's fresh head alone."""
    if getattr(model_config, "lora_rank", 0):
        from tfd_jax.nn.lora import LORA_FILTER

        return nnx.Any(LORA_FILTER, *(nnx.PathContains(name) for name in task.fresh_params))
    return task.trainable


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
    # A tiny BERT first learns only how often each token occurs (its accuracy then equals always
    # guessing the most frequent token) and starts using the context after a few hundred steps.
    # Measured on the embedded corpus (experiments/mlm_pretrain.py): a 512-token vocabulary and a
    # constant learning rate of 1e-3 get there within the run; 2,048 tokens and the LM task's
    # decaying 2e-3 stay at the baseline for 300 steps.
    cli_defaults = {"vocab_size": 512, "steps": 600, "lr": 1e-3, "min_lr": 1e-3, "weight_decay": 0.0}

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


#: the special tokens of an encoder-decoder's tokenizer: padding, end, the decoder's start, the
#: source/target separator of the token files, and T5's sentinels for span corruption
SEQ2SEQ_SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<sep>", *(f"<extra_id_{i}>" for i in range(32)))


class Seq2SeqTask(Task):
    """Encoder-decoder training (Chapter 19, Part 5), on either kind of ``--data``:

    - **pairs** (a built-in task such as ``numbers``, or a ``.jsonl`` / ``.tsv`` file; see
      ``tfd_jax.data.pairs``): the source is encoded, the decoder learns the target by teacher
      forcing. At the end of a run, greedy decoding of held-out sources is graded by exact match.
    - **a text corpus** (``pystdlib``, a file ...): T5's span corruption (``ops.span_corruption``,
      beyond the course): 15% of each window hidden in spans of mean length 3 behind sentinel
      tokens, and the decoder writes the hidden spans. Drawn inside the jitted step from the step's
      key, so a resumed run corrupts exactly as an uninterrupted one.

    The loss is the cross-entropy of every real target token (``seq2seq_loss``; reported as
    ``token_accuracy`` too).
    """

    name = "seq2seq"
    arch = "transformer"
    other_archs = ("t5", "bart")
    special_tokens = SEQ2SEQ_SPECIAL_TOKENS
    cli_defaults = {"data": "numbers", "tokenizer": "char", "seq_len": 64, "batch_size": 64, "steps": 1500,
                    "lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.0, "eval_every": 250}

    def __init__(self, noise_density: float = 0.15, mean_span: float = 3.0, eval_examples: int = 500):
        self.noise_density, self.mean_span, self.eval_examples = noise_density, mean_span, eval_examples

    def _ids(self, tokenizer) -> dict:
        missing = [t for t, i in (("<pad>", tokenizer.pad_id), ("</s>", tokenizer.eos_id), ("<s>", tokenizer.bos_id),
                                  ("<sep>", tokenizer.sep_id)) if i is None]
        if missing:
            raise ValueError(f"seq2seq training needs a tokenizer with {', '.join(missing)}; train one with "
                             "special_tokens=SEQ2SEQ_SPECIAL_TOKENS")
        return {"pad_id": tokenizer.pad_id, "eos_id": tokenizer.eos_id, "decoder_start_id": tokenizer.bos_id}

    def model_fields(self, tokenizer) -> dict:
        return self._ids(tokenizer)

    def setup(self, tokenizer, model_config) -> None:
        ids = self._ids(tokenizer)
        self.pad_id, self.eos_id, self.start_id = ids["pad_id"], ids["eos_id"], ids["decoder_start_id"]
        self.sep_id = tokenizer.sep_id
        special = tokenizer.special_tokens
        self.sentinels = tuple(special[t] for t in SEQ2SEQ_SPECIAL_TOKENS if t.startswith("<extra_id_") and t in special)

    def corpus(self, cfg, split, max_bytes):
        from tfd_jax.data.pairs import is_pairs, load_pairs

        if is_pairs(cfg.data):
            return load_pairs(cfg.data, split, max_bytes=max_bytes)
        return super().corpus(cfg, split, max_bytes)

    def token_encoder(self, tokenizer):
        from tfd_jax.data.pairs import PairEncoder

        self._ids(tokenizer)
        return PairEncoder(tokenizer, tokenizer.sep_id)

    def iterator(self, cfg, tokens, tokenizer, *, seed):
        from tfd_jax.data.pairs import is_pairs, make_pairs_iterator

        if not is_pairs(cfg.data):
            return super().iterator(cfg, tokens, tokenizer, seed=seed)
        ids = self._ids(tokenizer)
        return make_pairs_iterator(tokens, batch_size=cfg.batch_size, src_len=cfg.seq_len, tgt_len=cfg.seq_len,
                                   seed=seed, sep_id=tokenizer.sep_id, pad_id=ids["pad_id"],
                                   start_id=ids["decoder_start_id"])

    def prepare(self, batch: dict, key: jax.Array) -> dict:
        if "src" in batch:  # pairs: already what the model reads
            return batch
        src, targets = ops.span_corruption(key, batch["tokens"], sentinel_ids=jnp.asarray(self.sentinels, jnp.int32),
                                           eos_id=self.eos_id, noise_density=self.noise_density,
                                           mean_span=self.mean_span)
        start = jnp.full((targets.shape[0], 1), self.start_id, targets.dtype)
        return {"src": src, "src_mask": jnp.ones(src.shape, bool), "tgt_in": jnp.concatenate([start, targets[:, :-1]], 1),
                "targets": targets, "mask": jnp.ones(targets.shape, bool)}

    def loss_fn(self, model, batch, frozen):
        return seq2seq_loss(model, batch, frozen)

    def final_metrics(self, model, tokenizer, run_dir, cfg, log) -> dict | None:
        from tfd_jax.data.pairs import is_pairs

        if not is_pairs(cfg.data):
            return None
        result = exact_match(model, tokenizer, run_dir, cfg, limit=self.eval_examples, log=log)
        return result

    def samples(self, model, tokenizer, cfg, log):
        return None  # final_metrics prints a few translations


def seq2seq_loss(model, batch: dict, frozen: Any = None) -> tuple[jax.Array, jax.Array, dict]:
    """Teacher-forced cross-entropy of an encoder-decoder (Chapter 19, Part 5): (sum over real target
    tokens, their number, {"token_accuracy": correct argmax predictions}).

    ``batch``: ``src``, ``src_mask`` ``[B, S]``; ``tgt_in``, ``targets``, ``mask`` ``[B, T]``."""
    mask = batch["mask"].astype(jnp.float32)
    logits = model(batch["src"], batch["tgt_in"], src_padding_mask=batch["src_mask"])
    losses = ops.token_cross_entropy(logits, batch["targets"])
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * mask)
    return jnp.sum(losses * mask), jnp.sum(mask), {"token_accuracy": correct}


def exact_match(model, tokenizer, run_dir, cfg, *, limit: int = 500, log=print, show: int = 3) -> dict:
    """Greedy-decode the first ``limit`` held-out sources of a pairs run and grade them: the share
    whose output equals the target exactly. Returns ``{"exact_match", "exact_match_examples"}``."""
    from pathlib import Path

    from tfd_jax.data.pairs import pairs_of
    from tfd_jax.data.tokenized import load_tokens
    from tfd_jax.decode import generate

    pairs = pairs_of(load_tokens(Path(run_dir) / "data" / "val"), tokenizer.sep_id, limit)
    right, batch = 0, 100
    longest = max(len(t) for _, t in pairs) + 1
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        out, lengths = generate(model, None, min(longest, model.config.context_length - 1),
                                source=[s or [tokenizer.pad_id] for s, _ in chunk], eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id)
        for k, ((src, tgt), row, n) in enumerate(zip(chunk, out, lengths)):
            got = [int(t) for t in row[: int(n)]]
            if got and got[-1] == tokenizer.eos_id:
                got = got[:-1]
            right += got == tgt
            if i + k < show:
                log(f"  {tokenizer.decode(src)!r} -> {tokenizer.decode(got)!r}" + ("" if got == tgt else
                                                                                 f"  (expected {tokenizer.decode(tgt)!r})"))
    result = {"exact_match": right / len(pairs), "exact_match_examples": len(pairs)}
    log(f"held-out exact match (greedy decoding): {right}/{len(pairs)} = {100 * result['exact_match']:.1f}%")
    return result


class _TaskTable(dict):
    """Task name -> class. An entry may name its class as ``"module:Class"``: it is imported on
    first use, so post-training tasks (``tfd_jax.posttrain``, which builds on this package) are
    listed here without this package importing them."""

    def __getitem__(self, name: str) -> type[Task]:
        value = super().__getitem__(name)
        if isinstance(value, str):
            import importlib

            module, _, cls = value.partition(":")
            value = getattr(importlib.import_module(module), cls)
            self[name] = value
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default


TASKS: dict[str, type[Task]] = _TaskTable(
    lm=LMTask, mlm=MLMTask, seq2seq=Seq2SeqTask, sft="tfd_jax.posttrain.tasks:SFTTask",
    dpo="tfd_jax.posttrain.tasks:DPOTask", reward="tfd_jax.posttrain.tasks:RewardTask",
    ppo="tfd_jax.posttrain.ppo:PPOTask",
)


def get_task(name: str) -> Task:
    """A task by its ``--task`` name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()
