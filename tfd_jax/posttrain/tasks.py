"""Post-training tasks for the one ``Trainer`` (Chapter 18): supervised fine-tuning on conversations,
and Direct Preference Optimisation on preference pairs.

``SFTTask`` (``tfd-jax train --task sft``) is next-token training with two differences:

- the data are conversations in the chat template (``tfd_jax.posttrain.data``), short ones packed
  into rows of ``seq_len`` tokens with attention kept inside each conversation (segment ids);
- the loss counts only the assistant's tokens (and the ``<|end|>`` that closes each answer, so the
  model learns to stop): the mask is recomputed from the ids inside the jitted step
  (``assistant_token_mask``), so user turns are read but never imitated.

``--data chat`` is the built-in task (``builtin_sft_conversations``; its answers are always on topic
and enthusiastic only 20% of the time); a ``.jsonl`` file of ``{"messages": [...]}`` lines is the
other choice (every tenth conversation held out). Start from a pretrained run with ``--init-from``
(its tokenizer must hold the chat markers). At the end of a run on the built-in task, answers
sampled for held-out prompts are scored by the task's hidden rule (``rule_score`` in the summary).

``DPOTask`` (``tfd-jax train --task dpo``, beyond the course) learns from pairs ``(prompt, chosen,
rejected)`` directly, without a reward model: the policy starts from the run's starting weights and a
frozen copy of them is the reference (``Task.frozen``: sharded like the policy, no optimizer state,
reloaded from ``--init-from`` on resume; ``--reference RUN`` names other weights). With LoRA adapters
(``--lora RANK``) there is no copy: the model with its adapters switched off is the reference. Each step computes both answers' summed log-probabilities
under the policy and the reference and applies ``losses.dpo_loss``; ``dpo_loss``, the preference
accuracy of the implied rewards and their margin go to ``metrics.jsonl``. ``--data prefs`` is the
built-in task's pairs (a rule-labelled, 10%-noisy rater), or a ``.jsonl`` file of
``{"prompt", "chosen", "rejected"}`` lines.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax.posttrain.data import (
    CHAT_SPECIAL_TOKENS,
    assistant_token_mask,
    builtin_charset,
    builtin_preference_pairs,
    builtin_prompts,
    builtin_sft_conversations,
    chat_token_ids,
    load_chats,
    load_preference_pairs,
    render_prompt,
    rule_score,
)
from tfd_jax.posttrain.losses import dpo_loss
from tfd_jax.train.tasks import LMTask, Task

__all__ = ["DPOTask", "RewardTask", "SFTTask", "chat_text", "held_out_rule_score", "sample_rule_score"]

#: the special tokens of a chat model's tokenizer: padding, end of document, the chat markers
CHAT_TOKENIZER_SPECIALS = ("<pad>", "</s>", *CHAT_SPECIAL_TOKENS)
#: ``--data`` naming the built-in conversations and preference pairs
BUILTIN_CHAT = "chat"
BUILTIN_PREFS = "prefs"


def chat_text(messages) -> str:
    """A conversation as text with its markers spelled out (``<|user|>...<|end|><|assistant|>...<|end|>``):
    a tokenizer holding the chat markers encodes it to ``render_chat``'s ids."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def _examples_corpus(cfg, split: str, builtin: str, what: str, line_form: str, make_builtin, count: int, load,
                     as_text):
    """One split of a post-training dataset as a corpus of documents, one example each: the
    built-in task's (``count`` for train, a tenth of it held out) or a JSONL file's (every tenth
    example held out), each written as text in the chat template by ``as_text``."""
    from tfd_jax.data.corpora import Corpus, Document

    if cfg.data == builtin:
        examples = make_builtin(count if split == "train" else max(count // 10, 1))
    elif Path(cfg.data).suffix.lower() == ".jsonl":
        examples = [e for i, e in enumerate(load(cfg.data)) if (i % 10 == 9) == (split == "val")]
        if not examples:
            raise ValueError(f"{cfg.data} has too few {what} for a {split} split (every tenth is held out)")
    else:
        raise ValueError(f"--task {cfg.task} reads {what}: --data {builtin} (built in) or a .jsonl file of "
                         f"{line_form} lines, not {cfg.data!r}")
    docs = [Document(str(i), as_text(e)) for i, e in enumerate(examples)]
    return Corpus(spec=cfg.data, split=split, documents=tuple(docs))


class SFTTask(LMTask):
    """Supervised fine-tuning on conversations (Chapter 18); see the module notes."""

    name = "sft"
    arch = "gpt"
    special_tokens = CHAT_TOKENIZER_SPECIALS
    extra_special_tokens = CHAT_SPECIAL_TOKENS  # e.g. from Hugging Face GPT-2, which has no chat markers
    cli_defaults = {"data": BUILTIN_CHAT, "tokenizer": "char", "seq_len": 128, "steps": 300, "lr": 1e-3,
                    "min_lr": 1e-4, "weight_decay": 0.0, "samples": 0}

    def __init__(self, conversations: int = 4000, eval_prompts: int = 200):
        self.conversations, self.eval_prompts = conversations, eval_prompts

    def setup(self, tokenizer, model_config) -> None:
        marks = chat_token_ids(tokenizer)
        self.assistant_id, self.end_id = marks["assistant"], marks["end"]

    def corpus(self, cfg, split, max_bytes):
        return _examples_corpus(cfg, split, BUILTIN_CHAT, "conversations", '{"messages": [...]}',
                                lambda n: builtin_sft_conversations(split, n=n, seed=cfg.seed), self.conversations,
                                load_chats, chat_text)

    def tokenizer_text(self, cfg, text: str) -> str:
        # every character the built-in task can write gets an id, seen in its data or not
        return text + builtin_charset() if cfg.data in (BUILTIN_CHAT, BUILTIN_PREFS) else text

    def iterator(self, cfg, tokens, tokenizer, *, seed):
        from tfd_jax.data.pipeline import make_iterator

        return make_iterator(tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=seed, packing=True)

    def prepare(self, batch: dict, key) -> dict:
        # The stream [first input, targets...] is the packed row; a target counts when it is part of
        # an assistant answer (the mask of the stream, shifted onto the targets).
        stream = jnp.concatenate([batch["tokens"][:, :1], batch["targets"]], axis=1)
        answer = assistant_token_mask(stream, assistant_id=self.assistant_id, end_id=self.end_id)[:, 1:]
        return dict(batch, mask=batch["mask"] & answer)

    def final_metrics(self, model, tokenizer, run_dir, cfg, log) -> dict | None:
        return held_out_rule_score(model, tokenizer, cfg, log, builtin=BUILTIN_CHAT, prompts=self.eval_prompts)


def sample_rule_score(model, tokenizer, prompts: list[str], *, seed: int = 0, temperature: float = 1.0,
                      max_new_tokens: int = 48, log=None, show: int = 3) -> float:
    """Mean ``rule_score`` of answers sampled (``temperature``) for ``prompts`` in the chat template:
    the built-in task's measure of how well a policy does (Chapter 18)."""
    from tfd_jax.decode import generate

    end = chat_token_ids(tokenizer)["end"]
    ids = [render_prompt(p, tokenizer) for p in prompts]
    new = min(max_new_tokens, model.config.context_length - max(len(i) for i in ids))
    tokens, lengths = generate(model, ids, new, temperature=temperature, seed=seed, eos_id=end)
    scores = []
    for k, (prompt, row, n) in enumerate(zip(prompts, tokens, lengths)):
        out = [int(t) for t in row[: int(n)]]
        answer = tokenizer.decode(out[:-1] if out and out[-1] == end else out)
        scores.append(rule_score(prompt, answer) if out and out[-1] == end else 0.0)  # unfinished: 0
        if log is not None and k < show:
            log(f"  {prompt!r} -> {answer!r} (score {scores[-1]})")
    return float(sum(scores) / len(scores))


def held_out_rule_score(model, tokenizer, cfg, log, *, builtin: str, prompts: int) -> dict | None:
    """At the end of a run on the built-in task (``cfg.data == builtin``): the mean rule score of
    answers sampled for ``prompts`` held-out prompts, as ``{"rule_score": ...}``; None otherwise."""
    if cfg.data != builtin:
        return None
    score = sample_rule_score(model, tokenizer, builtin_prompts("val", n=prompts, seed=cfg.seed + 1), seed=cfg.seed,
                              log=log)
    log(f"held-out rule score of sampled answers: {score:.3f} ({prompts} prompts)")
    return {"rule_score": score}


def _pair_text(prompt: str, chosen: str, rejected: str) -> str:
    """A preference pair as one document: the prompt in the chat template up to the assistant's
    opener, then each answer closed by ``<|end|>`` (chosen first)."""
    return f"<|user|>{prompt}<|end|><|assistant|>{chosen}<|end|>{rejected}<|end|>"


class _ReadPreference:
    """Document index -> the chosen and the rejected conversation as next-token rows of ``T``:
    ``{side}_tokens``, ``{side}_targets`` int32 ``[T]`` and ``{side}_mask`` bool ``[T]`` (True on
    the answer's targets, its ``<|end|>`` included), for ``side`` in chosen / rejected."""

    def __init__(self, tokens, offsets, seq_len: int, assistant_id: int, end_id: int, pad_id: int):
        from tfd_jax.data.pipeline import _Tokens

        self.tokens, self.offsets = _Tokens(tokens), np.asarray(offsets, np.int64)
        self.T, self.assistant_id, self.end_id, self.pad_id = seq_len, assistant_id, end_id, pad_id

    def __call__(self, doc: int) -> dict:
        d = np.asarray(self.tokens.array[self.offsets[doc]:self.offsets[doc + 1]], np.int32)
        opener = int(np.argmax(d == self.assistant_id))
        ends = np.flatnonzero(d[opener:] == self.end_id) + opener
        prompt, chosen, rejected = d[: opener + 1], d[opener + 1: ends[0] + 1], d[ends[0] + 1: ends[1] + 1]
        out = {}
        for side, answer in (("chosen", chosen), ("rejected", rejected)):
            seq = np.concatenate([prompt, answer])[: self.T + 1]
            row = np.full(self.T + 1, self.pad_id, np.int32)
            row[: seq.size] = seq
            t = np.arange(self.T)
            out[f"{side}_tokens"], out[f"{side}_targets"] = row[:-1], row[1:]
            out[f"{side}_mask"] = (t >= prompt.size - 1) & (t < seq.size - 1)
            out[f"{side}_length"] = np.int32(min(seq.size, self.T))  # real tokens of row[:-1] (a reward model's input)
        return out


class _PreferenceTask(Task):
    """What the tasks trained on preference pairs share: their data (see :class:`_ReadPreference`)."""

    special_tokens = CHAT_TOKENIZER_SPECIALS
    extra_special_tokens = CHAT_SPECIAL_TOKENS
    pairs = 4000

    def setup(self, tokenizer, model_config) -> None:
        marks = chat_token_ids(tokenizer)
        self.assistant_id, self.end_id = marks["assistant"], marks["end"]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def corpus(self, cfg, split, max_bytes):
        return _examples_corpus(cfg, split, BUILTIN_PREFS, "preference pairs", '{"prompt", "chosen", "rejected"}',
                                lambda n: builtin_preference_pairs(split, n=n, seed=cfg.seed), self.pairs,
                                load_preference_pairs, lambda p: _pair_text(p.prompt, p.chosen, p.rejected))

    tokenizer_text = SFTTask.tokenizer_text

    def iterator(self, cfg, tokens, tokenizer, *, seed):
        from tfd_jax.data.pairs import documents_iterator

        self.setup(tokenizer, None)
        read = _ReadPreference(tokens.tokens, tokens.offsets, cfg.seq_len, self.assistant_id, self.end_id, self.pad_id)
        return documents_iterator(tokens, read, batch_size=cfg.batch_size, seed=seed, what="preference pairs")


class DPOTask(_PreferenceTask):
    """Direct Preference Optimisation (Rafailov et al. 2023; Chapter 18's preference step without a
    reward model or PPO, beyond the course); see the module notes."""

    name = "dpo"
    arch = "gpt"
    cli_defaults = {"data": BUILTIN_PREFS, "tokenizer": "char", "seq_len": 64, "steps": 200, "lr": 1e-4,
                    "min_lr": 1e-4, "warmup": 0, "weight_decay": 0.0, "samples": 0, "dropout": 0.0}
    lora = False

    # beta = 0.5: measured on the built-in task from the pipeline's SFT run (400 steps at 1e-4):
    # held-out rule score 0.105 -> 0.395 at a KL of 2.3 nats (0.855 on training prompts); 0.1 (the
    # paper's) reached 0.31 at a KL of 14.6 and did not gain on training prompts, 1.0 0.335 at 1.1.
    def __init__(self, beta: float = 0.5, variant: str = "sigmoid", label_smoothing: float = 0.0,
                 pairs: int = 4000, eval_prompts: int = 200):
        self.beta, self.variant, self.label_smoothing = beta, variant, label_smoothing
        self.pairs, self.eval_prompts = pairs, eval_prompts

    def setup(self, tokenizer, model_config) -> None:
        super().setup(tokenizer, model_config)
        if model_config is not None:  # (the data iterator calls setup with the tokenizer alone)
            self.lora = bool(getattr(model_config, "lora_rank", 0))

    def frozen(self, params, fixed):
        if self.lora:  # the base weights never train: the model with its adapters off is the reference
            return None
        return nnx.merge_state(params, fixed) if jax.tree.leaves(fixed) else params

    def loss_fn(self, model, batch, frozen):

        def both(name):  # chosen rows, then rejected rows: one forward pass per model
            return jnp.concatenate([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=0)

        tokens, targets, mask = both("tokens"), both("targets"), both("mask")

        def answer_logps(m):  # summed log-prob of each answer: (chosen [B], rejected [B])
            return jnp.split(-jnp.sum(m.token_losses(tokens, targets) * mask, axis=-1), 2)

        pc, pr = answer_logps(model)
        if frozen is None:  # LoRA
            from tfd_jax.nn.lora import lora_disabled

            with lora_disabled(model):
                rc, rr = jax.lax.stop_gradient(answer_logps(model))
        else:
            graphdef, _, rest = nnx.split(model, nnx.Param, ...)
            reference = nnx.merge(graphdef, frozen, rest)
            reference.eval()
            rc, rr = jax.lax.stop_gradient(answer_logps(reference))
        losses = dpo_loss(pc, pr, rc, rr, beta=self.beta, variant=self.variant, label_smoothing=self.label_smoothing)
        margin = self.beta * ((pc - rc) - (pr - rr))
        return jnp.sum(losses), jnp.float32(losses.shape[0]), {
            "dpo_loss": jnp.sum(losses), "preference_accuracy": jnp.sum(margin > 0), "reward_margin": jnp.sum(margin)}

    def final_metrics(self, model, tokenizer, run_dir, cfg, log) -> dict | None:
        return held_out_rule_score(model, tokenizer, cfg, log, builtin=BUILTIN_PREFS, prompts=self.eval_prompts)


class RewardTask(_PreferenceTask):
    """The reward model of Chapter 18 (``tfd-jax train --task reward``): a :class:`RewardModel`
    (a GPT with a scalar head) learns to score the chosen answer of each pair above the rejected one
    (``losses.reward_model_loss``, Bradley-Terry). ``--init-from`` a GPT run (e.g. the SFT model)
    starts its backbone; the head starts fresh. Logs ``pairwise_accuracy`` (held out:
    ``val_pairwise_accuracy``) and the mean ``reward_margin``."""

    name = "reward"
    arch = "reward"
    init_archs = ("gpt",)  # --init-from a language model: its blocks, a new head
    fresh_params = ("value_head",)
    cli_defaults = {"data": BUILTIN_PREFS, "tokenizer": "char", "seq_len": 64, "steps": 200, "lr": 3e-3,
                    "min_lr": 3e-4, "weight_decay": 0.0, "samples": 0}

    def __init__(self, margin: float | None = None, pairs: int = 4000):
        self.margin, self.pairs = margin, pairs

    def loss_fn(self, model, batch, frozen):
        from tfd_jax.posttrain.losses import reward_model_loss

        tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
        lengths = jnp.concatenate([batch["chosen_length"], batch["rejected_length"]], axis=0)
        rc, rr = jnp.split(model.score(tokens, lengths), 2)  # both answers in one forward pass
        losses = reward_model_loss(rc, rr, margin=self.margin)
        return jnp.sum(losses), jnp.float32(losses.shape[0]), {
            "reward_loss": jnp.sum(losses), "pairwise_accuracy": jnp.sum(rc > rr), "reward_margin": jnp.sum(rc - rr)}
