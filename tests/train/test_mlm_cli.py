"""``tfd-jax train --task mlm --arch bert --preset tiny`` on the embedded corpus, with the task's
defaults: the masked-LM loss falls, masked-token accuracy ends well above that of always guessing
the most frequent token (what a tiny BERT learns first), and a run killed with ``kill -9`` resumes
to exactly the uninterrupted run's losses and accuracies.

The task's learning rate is constant after warmup, so the first 40 steps of a 40-step run are the
first 40 steps of the longer reference run, and one reference serves both checks."""
import sys
from pathlib import Path

import numpy as np
import pytest

from tfd_jax.data.tokenized import load_tokens
from tfd_jax.tokenizers import load_tokenizer
from trainkit import resumed_equals_reference

STEPS = 40  # the killed and resumed run
REFERENCE_STEPS = 400  # long enough for the model to use the context


def _args(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "tfd_jax.cli", "train", "--task", "mlm", "--arch", "bert", "--preset", "tiny",
            "--out", str(out), "--max-bytes", "1000000", "--steps", str(steps), "--log-every", "1",
            "--eval-every", str(steps), "--eval-batches", "8", "--ckpt-every", "10", "--samples", "0",
            "--no-progress", *extra]


@pytest.mark.slow
def test_mlm_pretraining_learns_and_resumes_exactly_after_kill_9(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref, _ = resumed_equals_reference(_args(ref_dir, steps=REFERENCE_STEPS), _args(run_dir), ref_dir, run_dir, STEPS,
                                      ("masked_accuracy",))

    # The masked-LM loss falls from chance (ln V), and the model uses the context: its held-out
    # accuracy on masked tokens is well above always guessing the most frequent token.
    first = np.mean([r["mlm_loss"] for r in ref[:3]])
    last = np.mean([r["mlm_loss"] for r in ref[-20:]])
    assert last < first - 1.0, (first, last)
    tokens = np.asarray(load_tokens(ref_dir / "data" / "val").tokens)
    special = load_tokenizer(ref_dir / "tokenizer").all_special_ids()
    counts = np.bincount(tokens[~np.isin(tokens, special)])
    baseline = counts.max() / counts.sum()
    assert ref[-1]["val_masked_accuracy"] > 2 * baseline, (ref[-1]["val_masked_accuracy"], baseline)
