"""Fault injection: a run killed again and again, at random points, ends with the uninterrupted losses.

One run of the command line is interrupted many times, each time at a point drawn by a seeded
random generator from: during a step, during a checkpoint save, just after a save, SIGINT (Ctrl-C)
and SIGTERM (a preempted machine). After some of the kills the newest checkpoint is damaged on
purpose as well (a truncated tensor file, a deleted metadata file, an empty stray step
directory). Each time the run is resumed with ``--resume``; at the end its ``metrics.jsonl`` must
hold exactly the losses of the same run left alone.
"""
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tfd_jax.train.metrics import read_metrics
from trainkit import cli_args, losses, one_device_env, truncate_biggest_tensor_file, write_corpus

STEPS = 60
FLAGS = dict(log_every=1, eval_every=10, eval_batches=1, ckpt_every=3)


def _finished_steps(ckpt_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit() and (p / "files.json").exists())


def _saving(ckpt_dir: Path) -> bool:
    return any(".orbax-checkpoint-tmp" in p.name for p in ckpt_dir.glob("*"))


def _damage(ckpt_dir: Path, how: str) -> str:
    steps = _finished_steps(ckpt_dir)
    newest = ckpt_dir / str(steps[-1])
    if how == "truncate":
        truncate_biggest_tensor_file(newest, keep=1 / 3)
    elif how == "metadata":
        (newest / "state" / "_METADATA").unlink()
    else:  # a stray empty directory named like a newer step
        (ckpt_dir / str(steps[-1] + 100)).mkdir()
    return how


def _wait_for(proc, condition, timeout=120.0) -> bool:
    """Poll until ``condition()`` holds while ``proc`` runs; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(0.002)
    raise AssertionError("the run neither reached the fault point nor ended")


@pytest.mark.slow
def test_random_kills_signals_and_damage_then_resume_give_the_uninterrupted_losses(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = one_device_env()
    reference = subprocess.Popen(cli_args(corpus, tmp_path / "reference", steps=STEPS, **FLAGS), env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    rng = random.Random(20261201)
    faults = ["save", "step", "after_save", "sigint", "step", "save", "sigterm"]
    damage = ["truncate", "metadata", "stray"]  # spread over the chain: damage the newest checkpoint
    happened, damaged_reported = [], 0
    for i in range(len(faults) + 2):  # the planned faults, then a resume that completes the run
        args = cli_args(corpus, out, steps=STEPS, **FLAGS) + (["--resume"] if i else [])
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fault = faults[i] if i < len(faults) else None
        start = len(read_metrics(out)) if out.exists() else 0
        landed = False
        if fault in ("step", "sigint", "sigterm"):
            target = start + rng.randint(3, 10)
            landed = _wait_for(proc, lambda: out.exists() and len(read_metrics(out, warn=lambda m: None)) >= target)
        elif fault == "save":
            landed = _wait_for(proc, lambda: ckpt_dir.exists() and _saving(ckpt_dir))
        elif fault == "after_save":
            seen = set(_finished_steps(ckpt_dir)) if ckpt_dir.exists() else set()
            landed = _wait_for(proc, lambda: ckpt_dir.exists() and bool(set(_finished_steps(ckpt_dir)) - seen))
            time.sleep(rng.uniform(0, 0.05))
            landed = landed and proc.poll() is None
        if landed:
            sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}.get(fault, signal.SIGKILL)
            proc.send_signal(sig)
        output = proc.communicate(timeout=300)[0]
        damaged_reported += output.count("is damaged (")
        if landed and fault in ("sigint", "sigterm"):
            # a clean stop: saved, one line says how to go on, and an exit code that is not success
            assert proc.returncode == 128 + sig, output
            assert "saved step" in output and "--resume" in output, output
        elif landed:
            assert proc.returncode == -signal.SIGKILL, output
        else:
            assert proc.returncode == 0, output
        assert "Traceback" not in output, output
        if landed:
            happened.append(fault)
            # (deferred to a later fault while there are fewer than two checkpoints to fall back on)
            if damage and len(happened) >= 2 * (4 - len(damage)) and len(_finished_steps(ckpt_dir)) >= 2:
                happened.append(_damage(ckpt_dir, damage.pop(0)))
        if proc.returncode == 0:
            break
    print("faults:", happened)
    ref_output = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, ref_output

    # Every kind of fault was tried, and each damaged checkpoint was reported when it was met.
    for kind in ("save", "step", "after_save", "sigint", "sigterm", "truncate", "metadata", "stray"):
        assert kind in happened, (kind, happened)
    applied = [k for k in happened if k in ("truncate", "metadata", "stray")]
    assert damaged_reported == len(applied), (damaged_reported, happened)  # each one, and nothing else
    a, b = losses(tmp_path / "reference"), losses(out)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), (step, happened)
