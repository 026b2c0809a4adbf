"""End-to-end training runs on a tiny corpus: resume, kill -9, non-finite steps, run-dir safety.

All runs use 8 fake CPU devices (tests/conftest.py), a character tokenizer and a two-layer model, so
each compiles in seconds.
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tfd_jax.train import TrainConfig, TrainingError, train
from tfd_jax.train import checkpoint as ckpt
from tfd_jax.train.metrics import read_metrics

TINY = dict(
    tokenizer="char",
    preset="tiny",
    model_overrides={"d_model": 32, "num_heads": 2, "num_layers": 2, "context_length": 32},
    batch_size=8,
    seq_len=16,
    max_bytes=None,
    log_every=1,
    eval_every=5,
    eval_batches=2,
    ckpt_every=5,
    samples=0,
    progress=False,
)


MODEL_FLAGS = [f for k, v in TINY["model_overrides"].items() for f in ("--model", f"{k}={v}")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", ":", "\n"]
    text = " ".join(rng.choice(words, size=6000))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text)
    return str(path)


def cfg(corpus, out, **kw) -> TrainConfig:
    return TrainConfig(data=corpus, out=str(out), **{**TINY, **kw})


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    summary = train(cfg(corpus, out, steps=20))
    return out, summary


def test_loss_decreases_and_metrics_are_complete(straight_run):
    out, summary = straight_run
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in records[-1]
    assert "val_loss" in records[4] and "val_loss" not in records[5]
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.2, (first, last)
    assert (out / "loss.png").exists() and (out / "tokenizer").exists()
    assert sorted(ckpt.Checkpointer(out).all_steps()) == [10, 15, 20]  # keep-3


def test_resume_gives_identical_losses(straight_run, corpus, tmp_path):
    out_straight, _ = straight_run
    out = tmp_path / "run"
    train(cfg(corpus, out, steps=10))
    train(cfg(corpus, out, steps=20, resume=True))
    a, b = losses(out_straight), losses(out)
    assert sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), step


def test_resume_onto_another_mesh(straight_run, corpus, tmp_path):
    out_straight, _ = straight_run
    out = tmp_path / "run"
    train(cfg(corpus, out, steps=10, mesh="data=2,fsdp=2,tensor=2"))
    train(cfg(corpus, out, steps=15, resume=True, mesh="data=8"))
    a, b = losses(out_straight), losses(out)
    for step in range(11, 16):
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4), step


def test_scan_layers_run_matches_the_unrolled_run_and_resumes_onto_another_mesh(straight_run, corpus, tmp_path):
    """Stacked block parameters (``scan_layers``) start from the same weights, checkpoint, restore
    onto another mesh and train to the same losses as the unrolled run."""
    out_straight, _ = straight_run
    out = tmp_path / "run"
    scanned = {**TINY["model_overrides"], "scan_layers": True}
    train(cfg(corpus, out, steps=10, model_overrides=scanned, mesh="data=2,fsdp=2,tensor=2"))
    train(cfg(corpus, out, steps=15, resume=True, mesh="data=8"))  # the model config comes from the run
    a, b = losses(out_straight), losses(out)
    assert sorted(b) == list(range(1, 16))
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-4), step
    model, _ = ckpt.load_for_inference(out)
    assert not model.config.scan_layers and len(model.blocks) == 2  # per-layer blocks for decoding


def test_run_dir_is_never_overwritten(straight_run, corpus):
    out, _ = straight_run
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg(corpus, out, steps=20))
    with pytest.raises(TrainingError, match="either --resume"):
        train(cfg(corpus, out, steps=20, resume=True, force=True))
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_without_a_run_is_an_error(corpus, tmp_path):
    with pytest.raises(TrainingError, match="holds no run"):
        train(cfg(corpus, tmp_path / "nothing", steps=5, resume=True))


def test_nonfinite_steps_are_skipped_then_stop_the_run(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # One poisoned step is skipped and reported; the run goes on.
    train(cfg(corpus, out, steps=12, debug_nan_steps=(5,)))
    text = capsys.readouterr().out
    assert "step 5: non-finite" in text
    records = {r["step"]: r for r in read_metrics(out)}
    assert records[5]["loss"] is None and records[6]["loss"] is not None
    assert records[12]["nonfinite_steps"] == 1
    # Five in a row after the step-10 checkpoint stop the run, naming the last good checkpoint.
    out2 = tmp_path / "run2"
    with pytest.raises(TrainingError, match=r"diverged.*last good checkpoint is step 10.*lower --lr"):
        train(cfg(corpus, out2, steps=40, debug_nan_steps=tuple(range(12, 40))))
    assert ckpt.Checkpointer(out2).latest_step() == 10
    model, tok = ckpt.load_for_inference(out2)
    assert np.isfinite(np.asarray(model(jax.numpy.zeros((1, 4), jax.numpy.int32)))).all()
    assert tok is not None


def test_kill_9_after_a_checkpoint_then_resume(straight_run, corpus, tmp_path):
    """A run killed without warning resumes from its last complete checkpoint and reproduces the
    uninterrupted run's losses."""
    out_straight, _ = straight_run
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "tfd_jax.cli", "train", "--data", corpus, "--out", str(out), "--tokenizer", "char",
        "--preset", "tiny", "--batch-size", "8", "--seq-len", "16", "--max-bytes", "0", "--log-every", "1",
        "--eval-every", "5", "--eval-batches", "2", "--ckpt-every", "5", "--samples", "0", "--no-progress",
    ]
    model_flags = ["--steps", "20"] + MODEL_FLAGS
    env = dict(os.environ)
    proc = subprocess.Popen(args + model_flags, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt_dir = out / ckpt.CHECKPOINT_DIR
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
        if done and len(read_metrics(out)) >= 7:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_metrics(out))
    assert killed_at < 20
    resumed = subprocess.run(args + model_flags + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stdout
    a, b = losses(out_straight), losses(out)
    assert sorted(b) == list(range(1, 21))
    for step in range(6, 21):
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-6), step


def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "tfd_jax.cli", "train", "--data", corpus, "--out", str(out), "--tokenizer", "char",
        "--preset", "tiny", "--batch-size", "8", "--seq-len", "16", "--max-bytes", "0", "--log-every", "1",
        "--eval-every", "1000", "--ckpt-every", "1000", "--samples", "0", "--no-progress", "--steps", "100000",
    ] + MODEL_FLAGS
    env = dict(os.environ)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(read_metrics(out)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "saved step" in output
    latest = ckpt.Checkpointer(out).latest_step()
    assert latest is not None and latest >= 3


def test_bad_input_fails_before_writing_and_leaves_out_reusable(tmp_path, corpus):
    small = tmp_path / "small.txt"
    small.write_text("hello world, hello")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"one batch of 8 windows of 16\+1 tokens needs at least"):
        train(cfg(str(small), out, steps=5))
    assert not out.exists()
    with pytest.raises(TrainingError, match="uses 3 devices but there are 8"):
        train(cfg(corpus, out, steps=5, mesh="data=3"))
    with pytest.raises(TrainingError, match="multiple of data x fsdp = 8"):
        train(cfg(corpus, out, steps=5, batch_size=6))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        train(cfg(corpus, out, steps=5, model_overrides={**TINY["model_overrides"], "d_model": 30, "num_heads": 4}))
    assert not out.exists()
