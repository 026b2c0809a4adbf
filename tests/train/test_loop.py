"""End-to-end training runs on a tiny corpus: resume, other meshes, non-finite steps, run-dir safety.

Faults (kill -9, signals, damaged checkpoints, full disks) are in test_faults.py and test_reliability.py.

All runs use 8 fake CPU devices (tests/conftest.py), a character tokenizer and a two-layer model, so
each compiles in seconds.
"""
import jax
import numpy as np
import pytest

from tfd_jax.train import TrainingError, resume_config, train
from tfd_jax.train import checkpoint as ckpt
from tfd_jax.train.metrics import read_metrics
from trainkit import TINY, cfg, losses, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


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


def test_several_steps_per_call_train_as_one_per_call(straight_run, corpus, tmp_path, monkeypatch):
    """--steps-per-call 3, resumed with 2: the same losses as one step per call (steps that log,
    evaluate or save end a call, so every logged step is compared), and the auto choice."""
    from tfd_jax.train import loop
    from tfd_jax.train.loop import steps_per_call

    traced = []  # the multi-step program is built and runs (traced once per run)
    real = loop.make_multi_step
    monkeypatch.setattr(loop, "make_multi_step", lambda step, k: (lambda *a: traced.append(k) or real(step, k)(*a)))
    out_straight, _ = straight_run
    out = tmp_path / "run"
    train(cfg(corpus, out, steps=12, steps_per_call=3, log_every=4))
    train(cfg(corpus, out, steps=20, resume=True, steps_per_call=2, log_every=4))
    assert traced == [3, 2]
    a, b = losses(out_straight), losses(out)
    assert sorted(b) == [4, 5, 8, 10, 12, 15, 16, 20]
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-5, abs=1e-5), step
    assert steps_per_call(cfg(corpus, out, steps=100)) == 4 and steps_per_call(cfg(corpus, out, steps=99)) == 1
    assert steps_per_call(cfg(corpus, out, steps=100), start_step=1) == 1
    assert steps_per_call(cfg(corpus, out, steps=10, steps_per_call=3)) == 3


def test_scan_layers_run_matches_the_unrolled_run_and_resumes_onto_another_mesh(straight_run, corpus, tmp_path):
    """Stacked block parameters (``scan_layers``) start from the same weights, checkpoint, restore
    onto another mesh and train to the same losses as the unrolled run."""
    out_straight, _ = straight_run
    out = tmp_path / "run"
    scanned = {**TINY["model_overrides"], "scan_layers": True}
    train(cfg(corpus, out, steps=10, model_overrides=scanned, mesh="data=2,fsdp=2,tensor=2"))
    train(resume_config(out, steps=15, mesh="data=8"))  # the run's own settings, on another mesh
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
