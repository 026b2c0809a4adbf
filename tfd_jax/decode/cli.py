"""``tfd-jax generate``: continue a prompt with a trained run or Hugging Face weights (Chapter 13).

Examples::

    tfd-jax generate --run runs/shakespeare --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-p 0.95
    tfd-jax generate --hf path/to/gpt2 --prompt "The cat sat" --max-new-tokens 40
    tfd-jax generate --hf path/to/weights-only --prompt-ids "464 3797 3332"
    tfd-jax generate --run runs/numbers --source "40213"

A ``--hf`` directory may hold GPT-2, Llama or Qwen2 weights (its ``config.json`` says which; BERT is
an encoder and does not generate) and its tokenizer files, read without ``transformers``
(``vocab.json`` + ``merges.txt``, ``tokenizer.model``, ``vocab.txt`` or ``tokenizer.json``). A Hub
name is read as GPT-2, with ``transformers``' tokenizer.

Text is printed as it is produced: the decode loop runs in chunks of ``--chunk-size`` tokens and each
chunk is decoded and written straight away. Without a tokenizer (a run saved without one, or a
Hugging Face directory holding only weights) the prompt is given as ids and the new ids are printed.
Sampling defaults to temperature 0.8, Chapter 10's suggestion for open-ended text; ``--temperature 0``
is greedy.

An encoder-decoder run (``tfd-jax train --task seq2seq``) reads ``--source`` instead: the source is
encoded once and the decoder writes its output from the start token (``--prompt``, if given, begins
the output); decoding is greedy unless ``--temperature`` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO


class _HFTokenizer:
    """The few methods generation needs, over a ``transformers`` tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)


#: files that hold a Hugging Face tokenizer's vocabulary (fast or slow GPT-2 tokenizer)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _hf_tokenizer(source: str):
    """A GPT-2 tokenizer from the same directory or Hub name, or None when there is none.

    A weights-only directory still names its model type in ``config.json``, from which
    ``AutoTokenizer`` can build a tokenizer with an empty vocabulary; that counts as none.
    """
    local = os.path.isdir(source)
    if local and not any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except Exception:  # unreadable tokenizer files, or no network for a Hub name
        return None
    return _HFTokenizer(tok) if len(tok) > 1 else None


#: Hugging Face ``model_type`` -> the loader in ``tfd_jax.interop`` (causal language models only)
_HF_LOADERS = {"gpt2": "load_hf_gpt2", "llama": "load_hf_llama", "qwen2": "load_hf_llama"}
#: encoder-only families: they have weights we load, but nothing to generate with
_HF_ENCODERS = {"bert": "BERT"}


def _hf_model_type(directory: str) -> str:
    """``model_type`` of a Hugging Face model directory's ``config.json``, checked to be one we generate with."""
    import json

    from tfd_jax.cli import UserError

    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise UserError(f"--hf {directory}: no config.json; pass a directory written by save_pretrained")
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--hf {directory}: config.json cannot be read ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in _HF_ENCODERS:
        raise UserError(f"--hf {directory}: {_HF_ENCODERS[model_type]} is an encoder (it fills in masked tokens, it "
                        "does not continue text), so it cannot generate; use a causal model: "
                        f"{', '.join(sorted(_HF_LOADERS))}")
    if model_type not in _HF_LOADERS:
        raise UserError(f"--hf {directory}: model_type {model_type!r} is not one this command generates with "
                        f"({', '.join(sorted(_HF_LOADERS))})")
    return model_type


def _hf_dir_tokenizer(directory: str):
    """The tokenizer of a local Hugging Face directory, read without ``transformers``; None when it
    has no tokenizer files (weights only).

    ``load_hf_tokenizer`` reads byte-level BPE, WordPiece and sentencepiece; a ``tokenizer.json`` of
    another kind (WordLevel, Unigram, ...) is handed to ``transformers`` when it is installed.
    """
    from tfd_jax.cli import UserError
    from tfd_jax.tokenizers.hf import has_hf_files, load_hf_tokenizer

    if not has_hf_files(directory):
        return None
    try:
        return load_hf_tokenizer(directory)
    except (ValueError, FileNotFoundError) as e:
        fallback = _hf_tokenizer(directory)
        if fallback is None:
            raise UserError(f"--hf {directory}: its tokenizer cannot be read: {str(e).splitlines()[0]}") from None
        return fallback


def _load(args):
    """(model, tokenizer or None) for ``--run`` or ``--hf``."""
    from tfd_jax.cli import UserError

    if args.run:
        try:
            from tfd_jax.train.checkpoint import load_for_inference
        except ImportError as e:
            raise UserError(f"loading training runs is not available: {e}") from None
        return load_for_inference(args.run)
    try:
        from tfd_jax import interop
    except ImportError as e:
        raise UserError(f"loading Hugging Face weights is not available: {e}") from None
    if not os.path.isdir(args.hf):  # a Hub name (or a path that does not exist): GPT-2, as before
        return interop.load_hf_gpt2(args.hf), _hf_tokenizer(args.hf)
    loader = getattr(interop, _HF_LOADERS[_hf_model_type(args.hf)])
    tokenizer = _hf_dir_tokenizer(args.hf)  # before the weights: a bad or missing tokenizer fails fast
    if tokenizer is None and args.prompt is not None and args.prompt_ids is None:
        from tfd_jax.tokenizers.hf import LOOKED_FOR

        raise UserError(f"--hf {args.hf} has no tokenizer files ({LOOKED_FOR}) to encode --prompt; save the "
                        "tokenizer beside the weights, or pass the prompt as --prompt-ids \"1 2 3\"")
    return loader(args.hf), tokenizer


