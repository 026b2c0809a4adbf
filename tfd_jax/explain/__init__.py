"""The course's worked example, recomputed by the library, with errata.

Figures come from "Transformers for Absolute Dummies" by Rimom Costa (MIT licence), ``course.md``
at commit 1c3816ae43af, shipped here as ``worked_examples.json``: the inputs and outputs the course
prints for each hand-calculable example, plus float64 recomputations. Nothing is downloaded.

``tfd_jax.explain.run()`` (or ``tfd-jax explain``) runs "I love pizza" through :mod:`tfd_jax.ops`
chapter by chapter (embedding lookup, positional encoding, head-1 attention with and without the
causal mask, output projection, dropout, FFN, residual + LayerNorm, logits and sampling filters,
cross-entropy, one Adam step), then recomputes every worked example at the course's printed
precision and lists the ones the course gets wrong.

This subpackage depends only on numpy, jax, optax and :mod:`tfd_jax.ops`.
"""
from tfd_jax.explain.compare import AGREES, CARRIED, DIFFERS, UNCHECKED, Check, Value
from tfd_jax.explain.data import load_examples
from tfd_jax.explain.report import ExampleResult, Report, Step, check_example
from tfd_jax.explain.walkthrough import run

__all__ = [
    "AGREES",
    "CARRIED",
    "DIFFERS",
    "UNCHECKED",
    "Check",
    "ExampleResult",
    "Report",
    "Step",
    "Value",
    "check_example",
    "load_examples",
    "run",
]
