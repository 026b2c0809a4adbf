"""Conversations and preference data for post-training (Chapter 18): a chat template, file loaders,
and a built-in task whose "human rater" is a rule that code can check.

Chapter 18 fine-tunes a pretrained model on ``Instruction: ... / Response: ...`` examples, then
learns from people's preferences (a reward model and PPO). This module supplies the data those
steps consume.

**The chat template** (going beyond the course's ``Instruction:/Response:`` text, as chat models
do). A conversation is a list of messages ``{"role": "user" | "assistant" | "system", "content":
str}``; every message becomes ``<|role|>`` + ``encode(content)`` + ``<|end|>``, with nothing in
between (no spaces, no newlines, no bos/eos; a token file writer appends the eos of a document).
A system message is allowed as the first message only and needs ``<|system|>`` in the
tokenizer; user and assistant turns then alternate, starting with the user::

    <|user|>Tell me about cats.<|end|><|assistant|>Cats are lovely!<|end|>

Supervised fine-tuning trains only the assistant's tokens: :func:`render_chat` returns a mask
that is True on each assistant content token and on the ``<|end|>`` that closes it (so the model
learns to stop), and False on the ``<|assistant|>`` opener, on user and system turns.
:func:`assistant_token_mask` recomputes that mask from the ids alone, under ``jit``, also for
several conversations packed into one row.

**Files**: JSON lines. :func:`load_chats` reads ``{"messages": [...]}`` per line,
:func:`load_preference_pairs` reads ``{"prompt": ..., "chosen": ..., "rejected": ...}``; every error
names the file and the line.

**The built-in task** (no download; every function is a seeded program, so a seed gives the same
data on every machine). A user asks about one of 40 things (``"Tell me about cats."``); an answer
is a short templated sentence. Chapter 18's human rater is modelled by :func:`rule_score`: half a point for talking about the thing asked about, half a point for
enthusiasm (ending with ``"!"``), nothing for a garbled answer. The SFT examples are always on
topic but enthusiastic only ``style_rate`` of the time, so a model that merely imitates them scores
about ``0.5 + 0.5 * style_rate``; the preference pairs carry the rest of the signal, through a
rater that picks the wrong answer ``label_noise`` of the time. Splits: the held-out split
(``"val"``) asks about 8 things (every fifth of :data:`NOUNS`) that the training split never
mentions; prompt and answer templates are shared, so a held-out score measures whether the learnt
preference carries over to new topics. The pre-training text covers all 40 things (the "world"
that a base model knows before post-training).
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "NOUNS",
    "PROMPT_TEMPLATES",
    "RESPONSE_TEMPLATES",
    "ROLES",
    "PreferencePair",
    "assistant_token_mask",
    "builtin_charset",
    "builtin_nouns",
    "builtin_preference_pairs",
    "builtin_pretraining_text",
    "builtin_prompts",
    "builtin_sft_conversations",
    "chat_token_ids",
    "check_conversation",
    "load_chats",
    "load_preference_pairs",
    "prompt_noun",
    "render_chat",
    "render_prompt",
    "rule_score",
]

USER, ASSISTANT, END, SYSTEM = "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"
#: the chat template's markers; a tokenizer for chat adds them to its own (e.g. ``"<pad>"``,
#: ``"</s>"``): ``CharTokenizer.train(text, special_tokens=("<pad>", "</s>", *CHAT_SPECIAL_TOKENS))``.
#: ``<|system|>`` is only needed for conversations that open with a system message.
CHAT_SPECIAL_TOKENS = (USER, ASSISTANT, END, SYSTEM)
#: the roles a message may have
ROLES = ("system", "user", "assistant")
_OPENER = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


# --------------------------------------------------------------------------------------------------
# The chat template
# --------------------------------------------------------------------------------------------------


def check_conversation(messages: Any, *, for_generation: bool = False) -> list[dict[str, str]]:
    """Validate a conversation and return it as a list of ``{"role", "content"}`` dicts.

    The rules: a non-empty list of messages, each a mapping with a ``role`` in :data:`ROLES` and a
    string ``content`` that is not blank and holds none of :data:`CHAT_SPECIAL_TOKENS` (they would
    break the template). A ``system`` message may only come first. After it, turns alternate
    ``user``, ``assistant``, ``user``, ... starting with the user. A conversation for training
    (``for_generation=False``) ends with an assistant turn (so it has one to learn from); one for
    generation ends with a user turn, which the assistant is about to answer. Other keys of a
    message are ignored.

    Raises:
      ValueError: naming the message (``messages[2]``) and what is wrong with it; loaders prefix
        the file and line.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise ValueError("the conversation has no messages")
    out: list[dict[str, str]] = []
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(m, Mapping):
            raise ValueError(f'{where} must be an object {{"role": ..., "content": ...}}, got {type(m).__name__}')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            shown = "no role" if role is None else f"the unknown role {role!r}"
            raise ValueError(f"{where} has {shown}; a role is one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            shown = "no content" if content is None else f"content of type {type(content).__name__}"
            raise ValueError(f"{where} ({role}) has {shown}; content must be a string")
        if not content.strip():
            raise ValueError(f"{where} ({role}) has empty content")
        marker = next((t for t in CHAT_SPECIAL_TOKENS if t in content), None)
        if marker is not None:
            raise ValueError(f"{where} ({role}) holds the chat marker {marker!r} in its content; remove it")
        if role == "system" and k > 0:
            raise ValueError(f"{where} is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    turns = out[1:] if out[0]["role"] == "system" else out
    for k, m in enumerate(turns):
        want = "user" if k % 2 == 0 else "assistant"
        if m["role"] != want:
            idx = k + (len(out) - len(turns))
            before = "the conversation starts" if k == 0 else f"after {_a(turns[k - 1]['role'])} turn"
            raise ValueError(f"messages[{idx}] is {_a(m['role'])} turn where {_a(want)} turn must come "
                             f"({before}); user and assistant turns alternate, starting with the user")
    if for_generation:
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("a conversation to answer must end with a user turn")
    else:
        if not any(m["role"] == "assistant" for m in turns):
            raise ValueError("the conversation has no assistant turn, so there is nothing to train on")
        if turns[-1]["role"] != "assistant":
            raise ValueError("the conversation ends with a user turn that nobody answers; end it with an "
                             "assistant turn (or drop the last message)")
    return out


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def chat_token_ids(tokenizer) -> dict[str, int]:
    """The ids of the chat markers in ``tokenizer``: ``{"user", "assistant", "end"}`` and ``"system"``
    when registered. Raises ValueError when one of the first three is missing."""
    special = tokenizer.special_tokens
    missing = [t for t in (USER, ASSISTANT, END) if t not in special]
    if missing:
        raise ValueError(f"the tokenizer has no special token {missing[0]!r}; build it with "
                         "special_tokens=(..., *CHAT_SPECIAL_TOKENS) to use the chat template")
    ids = {"user": special[USER], "assistant": special[ASSISTANT], "end": special[END]}
    if SYSTEM in special:
        ids["system"] = special[SYSTEM]
    return ids


def render_chat(messages, tokenizer, *, add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """A conversation -> token ids and the mask of the tokens supervised fine-tuning trains (Chapter 18).

    Layout (see the module docstring): each message is ``<|role|>`` + ``encode(content)`` +
    ``<|end|>``, the messages back to back. With ``add_generation_prompt=True`` the conversation
    must end with a user turn and ``<|assistant|>`` is appended: the model writes the answer from
    there and stops by emitting ``<|end|>``.

    Args:
      messages: ``[{"role": ..., "content": ...}, ...]`` (rules: :func:`check_conversation`).
      tokenizer: any :class:`~tfd_jax.tokenizers.Tokenizer` holding :data:`CHAT_SPECIAL_TOKENS`
        (``<|system|>`` only needed for a system message).
    Returns:
      ``(ids, assistant_mask)``, two lists of the same length ``T``: ``assistant_mask[i]`` is True
      on every assistant content token and on the ``<|end|>`` closing an assistant turn.
    """
    turns = check_conversation(messages, for_generation=add_generation_prompt)
    marks = chat_token_ids(tokenizer)
    if turns[0]["role"] == "system" and "system" not in marks:
        raise ValueError(f"the conversation has a system message but the tokenizer has no {SYSTEM!r} token")
    marker_ids = set(marks.values())
    ids: list[int] = []
    mask: list[bool] = []
    for k, m in enumerate(turns):
        body = tokenizer.encode(m["content"])
        if marker_ids.intersection(body):
            raise ValueError(f"messages[{k}] ({m['role']}) encodes to a chat marker id; its content "
                             "must not contain the template's markers")
        trained = m["role"] == "assistant"
        ids += [marks[m["role"]], *body, marks["end"]]
        mask += [False] + [trained] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(marks["assistant"])
        mask.append(False)
    return ids, mask


def render_prompt(prompt_text: str, tokenizer) -> list[int]:
    """The ids a model continues to answer one user message: ``<|user|>`` + prompt + ``<|end|>`` +
    ``<|assistant|>`` (:func:`render_chat` with the generation prompt)."""
    ids, _ = render_chat([{"role": "user", "content": prompt_text}], tokenizer, add_generation_prompt=True)
    return ids


def assistant_token_mask(tokens: jax.Array, *, assistant_id: int, end_id: int) -> jax.Array:
    """The SFT mask from token ids alone (Chapter 18): True inside an assistant turn, from the token after
    ``<|assistant|>`` through the ``<|end|>`` that closes it.

    Position ``t`` is inside when the latest ``<|assistant|>`` strictly before ``t`` comes after the
    latest ``<|end|>`` strictly before ``t``. Both "latest" positions are running maxima along time
    (``jax.lax.cummax`` of the marker positions), so the function is jittable, has no Python loop
    and needs no user or system id. On a row produced by :func:`render_chat` (or several of them
    concatenated, with eos or padding between them: packing) it equals ``render_chat``'s mask.
    An assistant turn that is never closed is True up to the end of the row: a row cut inside a
    turn, or a generation prompt followed by the sampled answer (and by any padding after it, so
    combine with a padding mask there). A row that starts inside a turn (the rest of a conversation
    cut in two) is False until the next ``<|assistant|>``, since the ids alone cannot tell.

    Args:
      tokens: int ``[B, T]`` (any leading shape; time last).
      assistant_id, end_id: the ids of ``<|assistant|>`` and ``<|end|>`` (:func:`chat_token_ids`).
    Returns:
      bool, the shape of ``tokens``.
    """
    tokens = jnp.asarray(tokens)
    axis = tokens.ndim - 1
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
    last_open = jax.lax.cummax(jnp.where(tokens == assistant_id, pos, -1), axis=axis)
    last_end = jax.lax.cummax(jnp.where(tokens == end_id, pos, -1), axis=axis)
    # shift right by one step: the latest marker strictly before each position
    pad = jnp.full(tokens.shape[:-1] + (1,), -1, jnp.int32)
    open_before = jnp.concatenate([pad, last_open[..., :-1]], axis=axis)
    end_before = jnp.concatenate([pad, last_end[..., :-1]], axis=axis)
    return open_before > end_before


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One human judgement (Chapter 18): for ``prompt``, the rater preferred ``chosen`` to ``rejected``
    (plain texts, no chat markers)."""

    prompt: str
    chosen: str
    rejected: str


def _json_lines(path: Path, shape: str):
    """``(line number, object)`` for each non-blank line of a JSONL file; errors name file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}" if not path.exists() else f"{path} is not a file")
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg}); each line must be {shape}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected an object {shape}, got {type(row).__name__}")
        yield i, row


