"""Training metrics: JSONL log, optional TensorBoard, the loss plot, and model FLOPs utilisation.

MFU (model FLOPs utilisation) is the fraction of the hardware's peak that the model's own
arithmetic uses. We count, per trained token, ``6 N + 6 L M T`` FLOPs:

* ``6 N``: each of the ``N`` parameters that take part in a matrix product costs 2 FLOPs forward and
  4 backward. ``N`` (:func:`matmul_params`) is every parameter except the position table and, for an
  untied model, the input embedding table (lookups, not products); a tied table is the output
  head's matrix, so it counts (nanoGPT's convention).
* ``6 L M T``: attention's two ``T x T`` products per layer, 12 L M T forward and backward for full
  attention, halved because a causal mask leaves half the scores unused.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import jax

# Peak dense bf16 FLOP/s per device (vendor datasheets, without sparsity). Matched by substring of
# jax's device_kind, longest key first.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 125e12,
    "V100": 125e12,  # fp16 tensor cores
    "T4": 65e12,  # fp16 tensor cores
    "TPU v2": 45e12,
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device=None) -> float | None:
    """Peak bf16 FLOP/s of a device from the table, or None if unknown (e.g. CPUs)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in kind.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def matmul_params(cfg) -> int:
    """``N`` of the MFU formula for a ``GPTConfig`` (see the module docstring)."""
    n = cfg.num_params()
    if cfg.positions == "learned":
        n -= cfg.context_length * cfg.d_model
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.d_model
    return n


def flops_per_token(num_matmul_params: int, num_layers: int, d_model: int, seq_len: int) -> float:
    """``6 N + 6 L M T`` training FLOPs per token (see the module docstring)."""
    return 6.0 * num_matmul_params + 6.0 * num_layers * d_model * seq_len


def mfu(tokens_per_s: float, flops_per_tok: float, num_devices: int, peak: float | None) -> float | None:
    """Achieved FLOP/s over the devices' combined peak; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_tok / (num_devices * peak)


class MetricsLog:
    """Append one JSON object per logged step to ``metrics.jsonl`` (and TensorBoard if installed).

    Only process 0 writes. Each record is appended as one line by one ``write`` call, so an
    interrupted run leaves at worst a torn last line, which :func:`read_metrics` drops. Resuming a
    run keeps the records up to the resume step (rewritten atomically), so a resumed run's file
    reads as if it had never stopped.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True,
                 warn=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(run_dir, warn=warn) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # optional

                self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = (json.dumps(clean) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike, *, warn=None) -> list[dict]:
    """The records of ``RUN/metrics.jsonl``. A line that is not a JSON object (the torn tail an
    interrupted write leaves, or a damaged line) is dropped and reported through ``warn``
    (default: ``warnings.warn``), naming the file and the line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            torn = i == len(lines)  # the last line, without its newline
            what = "a torn last line (left by an interrupted write)" if torn else f"damaged line {i}"
            msg = f"{path}: dropped {what}: {line[:60]!r}"
            if warn is None:
                warnings.warn(msg, stacklevel=2)
            else:
                warn(msg)
            continue
        records.append(record)
    return records


def plot_loss(run_dir: str | os.PathLike) -> Path | None:
    """Draw ``loss.png`` (train and validation loss, learning rate and gradient norm against step,
    :func:`tfd_jax.viz.training_curves`); None if matplotlib is missing or nothing was logged."""
    try:
        from tfd_jax.viz import save, training_curves
    except ModuleNotFoundError:
        return None
    try:
        fig = training_curves(read_metrics(run_dir))
    except ValueError:  # nothing logged yet
        return None
    return save(fig, Path(run_dir) / "loss.png", dpi=110)