def _prompt_ids(args, tokenizer) -> list[int]:
    from tfd_jax.cli import UserError

    if args.prompt is not None and args.prompt_ids is not None:
        raise UserError("give either --prompt or --prompt-ids, not both")
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise UserError(f"--prompt-ids must be integers separated by spaces, got {args.prompt_ids!r}") from None
    elif args.prompt is not None:
        if tokenizer is None:
            raise UserError("this model has no tokenizer to encode --prompt; pass the prompt as --prompt-ids \"1 2 3\"")
        ids = tokenizer.encode(args.prompt)
    else:
        raise UserError("nothing to continue: give --prompt TEXT (or --prompt-ids \"1 2 3\")")
    if not ids:
        raise UserError("the prompt is empty; generation needs at least one token to start from")
    return ids


class _TextStream:
    """Decode the growing list of new ids and print only what was not printed yet.

    Byte-level tokenizers can split a character across tokens; until the rest arrives the decoded text
    ends in U+FFFD, so trailing replacement characters are held back.
    """

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def add(self, ids: list[int], final: bool = False) -> None:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
        else:  # the tokenizer revised earlier text: print the new ending on its own
            self.out.write(text[len(os.path.commonprefix([text, self.printed])):])
        self.printed = text
        self.out.flush()


def run_generate(args, out: TextIO | None = None) -> int:
    """The ``generate`` subcommand; ``func(args) -> exit code``."""
    from tfd_jax import ops
    from tfd_jax.cli import UserError
    from tfd_jax.decode.generate import generate_stream, plan_generation

    out = out or sys.stdout
    temperature = args.temperature if args.temperature is not None else (0.0 if args.source is not None else 0.8)
    try:  # cheap checks first, before any weights are read
        ops.check_sampling_args(temperature=temperature, top_k=args.top_k, top_p=args.top_p, allow_greedy=True)
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {args.chunk_size}")
        if not 0 <= args.seed < 2**31:
            raise ValueError(f"--seed must be in 0..2^31-1, got {args.seed}")
    except ValueError as e:
        raise UserError(str(e)) from None
    model, tokenizer = _load(args)
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    source = None
    if seq2seq:
        if args.source is None:
            raise UserError(f"{args.run or args.hf} is an encoder-decoder: give --source TEXT for it to translate")
        if tokenizer is None:
            raise UserError("this model has no tokenizer to encode --source")
        source = [tokenizer.encode(args.source) or [model.config.pad_id]]
        ids = [model.config.decoder_start_id, *(tokenizer.encode(args.prompt) if args.prompt else [])]
    elif args.source is not None:
        raise UserError("--source is for encoder-decoder runs (tfd-jax train --task seq2seq); "
                        "a decoder-only model continues --prompt")
    else:
        ids = _prompt_ids(args, tokenizer)
    ctx = model.config.context_length
    max_new = args.max_new_tokens if args.max_new_tokens is not None else min(100, ctx - len(ids))
    eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    kw = dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos_id, source=source)
    try:
        plan_generation(model.config, [ids], max_new, **kw)
    except ValueError as e:
        raise UserError(str(e)) from None

    stream = _TextStream(tokenizer, out) if tokenizer is not None else None
    if stream is not None:
        if not seq2seq:
            out.write(args.prompt if args.prompt is not None else tokenizer.decode(ids))
        elif args.prompt:
            out.write(args.prompt)
        out.flush()
    first = True
    for chunk in generate_stream(model, [ids], max_new, seed=args.seed, chunk_size=args.chunk_size, **kw):
        new = [int(t) for t, ok in zip(chunk.tokens[0], chunk.valid[0]) if ok]
        if stream is not None:
            stream.add([t for t in new if t != eos_id])
        elif new:
            out.write(("" if first else " ") + " ".join(map(str, new)))
            out.flush()
            first = False
    if stream is not None:
        stream.add([], final=True)
    out.write("\n")
    out.flush()
    return 0


def register(subparsers) -> None:
    """Add ``generate`` to the ``tfd-jax`` command line."""
    p = subparsers.add_parser(
        "generate",
        help="continue a prompt with a trained model or Hugging Face GPT-2 / Llama / Qwen2 weights",
        description="Continue a prompt with a trained run or Hugging Face GPT-2, Llama or Qwen2 weights, printing the\n"
        "text as it is produced (Chapter 13's generation loop, with a KV cache).",
        epilog="examples:\n" + __doc__.split("Examples::\n\n")[1].split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="a training run directory (config.json, tokenizer/, checkpoints)")
    src.add_argument("--hf", metavar="NAME_OR_DIR", help="Hugging Face weights: a save_pretrained directory (GPT-2, Llama, Qwen2) or a GPT-2 Hub name")
    p.add_argument("--prompt", help="the text to continue (an encoder-decoder: the start of its output)")
    p.add_argument("--source", help="an encoder-decoder run's input, e.g. --source 40213 for a numbers run")
    p.add_argument("--prompt-ids", metavar="IDS", help='the prompt as token ids, e.g. "464 3797 3332" (prints ids)')
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to add (default: 100, or what fits the context)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; below 1 sharper, above 1 flatter (default 0.8; with --source 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens up to mass p")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same text)")
    p.add_argument("--chunk-size", type=int, default=8, help="tokens per streamed chunk (default 8)")
    p.set_defaults(func=run_generate)
