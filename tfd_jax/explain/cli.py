"""``tfd-jax explain``: the course's worked example through the library, with errata (all chapters)."""
from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="walk the course's 'I love pizza' example through the library and list the course's errata",
        description=(
            "Recompute every worked example of 'Transformers for Absolute Dummies' with tfd_jax.ops and "
            "compare it with the course's printed numbers. Works offline: the figures ship with the package."
        ),
    )
    p.add_argument("--chapter", type=int, default=None, metavar="N", help="only chapter N's steps and examples")
    p.add_argument("--errata", action="store_true", help="print only the errata list")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of text")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Exit status 0; 1 if a verdict differs from the one recorded in the shipped data."""
    from tfd_jax.explain import run

    if args.json:
        report = run(None, chapter=args.chapter, errata_only=args.errata)
        payload = report.to_dict()
        if args.errata:
            payload = {"summary": payload["summary"], "errata": payload["errata"]}
        json.dump(payload, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        report = run(sys.stdout, chapter=args.chapter, errata_only=args.errata)
    return 0 if report.verdicts_match_record else 1
