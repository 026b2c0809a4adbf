"""The ``tfd-jax`` command line.

Each subcommand lives beside the code it drives, in a module with a ``register(subparsers)``
function that adds its parser and sets ``func`` (called with the parsed args, returns an exit
code). Modules are imported lazily so ``tfd-jax --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> module that registers it
COMMANDS = {
    "explain": "tfd_jax.explain.cli",
    "tokenizer": "tfd_jax.tokenizers.cli",
    "data": "tfd_jax.data.cli",
    "train": "tfd_jax.train.cli",
    "generate": "tfd_jax.decode.cli",
}


class UserError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfd-jax",
        description="Transformers for Absolute Dummies, in JAX: explain, tokenize, train, generate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tfd_jax.runtime import set_default_xla_flags

    set_default_xla_flags()  # XLA reads XLA_FLAGS once, when JAX starts its first backend
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as e:
        print(f"tfd-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