def load_chats(path) -> list[list[dict[str, str]]]:
    """Conversations for SFT from a JSONL file, one ``{"messages": [{"role": ..., "content": ...}, ...]}``
    per line (blank lines skipped), each checked by :func:`check_conversation` (training form: it
    ends with an assistant turn).

    Raises:
      FileNotFoundError: no such file.
      ValueError: ``"PATH:LINE: ..."`` for malformed JSON, a line without a ``messages`` list, or a
        conversation that breaks the rules; or the file holds no conversation.
    """
    path = Path(path)
    shape = '{"messages": [{"role": ..., "content": ...}, ...]}'
    out = []
    for i, row in _json_lines(path, shape):
        if not isinstance(row.get("messages"), list):
            raise ValueError(f"{path}:{i}: expected {shape} (no 'messages' list)")
        try:
            out.append(check_conversation(row["messages"]))
        except ValueError as e:
            raise ValueError(f"{path}:{i}: {e}") from None
    if not out:
        raise ValueError(f"{path} holds no conversations")
    return out


def _check_text(value: Any, field: str, where: str) -> str:
    if value is None:
        raise ValueError(f"{where}: missing field {field!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {field!r} is empty")
    marker = next((t for t in CHAT_SPECIAL_TOKENS if t in value), None)
    if marker is not None:
        raise ValueError(f"{where}: field {field!r} holds the chat marker {marker!r}; remove it")
    return value


