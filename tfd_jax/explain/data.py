"""The course's worked examples, shipped with the package (figures from the course, MIT licence).

``worked_examples.json`` holds every hand-calculable example of "Transformers for Absolute Dummies"
by Rimom Costa (``course.md`` at commit 1c3816ae43af): the inputs the course prints, the outputs it
prints, float64 recomputations and a verdict per example. It is read from the installed package, so
nothing else is needed.
"""
from __future__ import annotations

import json
from importlib import resources

EXAMPLES_FILE = "worked_examples.json"


def load_examples() -> dict:
    """A fresh copy of the shipped worked-examples document (safe to modify)."""
    text = resources.files("tfd_jax.explain").joinpath(EXAMPLES_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def examples_by_id(data: dict) -> dict[str, dict]:
    """``{example id: example}`` for the document ``data``."""
    return {ex["id"]: ex for ex in data["examples"]}
