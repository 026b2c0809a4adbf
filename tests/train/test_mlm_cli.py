"""``tfd-jax train --task mlm --arch bert --preset tiny`` on the embedded corpus: the masked-LM loss
falls, masked-token accuracy reaches that of always guessing the most frequent token (what a tiny
BERT learns first: going beyond it takes hundreds more steps than a test can afford, see
``experiments/mlm_pretrain.py``), and a run killed with ``kill -9`` resumes to exactly the
uninterrupted run's losses and accuracies."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tfd_jax.data.tokenized import load_tokens
from tfd_jax.tokenizers import load_tokenizer
from tfd_jax.train.metrics import read_metrics
from trainkit import one_device_env

STEPS = 40


def _args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tfd_jax.cli", "train", "--task", "mlm", "--arch", "bert", "--preset", "tiny",
            "--out", str(out), "--tokenizer", "char", "--max-bytes", "300000", "--steps", str(STEPS),
            "--batch-size", "16", "--seq-len", "32", "--lr", "3e-3", "--warmup", "10", "--log-every", "1",
            "--eval-every", "40", "--eval-batches", "4", "--ckpt-every", "10", "--no-progress", *extra]


def _finished(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / "files.json").exists())


@pytest.mark.slow
def test_mlm_pretraining_learns_and_resumes_exactly_after_kill_9(tmp_path):
    env = one_device_env()
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    reference = subprocess.Popen(_args(ref_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = subprocess.Popen(_args(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while killed.poll() is None and time.time() < deadline:
        if (run_dir / "checkpoints").exists() and len(_finished(run_dir / "checkpoints")) >= 2:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    out = killed.communicate(timeout=240)[0]
    assert killed.returncode == -signal.SIGKILL, out
    resumed = subprocess.run(_args(run_dir, "--resume"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stdout
    ref_out = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, ref_out

    ref, got = read_metrics(ref_dir), read_metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), a["step"]
        assert b["masked_accuracy"] == pytest.approx(a["masked_accuracy"], abs=1e-6), a["step"]

    # The masked-LM loss falls from chance (ln V), and the model has learned at least the token
    # frequencies: its accuracy on masked tokens is that of always guessing the most frequent one.
    first = np.mean([r["mlm_loss"] for r in ref[:3]])
    last = np.mean([r["mlm_loss"] for r in ref[-5:]])
    assert last < first - 0.7, (first, last)
    tokens = np.asarray(load_tokens(ref_dir / "data" / "val").tokens)
    special = load_tokenizer(ref_dir / "tokenizer").all_special_ids()
    counts = np.bincount(tokens[~np.isin(tokens, special)])
    baseline = counts.max() / counts.sum()
    assert ref[-1]["val_masked_accuracy"] > 0.9 * baseline, (ref[-1]["val_masked_accuracy"], baseline)
