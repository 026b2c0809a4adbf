"""``tfd-jax train --task seq2seq`` on both kinds of data, each killed with ``kill -9`` and resumed to
exactly the uninterrupted run's losses: the built-in numbers-to-words task (its loss falls, and the
held-out exact match of greedy decoding is measured at the end; the full default run reaches 95%+,
see ``experiments/seq2seq_numbers.py``) and T5's span corruption of the embedded corpus (its loss
falls). Then ``tfd-jax generate --source`` decodes with the trained run."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from trainkit import resumed_equals_reference, run_cli

STEPS = 40


def _args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tfd_jax.cli", "train", "--task", "seq2seq", "--out", str(out), "--steps", str(STEPS),
            "--batch-size", "32", "--log-every", "1", "--eval-every", str(STEPS), "--eval-batches", "2",
            "--ckpt-every", "10", "--no-progress", *extra]


@pytest.mark.slow
def test_numbers_translation_learns_resumes_exactly_and_generates(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref, resumed_out = resumed_equals_reference(_args(ref_dir), _args(run_dir), ref_dir, run_dir, STEPS,
                                                ("token_accuracy",))
    assert np.mean([r["loss"] for r in ref[-5:]]) < np.mean([r["loss"] for r in ref[:3]]) - 1.0
    summary = json.loads(resumed_out.strip().splitlines()[-1])
    assert summary["exact_match_examples"] == 500 and 0.0 <= summary["exact_match"] <= 1.0
    assert "held-out exact match (greedy decoding)" in resumed_out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arch"] == "transformer" and config["train"]["data"] == "numbers"
    assert config["train"]["tokenizer"] == "char"  # the task's default

    out = run_cli([sys.executable, "-m", "tfd_jax.cli", "generate", "--run", str(run_dir), "--source", "40213",
                   "--max-new-tokens", "20"])
    assert out.returncode == 0, out.stderr
    text = out.stdout.strip()
    assert text and set(text) <= set("abcdefghijklmnopqrstuvwxyz- "), text
    refused = run_cli([sys.executable, "-m", "tfd_jax.cli", "generate", "--run", str(run_dir), "--prompt", "4"])
    assert refused.returncode != 0 and "give --source" in refused.stderr


@pytest.mark.slow
def test_span_corruption_loss_falls_and_resumes_exactly(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    extra = ("--data", "pystdlib", "--max-bytes", "300000", "--arch", "t5", "--lr", "3e-3")
    ref, _ = resumed_equals_reference(_args(ref_dir, *extra), _args(run_dir, *extra), ref_dir, run_dir, STEPS,
                                      ("token_accuracy",))
    assert np.mean([r["loss"] for r in ref[-5:]]) < np.mean([r["loss"] for r in ref[:3]]) - 0.5
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arch"] == "t5" and config["model"]["positions"] == "relative"
