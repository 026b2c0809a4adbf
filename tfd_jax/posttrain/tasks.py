"""Post-training tasks for the one ``Trainer`` (Chapter 18): supervised fine-tuning on conversations.

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
"""
from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from tfd_jax.posttrain.data import (
    CHAT_SPECIAL_TOKENS,
    assistant_token_mask,
    builtin_charset,
    builtin_prompts,
    builtin_sft_conversations,
    chat_token_ids,
    load_chats,
    render_prompt,
    rule_score,
)
from tfd_jax.train.tasks import LMTask

__all__ = ["SFTTask", "chat_text", "sample_rule_score"]

#: the special tokens of a chat model's tokenizer: padding, end of document, the chat markers
CHAT_TOKENIZER_SPECIALS = ("<pad>", "</s>", *CHAT_SPECIAL_TOKENS)
#: ``--data`` naming the built-in conversations
BUILTIN_CHAT = "chat"


def chat_text(messages) -> str:
    """A conversation as text with its markers spelled out (``<|user|>...<|end|><|assistant|>...<|end|>``):
    a tokenizer holding the chat markers encodes it to ``render_chat``'s ids."""
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


class SFTTask(LMTask):
    """Supervised fine-tuning on conversations (Chapter 18); see the module notes."""

    name = "sft"
    arch = "gpt"
    special_tokens = CHAT_TOKENIZER_SPECIALS
    cli_defaults = {"data": BUILTIN_CHAT, "tokenizer": "char", "seq_len": 128, "steps": 300, "lr": 1e-3,
                    "min_lr": 1e-4, "weight_decay": 0.0, "samples": 0}

    def __init__(self, conversations: int = 4000, eval_prompts: int = 200):
        self.conversations, self.eval_prompts = conversations, eval_prompts

    def setup(self, tokenizer, model_config) -> None:
        marks = chat_token_ids(tokenizer)
        self.assistant_id, self.end_id = marks["assistant"], marks["end"]

    def corpus(self, cfg, split, max_bytes):
        from tfd_jax.data.corpora import Corpus, Document

        if cfg.data == BUILTIN_CHAT:
            n = self.conversations if split == "train" else max(self.conversations // 10, 1)
            chats = builtin_sft_conversations(split, n=n, seed=cfg.seed)
        elif Path(cfg.data).suffix.lower() == ".jsonl":
            every = load_chats(cfg.data)
            chats = [c for i, c in enumerate(every) if (i % 10 == 9) == (split == "val")]
            if not chats:
                raise ValueError(f"{cfg.data} has too few conversations for a {split} split (every tenth is held out)")
        else:
            raise ValueError(f"--task sft reads conversations: --data {BUILTIN_CHAT} (built in) or a .jsonl file of "
                             f'{{"messages": [...]}} lines, not {cfg.data!r}')
        docs = [Document(str(i), chat_text(c)) for i, c in enumerate(chats)]
        if cfg.data == BUILTIN_CHAT and split == "train":  # every character the task can write has an id
            docs.append(Document("charset", builtin_charset()))
        return Corpus(spec=cfg.data, split=split, documents=tuple(docs))

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
        if cfg.data != BUILTIN_CHAT:
            return None
        score = sample_rule_score(model, tokenizer, builtin_prompts("val", n=self.eval_prompts, seed=cfg.seed + 1),
                                  seed=cfg.seed, log=log)
        log(f"held-out rule score of sampled answers: {score:.3f} ({self.eval_prompts} prompts)")
        return {"rule_score": score}


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