def load_preference_pairs(path) -> list[PreferencePair]:
    """Preference pairs from a JSONL file, one ``{"prompt": str, "chosen": str, "rejected": str}`` per
    line (blank lines skipped; other keys ignored).

    Raises:
      FileNotFoundError: no such file.
      ValueError: ``"PATH:LINE: ..."`` for malformed JSON, a missing, non-string or blank field, a
        chat marker inside a field, or a pair whose chosen text equals its rejected text; or the
        file holds no pair.
    """
    path = Path(path)
    shape = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
    out = []
    for i, row in _json_lines(path, shape):
        where = f"{path}:{i}"
        prompt, chosen, rejected = (_check_text(row.get(f), f, where) for f in ("prompt", "chosen", "rejected"))
        if chosen == rejected:
            raise ValueError(f"{where}: chosen and rejected are the same text; a preference needs two "
                             "different responses")
        out.append(PreferencePair(prompt, chosen, rejected))
    if not out:
        raise ValueError(f"{path} holds no preference pairs")
    return out


# --------------------------------------------------------------------------------------------------
# The built-in task
# --------------------------------------------------------------------------------------------------

#: the 40 things the built-in task talks about (plural, lower case); every fifth is held out
NOUNS = (
    "cats", "dogs", "birds", "fish", "horses", "cows", "ducks", "frogs", "bees", "owls",
    "apples", "pears", "grapes", "lemons", "plums", "trees", "flowers", "rivers", "lakes", "hills",
    "stars", "clouds", "boats", "trains", "bikes", "books", "songs", "games", "hats", "shoes",
    "cups", "lamps", "kites", "drums", "candles", "bells", "rabbits", "foxes", "whales", "tigers",
)
_SPLIT_NOUNS = {
    "train": tuple(n for i, n in enumerate(NOUNS) if i % 5 != 4),
    "val": tuple(n for i, n in enumerate(NOUNS) if i % 5 == 4),
}
_SPLIT_CODE = {"train": 0, "val": 1}

