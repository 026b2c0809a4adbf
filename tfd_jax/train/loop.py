"""The training loop: data, model, sharded jitted steps, evaluation, checkpoints, metrics (Chapter 17).

``train(TrainConfig(...))`` is what ``tfd-jax train`` runs. In order:

1. check the run directory (never overwrite a run without ``resume`` or ``force``);
2. load the corpus, train (or, on resume, reload) the tokenizer, tokenize train and val splits;
3. build the mesh, initialise the sharded model and optimizer state directly on the devices;
4. on resume, restore state and data iterator from the latest checkpoint (onto this mesh);
5. loop: one jitted, donated step per batch; every ``log_every`` steps pull metrics to the host,
   write ``metrics.jsonl`` and update the progress bar; evaluate every ``eval_every``; save every
   ``ckpt_every`` and at the end; stop cleanly on SIGTERM (saving first) and on repeated
   non-finite steps (not saving: the last good checkpoint stays the newest);
6. draw ``loss.png`` and print a few samples.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax.models import GPT, GPTConfig
from tfd_jax.train import checkpoint as ckpt
from tfd_jax.train import metrics as mx
from tfd_jax.train import sharding as shd
from tfd_jax.train.optim import OptimConfig, make_optimizer
from tfd_jax.train.precision import compute_dtype, default_precision
from tfd_jax.train.step import init_state, make_eval_step, make_train_step, rng_tags, split_model


class TrainingError(RuntimeError):
    """The run stopped for a reason the user should read (diverged, bad run directory, ...)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``tfd-jax train`` can set. Defaults: the README's main job (a few minutes on a laptop CPU)."""

    out: str = "runs/pystdlib"
    data: str = "pystdlib"
    max_bytes: int | None = 3_000_000  # cap on the training text, for quick runs (None = all)
    tokenizer: str = "spm"  # "spm" (sentencepiece BPE), "bpe" (the course's, from scratch), "char"
    vocab_size: int = 2048
    preset: str = "small"
    model_overrides: dict = field(default_factory=dict)
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    sampling: str = "random"  # where training windows start: "random" (nanoGPT's) or "epochs"
    grad_accum: int = 1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=30, b2=0.99))
    precision: str | None = None  # None: bf16 on GPU/TPU, fp32 on CPU
    mesh: str | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    resume: bool = False
    force: bool = False
    max_nonfinite_streak: int = 5
    spike_factor: float = 2.0  # report a loss spike above this multiple of the running average
    samples: int = 3
    sample_tokens: int = 60
    sample_prompts: tuple[str, ...] | None = None
    progress: bool = True
    profile_dir: str | None = None  # write a JAX profiler trace of a few steps here
    profile_steps: int = 5
    debug_nan_steps: tuple[int, ...] = ()  # poison these steps' loss with NaN, to rehearse the failure path

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"] = dataclasses.asdict(self.optim)
        return d


# --- setup helpers ---------------------------------------------------------------------------


