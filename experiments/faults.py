"""Every fault and bad input of the reliability review, tried on tiny runs: what ``tfd-jax`` does now.

    python experiments/faults.py [--work DIR] [--only TEXT]

Prints one JSON object per scenario (its number, name, the command's exit code, how many lines it
wrote to stderr, the last of them, and ``ok``: whether what must hold held: the run intact, the
right refusal, a resume that continues), then a summary line. Runs use a 1-device CPU, a character
tokenizer and a two-layer model, so each command takes seconds. The full-disk and read-only
scenarios mount a small tmpfs, which needs root; where that is not allowed they say so.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = ["--tokenizer", "char", "--preset", "tiny", "--batch-size", "8", "--seq-len", "16", "--max-bytes", "0",
        "--model", "d_model=32", "--model", "num_heads=2", "--model", "num_layers=2", "--samples", "0",
        "--no-progress", "--eval-batches", "1", "--eval-every", "100"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
ENV.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tfd_jax_faults_xla_cache"))


def tj(*args, env=None, file_limit=None, timeout=300) -> subprocess.CompletedProcess:
    """``tfd-jax ARGS`` in a new process; ``file_limit``: no file it writes may grow past this many bytes."""
    head = [sys.executable, "-m", "tfd_jax.cli"]
    if file_limit:  # set in the child itself (no preexec_fn: forking a process that runs JAX's threads)
        head = [sys.executable, "-c", f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                f"({file_limit}, {file_limit})); sys.argv = ['tfd-jax', *sys.argv[1:]]; "
                "runpy.run_module('tfd_jax.cli', run_name='__main__')"]
    return subprocess.run([*head, *map(str, args)], env=env or ENV, capture_output=True, text=True, timeout=timeout)


def in_process(*args) -> subprocess.CompletedProcess:
    """The same command through ``tfd_jax.cli.main`` in this process (for checks that fail before
    anything runs)."""
    from tfd_jax.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def snapshot(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def steps_of(run: Path) -> list[int]:
    from tfd_jax.train.metrics import read_metrics

    return [r["step"] for r in read_metrics(run, warn=lambda m: None)]


class Lab:
    def __init__(self, work: Path):
        self.work = work
        self.corpus = work / "corpus.txt"
        import numpy as np

        rng = np.random.default_rng(0)
        words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", ":", "\n"]
        self.corpus.write_text(" ".join(rng.choice(words, size=3000)))
        self.base = work / "base"
        shutil.rmtree(self.base, ignore_errors=True)
        p = tj("train", "--data", self.corpus, "--out", self.base, "--steps", 9, "--ckpt-every", 3,
               "--log-every", 3, *TINY)
        assert p.returncode == 0, p.stderr
        self.n = 0

    def copy(self, name: str) -> Path:
        out = self.work / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(self.base, out)
        return out

    def train(self, out, *flags, **kw):
        return tj("train", "--data", self.corpus, "--out", out, *TINY, *flags, **kw)


def scenarios(lab: Lab):  # noqa: C901 - one flat list is the easiest to read and to count
    """Yields (name, function returning (CompletedProcess, ok))."""
    w = lab.work

    # --- run directories and --force ---
    def force_other_files():
        d = w / "proj"
        d.mkdir(exist_ok=True)
        (d / "notes.txt").write_text("x")
        p = lab.train(d, "--steps", 3, "--force")
        return p, p.returncode == 2 and (d / "notes.txt").exists()
    yield "--force on a directory that is not a run", force_other_files

    def force_bad(flags, name):
        def f():
            run = lab.copy(name)
            before = snapshot(run)
            p = tj("train", "--out", run, "--force", *TINY, *flags)
            return p, p.returncode == 2 and snapshot(run) == before
        return f
    tiny_corpus = w / "tiny.txt"
    tiny_corpus.write_text("hello world, hello")
    yield "--force with a missing --data", force_bad(["--data", w / "nope.txt", "--steps", 3], "f1")
    yield "--force with a corpus too small for one batch", force_bad(["--data", tiny_corpus, "--steps", 3], "f2")
    yield "--force with a mesh that does not fit the devices", force_bad(["--data", lab.corpus, "--mesh", "data=3"], "f3")
    yield "--force with heads that do not divide d_model", force_bad(
        ["--data", lab.corpus, "--model", "d_model=30", "--model", "num_heads=4"], "f4")

    def force_ok():
        run = lab.copy("f5")
        p = lab.train(run, "--steps", 4, "--log-every", 1, "--force")
        left = [x.name for x in w.iterdir() if ".incomplete-" in x.name or ".replaced-" in x.name]
        return p, p.returncode == 0 and steps_of(run) == [1, 2, 3, 4] and not left
    yield "--force with valid settings (replaces the run, nothing left behind)", force_ok

    def plain_on_run():
        run = lab.copy("p1")
        p = lab.train(run, "--steps", 3)
        return p, p.returncode == 2 and "--resume" in p.stderr
    yield "no flag on a directory holding a run", plain_on_run
    yield "--resume on a missing directory", lambda: (p := lab.train(w / "missing", "--resume"), p.returncode == 2)
    yield "--resume on a directory that holds no run", lambda: (p := lab.train(w / "proj", "--resume"), p.returncode == 2)
    yield "--resume and --force together", lambda: (p := in_process("train", "--out", lab.base, "--resume", "--force"),
                                                    p.returncode == 2)
    afile = w / "afile"
    afile.write_text("x")
    yield "--out is a file", lambda: (p := in_process("train", "--out", afile), p.returncode == 2)

    # --- one run per directory ---
    def second_run(flag):
        def f():
            run = lab.copy("lock")
            first = subprocess.Popen([sys.executable, "-m", "tfd_jax.cli", "train", "--out", str(run), "--resume",
                                      "--steps", "100000", "--log-every", "100"], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while len(steps_of(run)) < 4 and first.poll() is None:
                time.sleep(0.05)
            p = tj("train", "--out", run, flag, *(["--data", lab.corpus, *TINY] if flag == "--force" else []))
            first.send_signal(signal.SIGKILL)
            first.wait()
            return p, p.returncode == 2 and "in use by another run" in p.stderr
        return f
    yield "a second --resume while the run trains", second_run("--resume")
    yield "--force while the run trains", second_run("--force")

    def after_kill():
        run = w / "lock"  # its holder was killed by the scenario before
        p = tj("train", "--out", run, "--resume", "--steps", 12)
        return p, p.returncode == 0
    yield "--resume after the holder was killed (no lock left behind)", after_kill

    # --- --resume keeps the run's settings ---
    for flags in (["--preset", "small"], ["--precision", "bf16"], ["--lr", "0.01"], ["--data", tiny_corpus],
                  ["--tokenizer", "bpe"], ["--batch-size", "16"], ["--seq-len", "8"], ["--seed", "1"],
                  ["--scan-layers"], ["--model", "d_model=64"], ["--optimizer", "adam"], ["--sampling", "epochs"]):
        def refused(flags=flags):
            run = lab.copy("r1")
            before = snapshot(run)
            p = tj("train", "--out", run, "--resume", *flags)
            return p, p.returncode == 2 and flags[0] in p.stderr and snapshot(run) == before
        yield f"--resume {' '.join(map(str, flags))}", refused

    def allowed():
        run = lab.copy("r2")
        p = tj("train", "--out", run, "--resume", "--steps", 12, "--log-every", 1, "--ckpt-every", 2)
        config = json.loads((run / "config.json").read_text())
        return p, (p.returncode == 0 and config["train"]["steps"] == 12
                   and config["resumes"][-1]["changes"]["steps"] == [9, 12] and steps_of(run)[-3:] == [10, 11, 12])
    yield "--resume --steps 12 --log-every 1 --ckpt-every 2 (allowed, recorded)", allowed

    def other_mesh():
        run = lab.copy("r3")
        p = tj("train", "--out", run, "--resume", "--steps", 12, "--mesh", "data=2",
               env=dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
        return p, p.returncode == 0 and steps_of(run)[-1] == 12
    yield "--resume on 2 devices with --mesh data=2 (allowed)", other_mesh

    def cadence():
        run = w / "c1"
        shutil.rmtree(run, ignore_errors=True)
        p = lab.train(run, "--steps", 10, "--ckpt-every", 3)  # logging every 10 (the default)
        return p, p.returncode == 0 and sorted(int(x.name) for x in (run / "checkpoints").iterdir()) == [6, 9, 10]
    yield "--ckpt-every 3 with the default --log-every 10", cadence

    # --- metrics.jsonl ---
    def torn(text, name):
        def f():
            run = lab.copy(name)
            with open(run / "metrics.jsonl", "a") as fh:
                fh.write(text)
            p = tj("train", "--out", run, "--resume", "--steps", 12)
            return p, p.returncode == 0 and "dropped" in p.stdout and steps_of(run)[-1] == 12
        return f
    yield "a torn last line in metrics.jsonl", torn('{"step": 10, "lo', "m1")
    yield "a damaged line in the middle of metrics.jsonl", torn('garbage\n{"step": 9}\n', "m2")

    # --- token files ---
    def prepare_other():
        from tfd_jax.tokenizers import CharTokenizer

        run = lab.copy("t1")
        CharTokenizer.train(lab.corpus.read_text() + "XYZ").save(w / "other_tok")
        before = snapshot(run)
        p = tj("data", "prepare", "--corpus", lab.corpus, "--tokenizer", w / "other_tok", "--out", run / "data")
        return p, p.returncode == 2 and snapshot(run) == before
    yield "data prepare into a run's data/ with another tokenizer", prepare_other

    def tokens_behind(make, name):
        def f():
            from tfd_jax.data import load_corpus
            from tfd_jax.data.tokenized import write_tokens

            run = lab.copy(name)
            corpus, tok = make(run)
            write_tokens(load_corpus(str(corpus), split="train"), tok, run / "data" / "train", progress=False)
            p = tj("train", "--out", run, "--resume", "--steps", 12)
            return p, p.returncode == 2
        return f

    def other_tokenizer(run):
        from tfd_jax.tokenizers import CharTokenizer

        return lab.corpus, CharTokenizer.train(lab.corpus.read_text() + "XYZ")

    def other_text(run):
        from tfd_jax.tokenizers import load_tokenizer

        other = w / "other.txt"
        other.write_text(lab.corpus.read_text()[::-1])
        return other, load_tokenizer(run / "tokenizer")
    yield "token files rewritten with another tokenizer, then --resume", tokens_behind(other_tokenizer, "t2")
    yield "token files rewritten from other text, then --resume", tokens_behind(other_text, "t3")

    def truncated_tokens():
        run = lab.copy("t4")
        os.truncate(run / "data" / "train.bin", 100)
        p = tj("train", "--out", run, "--resume", "--steps", 12)
        return p, p.returncode == 2 and "prepare the data again" in p.stderr
    yield "a truncated train.bin, then --resume", truncated_tokens

    # --- damaged checkpoints ---
    def damage(how, newest=True):
        run = lab.copy(f"d_{how}")
        c = run / "checkpoints"
        steps = sorted(int(x.name) for x in c.iterdir())
        targets = steps[-1:] if newest else steps
        for s in targets:
            d = c / str(s)
            if how == "truncate":
                big = max((x for x in d.rglob("*") if x.is_file() and "ocdbt" in str(x)), key=lambda x: x.stat().st_size)
                os.truncate(big, big.stat().st_size // 2)
            elif how == "metadata":
                (d / "state" / "_METADATA").unlink()
        if how == "stray":
            (c / "30").mkdir()
        return run

    for how in ("truncate", "metadata", "stray"):
        def resumed(how=how):
            run = damage(how)
            p = tj("train", "--out", run, "--resume", "--steps", 12)
            return p, p.returncode == 0 and p.stdout.count("is damaged") == 1 and steps_of(run)[-1] == 12
        yield f"damaged newest checkpoint ({how}), then --resume", resumed

    def generate_damaged():
        run = damage("truncate")
        p = tj("generate", "--run", run, "--prompt", "def", "--max-new-tokens", 4)
        return p, p.returncode == 0 and p.stderr.count("is damaged") == 1
    yield "damaged newest checkpoint, then generate", generate_damaged

    def all_damaged(cmd):
        def f():
            run = damage("metadata", newest=False)
            before = snapshot(run)
            p = tj(*([cmd, "--run", run, "--prompt", "def"] if cmd == "generate" else [cmd, "--out", run, "--resume"]))
            return p, p.returncode == 2 and "no intact checkpoint" in p.stderr and snapshot(run) == before
        return f
    yield "every checkpoint damaged, then --resume", all_damaged("train")
    yield "every checkpoint damaged, then generate", all_damaged("generate")

    def bad_config(cmd):
        def f():
            run = lab.copy(f"cfg_{cmd}")
            (run / "config.json").write_text("{not json")
            p = tj(*([cmd, "--run", run, "--prompt", "def"] if cmd == "generate" else [cmd, "--out", run, "--resume"]))
            return p, p.returncode == 2 and "config.json is damaged" in p.stderr
        return f
    yield "a damaged config.json, then --resume", bad_config("train")
    yield "a damaged config.json, then generate", bad_config("generate")

    def stale_tmp():
        run = lab.copy("tmp1")
        (run / "checkpoints" / "12.orbax-checkpoint-tmp").mkdir()
        p = tj("train", "--out", run, "--resume", "--steps", 12)
        return p, p.returncode == 0 and not list((run / "checkpoints").glob("*tmp*"))
    yield "an unfinished save left by kill -9, then --resume", stale_tmp

    # --- fp16 ---
    def fp16():
        run = w / "fp16"
        shutil.rmtree(run, ignore_errors=True)
        p = lab.train(run, "--steps", 4, "--precision", "fp16")
        return p, p.returncode == 0 and (run / "checkpoints" / "4").is_dir()
    yield "a short fp16 run", fp16

    # --- packages ---
    def no_safetensors():
        import torch  # noqa: F401 - only to build a tiny Hugging Face directory
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = w / "hf"
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16)).save_pretrained(hf)
        code = ("import sys; sys.modules['safetensors'] = None; from tfd_jax.cli import main; "
                f"sys.exit(main(['generate', '--hf', {str(hf)!r}, '--prompt-ids', '1 2', '--max-new-tokens', '2']))")
        p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
        return p, p.returncode == 2 and p.stderr.count("\n") == 1 and "safetensors" in p.stderr
    yield "generate --hf without safetensors installed", no_safetensors

    # --- faults outside the program ---
    mnt = w / "small_disk"
    mnt.mkdir(exist_ok=True)

    def full_disk():
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(mnt)],
                          capture_output=True).returncode:
            return None, "cannot mount a tmpfs here (needs root)"
        try:
            run = mnt / "run"
            p = lab.train(run, "--steps", 20, "--ckpt-every", 5, "--log-every", 1)
            ok = p.returncode == 1 and p.stderr.count("\n") == 1 and "the disk is full" in p.stderr
            subprocess.run(["mount", "-o", "remount,size=4000k", str(mnt)], check=True)
            again = tj("train", "--out", run, "--resume")
            return p, ok and again.returncode == 0 and steps_of(run)[-1] == 20
        finally:
            subprocess.run(["umount", str(mnt)])
    yield "a full disk (real ENOSPC on a 1 MB tmpfs), then --resume after freeing space", full_disk

    def file_limit():
        run = lab.copy("fsize")
        p = tj("train", "--out", run, "--resume", "--steps", 12, file_limit=100_000,
               env=dict(ENV, JAX_ENABLE_COMPILATION_CACHE="false"))  # its entries would be cut short too
        return p, p.returncode == 1 and "Traceback" not in p.stderr and "step 9" in p.stderr.splitlines()[-1]
    yield "a file size limit (EFBIG) during a save", file_limit

    def read_only(new):
        def f():
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2000k", "tmpfs", str(mnt)],
                              capture_output=True).returncode:
                return None, "cannot mount a tmpfs here (needs root)"
            try:
                shutil.copytree(lab.base, mnt / "run")
                subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
                if new:
                    p = lab.train(mnt / "new", "--steps", 3)
                else:
                    p = tj("train", "--out", mnt / "run", "--resume", "--steps", 12)
                return p, p.returncode in (1, 2) and p.stderr.count("\n") == 1 and "read-only" in p.stderr.lower()
            finally:
                subprocess.run(["umount", str(mnt)])
        return f
    yield "--resume on a read-only file system", read_only(False)
    yield "a new run on a read-only file system", read_only(True)

    def ctrl_c_twice():
        """In this process, so that the second SIGINT surely lands before the first one's save
        (two signals sent to another process while it waits on a step are merged into one)."""
        import tfd_jax.train.loop as loop

        run = lab.copy("sigint2")
        real, calls = loop.shd.global_batch, {"n": 0}

        def interrupting(local, mesh):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            return real(local, mesh)

        loop.shd.global_batch = interrupting
        try:
            p = in_process("train", "--out", run, "--resume", "--steps", 20, "--no-progress")
        finally:
            loop.shd.global_batch = real
        return p, p.returncode == 130 and "before saving; the newest complete checkpoint is step 9" in p.stderr
    yield "Ctrl-C twice", ctrl_c_twice

    def stop_by(sig):
        def f():
            run = lab.copy(f"sig{sig}")
            proc = subprocess.Popen([sys.executable, "-m", "tfd_jax.cli", "train", "--out", str(run), "--resume",
                                     "--steps", "100000", "--log-every", "1", "--ckpt-every", "100000"], env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            while len(steps_of(run)) < 6 and proc.poll() is None:
                time.sleep(0.01)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=300)
            p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            return p, p.returncode == 128 + sig and "saved step" in out
        return f
    yield "SIGINT (Ctrl-C) during training", stop_by(signal.SIGINT)
    yield "SIGTERM (preemption) during training", stop_by(signal.SIGTERM)

    def killed_early():
        run = lab.copy("early")
        shutil.rmtree(run / "checkpoints")
        (run / "metrics.jsonl").unlink()
        p = tj("train", "--out", run, "--resume")
        return p, p.returncode == 0 and "no checkpoint yet" in p.stdout and steps_of(run)[-1] == 9
    yield "a run killed before its first checkpoint, then --resume", killed_early

    def prepare_fails():
        from tfd_jax.tokenizers import CharTokenizer

        CharTokenizer.train("abc ").save(w / "abc_tok")
        text = w / "abcxyz.txt"
        text.write_text("abc " * 50 + "xyz")
        p = tj("data", "prepare", "--corpus", text, "--tokenizer", w / "abc_tok", "--out", w / "prepared")
        return p, p.returncode == 2 and not (w / "prepared").exists()
    yield "a data prepare that fails half way", prepare_fails

    def empty_dir():
        (w / "empty").mkdir(exist_ok=True)
        p = lab.train(w / "e_run", "--data", w / "empty")
        return p, p.returncode == 2 and "--corpus" not in p.stderr and not (w / "e_run").exists()
    yield "an empty directory as the corpus", empty_dir

    def summary_speed():
        run = lab.copy("speed")
        p = tj("train", "--out", run, "--resume")
        return p, p.returncode == 0 and json.loads(p.stdout.splitlines()[-1])["tokens_per_s"] is None
    yield "the summary after a resume with nothing to do", summary_speed

    # --- numbers a flag takes ---
    for flags in (["--lr", "nan"], ["--lr", "-1"], ["--min-lr", "0.1", "--lr", "0.01"], ["--warmup", "-1"],
                  ["--weight-decay", "-1"], ["--beta2", "1"], ["--dropout", "1.5"], ["--seed", "-1"],
                  ["--max-bytes", "-5"], ["--vocab-size", "1"], ["--steps", "0"], ["--batch-size", "0"],
                  ["--seq-len", "0"], ["--grad-accum", "0"], ["--log-every", "0"], ["--eval-every", "0"],
                  ["--eval-batches", "0"], ["--ckpt-every", "0"], ["--samples", "-1"],
                  ["--model", "norm_eps=0"], ["--model", "d_ff=-5"], ["--model", "rope_base=inf"],
                  ["--model", "dropout=nan"]):
        yield f"train {' '.join(flags)}", lambda flags=flags: (
            p := in_process("train", "--out", w / "never", *flags), p.returncode == 2 and not (w / "never").exists())
    for flags in (["--temperature", "nan"], ["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "0"],
                  ["--seed", "-1"], ["--max-new-tokens", "0"], ["--chunk-size", "0"]):
        yield f"generate {' '.join(flags)}", lambda flags=flags: (
            p := in_process("generate", "--run", lab.base, "--prompt", "x", *flags), p.returncode == 2)

    # --- an error inside the program ---
    def internal():
        code = ("import sys; import tfd_jax.train.loop as l; l.train = lambda cfg: {}['bug']; "
                "from tfd_jax.cli import main; sys.exit(main(['train']))")
        p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True)
        return p, p.returncode == 1 and p.stderr.count("\n") == 1 and "--debug" in p.stderr
    yield "an unexpected error inside the program", internal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--only", default=None, help="run only the scenarios whose name contains this")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="tfd_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update({k: v for k, v in ENV.items() if k.startswith(("JAX_", "XLA_"))})
    lab = Lab(work)
    results = []
    for i, (name, fn) in enumerate(scenarios(lab), 1):
        if args.only and args.only not in name:
            continue
        t = time.time()
        try:
            proc, ok = fn()
        except Exception as e:  # noqa: BLE001 - a scenario that breaks is reported, and the rest still run
            proc, ok = subprocess.CompletedProcess(name, None, "", f"scenario failed: {type(e).__name__}: {e}"), False
        if proc is None:
            row = {"n": i, "scenario": name, "ok": None, "note": ok}
        else:
            err = proc.stderr.strip().splitlines()
            row = {"n": i, "scenario": name, "ok": bool(ok), "exit": proc.returncode, "stderr_lines": len(err),
                   "last_line": err[-1][:300] if err else "", "s": round(time.time() - t, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"scenarios": len(results), "ok": sum(r["ok"] is True for r in results),
                      "not_ok": [r["n"] for r in results if r["ok"] is False],
                      "not_run": [r["n"] for r in results if r["ok"] is None]}))


if __name__ == "__main__":
    main()
