"""The course's pictures, drawn from the library's own numbers.

Every function returns a :class:`Picture`, a :class:`matplotlib.figure.Figure` built without
``pyplot``: nothing global changes, no window opens, and it works headless (a server, a test, a CI
machine). In a notebook a picture shows itself as the cell's result (as a PNG); elsewhere call
:func:`save` (or ``fig.savefig``).

=================================  ==============================================  ============
picture                            what it shows                                   chapter
=================================  ==============================================  ============
:func:`bpe_merge_table`            the first merges of BPE training, as a table    2
:func:`positional_waves`           a few columns of the sine/cosine table          4
:func:`positional_heatmap`         the whole table, position x dimension           4
:func:`attention_map`              attention weights per head, masked cells grey   5, 12, 19
:func:`mask_patterns`              several masks side by side (causal, padding)    12, 19
:func:`sampling_distributions`     next-token probabilities per temperature/top-p  10
:func:`kv_cache_memory`            KV-cache bytes against context length           13
:func:`training_curves`            train/validation loss and learning rate         11, 14-16
:func:`compare_runs`               one metric of several runs on one axis          14-16
:func:`rlhf_curves`                reward and KL of an RLHF (PPO) run              18
:func:`metric_curves`              any other logged metric, one panel each         11, 18, 19
=================================  ==============================================  ============
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

try:
    from matplotlib.colors import Normalize, to_rgba
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    import matplotlib as _mpl
except ImportError as e:  # pragma: no cover - exercised only without matplotlib
    raise ModuleNotFoundError("tfd_jax.viz draws with matplotlib: pip install matplotlib", name="matplotlib") from e

class Picture(Figure):
    """A matplotlib Figure that a notebook shows as a PNG when it is a cell's result."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


MASKED_COLOR = "#b3b3b3"  # cells a query may not attend to: flat grey, no value written
CMAP = "viridis"  # allowed cells: attention weight 0 (dark) .. 1 (yellow)