def _check_run_dir(cfg: TrainConfig) -> Path:
    """Refuse to touch an existing run unless asked. Every process checks (read-only) before process 0
    changes anything, so on a shared filesystem they all reach the same verdict."""
    out = Path(cfg.out)
    has_run = (out / ckpt.CONFIG_FILE).exists() or (out / ckpt.CHECKPOINT_DIR).exists()
    if cfg.resume and cfg.force:
        raise TrainingError("use either --resume (continue the run) or --force (start over), not both")
    if cfg.resume and not has_run:
        raise TrainingError(f"--resume: {out} holds no run to continue")
    if not cfg.resume and not cfg.force:
        if has_run:
            raise TrainingError(
                f"{out} already holds a run; pass --resume to continue it, --force to delete it and start "
                "over, or choose another --out"
            )
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TrainingError(f"{out} exists and is not an empty directory; choose another --out or pass --force")
    _sync("run_dir_checked")
    if jax.process_index() == 0:
        if cfg.force and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True, exist_ok=True)
    _sync("run_dir_ready")
    return out


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _prepare_data(cfg: TrainConfig, out: Path, log):
    """(tokenizer, train TokenFile, val TokenFile). Process 0 does the work, the others read it."""
    from tfd_jax.data import load_corpus
    from tfd_jax.data.tokenized import load_tokens, write_tokens
    from tfd_jax.tokenizers import load_tokenizer

    tok_dir = out / ckpt.TOKENIZER_DIR
    data_dir = out / "data"
    if jax.process_index() == 0 and not (data_dir / "val.json").exists():
        t0 = time.time()
        train_corpus = load_corpus(cfg.data, split="train", max_bytes=cfg.max_bytes)
        val_corpus = load_corpus(cfg.data, split="val", max_bytes=None if cfg.max_bytes is None else max(cfg.max_bytes // 10, 1))
        log(f"corpus {cfg.data!r}: {train_corpus.num_chars:,} train / {val_corpus.num_chars:,} val characters")
        if tok_dir.exists():
            tokenizer = load_tokenizer(tok_dir)
        else:
            # A character vocabulary must cover the validation text too (nanoGPT builds it from all
            # of the text); BPE and sentencepiece fall back to bytes, so they see only training text.
            text = train_corpus.text + (val_corpus.text if cfg.tokenizer == "char" else "")
            tokenizer = _train_tokenizer(cfg, text)
            tokenizer.save(tok_dir)
        write_tokens(train_corpus, tokenizer, data_dir / "train", progress=cfg.progress)
        write_tokens(val_corpus, tokenizer, data_dir / "val", progress=cfg.progress)
        log(f"tokenizer {cfg.tokenizer} ({tokenizer.vocab_size} tokens) and data ready in {time.time() - t0:.1f}s")
    _sync("data_prepared")
    tokenizer = load_tokenizer(tok_dir)
    return tokenizer, load_tokens(data_dir / "train"), load_tokens(data_dir / "val")


def _train_tokenizer(cfg: TrainConfig, text: str):
    from tfd_jax.tokenizers import BPETokenizer, CharTokenizer, SentencePieceTokenizer

    if cfg.tokenizer == "spm":
        return SentencePieceTokenizer.train(text, cfg.vocab_size)
    if cfg.tokenizer == "bpe":
        return BPETokenizer.train(text, cfg.vocab_size)
    if cfg.tokenizer == "char":
        return CharTokenizer.train(text)
    raise TrainingError(f"unknown tokenizer {cfg.tokenizer!r}; choose 'spm', 'bpe' or 'char'")


def model_config_for(cfg: TrainConfig, vocab_size: int, precision: str) -> GPTConfig:
    overrides = {"vocab_size": vocab_size, "dtype": compute_dtype(precision), **cfg.model_overrides}
    base = GPTConfig.preset(cfg.preset, **overrides)
    if cfg.seq_len > base.context_length:
        base = base.replace(context_length=cfg.seq_len)
    return base


# --- the run ---------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns a summary dict (final losses, timings)."""
    shd.maybe_initialize_distributed()
    is_main = jax.process_index() == 0

    def log(msg: str) -> None:
        if is_main:
            print(msg, flush=True)

    _validate(cfg)
    out = _check_run_dir(cfg)
    try:
        return _train(cfg, out, log, is_main)
    except BaseException:
        # A new run that failed before writing its config (bad data, bad flags) leaves nothing
        # behind, so the same --out can be used again once the problem is fixed.
        if not cfg.resume and is_main and not (out / ckpt.CONFIG_FILE).exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: TrainConfig, out: Path, log, is_main: bool) -> dict:
    precision = cfg.precision or default_precision()
    compute_dtype(precision)  # validates the name
    try:
        mesh = shd.make_mesh(cfg.mesh)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if cfg.batch_size % shd.batch_divisor(mesh):
        raise TrainingError(
            f"--batch-size {cfg.batch_size} must be a multiple of data x fsdp = {shd.batch_divisor(mesh)} on mesh {dict(mesh.shape)}"
        )
    if cfg.batch_size % (cfg.grad_accum * shd.batch_divisor(mesh)):
        raise TrainingError(
            f"--batch-size {cfg.batch_size} must be divisible by --grad-accum {cfg.grad_accum} x data x fsdp "
            f"({shd.batch_divisor(mesh)}) so every micro-batch splits evenly over the devices"
        )

    tokenizer, train_tokens, val_tokens = _prepare_data(cfg, out, log)

    # Build the data iterators before anything is written, so a corpus too small for one batch
    # fails here with a clear message and leaves no half-made run behind.
    data_it = _train_iterator(cfg, train_tokens)
    try:
        _val_iterator(cfg, val_tokens)
    except ValueError as e:
        raise TrainingError(f"validation split too small: {e}") from None

    if cfg.resume:
        model_cfg = GPTConfig.from_dict(ckpt.read_config(out)["model"])
    else:
        model_cfg = model_config_for(cfg, tokenizer.vocab_size, precision)
        if is_main:
            ckpt.write_config(out, {"model": model_cfg.to_dict(), "train": cfg.to_dict(), "precision": precision})
    _sync("config_written")

    # Build the model's structure without allocating, then initialise directly with the shardings.
    def make_model():
        return GPT(model_cfg, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))

    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params, abstract_rest = split_model(abstract_model)
    p_sh = shd.param_shardings(abstract_params, mesh)
    rep = shd.replicated(mesh)

    @jax.jit
    def init_params_and_rest():
        _, p, r = split_model(make_model())
        return jax.lax.with_sharding_constraint(p, p_sh), r

    with jax.set_mesh(mesh):
        params, rest = init_params_and_rest()
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    n_embed = model_cfg.vocab_size * model_cfg.d_model + (model_cfg.context_length * model_cfg.d_model if model_cfg.positions == "learned" else 0)

    optimizer, schedule = make_optimizer(cfg.optim, cfg.steps)
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer, cfg.seed, precision), params)
    state_sh = _state_shardings(abstract_state, optimizer, p_sh, rep)
    state = jax.jit(lambda p: init_state(p, optimizer, cfg.seed, precision), out_shardings=state_sh)(params)
    del params

    checkpointer = ckpt.Checkpointer(out, keep=cfg.keep_checkpoints)
    start_step = 0
    if cfg.resume:
        from tfd_jax.data.pipeline import IteratorRestore

        target = ckpt.abstract_with_shardings(abstract_state, state_sh)
        state, _ = checkpointer.restore(target, data_args=IteratorRestore(data_it))
        start_step = int(jax.device_get(state["step"]))
        log(f"resumed from step {start_step} ({out / ckpt.CHECKPOINT_DIR})")
    if start_step >= cfg.steps:
        log(f"nothing to do: the run is already at step {start_step} of {cfg.steps}")

    train_step = make_train_step(
        graphdef,
        rest,
        optimizer,
        schedule,
        grad_accum=cfg.grad_accum,
        dropout_tags=rng_tags(abstract_model) if (model_cfg.dropout or model_cfg.embed_dropout) else (),
        fp16=precision == "fp16",
    )

    step_fn = jax.jit(
        train_step,
        in_shardings=(state_sh, shd.batch_sharding(mesh), rep),
        out_shardings=(state_sh, rep),
        donate_argnums=0,
    )
    eval_fn = jax.jit(make_eval_step(graphdef, rest), in_shardings=(state_sh["params"], shd.batch_sharding(mesh)))

    fpt = mx.flops_per_token(mx.matmul_params(model_cfg), model_cfg.num_layers, model_cfg.d_model, cfg.seq_len)
    peak = mx.peak_flops_per_device()
    metrics_log = mx.MetricsLog(out, resume_step=start_step if cfg.resume else None)
    log(
        f"model {cfg.preset}: {n_params:,} parameters ({n_params - n_embed:,} without embeddings), "
        f"{model_cfg.num_layers} layers, d_model {model_cfg.d_model}, vocab {model_cfg.vocab_size}; "
        f"precision {precision}; mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s)"
    )

    stop = {"signal": None}
    old_handler = None
    if threading_main():
        old_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = _progress(cfg, start_step, is_main)
    summary = {"run_dir": str(out), "start_step": start_step}
    ema = None
    last_t, last_step = None, start_step
    step = start_step
    pending = []  # (step, device metrics) not yet pulled to the host
    t_start = time.perf_counter()
    profiling = False
    # Made once on the devices, so the loop sends nothing but the batch. (Made by a jitted function:
    # device_put checks that every process passes equal values, and NaN never equals itself.)
    poison_one, poison_nan = jax.jit(lambda: (jnp.float32(1.0), jnp.float32(jnp.nan)), out_shardings=(rep, rep))()
    val_loss = None
    try:
        while step < cfg.steps:
            if cfg.profile_dir and step == start_step + 2:  # after compilation and one warm step
                jax.profiler.start_trace(cfg.profile_dir)
                profiling = True
            local = next(data_it)
            batch = shd.global_batch(local, mesh)
            state, m = step_fn(state, batch, poison_nan if (step + 1) in cfg.debug_nan_steps else poison_one)
            step += 1
            pending.append((step, m))
            if profiling and (step >= start_step + 2 + cfg.profile_steps or step == cfg.steps):
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
                log(f"profiler trace of {cfg.profile_steps} steps written to {cfg.profile_dir} (open it with TensorBoard or Perfetto)")
            if step == start_step + 1:
                jax.block_until_ready(m)  # the first step includes compilation: time from here on
                last_t, last_step = time.perf_counter(), step
                summary["compile_and_first_step_s"] = round(last_t - t_start, 2)
            boundary = step % cfg.log_every == 0 or step == cfg.steps or step % cfg.eval_every == 0 or stop["signal"]
            if not boundary:
                continue
            host = jax.device_get([mm for _, mm in pending])
            now = time.perf_counter()
            tps = tokens_per_step * (step - last_step) / max(now - last_t, 1e-9) if step > last_step else None
            last_t, last_step = now, step
            state_counts = jax.device_get({k: state[k] for k in ("nonfinite", "nonfinite_streak", "loss_scale")})
            for (s, _), hm in zip(pending, host):
                loss = float(hm["loss"])
                if not bool(hm["finite"]):
                    log(f"step {s}: non-finite loss or gradients; the update was skipped")
                elif ema is not None and loss > cfg.spike_factor * ema:
                    log(f"step {s}: loss spike {loss:.3f} (running average {ema:.3f})")
                if bool(hm["finite"]):
                    ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            pending.clear()
            last = host[-1]
            record = {
                "step": step,
                "loss": float(last["loss"]) if bool(last["finite"]) else None,
                "lr": float(last["lr"]),
                "grad_norm": float(last["grad_norm"]) if bool(last["finite"]) else None,
                "update_ratio": float(last["update_ratio"]) if bool(last["finite"]) else None,
                "tokens_per_s": tps,
                "mfu": mx.mfu(tps, fpt, jax.device_count(), peak) if tps else None,
                "nonfinite_steps": int(state_counts["nonfinite"]),
            }
            if precision == "fp16":
                record["loss_scale"] = float(state_counts["loss_scale"])
            if int(state_counts["nonfinite_streak"]) >= cfg.max_nonfinite_streak:
                raise TrainingError(_diverged_message(step, int(state_counts["nonfinite_streak"]), checkpointer))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = _evaluate(cfg, eval_fn, state["params"], val_tokens, mesh)
                record["val_loss"] = val_loss
            metrics_log.write(record)
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{record['loss']:.3f}" if record["loss"] is not None else "nan", tok_s=f"{tps or 0:,.0f}")
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop["signal"]:
                if int(state_counts["nonfinite_streak"]) > 0:
                    # Mid-streak the newest checkpoint stays the one from before the trouble began.
                    log(f"step {step}: checkpoint skipped during a run of non-finite steps")
                else:
                    checkpointer.save(step, state, _iterator_save(data_it), force=True)
            if stop["signal"]:
                checkpointer.wait()
                log(f"received signal {stop['signal']}: saved step {step} to {out / ckpt.CHECKPOINT_DIR}; resume with --resume")
                summary["stopped_by_signal"] = True
                break
        checkpointer.wait()
    finally:
        if profiling:
            jax.profiler.stop_trace()
        if bar is not None:
            bar.close()
        checkpointer.close()
        metrics_log.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    records = mx.read_metrics(out)
    summary.update(
        {
            "steps": step,
            "final_loss": next((r["loss"] for r in reversed(records) if r.get("loss") is not None), None),
            "val_loss": val_loss,
            "tokens_per_s": next((r["tokens_per_s"] for r in reversed(records) if r.get("tokens_per_s")), None),
            "num_params": n_params,
        }
    )
    want_samples = cfg.samples and not summary.get("stopped_by_signal")
    if want_samples and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        host_params = multihost_utils.process_allgather(state["params"], tiled=True)  # a collective: all processes
    elif want_samples:
        host_params = jax.device_get(state["params"])
    if is_main:
        png = mx.plot_loss(out)
        if png:
            log(f"loss curve: {png}")
        if want_samples:
            model = nnx.merge(graphdef, host_params, rest)
            model.eval()
            summary["samples"] = print_samples(model, tokenizer, cfg, log)
    return summary


