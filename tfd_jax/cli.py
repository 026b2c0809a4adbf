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
    "pipeline": "tfd_jax.posttrain.pipeline",
    "chat": "tfd_jax.posttrain.chat",
    "quiz": "tfd_jax.quiz",
    "plot": "tfd_jax.viz.cli",
}


class UserError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool) -> None:
    """``--debug`` on every (sub)command: show the traceback of an error, not only its one line."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="on an error, print the full traceback too (or set TFD_JAX_DEBUG=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _add_debug_flag(sub, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfd-jax",
        description="Transformers for Absolute Dummies, in JAX: explain, tokenize, train, generate.",
        epilog="Exit codes: 0 done; 1 a run that started could not go on (the message says what is safe); "
        "2 bad input; 130 / 143 stopped by SIGINT / SIGTERM after saving (resume with --resume).",
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
    _add_debug_flag(parser, top=True)
    return parser


def describe_error(e: BaseException) -> tuple[str, int]:
    """(one line for the user, exit code) for an error that ends a command."""
    from tfd_jax.faults import system_fault

    code = getattr(e, "exit_code", None)  # the training loop's errors say what is safe themselves
    if isinstance(e, ModuleNotFoundError) and e.name:
        return f"this needs the Python package {e.name!r}, which is not installed: pip install {e.name}", 2
    if code is None:
        fault = system_fault(e)
        if fault is not None:
            return fault, 1
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror}: {e.filename}", 2
    lines = str(e).strip().splitlines()
    text = lines[0][:500] if lines else type(e).__name__
    if code is not None or isinstance(e, (UserError, ValueError, OSError)):
        return text, code or 2
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text:
        return ("out of device memory; try a smaller --batch-size or --seq-len, --grad-accum, --remat, "
                "or a mesh with fsdp", 1)
    return f"unexpected {type(e).__name__}: {text} (run again with --debug for the traceback)", 1


def _quiet_library_logs() -> None:
    """Orbax logs each failure of a background save with tracebacks, from its own threads, before
    the command reports it in one line; without --debug those logs are left out (warnings stay)."""
    import logging

    logging.getLogger("absl").setLevel(logging.CRITICAL)
    from tfd_jax.faults import silence_orbax_aftermath

    silence_orbax_aftermath()


def main(argv: list[str] | None = None) -> int:
    import os

    from tfd_jax.runtime import set_cpu_devices, set_default_xla_flags

    set_default_xla_flags()  # XLA reads XLA_FLAGS once, when JAX starts its first backend
    try:
        set_cpu_devices()  # one CPU device per core: CPU training runs data-parallel over them
    except ValueError as e:
        print(f"tfd-jax: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("TFD_JAX_DEBUG", "") not in ("", "0")
    if not debug:
        _quiet_library_logs()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"tfd-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends in one line; --debug shows the traceback
        if debug:
            import traceback

            traceback.print_exc()
        text, code = describe_error(e)
        print(f"tfd-jax {args.command}: error: {text}", file=sys.stderr)
        return code


if __name__ == "__main__":
    # `python -m tfd_jax.cli`: run the imported module's main, so that its UserError is the one
    # the subcommands raise (this file, run as __main__, defines a second, unrelated class)
    from tfd_jax.cli import main as _main

    sys.exit(_main())