def save(fig: Figure, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (or whatever the suffix says) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def to_rgba_array(fig: Figure, *, dpi: int = 100) -> np.ndarray:
    """The figure rendered to a ``uint8 [height, width, 4]`` array (what a PNG would hold)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def _np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _labels(tokens: Sequence[str] | None, n: int) -> list[str]:
    if tokens is None:
        return [str(i) for i in range(n)]
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise ValueError(f"got {len(tokens)} token labels for an axis of length {n}")
    return tokens


# ----------------------------------------------------------------------------- Chapter 2


def bpe_merge_table(steps: Sequence, *, max_rows: int = 12, title: str | None = None) -> Picture:
    """The first merges of byte-pair encoding as a table (Chapter 2).

    Args:
      steps: :class:`tfd_jax.tokenizers.bpe.MergeStep` records, e.g. from ``bpe.train_trace(text, 10)``.
      max_rows: show at most this many merges.
    """
    from tfd_jax.tokenizers.bpe import _show

    steps = list(steps)[:max_rows]
    if not steps:
        raise ValueError("no merges to show: the trace is empty (is the text at least two characters long?)")
    rows = [[str(s.index), _show(s.left), _show(s.right), _show(s.merged), str(s.count), str(s.vocab_size)]
            for s in steps]
    fig = Picture(figsize=(7.0, 0.45 * len(rows) + 1.0), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=["merge", "left", "right", "new token", "count", "vocab size"],
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1.0, 1.3)
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_facecolor("#dde6f0")
    ax.set_title(title or "BPE training: the most frequent pair becomes a new token")
    return fig


# ----------------------------------------------------------------------------- Chapter 4


def positional_waves(d_model: int = 6, num_positions: int = 64, dims: Iterable[int] | None = None,
                     base: float = 10000.0) -> Picture:
    """Columns of the sinusoidal table as waves against position (Chapter 4, Part 4).

    Each sin/cos pair ``(2i, 2i+1)`` turns at its own speed, ``1 / base^(2i/M)``: the first pair
    changes every position, the last hardly at all over a short sentence.
    """
    from tfd_jax.ops import sinusoidal_positions

    pe = _np(sinusoidal_positions(num_positions, d_model, base))
    dims = list(range(min(d_model, 6)) if dims is None else dims)
    fig = Picture(figsize=(8.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for d in dims:
        if not 0 <= d < d_model:
            raise ValueError(f"dimension {d} is outside 0..{d_model - 1}")
        divisor = base ** (2 * (d // 2) / d_model)
        ax.plot(pe[:, d], ("-" if d % 2 == 0 else "--"), label=f"dim {d} ({'sin' if d % 2 == 0 else 'cos'}, "
                f"pos/{divisor:.4g})")
    ax.set_xlabel("position")
    ax.set_ylabel("PE value")
    ax.set_ylim(-1.1, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    ax.set_title(f"Sinusoidal positions, d_model = {d_model}")
    return fig


def positional_heatmap(num_positions: int = 64, d_model: int = 64, base: float = 10000.0) -> Picture:
    """The sinusoidal table as an image: position down, dimension across (Chapter 4). Fast stripes on
    the left (high frequencies), slow ones on the right; every row is a different pattern."""
    from tfd_jax.ops import sinusoidal_positions

    pe = _np(sinusoidal_positions(num_positions, d_model, base))
    fig = Picture(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(pe, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("dimension")
    ax.set_ylabel("position")
    ax.set_title(f"Sinusoidal position table [{num_positions} x {d_model}]")
    fig.colorbar(im, ax=ax, shrink=0.85)
    return fig


# ----------------------------------------------------------------------------- Chapters 5, 12, 19


def _as_heads(weights, batch_index: int) -> np.ndarray:
    w = _np(weights)
    if w.ndim == 4:
        w = w[batch_index]
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"attention weights must be [T, S], [H, T, S] or [B, H, T, S]; got shape {w.shape}")
    return w


def attention_map(weights, tokens: Sequence[str] | None = None, *, mask=None,
                  query_tokens: Sequence[str] | None = None, heads: Iterable[int] | None = None,
                  batch_index: int = 0, annotate: bool | None = None, title: str | None = None) -> Picture:
    """Attention weights as one heat map per head, query rows by key columns (Chapters 5 and 12).

    Args:
      weights: ``[T, S]``, ``[H, T, S]`` or ``[B, H, T, S]`` (e.g. from ``ops.attention_weights`` or
        ``nn.record_attention_weights``); rows sum to 1 over the allowed keys.
      tokens: labels of the keys (and of the queries unless ``query_tokens`` is given).
      mask: bool, broadcastable to ``[H, T, S]`` (``[T, S]`` is enough; a leading batch axis is
        indexed by ``batch_index``); False cells are drawn in :data:`MASKED_COLOR` with no value,
        so a causal map shows its grey upper triangle.
      heads: which heads to draw (default: up to the first 8).
      annotate: write each weight in its cell (default: when the map has at most 12 x 12 cells).
    """
    w = _as_heads(weights, batch_index)
    H, T, S = w.shape
    if mask is None:
        allowed = np.ones((H, T, S), bool)
    else:
        m = np.asarray(mask, bool)
        if m.ndim == 4:
            m = m[min(batch_index, m.shape[0] - 1)]
        try:
            allowed = np.broadcast_to(m, (H, T, S))
        except ValueError:
            raise ValueError(f"mask of shape {np.shape(mask)} does not broadcast to the weights' [H, T, S] = "
                             f"{(H, T, S)}") from None
    heads = list(range(min(H, 8)) if heads is None else heads)
    for h in heads:
        if not 0 <= h < H:
            raise ValueError(f"head {h} is outside 0..{H - 1}")
    keys, queries = _labels(tokens, S), _labels(query_tokens if query_tokens is not None else
                                                 (tokens if T == S else None), T)
    annotate = (T <= 12 and S <= 12) if annotate is None else annotate
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    cell = 0.42 if max(T, S) <= 16 else 0.22
    fig = Picture(figsize=(max(3.2, min(16.0, cols * (S * cell + 1.4))), max(2.6, min(14.0, rows * (T * cell + 1.3)))),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap, norm, grey = _mpl.colormaps[CMAP], Normalize(0.0, 1.0), np.asarray(to_rgba(MASKED_COLOR))
    for ax, h in zip(axes, heads):
        rgba = cmap(norm(w[h]))
        rgba[~allowed[h]] = grey
        ax.imshow(rgba, interpolation="nearest")
        ax.set_xticks(range(S), keys, rotation=90 if S > 6 or max(map(len, keys)) > 4 else 0, fontsize=8)
        ax.set_yticks(range(T), queries, fontsize=8)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.set_title(f"head {h}", fontsize=9)
        if annotate:
            for t in range(T):
                for s in range(S):
                    if allowed[h, t, s]:
                        ax.text(s, t, f"{w[h, t, s]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if w[h, t, s] < 0.5 else "black")
    for ax in axes[len(heads):]:
        ax.axis("off")
    fig.colorbar(_mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[: len(heads)]), shrink=0.8,
                 label="attention weight")
    if not allowed.all():
        fig.legend(handles=[Patch(color=MASKED_COLOR, label="masked (may not attend)")], loc="outside lower center",
                   fontsize=8)
    fig.suptitle(title or "Attention weights", fontsize=10)
    return fig


def mask_patterns(masks: Mapping[str, object], tokens: Sequence[str] | None = None,
                  title: str | None = None) -> Picture:
    """Boolean masks side by side, allowed cells dark and masked ones grey (Chapters 12 and 19):
    e.g. ``{"encoder (BERT)": all True, "decoder (GPT)": ops.causal_mask(T), "with padding": ...}``."""
    if not masks:
        raise ValueError("no masks to draw")
    arrays = {name: np.asarray(m, bool).reshape(np.asarray(m).shape[-2:]) for name, m in masks.items()}
    fig = Picture(figsize=(3.2 * len(arrays), 3.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(arrays), squeeze=False)).ravel()
    on, off = np.asarray(to_rgba("#2b5d8a")), np.asarray(to_rgba(MASKED_COLOR))
    for ax, (name, m) in zip(axes, arrays.items()):
        T, S = m.shape
        rgba = np.where(m[..., None], on, off)
        ax.imshow(rgba, interpolation="nearest")
        ax.set_xticks(range(S), _labels(tokens if tokens is not None and len(tokens) == S else None, S), fontsize=8,
                      rotation=90 if S > 6 else 0)
        ax.set_yticks(range(T), _labels(tokens if tokens is not None and len(tokens) == T else None, T), fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.legend(handles=[Patch(color="#2b5d8a", label="may attend"), Patch(color=MASKED_COLOR, label="masked")],
               loc="outside lower center", ncol=2, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# ----------------------------------------------------------------------------- Chapter 10


def sampling_distributions(logits, tokens: Sequence[str] | None = None, *,
                           temperatures: Sequence[float] = (0.5, 1.0, 2.0),
                           top_ps: Sequence[float] = (1.0, 0.9), top_k: int | None = None) -> Picture:
    """Next-token probabilities after temperature and top-p (and top-k) filtering (Chapter 10):
    one bar chart per (top-p, temperature), from ``ops.filter_logits`` and a softmax.

    Args:
      logits: ``[V]`` scores of one position (keep V small enough to read, e.g. 5-20 candidates).
    """
    import jax
    import jax.numpy as jnp

    from tfd_jax.ops import filter_logits

    z = jnp.asarray(logits, jnp.float32)
    if z.ndim != 1:
        raise ValueError(f"logits must be one position's [V] scores; got shape {tuple(z.shape)}")
    V = z.shape[0]
    labels = _labels(tokens, V)
    fig = Picture(figsize=(3.0 * len(temperatures), 2.4 * len(top_ps) + 0.5), layout="constrained")
    axes = fig.subplots(len(top_ps), len(temperatures), squeeze=False, sharey=True)
    for r, p in enumerate(top_ps):
        for c, t in enumerate(temperatures):
            probs = np.asarray(jax.nn.softmax(filter_logits(z, temperature=t, top_k=top_k, top_p=p)))
            ax = axes[r, c]
            bars = ax.bar(range(V), probs, color=["#2b5d8a" if q > 0 else MASKED_COLOR for q in probs])
            ax.set_ylim(0, 1.05)
            ax.set_xticks(range(V), labels, rotation=90 if V > 5 else 0, fontsize=8)
            ax.set_title(f"T = {t:g}, top-p = {p:g}" + (f", top-k = {top_k}" if top_k else ""), fontsize=9)
            kept = int((probs > 0).sum())
            ax.text(0.98, 0.95, f"{kept}/{V} kept", transform=ax.transAxes, ha="right", va="top", fontsize=8)
            if V <= 8:
                ax.bar_label(bars, [f"{q:.2f}" if q > 0 else "" for q in probs], fontsize=7)
        axes[r, 0].set_ylabel("probability")
    fig.suptitle("Sampling: temperature sharpens or flattens, top-p cuts the tail", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- Chapter 13


def kv_cache_memory(configs: Mapping[str, object], *, max_context: int = 4096, batch_size: int = 1,
                    dtype=None, budget_bytes: float | None = None) -> Picture:
    """KV-cache bytes against context length, one line per model (Chapter 13): ``2 x L x K x D``
    numbers per token and sequence (``decode.cache.bytes_per_token``), growing linearly.

    Args:
      configs: name -> a model config (``GPTConfig``; anything with ``num_layers``, ``num_kv_heads``,
        ``head_dim``, ``compute_dtype``).
      dtype: the cache dtype (default: each model's compute dtype).
      budget_bytes: draw a horizontal line at this memory (e.g. a GPU's).
    """
    from tfd_jax.decode.cache import bytes_per_token

    if not configs:
        raise ValueError("no model configs to draw")
    ctx = np.unique(np.geomspace(16, max_context, 64).astype(int))
    fig = Picture(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    for name, cfg in configs.items():
        per = bytes_per_token(cfg, dtype) * batch_size
        ax.plot(ctx, ctx * per / 2**20, label=f"{name}: {per / 1024:.1f} KiB per token")
    if budget_bytes:
        ax.axhline(budget_bytes / 2**20, color="crimson", ls=":", label=f"budget {budget_bytes / 2**30:.0f} GiB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"KV-cache memory, batch {batch_size}")
    return fig


# ----------------------------------------------------------------------------- Chapters 11, 14-16, 18


def _records(run_or_records) -> list[dict]:
    if isinstance(run_or_records, (str, os.PathLike)):
        from tfd_jax.train.metrics import read_metrics

        path = Path(run_or_records)
        if not (path / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{path} has no metrics.jsonl: is it a training run directory?")
        return read_metrics(path)
    return list(run_or_records)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) and "step" in r]
    if not pts:
        return np.zeros(0), np.zeros(0)
    s, v = zip(*pts)
    return np.asarray(s, float), np.asarray(v, float)


# metrics.jsonl keys that are bookkeeping rather than something to look at
_NOT_CURVES = {"step", "loss", "lr", "tokens_per_s", "mfu", "grad_norm", "update_ratio", "loss_scale",
               "nonfinite_steps"}


def training_curves(run_or_records, *, title: str | None = None) -> Picture:
    """Training and validation loss (top) and learning rate and gradient norm (bottom) against step
    (Chapters 11 and 14-16), from a run directory's ``metrics.jsonl`` or its records.

    A straight-ish fall on a log scale is healthy; a spike, a rising tail or a loss stuck at
    ``ln(V)`` is one of Chapter 16's problems.
    """
    records = _records(run_or_records)
    s, loss = _series(records, "loss")
    vs, vloss = _series(records, "val_loss")
    if not s.size and not vs.size:
        raise ValueError("no loss values to draw: metrics.jsonl holds no logged step yet")
    fig = Picture(figsize=(7.5, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    if s.size:
        top.plot(s, loss, label="train loss", color="#2b5d8a")
    if vs.size:
        top.plot(vs, vloss, "o-", label="validation loss", color="#d95f02")
    top.set_ylabel("cross-entropy (nats/token)")
    top.grid(alpha=0.3)
    top.legend()
    ls, lr = _series(records, "lr")
    if ls.size:
        bottom.plot(ls, lr, color="#1b9e77", label="learning rate")
        bottom.set_ylabel("learning rate")
        bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    gs, gn = _series(records, "grad_norm")
    if gs.size:
        twin = bottom.twinx()
        twin.plot(gs, gn, color="#7570b3", alpha=0.7, label="gradient norm")
        twin.set_ylabel("gradient norm")
        twin.set_yscale("log")
        if ls.size:
            handles = bottom.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            bottom.legend(handles=handles, fontsize=8, loc="upper right")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    top.set_title(title or "Training")
    return fig


def compare_runs(runs: Mapping[str, object], key: str = "loss", *, log_y: bool = False,
                 title: str | None = None) -> Picture:
    """One metric (default the training loss) of several runs on one axis (Chapters 14-16): a
    learning-rate sweep, a run that diverges next to the one that fixes it. Steps whose value was
    not finite are drawn as a cross at the top of the axis.

    Args:
      runs: label -> a run directory or its ``metrics.jsonl`` records.
    """
    if not runs:
        raise ValueError("no runs to compare")
    fig = Picture(figsize=(7.5, 4.0), layout="constrained")
    ax = fig.add_subplot()
    drawn = 0
    for label, run in runs.items():
        records = _records(run)
        s, v = _series(records, key)
        if s.size:
            ax.plot(s, v, label=label)
            drawn += 1
        bad = [r["step"] for r in records if key in r and r[key] is None and "step" in r]
        if bad:
            ax.plot(bad, [1.0] * len(bad), "x", color="crimson", transform=ax.get_xaxis_transform(),
                    label=f"{label}: not finite")
    if not drawn:
        raise ValueError(f"none of the runs logged {key!r}")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{key} of {len(runs)} runs")
    return fig


def rlhf_curves(run_or_records, *, title: str | None = None) -> Picture:
    """Reward and KL against step of a PPO run (Chapter 18): the reward model's score of the rollouts
    rising while the KL to the reference (the price paid for it) stays bounded; with the adaptive
    controller its coefficient is drawn too."""
    records = _records(run_or_records)
    rs, reward = _series(records, "reward")
    ks, kl = _series(records, "kl")
    if not rs.size or not ks.size:
        raise ValueError("no reward and kl metrics to draw: this is not a PPO run (DPO logs reward_margin; "
                         "use metric_curves)")
    fig = Picture(figsize=(7.5, 5.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.plot(rs, reward, color="#1b9e77")
    top.set_ylabel("reward (reward model)")
    top.grid(alpha=0.3)
    bottom.plot(ks, kl, color="#d95f02", label="KL to the reference (nats per answer)")
    cs, coef = _series(records, "kl_coef")
    if cs.size and np.ptp(coef) > 0:
        twin = bottom.twinx()
        twin.plot(cs, coef, color="#7570b3", ls="--", label="KL coefficient")
        twin.set_ylabel("KL coefficient")
    bottom.set_ylabel("KL")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=8, loc="upper left")
    top.set_title(title or "RLHF: reward and KL")
    return fig


def metric_names(run_or_records) -> list[str]:
    """The numeric metrics of a run other than loss, learning rate and throughput bookkeeping."""
    records = _records(run_or_records)
    names: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            base = k[4:] if k.startswith("val_") else k
            if base not in _NOT_CURVES and k not in _NOT_CURVES and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                names.setdefault(base)
    return list(names)


def metric_curves(run_or_records, names: Sequence[str] | None = None, *, title: str | None = None) -> Picture:
    """One panel per metric (training values as a line, ``val_`` values as dots), e.g. masked
    accuracy of an MLM run or the preference accuracy and reward margin of a DPO run."""
    records = _records(run_or_records)
    names = list(metric_names(records) if names is None else names)
    if not names:
        raise ValueError("no metrics beyond the loss to draw")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Picture(figsize=(3.6 * cols, 2.6 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        s, v = _series(records, name)
        vs, vv = _series(records, "val_" + name)
        if s.size:
            ax.plot(s, v, color="#2b5d8a", label="train")
        if vs.size:
            ax.plot(vs, vv, "o", color="#d95f02", label="validation")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if s.size and vs.size:
            ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