def threading_main() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


def _validate(cfg: TrainConfig) -> None:
    problems = []
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "ckpt_every", "eval_batches"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    from tfd_jax.models.config import PRESETS

    if cfg.preset not in PRESETS:
        problems.append(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if problems:
        raise TrainingError("; ".join(problems))


def _state_shardings(abstract_state, optimizer, p_sh, rep):
    import optax

    opt_sh = optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, s: s,
        abstract_state["opt_state"],
        p_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return {k: (p_sh if k == "params" else opt_sh if k == "opt_state" else rep) for k in abstract_state}


def _train_iterator(cfg: TrainConfig, tokens):
    from tfd_jax.data.pipeline import make_iterator

    return make_iterator(tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, sampling=cfg.sampling)


def _val_iterator(cfg: TrainConfig, tokens):
    from tfd_jax.data.pipeline import make_iterator

    return make_iterator(tokens, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed + 12345,
                         sampling=cfg.sampling)


def _iterator_save(it):
    from tfd_jax.data.pipeline import IteratorSave

    return IteratorSave(it)


def _evaluate(cfg: TrainConfig, eval_fn, params, val_tokens, mesh) -> float:
    """Mean validation loss over ``eval_batches`` fixed batches (the same ones every time)."""
    it = _val_iterator(cfg, val_tokens)
    total, count = 0.0, 0.0
    for _ in range(cfg.eval_batches):
        s, c = eval_fn(params, shd.global_batch(next(it), mesh))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def _diverged_message(step: int, streak: int, checkpointer) -> str:
    last = checkpointer.latest_step()
    where = f"the last good checkpoint is step {last}" if last is not None else "no checkpoint was saved yet"
    return (
        f"training diverged: {streak} steps in a row up to step {step} had non-finite loss or gradients "
        f"(those updates were skipped); {where}. Likely fixes (Chapter 16): lower --lr (e.g. 10x), keep "
        "gradient clipping at 1.0, use bf16 instead of fp16, check the data for corrupt examples, and "
        "check the LayerNorm eps (1e-5)."
    )


def _progress(cfg: TrainConfig, start: int, is_main: bool):
    if not (cfg.progress and is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def print_samples(model, tokenizer, cfg: TrainConfig, log) -> list[str]:
    """Generate and print a few continuations of short prompts; returns the texts."""
    from tfd_jax.decode import generate

    prompts = list(cfg.sample_prompts or (("def ", "class ", "import ") if cfg.data == "pystdlib" else ("\n",)))
    prompts = prompts[: cfg.samples]
    ids = [tokenizer.encode(p) or [tokenizer.encode("\n")[0]] for p in prompts]
    limit = model.config.context_length - max(len(i) for i in ids)
    new_tokens, lengths = generate(model, ids, min(cfg.sample_tokens, limit), temperature=0.8, top_k=50, seed=cfg.seed)
    new_tokens, lengths = np.asarray(new_tokens), np.asarray(lengths)
    texts = []
    for p, row, n in zip(prompts, new_tokens, lengths):
        text = p + tokenizer.decode([int(t) for t in row[: int(n)]])
        texts.append(text)
        log("--- sample " + "-" * 50 + "\n" + text)
    return texts


def summary_json(summary: dict) -> str:
    """The run summary as one JSON line (samples were already printed)."""
    return json.dumps({k: v for k, v in summary.items() if k != "samples"}, default=str)