#: what a user asks ({n}: the noun)
PROMPT_TEMPLATES = (
    "Tell me about {n}.",
    "What do you think of {n}?",
    "Say something about {n}.",
    "Do you like {n}?",
    "Describe {n}.",
)
#: how an answer goes ({n}: the noun, {N}: capitalised); the end mark ("." or "!") is added
RESPONSE_TEMPLATES = (
    "{N} are lovely",
    "I really like {n}",
    "Many people enjoy {n}",
    "{N} make the day better",
    "There is a lot to love about {n}",
    "Everyone should know about {n}",
    "I think {n} are great",
    "{N} are a joy to see",
)
# sentences that only the pre-training text holds
_WORLD_TEMPLATES = (
    "You can see {n} in the town",
    "My friend has a story about {n}",
    "We talked about {n} all day",
    "Some {n} are big and some are small",
)
_WELL_FORMED = re.compile(r"[A-Za-z]+(?: [A-Za-z]+){2,11}[.!]")


def _rng(seed: int, split: str, purpose: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], purpose])


def builtin_nouns(split: str) -> tuple[str, ...]:
    """The nouns of one split: ``"train"`` (32) or ``"val"`` (8, every fifth of :data:`NOUNS`)."""
    if split not in _SPLIT_NOUNS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return _SPLIT_NOUNS[split]


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    return int(n)


