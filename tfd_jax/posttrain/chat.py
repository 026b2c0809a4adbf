"""``tfd-jax chat``: talk to a fine-tuned run through its chat template (Chapter 18).

    tfd-jax chat --run runs/sft                       # interactive: one line per turn, an empty line ends
    tfd-jax chat --run runs/dpo --prompt "Tell me about cats."   # one turn, then exit

Each turn renders the whole conversation so far with ``data.render_chat`` (and the assistant's
opener), samples the answer until ``<|end|>`` (temperature 0.8 by default; 0 is greedy) and adds it
to the conversation. A conversation that no longer fits the model's context is refused with the
lengths named.
"""
from __future__ import annotations

import sys
from typing import TextIO


def reply(model, tokenizer, messages: list[dict], *, temperature: float = 0.8, top_p: float | None = None,
          max_new_tokens: int = 128, seed: int = 0) -> str:
    """The assistant's next message for ``messages`` (ending with a user turn), as text (chat
    markers in what the model wrote are left out)."""
    from tfd_jax.decode import generate
    from tfd_jax.posttrain.data import chat_token_ids, render_chat

    ids, _ = render_chat(messages, tokenizer, add_generation_prompt=True)
    room = model.config.context_length - len(ids)
    if room < 1:
        raise ValueError(f"the conversation is {len(ids)} tokens and the model's context is "
                         f"{model.config.context_length}: start a new one")
    marks = chat_token_ids(tokenizer)
    tokens, lengths = generate(model, [ids], min(max_new_tokens, room), temperature=temperature, top_p=top_p,
                               seed=seed, eos_id=marks["end"])
    # the answer's text, without its closing <|end|> or any other marker a weak model may write
    markers = set(marks.values())
    return tokenizer.decode([int(t) for t in tokens[0, : int(lengths[0])] if int(t) not in markers])


def run_chat(args, stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    from tfd_jax.cli import UserError
    from tfd_jax.posttrain.data import chat_token_ids
    from tfd_jax.train.checkpoint import load_for_inference

    stdin, out = stdin or sys.stdin, out or sys.stdout
    model, tokenizer = load_for_inference(args.run)
    if tokenizer is None or not hasattr(model, "init_cache") or getattr(model.config, "is_encoder_decoder", False):
        raise UserError(f"{args.run} is not a chat model: chat needs a decoder-only run with a tokenizer")
    try:
        chat_token_ids(tokenizer)
    except ValueError as e:
        raise UserError(f"{args.run}: {e}; fine-tune it with tfd-jax train --task sft first") from None
    messages: list[dict] = []
    turn = 0
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            out.write("you> ")
            out.flush()
            text = stdin.readline()
            if not text.strip():
                return 0
        messages.append({"role": "user", "content": text.strip()})
        try:
            answer = reply(model, tokenizer, messages, temperature=args.temperature, top_p=args.top_p,
                           max_new_tokens=args.max_new_tokens, seed=args.seed + turn)
        except ValueError as e:
            raise UserError(str(e)) from None
        out.write(("" if args.prompt is not None else "assistant> ") + answer + "\n")
        out.flush()
        if args.prompt is not None:
            return 0
        messages.append({"role": "assistant", "content": answer or "."})
        turn += 1


def register(subparsers) -> None:
    import argparse

    p = subparsers.add_parser("chat", help="talk to a fine-tuned run through its chat template",
                              description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, metavar="DIR", help="a run directory (SFT, DPO, ...)")
    p.add_argument("--prompt", help="one user message: print the answer and exit")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_chat)
