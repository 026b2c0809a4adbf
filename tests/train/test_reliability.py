"""What no flag, fault or bad input may do to a run: delete it, mix it up, strand it, or end in a traceback.

One test per fault found in a reliability review of ``tfd-jax train`` (each failed before the fix),
plus the checks that every number a flag takes is range-checked and every error is one line.
The random SIGKILL / signal / damaged-checkpoint chain is in test_faults.py.
"""
import ast
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import tfd_jax
from tfd_jax.cli import build_parser, main
from tfd_jax.train import RunFailed, TrainingError, resume_config, train
from tfd_jax.train import checkpoint as ckpt
from tfd_jax.train import rundir
from tfd_jax.train.cli import config_from_args
from tfd_jax.train.config import validate
from tfd_jax.train.metrics import read_metrics
from trainkit import cfg, losses, one_device_env, run_cli, truncate_biggest_tensor_file, write_corpus

BASE = dict(steps=9, log_every=4, ckpt_every=3, eval_every=100, eval_batches=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", words=3000)


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A finished 9-step run that checkpoints every 3 steps and logs every 4."""
    out = tmp_path_factory.mktemp("base") / "run"
    train(cfg(corpus, out, **BASE))
    return out


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    """A copy of the base run that a test may change."""
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def snapshot(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# 4. --ckpt-every between logging steps ------------------------------------------------------------

def test_ckpt_every_is_honoured_between_logging_steps(base_run):
    assert sorted(ckpt.Checkpointer(base_run).all_steps()) == [3, 6, 9]
    assert [r["step"] for r in read_metrics(base_run)] == [4, 8, 9]


# 1. --force ---------------------------------------------------------------------------------------

def test_force_replaces_only_a_run_and_only_once_the_new_one_is_checked(run, corpus, tmp_path):
    notes = tmp_path / "proj"
    notes.mkdir()
    (notes / "notes.txt").write_text("x")
    with pytest.raises(TrainingError, match=r"holds no training run \(notes.txt\).*never other files"):
        train(cfg(corpus, notes, force=True, **BASE))
    assert (notes / "notes.txt").read_text() == "x"

    before = snapshot(run)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello world, hello")
    bad = [
        (dict(data=str(tmp_path / "nope.txt")), FileNotFoundError, "no such file"),
        (dict(data=str(tiny)), ValueError, "one batch of 8 windows"),
        (dict(mesh="data=3"), TrainingError, "uses 3 devices"),
        (dict(model_overrides={"d_model": 30, "num_heads": 4}), ValueError, "not divisible by num_heads"),
    ]
    for change, error, message in bad:
        with pytest.raises(error, match=message):
            train(cfg(corpus, run, force=True, **{**BASE, **change}))
        assert snapshot(run) == before, change  # the old run is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj", "run", "tiny.txt"]  # no staging left behind

    stale = tmp_path / ".run.incomplete-killed"  # what a run killed while it was being made leaves
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    train(cfg(corpus, run, force=True, **{**BASE, "steps": 4, "log_every": 1}))
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert ckpt.read_config(run)["train"]["steps"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj", "run", "tiny.txt"]


# 2. one run per directory -------------------------------------------------------------------------

HOLD = "import sys, time; from tfd_jax.train.rundir import RunLock; RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


def test_a_run_directory_is_held_by_one_run_and_a_killed_holder_leaves_no_lock(run, corpus, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env=one_device_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunInUse, match=rf"in use by another run \(pid {holder.pid} on "):
            train(resume_config(run))
        with pytest.raises(rundir.RunInUse, match="in use by another run"):
            train(cfg(corpus, run, force=True, **BASE))
        code, out, err = cli(capsys, "train", "--out", run, "--resume")
        assert code == 2 and err.count("\n") == 1 and "in use by another run" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = rundir.RunLock.acquire(run)  # the kernel dropped the killed process's lock
    lock.release()


# 3. --resume keeps the run's settings --------------------------------------------------------------

def test_resume_refuses_changed_settings_and_applies_and_records_the_allowed_ones(run, corpus, capsys, tmp_path):
    other = write_corpus(tmp_path / "other.txt", seed=1)
    refused = [
        (["--preset", "small", "--lr", "0.01", "--precision", "bf16"],
         ["--preset small (the run has tiny)", "--lr 0.01 (the run has 0.002)", "--precision bf16 (the run has fp32)"]),
        (["--data", other], ["--data"]),
        (["--model", "d_model=64", "--seed", "3"], ["--model d_model 64 (the run has 32)", "--seed 3 (the run has 0)"]),
        (["--scan-layers"], ["--scan-layers true (the run has false)"]),
    ]
    before = snapshot(run)
    for flags, named in refused:
        code, out, err = cli(capsys, "train", "--out", run, "--resume", *flags)
        assert code == 2 and err.count("\n") == 1, err
        for text in named:
            assert text in err, (text, err)
    assert snapshot(run) == before

    code, out, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "12", "--log-every", "2",
                         "--ckpt-every", "4", "--no-progress")
    assert code == 0, err
    assert "resumed from step 9" in out and "changed: --steps 9 -> 12" in out, out
    assert "precision fp32" in out and "model tiny" in out  # the run's settings, as used
    config = ckpt.read_config(run)
    assert config["train"]["steps"] == 12 and config["train"]["log_every"] == 2 and config["train"]["preset"] == "tiny"
    assert config["resumes"][-1]["step"] == 9
    assert config["resumes"][-1]["changes"]["steps"] == [9, 12]
    assert [r["step"] for r in read_metrics(run)] == [4, 8, 9, 10, 12]
    assert sorted(ckpt.Checkpointer(run).all_steps()) == [6, 9, 12]  # every 4 now, the last 3 kept


# 5. a torn metrics.jsonl -------------------------------------------------------------------------

def test_a_torn_last_metrics_line_is_dropped_with_a_warning_naming_the_file(run, capsys):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # what kill -9 or a full disk leaves
    train(resume_config(run, steps=10, log_every=1))
    out = capsys.readouterr().out
    assert f"{run / 'metrics.jsonl'}: dropped a torn last line" in out, out
    assert [r["step"] for r in read_metrics(run)] == [4, 8, 9, 10]


# 6. token files made with another tokenizer -------------------------------------------------------

def test_token_files_must_come_from_the_runs_tokenizer_and_data(run, corpus, capsys, tmp_path):
    from tfd_jax.data import load_corpus
    from tfd_jax.data.tokenized import write_tokens
    from tfd_jax.tokenizers import CharTokenizer, load_tokenizer

    other_tok = CharTokenizer.train(Path(corpus).read_text() + "XYZ")
    other_tok.save(tmp_path / "other_tok")
    before = snapshot(run)
    code, out, err = cli(capsys, "data", "prepare", "--corpus", corpus, "--tokenizer", tmp_path / "other_tok",
                         "--out", run / "data", "--no-progress")
    assert code == 2 and "whose tokenizer is another one" in err and str(run / "tokenizer") in err, err
    assert snapshot(run) == before

    # Written behind its back (the library, not the command line): the resume refuses.
    train_split = load_corpus(corpus, split="train")
    write_tokens(train_split, other_tok, run / "data" / "train", progress=False)
    with pytest.raises(TrainingError, match=r"train.bin was made with another tokenizer .*prepare it again"):
        train(resume_config(run, steps=10))
    # The run's own tokenizer on other text: not the data the run started with.
    other_text = tmp_path / "other.txt"
    write_corpus(other_text, seed=5)
    write_tokens(load_corpus(str(other_text), split="train"), load_tokenizer(run / "tokenizer"),
                 run / "data" / "train", progress=False)
    with pytest.raises(TrainingError, match=r"token files .* changed since the run started \(train: "):
        train(resume_config(run, steps=10))


# 7. damaged checkpoints --------------------------------------------------------------------------

def test_damaged_checkpoints_are_reported_in_one_line_each_and_the_newest_intact_one_is_used(base_run, run, capsys):
    cdir = run / "checkpoints"
    truncate_biggest_tensor_file(cdir / "9")  # a truncated tensor file
    (cdir / "6" / "state" / "_METADATA").unlink()  # a missing metadata file
    (cdir / "12").mkdir()  # an empty stray step directory
    said = []
    model, _ = ckpt.load_for_inference(run, log=said.append)
    assert [m.split(" in ")[0] for m in said] == ["checkpoint step 12", "checkpoint step 9", "checkpoint step 6"], said
    assert "empty" in said[0] and "bytes" in said[1] and "_METADATA is missing" in said[2]
    assert (cdir / "12").exists()  # loading for inference changes nothing
    code, out, err = cli(capsys, "generate", "--run", run, "--prompt", "def", "--max-new-tokens", "4")
    assert code == 0 and err.count("is damaged") == 3 and "Traceback" not in err, err

    train(resume_config(run))  # back to step 3, then the same steps again
    out = capsys.readouterr().out
    assert out.count("is damaged") == 3 and "resumed from step 3" in out, out
    assert sorted(p.name for p in (run / "checkpoints_damaged").iterdir()) == ["12", "6", "9"]
    a, b = losses(base_run), losses(run)
    assert sorted(b) == [4, 8, 9]
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step

    for step_dir in cdir.iterdir():
        (step_dir / "state" / "_METADATA").unlink()
    before = snapshot(run)
    with pytest.raises(ckpt.NoIntactCheckpoint, match=r"no intact checkpoint .*step 9: state/_METADATA is missing"):
        train(resume_config(run))
    assert snapshot(run) == before  # with nothing to fall back on, nothing is moved


# 8. fp16: a short run still saves ------------------------------------------------------------------

def test_a_short_fp16_run_writes_its_last_checkpoint(corpus, tmp_path):
    out = tmp_path / "fp16"
    # its last two steps poisoned: mid-streak at the end, and still the last checkpoint is written
    train(cfg(corpus, out, precision="fp16", steps=6, log_every=1, ckpt_every=100, eval_every=100,
              debug_nan_steps=(5, 6)))
    assert ckpt.Checkpointer(out).latest_step() == 6
    records = read_metrics(out)
    assert records[3]["loss"] is not None and records[3]["loss_scale"] > 1  # finite steps under a loss scale


# 9. every import is declared ---------------------------------------------------------------------

#: imported only inside functions, for features that say what to install when it is missing
OPTIONAL = {"torch", "transformers", "matplotlib", "tensorboardX", "huggingface_hub", "jax_triton"}


def _declared() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((Path(tfd_jax.__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", d)[0].lower().replace("-", "_") for d in project["dependencies"]}
    return names


def test_every_package_the_library_imports_is_declared_or_optional_and_imported_lazily():
    import importlib.metadata as md

    dist_of = md.packages_distributions()
    declared = _declared()
    stdlib = set(sys.stdlib_module_names)
    missing, eager = [], []
    for path in Path(tfd_jax.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in stdlib or top in ("tfd_jax", "__future__"):
                    continue
                if top in OPTIONAL:
                    if id(node) in top_level:
                        eager.append(f"{path.name}: {mod}")
                    continue
                dists = {d.lower().replace("-", "_") for d in dist_of.get(top, [top])}
                if not dists & declared:
                    missing.append(f"{path.relative_to(path.parents[1])}: {mod}")
    assert not missing, f"imported but not in pyproject's dependencies: {missing}"
    assert not eager, f"optional packages imported at module level: {eager}"


# 10. faults outside the program ------------------------------------------------------------------

def test_a_full_disk_ends_in_one_line_naming_the_intact_checkpoint_and_the_run_resumes(run, tmp_path):
    """RLIMIT_FSIZE makes every write past 45 kB fail (EFBIG) as a full disk would (ENOSPC): the
    checkpoint's metadata file cannot be written, the small files around it still can. (Not a limit
    on the tensor files: orbax splits those into pieces whose sizes depend on thread timing.)"""
    limit = 45_000
    assert (run / "checkpoints" / "9" / "state" / "_METADATA").stat().st_size > limit
    args = ["train", "--out", str(run), "--resume", "--steps", "12", "--no-progress"]
    limited = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
               "sys.argv = ['tfd-jax', *sys.argv[1:]]; runpy.run_module('tfd_jax.cli', run_name='__main__')")
    # (without JAX's compilation cache, whose entries it would write cut short for the other tests)
    full = subprocess.run([sys.executable, "-c", limited, *args], env=dict(one_device_env(), JAX_ENABLE_COMPILATION_CACHE="false"),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stdout + full.stderr
    # One line, no traceback.
    assert "Traceback" not in full.stderr and "ERROR" not in full.stderr, full.stderr
    last = full.stderr.splitlines()[-1]
    assert last.startswith("tfd-jax train: error: a file grew past the size limit; the newest complete "
                           "checkpoint is step 9"), full.stderr
    assert last.endswith(f"tfd-jax train --out {run} --resume")
    again = run_cli([sys.executable, "-m", "tfd_jax.cli", *args])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resumed from step 9" in again.stdout and read_metrics(run)[-1]["step"] == 12


def test_a_read_only_run_directory_and_a_failing_save_end_in_one_line(run, capsys, monkeypatch):
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(rundir.LOCK_FILE):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(rundir.os, "open", read_only)
    code, out, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "12")
    assert code == 2 and err.count("\n") == 1 and "(Read-only file system); a run directory must be writable" in err
    monkeypatch.setattr(rundir.os, "open", real_open)

    def fails(self, step, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self.directory / str(step)))

    monkeypatch.setattr(ckpt.Checkpointer, "save", fails)
    with pytest.raises(RunFailed, match=r"the file system is read-only \(at .*12\); the newest complete checkpoint is step 9"):
        train(resume_config(run, steps=12))


def test_ctrl_c_saves_after_the_step_and_a_second_ctrl_c_stops_at_once(run, capsys, monkeypatch):
    import tfd_jax.train.loop as loop

    real, calls = loop.shd.global_batch, {"n": 0}

    def interrupting(local, mesh, at, times):  # Ctrl-C `times` times while the batch of call `at` is made
        calls["n"] += 1
        if calls["n"] == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(local, mesh)

    monkeypatch.setattr(loop.shd, "global_batch", lambda local, mesh: interrupting(local, mesh, 1, 1))
    code, out, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "20", "--no-progress")
    assert code == 130 and "received SIGINT: saved step 10" in out, (out, err)  # step 10 finished, then saved
    assert ckpt.Checkpointer(run).latest_step() == 10

    calls["n"] = 0
    monkeypatch.setattr(loop.shd, "global_batch", lambda local, mesh: interrupting(local, mesh, 2, 2))
    code, out, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "20", "--no-progress")
    assert code == 130 and err.splitlines()[-1] == (
        f"tfd-jax train: error: interrupted at step 11 before saving; the newest complete checkpoint is step 10 "
        f"in {run / 'checkpoints'}; continue with: tfd-jax train --out {run} --resume"), err
    assert ckpt.Checkpointer(run).latest_step() == 10


def test_every_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import tfd_jax.train.loop as loop

    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(loop, "train", broken)
    code, out, err = cli(capsys, "train", "--out", "x")
    assert code == 1 and err == "tfd-jax train: error: unexpected KeyError: 'a bug' (run again with --debug for the traceback)\n"
    code, out, err = cli(capsys, "train", "--out", "x", "--debug")
    assert code == 1 and "Traceback (most recent call last)" in err and "in broken" in err
    # the same through `python -m tfd_jax.cli`, whose module runs as __main__
    p = run_cli([sys.executable, "-m", "tfd_jax.cli", "train", "--model", "bogus=1"])
    assert p.returncode == 2 and p.stderr.startswith("tfd-jax train: error: --model 'bogus=1': expected"), p.stderr


# 11. smaller ones --------------------------------------------------------------------------------

def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(base_run, run, capsys, corpus):
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.jsonl").unlink()
    with pytest.raises(TrainingError, match="already holds a run; pass --resume to continue it"):
        train(cfg(corpus, run, **BASE))
    train(resume_config(run))
    assert "has no checkpoint yet: starting from step 0 with the run's settings" in capsys.readouterr().out
    assert losses(run) == pytest.approx(losses(base_run), rel=1e-6)


def test_resume_summary_reports_this_process_s_speed_only(run):
    summary = train(resume_config(run))  # at step 9 of 9: nothing to do
    assert summary["start_step"] == summary["steps"] == 9
    assert summary["tokens_per_s"] is None  # not the previous process's figure


def test_a_failed_data_prepare_leaves_no_directory_and_errors_name_no_foreign_flag(tmp_path, capsys):
    from tfd_jax.tokenizers import CharTokenizer

    CharTokenizer.train("abc ").save(tmp_path / "tok")
    text = tmp_path / "text.txt"
    text.write_text("abc " * 50 + "xyz")  # the val split holds characters the tokenizer lacks
    code, out, err = cli(capsys, "data", "prepare", "--corpus", text, "--tokenizer", tmp_path / "tok",
                         "--out", tmp_path / "prepared", "--no-progress")
    assert code == 2 and "not in this tokenizer's vocabulary" in err, err
    assert not (tmp_path / "prepared").exists()

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError) as e:
        train(cfg(str(tmp_path / "empty"), tmp_path / "r", **BASE))
    assert "holds no text files" in str(e.value) and "--corpus" not in str(e.value)
    assert not (tmp_path / "r").exists()


# every number a flag takes is range-checked ----------------------------------------------------------

BAD_FLAGS = [
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--min-lr", "0.1", "--lr", "0.01"], "--min-lr 0.1 is above the peak --lr 0.01"),
    (["--warmup", "-1"], "--warmup must be an integer >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a number >= 0"),
    (["--beta2", "1"], "--beta2 must be in (0, 1)"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--seed", "-1"], "--seed must be an integer in 0..2^31-1"),
    (["--max-bytes", "-5"], "--max-bytes must be a positive number of bytes"),
    (["--vocab-size", "1"], "--vocab-size must be an integer >= 2"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--eval-batches", "0"], "--eval-batches must be an integer >= 1"),
    (["--ckpt-every", "0"], "--ckpt-every must be an integer >= 1"),
    (["--samples", "-1"], "--samples must be an integer >= 0"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[f[0][0] for f in BAD_FLAGS])
def test_every_number_a_train_flag_takes_is_range_checked(flags, message):
    config = config_from_args(build_parser().parse_args(["train", *flags]))
    with pytest.raises(TrainingError) as e:
        validate(config)
    assert message in str(e.value)


def test_model_fields_are_range_checked():
    from tfd_jax.models import GPTConfig

    for field, value in (("norm_eps", 0.0), ("rope_base", float("inf")), ("d_ff", -5)):
        with pytest.raises(ValueError, match=field):
            GPTConfig.preset("tiny", **{field: value})