def _response(template: str, noun: str, mark: str) -> str:
    return template.format(n=noun, N=noun.capitalize()) + mark


def prompt_noun(prompt: str) -> str:
    """The noun of :data:`NOUNS` a prompt asks about (whole word, any case). Raises ValueError when the
    prompt names none of them or several."""
    found = sorted({w for w in re.findall(r"[a-z]+", prompt.lower()) if w in NOUNS})
    if len(found) != 1:
        what = "none of the built-in task's nouns" if not found else f"several nouns ({', '.join(found)})"
        raise ValueError(f"prompt {prompt!r} names {what}; the rule scores prompts about exactly one")
    return found[0]


def rule_score(prompt: str, response: str) -> float:
    """The built-in task's hidden rule, standing in for Chapter 18's human rater: a score in ``[0, 1]``.

    The response (plain text; surrounding whitespace is ignored) first has to be **well formed**:
    3 to 12 words of ASCII letters separated by single spaces, ending with ``"."`` or ``"!"`` right
    after the last word, with no word repeated right after itself (case-insensitive). Anything
    else (empty, cut off, stuttering, stray symbols) scores **0**. A well-formed response scores

    * **0.5** if one of its words is the prompt's noun (:func:`prompt_noun`; case-insensitive), plus
    * **0.5** if it ends with ``"!"``.

    So ``"Cats are lovely!"`` scores 1 for ``"Tell me about cats."``, ``"Cats are lovely."`` 0.5,
    ``"Dogs are lovely!"`` 0.5, ``"Dogs are lovely."`` 0, ``"I really really like cats!"`` 0.
    """
    noun = prompt_noun(prompt)
    text = response.strip()
    if not _WELL_FORMED.fullmatch(text):
        return 0.0
    words = text[:-1].lower().split(" ")
    if any(a == b for a, b in zip(words, words[1:])):
        return 0.0
    return 0.5 * (noun in words) + 0.5 * text.endswith("!")


def builtin_prompts(split: str, *, n: int, seed: int) -> list[str]:
    """``n`` prompts of the split (noun and prompt template drawn uniformly, with replacement), e.g.
    ``"Tell me about cats."``: what PPO samples answers to, and what a held-out score averages over."""
    nouns, n = builtin_nouns(split), _check_n(n)
    rng = _rng(seed, split, 3)
    return [PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(n=nouns[rng.integers(len(nouns))])
            for _ in range(n)]


def builtin_sft_conversations(split: str, *, n: int, seed: int, style_rate: float = 0.2) -> list[list[dict[str, str]]]:
    """``n`` one-exchange conversations for supervised fine-tuning (Chapter 18's demonstrations).

    Each is ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]``; the
    answer is a random :data:`RESPONSE_TEMPLATES` sentence about the prompt's noun (always on
    topic). Exactly ``round(style_rate * n)`` of them, at random places, end with ``"!"`` (the
    preferred style); the others end with ``"."``. Their mean :func:`rule_score` is therefore
    ``0.5 + 0.5 * round(style_rate * n) / n``.
    """
    if not 0.0 <= style_rate <= 1.0:
        raise ValueError(f"style_rate must be in [0, 1], got {style_rate}")
    n = _check_n(n)
    prompts = builtin_prompts(split, n=n, seed=seed)
    rng = _rng(seed, split, 1)
    excited = np.zeros(n, bool)
    excited[rng.permutation(n)[: int(round(style_rate * n))]] = True
    out = []
    for prompt, bang in zip(prompts, excited):
        template = RESPONSE_TEMPLATES[rng.integers(len(RESPONSE_TEMPLATES))]
        answer = _response(template, prompt_noun(prompt), "!" if bang else ".")
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return out


def _candidate(rng: np.random.Generator, noun: str, nouns: tuple[str, ...]) -> str:
    """One answer a model might give: on topic or about another noun of the split, "." or "!", and
    now and then garbled (cut off before its last word, or with a word said twice), scoring 0."""
    others = [x for x in nouns if x != noun]
    about = noun if rng.random() < 0.5 else others[rng.integers(len(others))]
    template = RESPONSE_TEMPLATES[rng.integers(len(RESPONSE_TEMPLATES))]
    text = _response(template, about, "!" if rng.random() < 0.5 else ".")
    if rng.random() < 0.15:
        words = text[:-1].split(" ")
        if rng.random() < 0.5:
            return " ".join(words[:-1])
        k = int(rng.integers(len(words)))
        return " ".join(words[: k + 1] + words[k:]) + text[-1]
    return text


def builtin_preference_pairs(split: str, *, n: int, seed: int, label_noise: float = 0.1) -> list[PreferencePair]:
    """``n`` preference pairs judged by a noisy rater (Chapter 18's human comparisons).

    For a random prompt of the split, two different candidate answers are drawn (each on or off
    topic, ending with "." or "!", sometimes garbled; see :func:`rule_score`). When their scores
    tie the draw is dropped and another is made, so every pair has a right answer: ``chosen`` is
    the higher-scoring one, except that with probability ``label_noise`` the rater gets it the
    wrong way round.
    """
    if not 0.0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise}")
    nouns, n = builtin_nouns(split), _check_n(n)
    rng = _rng(seed, split, 2)
    out: list[PreferencePair] = []
    while len(out) < n:
        noun = nouns[rng.integers(len(nouns))]
        prompt = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(n=noun)
        a, b = _candidate(rng, noun, nouns), _candidate(rng, noun, nouns)
        sa, sb = rule_score(prompt, a), rule_score(prompt, b)
        if a == b or sa == sb:
            continue
        better, worse = (a, b) if sa > sb else (b, a)
        if rng.random() < label_noise:
            better, worse = worse, better
        out.append(PreferencePair(prompt, better, worse))
    return out


def builtin_pretraining_text(*, n_chars: int, seed: int) -> str:
    """Plain text from the built-in task's world for a tiny pre-training stage: one sentence per line,
    about any of the 40 nouns (both splits), from the answer templates and a few sentences of its own
    (mostly ending with ".", one in ten with "!"), with a user-style question now and then.

    Whole lines are added until the text holds at least ``n_chars`` characters (so it is at most
    one line longer). A short text need not hold every character the task uses: train a character
    tokenizer on this text plus :func:`builtin_charset`.
    """
    n_chars = _check_n(n_chars)
    rng = _rng(seed, "train", 4)
    sentences = RESPONSE_TEMPLATES + _WORLD_TEMPLATES
    lines, size = [], 0
    while size < n_chars:
        noun = NOUNS[rng.integers(len(NOUNS))]
        if rng.random() < 0.2:
            line = PROMPT_TEMPLATES[rng.integers(len(PROMPT_TEMPLATES))].format(n=noun)
        else:
            line = _response(sentences[rng.integers(len(sentences))], noun, "!" if rng.random() < 0.1 else ".")
        lines.append(line)
        size += len(line) + 1
    return "".join(line + "\n" for line in lines)


def builtin_charset() -> str:
    """Every character the built-in task's functions can produce (sorted, including ``"\\n"``): add it
    to the text a character tokenizer is trained on, so no built-in prompt or answer is out of
    its vocabulary."""
    chars = set("\n.!")
    for noun in NOUNS:
        for t in PROMPT_TEMPLATES + RESPONSE_TEMPLATES + _WORLD_TEMPLATES:
            chars.update(t.format(n=noun, N=noun.capitalize()))
    return "".join(sorted(chars))
