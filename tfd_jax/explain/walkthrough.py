"""The course's worked example, "I love pizza", run through the library, chapter by chapter.

:func:`run` prints three parts:

1. the walkthrough: the sentence's numbers pushed through :mod:`tfd_jax.ops` (embedding lookup,
   sinusoidal positions, head-1 attention with and without the causal mask, output projection,
   dropout, FFN, residual + LayerNorm, logits and sampling filters, cross-entropy, one Adam step),
   each beside the value the course prints;
2. every worked example of the course recomputed from its printed inputs, at the course's precision;
3. the errata: every example where the course's printed numbers are wrong, with the right ones.

All figures come from ``worked_examples.json`` shipped in this package.
"""
from __future__ import annotations

import math
import sys
from typing import Any, TextIO

import jax
import numpy as np

from tfd_jax.explain import kernels as kern
from tfd_jax.explain.compare import AGREES, CARRIED, DIFFERS, UNCHECKED, Check, Value, compare, fmt
from tfd_jax.explain.data import examples_by_id, load_examples
from tfd_jax.explain.report import ExampleResult, Report, Step, check_example

_STATUS_TEXT = {
    AGREES: "agrees",
    CARRIED: "agrees (from the course's own rounded numbers)",
    DIFFERS: "COURSE ERROR",
    UNCHECKED: "not checkable",
}

CHAPTER_NAMES = {
    1: "Vocabulary",
    2: "Tokenization",
    3: "Embeddings",
    4: "Positional encoding",
    5: "Multi-head self-attention",
    6: "Dropout",
    7: "Feed-forward network",
    8: "Residual connections and LayerNorm",
    9: "Stacking blocks",
    10: "Output head and sampling",
    11: "Training",
    12: "Causal masking",
    13: "Inference and the KV cache",
    14: "Hyperparameters",
    15: "Training techniques",
    16: "Training problems",
    17: "The complete example",
    21: "Final thoughts",
}


# ----------------------------------------------------------------------------- rendering


def _render_uniform(x: Any, decimals: int) -> str:
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_render_uniform(v, decimals)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)) or (hasattr(x, "ndim") and getattr(x, "ndim", 0) > 0):
        return "[" + ", ".join(_render_uniform(v, decimals) for v in list(x)) + "]"
    if hasattr(x, "item"):
        x = x.item()
    return fmt(x, decimals)


def _render_checks(course: Any, checks: list[Check], side: str) -> str:
    """Render ``course``'s shape with each leaf from the next check (ours or the course's)."""
    it = iter(checks)

    def walk(c):
        if isinstance(c, dict):
            return "{" + ", ".join(f"{k}: {walk(v)}" for k, v in c.items()) + "}"
        if isinstance(c, list):
            return "[" + ", ".join(walk(v) for v in c) + "]"
        check = next(it)
        return check.show_course() if side == "course" else check.show_ours()

    return walk(course)


def _overall(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    if DIFFERS in statuses:
        return DIFFERS
    if statuses <= {UNCHECKED}:
        return UNCHECKED
    if CARRIED in statuses:
        return CARRIED
    return AGREES


class _Printer:
    def __init__(self, out: TextIO | None):
        self.out = out

    def __call__(self, text: str = "") -> None:
        if self.out is not None:
            print(text, file=self.out)


# ----------------------------------------------------------------------------- the walkthrough


class _Walkthrough:
    """Collects and prints the steps of the "I love pizza" pipeline."""

    def __init__(self, report: Report, p: _Printer, chapter: int | None):
        self.report, self.p, self.chapter = report, p, chapter
        self._section = None

    def wants(self, chapter: int) -> bool:
        return self.chapter is None or self.chapter == chapter

    def step(
        self,
        chapter: int,
        name: str,
        label: str,
        ours: Any,
        course: Any = None,
        *,
        carried: Any = None,
        decimals: int | None = None,
        mixed: bool = False,
        note: str = "",
    ) -> None:
        ours = _plain(ours)
        self.report.walkthrough[name] = ours
        status = ""
        if course is not None:
            checks = compare(name, course, Value(ours, carried=_plain(carried), decimals=decimals, mixed=mixed))
            status = _overall(checks)
            ours_text = _render_checks(course, checks, "ours")
            course_text = _render_checks(course, checks, "course")
        else:
            ours_text = _render_uniform(ours, 4 if decimals is None else decimals)
            course_text = ""
        self.report.steps.append(Step(chapter, name, label, ours, course, status, note))
        if not self.wants(chapter):
            return
        if self._section != chapter:
            self._section = chapter
            self.p()
            self.p(f"-- Chapter {chapter}: {CHAPTER_NAMES.get(chapter, '')}")
        self.p(f"  {label}")
        self.p(f"      ours    {ours_text}")
        if course is not None:
            self.p(f"      course  {course_text}    [{_STATUS_TEXT[status]}]")
        if note:
            self.p(f"      ({note})")


def _plain(x: Any) -> Any:
    if x is None:
        return None
    if hasattr(x, "tolist"):
        return np.asarray(x, dtype=np.float64).tolist() if np.asarray(x).dtype != bool else np.asarray(x).tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _as_heads(x) -> np.ndarray:
    """``[T, D]`` -> ``[1, T, 1, D]`` (one sequence, one head) for the attention ops."""
    return np.asarray(x, np.float32)[None, :, None, :]


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def walkthrough(data: dict, report: Report, p: _Printer, chapter: int | None = None) -> None:
    """Run "I love pizza" through the library and record/print every intermediate."""
    ex = examples_by_id(data)
    d = data["data"]
    w = _Walkthrough(report, p, chapter)
    C = lambda i: ex[i]["course_outputs"]  # noqa: E731 - the course's printed outputs of example i
    I = lambda i: ex[i]["inputs"]  # noqa: E731 - its printed inputs
    f64 = kern.f64

    # Chapters 1-3: tokens, ids, embedding lookup.
    sentence = d["vocabulary"]["sentence"]
    words = sentence["text"].split()
    ids = [d["vocabulary"]["ids"][t] for t in words]
    w.step(1, "ids", f"token ids of {sentence['text']!r}", ids, sentence["ids"])
    rows = {int(k.split()[0]): v for k, v in d["embedding_table_ch3"]["rows"].items()}
    vocab, width = d["vocabulary"]["vocab_size"], len(next(iter(rows.values())))
    table = np.zeros((vocab, width))
    table[list(rows)] = list(rows.values())
    X = table[ids]
    w.step(3, "X", f"X = E[ids]: rows of the {vocab:,} x {width} embedding table", X,
           C("ch3.embedding_lookup_stack")["X"])

    # Chapter 4: sinusoidal positions, added without any scaling.
    T = len(ids)
    pe = f64(kern.sinusoidal_positions(T, width))
    pe_course = C("ch4.pe_positions_0_1_2")["4dp"]
    w.step(4, "PE", f"PE = ops.sinusoidal_positions({T}, {width}), positions 1 and 2 at 4 dp",
           {k: pe[int(k)] for k in pe_course}, pe_course)
    pe_rounded = np.round(pe, 2)
    w.step(4, "PE_rounded", "PE rounded to 2 dp, the values the course carries forward", pe_rounded,
           I("ch4.position_aware_matrix")["PE_rounded_2dp_as_used_by_course"], decimals=2)
    X_pos = X + pe_rounded
    w.step(4, "X_pos", "X_pos = X + PE (rounded), no sqrt(d_model) scaling", X_pos,
           C("ch4.position_aware_matrix")["X_pos"])
    w.step(4, "X_pos_exact", f"X_pos with the exact PE (moves by at most {np.abs(pe - pe_rounded).max():.4f})",
           X + pe, decimals=4)

    # Chapter 5: head 1 sees dims 0-2 through its own 3x3 projections.
    qkv = I("ch5.qkv_head1")
    d_k = len(qkv["W_Q1"])
    x1 = X_pos[:, :d_k]
    Q, K, V = (x1 @ np.asarray(qkv[f"W_{n}1"], np.float64) for n in "QKV")
    printed = C("ch5.qkv_head1")
    w.step(5, "Q", "head 1: Q = X_pos[:, 0:3] @ W_Q1", Q, printed["Q"], decimals=3)
    w.step(5, "K", "head 1: K = X_pos[:, 0:3] @ W_K1", K, printed["K"], decimals=3)
    w.step(5, "V", "head 1: V = X_pos[:, 0:3] @ W_V1", V, printed["V"], decimals=3,
           note="the course's V for 'love' and 'pizza' has a wrong third component; see the errata")
    raw = Q @ K.T
    w.step(5, "scores_I", "raw scores of 'I': Q_I . K_j", raw[0], C("ch5.scores_I")["scores"],
           carried=np.sum(C("ch5.scores_I")["terms"], axis=1))
    w.step(5, "scaled_scores", f"scaled scores Q K^T / sqrt({d_k}), every row", raw / math.sqrt(d_k), decimals=6)
    w.step(5, "scaled_scores_I", "scaled scores of 'I'", raw[0] / math.sqrt(d_k), C("ch5.scaled_scores_I")["scaled"])
    q, k, v = _as_heads(Q), _as_heads(K), _as_heads(V)
    weights = f64(kern.attention_weights(q, k))[0, 0]
    w.step(5, "weights_bidirectional", "ops.attention_weights, no mask (the Chapter 5 example is bidirectional)",
           weights, decimals=6)
    w.step(5, "weights_I", "attention weights of 'I'", weights[0], C("ch5.softmax_I")["weights"])
    out_bi = f64(kern.attention(q, k, v))[0, :, 0, :]
    w.step(5, "output_bidirectional", "ops.attention, no mask: head-1 output of every token", out_bi, decimals=6)
    w.step(5, "output_I", "head-1 output of 'I' = sum_j w_j V_j", out_bi[0], C("ch5.weighted_sum_I")["output"],
           note=f"the course's third component comes from its wrong V; with V right it is {out_bi[0][2]:.4f}")

    # Chapter 5, Part 3: concatenate the heads, project with W_O.
    proj = I("ch5.output_projection_I")
    W_O = np.asarray(proj["W_O"], np.float64)
    head2 = np.asarray(proj["head2_given_not_computed"], np.float64)
    concat_printed = np.concatenate([proj["head1"], head2])
    w.step(5, "attention_output_I", "concat(head 1 as printed, head 2 as given) @ W_O, for 'I'", concat_printed @ W_O,
           C("ch5.output_projection_I")["attention_output"],
           note="the course prints an invented vector here and carries it into Chapters 6-8")
    w.step(5, "attention_output_I_ours", "the same with our head-1 output", np.concatenate([out_bi[0], head2]) @ W_O,
           decimals=5)

    # Chapter 12, shown next to the unmasked version: the causal mask.
    mask = np.asarray(kern.causal_mask(T))
    weights_c = f64(kern.attention_weights(q, k, mask))[0, 0]
    out_c = f64(kern.attention(q, k, v, mask=mask))[0, :, 0, :]
    w.step(12, "causal_mask", f"ops.causal_mask({T}): True = may attend", mask)
    w.step(12, "weights_causal", "ops.attention_weights with the causal mask", weights_c, decimals=6,
           note="'I' can only attend to itself, so its output is V_I")
    w.step(12, "output_causal", "ops.attention with the causal mask", out_c, decimals=6)
    cm = I("ch12.causal_mask_softmax")
    row = words.index("love")
    love = f64(kern.softmax(_f32(np.where(mask, cm["scores"], -np.inf)[row])))
    w.step(12, "course_love_row", "the course's own masked score matrix, 'love' row after softmax", love,
           C("ch12.causal_mask_softmax")["love_row_weights"],
           note="that matrix is not the Chapter 5 scores (see the errata); the rule is the same")

    # Chapter 6: dropout on the course's attention output.
    dr = I("ch6.dropout")
    x_att = np.asarray(dr["x"], np.float64)
    draw = np.asarray(dr["random_2"], np.float64)
    kept = np.where(draw > dr["p"], x_att / (1 - dr["p"]), 0.0)
    w.step(6, "dropout_scaled", f"inverted dropout p={dr['p']}, keep where the given draw > p, scale by 1/(1-p)",
           kept, C("ch6.dropout")["scaled"])
    sample = f64(kern.dropout(_f32(x_att), dr["p"], jax.random.key(0)))
    survivors = sample != 0
    same = bool(np.allclose(sample[survivors], (x_att / (1 - dr["p"]))[survivors], atol=1e-6))
    w.step(6, "ops_dropout", "ops.dropout with a random key: zeros, and survivors scaled the same way", sample,
           decimals=3, note=f"survivors equal x / (1 - p): {same}; deterministic=True returns x unchanged")

    # Chapter 7: the FFN's first six hidden units (only six columns of W1 are printed).
    ffn = I("ch7.ffn_hidden_first6")
    W1 = np.asarray(ffn["W1_first6_columns_6x6"], np.float64)
    b1 = np.asarray(ffn["b1_first6"], np.float64)
    x_ffn = np.asarray(ffn["x"], np.float64)
    n_cols = W1.shape[1]
    w.step(7, "ffn_hidden", f"h = x @ W1[:, :{n_cols}] + b1[:{n_cols}]", x_ffn @ W1 + b1,
           C("ch7.ffn_hidden_first6")["hidden_first10"][:n_cols])
    relu_h = f64(kern.feed_forward(_f32(x_ffn), _f32(W1), _f32(b1), np.eye(n_cols, dtype=np.float32), None,
                                   activation="relu"))
    w.step(7, "ffn_relu", f"ReLU(h) (ops.feed_forward with W2 = I on these {n_cols} units)", relu_h,
           C("ch7.relu")["relu"][:n_cols], note="the course applies ReLU to its wrong hidden values")

    # Chapter 8: residual and LayerNorm (post-LN).
    res = I("ch8.residual_add")
    summed = np.asarray(res["sublayer_output"], np.float64) + np.asarray(res["input"], np.float64)
    w.step(8, "residual", "residual: FFN output (given by the course) + its input", summed,
           C("ch8.residual_add")["sum"])
    ln_in = I("ch8.layernorm")
    ln = f64(kern.layer_norm(_f32(ln_in["x"]), _f32(ln_in["gamma"]), _f32(ln_in["beta"]), ln_in["eps"]))
    xs = np.asarray(ln_in["x"], np.float64)
    w.step(8, "ln_mean", "mean over the features", xs.mean(), C("ch8.layernorm")["mean"])
    w.step(8, "ln_variance", "population variance", xs.var(), C("ch8.layernorm")["variance"])
    w.step(8, "layer_norm", f"ops.layer_norm (eps {ln_in['eps']}, gamma 1, beta 0)", ln,
           C("ch8.layernorm")["normalized"])

    # Chapter 10: logits, softmax, temperature, top-k, top-p.
    lg = I("ch10.logits_softmax")
    names = list(lg["logits"])
    logits = _f32(list(lg["logits"].values()))
    total = lg["assumed_sum_over_50000"]
    w.step(10, "probs_assumed_sum", f"exp(logit) / {total} (the course's assumed total) for " + ", ".join(names),
           np.exp(logits.astype(np.float64)) / total, C("ch10.logits_softmax")["prob"])
    w.step(10, "probs_six", "softmax over these six logits alone", f64(kern.softmax(logits)), decimals=4)
    for ex_id in ("ch10.temperature_0_5", "ch10.temperature_1_5"):
        t_in, printed_t = I(ex_id), C(ex_id)
        scaled = kern.apply_temperature(_f32(t_in["logits"]), t_in["T"])
        w.step(10, f"temperature_{t_in['T']}", f"T = {t_in['T']}: softmax(ops.apply_temperature(logits, T)), %",
               100 * f64(kern.softmax(scaled)), printed_t["percent"],
               carried=100 * np.asarray(printed_t["exp"], np.float64) / printed_t["sum"])
    tk = I("ch10.top_k")
    probs_k = _f32(list(tk["top_probs_percent"].values()))
    renorm = 100 * f64(kern.softmax(kern.top_k_filter(np.log(probs_k), tk["k"])))
    w.step(10, "top_k", f"top-k, k = {tk['k']}: ops.top_k_filter then renormalise, %", renorm,
           C("ch10.top_k")["renormalised_percent"])
    p_top = I("ch10.top_p")["p"]
    nucleus = f64(kern.top_p_filter(logits, p_top))
    kept_names = [n for n, z in zip(names, nucleus) if np.isfinite(z)]
    w.step(10, "top_p_kept", f"ops.top_p_filter(p={p_top}) on the six logits keeps {', '.join(kept_names)}",
           np.isfinite(nucleus),
           note="tokens are added until the running total reaches p; the one that crosses it stays")

    # Chapter 11: loss, gradient, SGD and one Adam step.
    ce = I("ch11.cross_entropy_pizza")
    named = [ce["P_pizza"], ce["P_the"], ce["P_is"]]
    probs = _f32(named + [1 - sum(named)])  # the last entry stands for every other token
    loss = f64(kern.token_cross_entropy(np.log(probs), np.int32(0)))
    w.step(11, "loss", f"cross-entropy with P(pizza) = {ce['P_pizza']}: ops.token_cross_entropy", loss,
           C("ch11.cross_entropy_pizza")["loss"])
    bp = I("ch11.backprop_W_vocab_0_999")
    dlogit = f64(kern.cross_entropy_grad(np.log(_f32([bp["P_pizza"], 1 - bp["P_pizza"]])), np.int32(0)))[0]
    w.step(11, "grad", "dL/dW_vocab[0, 999] = (P - 1) * h0, by jax.grad", dlogit * bp["h0"],
           C("ch11.backprop_W_vocab_0_999")["grad"])
    sgd = I("ch11.sgd_update")
    w.step(11, "sgd", "plain gradient descent: W - lr * g", sgd["W"] - sgd["lr"] * sgd["grad"],
           C("ch11.sgd_update")["W_new"])
    ad = I("ch11.adam_step1")
    step = kern.adam_step(ad["lr"], ad["beta1"], ad["beta2"], ad["eps"])
    W_new, m1, v1 = (float(t) for t in step(*_f32([ad["W"], ad["g1"], ad["m0"], ad["v0"]])))
    w.step(11, "adam_m1", "optax.adam, step 1: first moment m1", m1, C("ch11.adam_step1")["m1"])
    w.step(11, "adam_v1", "second moment v1", v1, C("ch11.adam_step1")["v1"])
    w.step(11, "adam_W", "W after one Adam step (after bias correction the first step is lr * sign(g))", W_new,
           C("ch11.adam_step1")["W_new"])

    # Chapter 14: the learning-rate schedule.
    lr = I("ch14.lr_schedule")
    sched = kern.warmup_cosine(lr["peak"], lr["warmup_steps"], lr["total_steps"], lr["min_lr"])
    w.step(14, "lr_schedule", "optax.warmup_cosine_decay_schedule at steps " + ", ".join(f"{s:,}" for s in lr["steps"]),
           [float(sched(s)) for s in lr["steps"]], C("ch14.lr_schedule")["lr"], decimals=5,
           note="the course's table matches neither its formula nor this schedule; see the errata")


def _block_diagonal_check(data: dict) -> float:
    """Max difference between the course's per-slice heads and standard MHA with block-diagonal W."""
    ex = examples_by_id(data)
    x = np.asarray(ex["ch4.position_aware_matrix"]["course_outputs"]["X_pos"], np.float64)
    qkv = ex["ch5.qkv_head1"]["inputs"]
    W = {n: np.asarray(qkv[f"W_{n}1"], np.float64) for n in "QKV"}
    d_k = len(W["Q"])
    h = x.shape[1] // d_k
    # Head 2's weights are not printed; head 1's stand in for them in this check.
    block = {n: np.kron(np.eye(h), W[n]) for n in "QKV"}
    q, k, v = (kern.split_heads(_f32(x @ block[n])[None], h) for n in "QKV")
    standard = kern.f64(kern.attention(q, k, v))[0]  # [T, H, D]
    per_slice = []
    for j in range(h):
        xs = x[:, j * d_k:(j + 1) * d_k]
        per_slice.append(kern.f64(kern.attention(*(_as_heads(xs @ W[n]) for n in "QKV")))[0, :, 0, :])
    return float(np.abs(np.stack(per_slice, axis=1) - standard).max())


def _conventions(data: dict, p: _Printer) -> None:
    gap = _block_diagonal_check(data)
    p()
    p("== Where the course's conventions matter")
    p("  * Heads split the input, not just the output: head j projects only dims [3j, 3j+3) of X_pos with its")
    p("    own 3x3 matrices. That is ordinary multi-head attention whose 6x6 W_Q, W_K, W_V are block-diagonal")
    p(f"    (checked here with ops.split_heads + ops.attention: largest difference {gap:.1e}).")
    p("  * Post-LN blocks: LayerNorm(x + Dropout(Sublayer(x))) after attention and after the FFN; GPT-2 puts")
    p("    the norm first and adds a final LayerNorm. The Chapter 17 'final LayerNorm' belongs to the latter.")
    p("  * Untied output head: the course recommends W_vocab = E^T, but its worked logits need a separate W_vocab.")
    p("  * Embeddings are not multiplied by sqrt(d_model); the sinusoidal PE is added as is (rounded to 2 dp")
    p("    in the course's arithmetic).")
    p("  * The Chapter 5 attention example is bidirectional; the model itself is causal (Chapter 12).")
    p("  * Row vectors throughout: x @ W with W shaped (d_in, d_out); no biases on Q, K, V, O or the head.")


# ----------------------------------------------------------------------------- per-example and errata printing


def _print_example(r: ExampleResult, p: _Printer) -> None:
    verdict = {True: "agrees", False: "COURSE ERROR", None: "not checkable"}[r.agrees_with_course]
    lines = f"lines {r.lines[0]}-{r.lines[1]}" if len(r.lines) == 2 else ""
    p(f"  [{verdict}] {r.id} (Ch {r.chapter}, {lines}) {r.title}")
    if r.not_checkable:
        p(f"      not checkable: {r.not_checkable}")
    by_key: dict[str, list[Check]] = {}
    for c in r.checks:
        by_key.setdefault(c.key, []).append(c)
    for key, checks in by_key.items():
        if r.not_checkable and all(c.status == UNCHECKED for c in checks):
            continue
        course = r.course[key]
        status = _overall(checks)
        how = f"    ({r.notes[key]})" if key in r.notes else ""
        p(f"      {key}: ours {_render_checks(course, checks, 'ours')}{how}")
        p(f"      {' ' * len(key)}  course {_render_checks(course, checks, 'course')}    [{_STATUS_TEXT[status]}]")
        reasons = sorted({c.reason for c in checks if c.status == UNCHECKED and c.reason})
        for reason in reasons:
            p(f"      {' ' * len(key)}  ? = not checkable: {reason}")
    for line in r.info:
        p(f"      note: {line}")


def _print_errata(report: Report, p: _Printer, chapter: int | None = None) -> None:
    errata = report.errata
    where = "" if chapter is None else f" in chapter {chapter}"
    p()
    p(f"== Errata: {len(errata)} worked examples{where} where the course's printed numbers are wrong")
    for r in errata:
        lines = f", course.md lines {r.lines[0]}-{r.lines[1]}" if len(r.lines) == 2 else ""
        p(f"  {r.id} (Ch {r.chapter}{lines}) {r.title}")
        if r.why:
            p(f"      why: {r.why}")
        for c in r.errors:
            course, correct = c.show_course(), c.show_ours(keep_tiny=True, extra_digits=2)
            extra = "  (follows from the course's earlier numbers, so inherits the slip)" if c.status == CARRIED else ""
            p(f"      {c.path}: course {course}, correct {correct}{extra}")


# ----------------------------------------------------------------------------- entry point


def run(
    out: TextIO | None = sys.stdout,
    *,
    chapter: int | None = None,
    errata_only: bool = False,
    data: dict | None = None,
) -> Report:
    """Print the walkthrough, every worked example and the errata; return the :class:`Report`.

    Args:
      out: where to print (None prints nothing).
      chapter: only this chapter's walkthrough steps and examples (the errata stay complete only
        when no chapter is given).
      errata_only: print just the errata list (everything is still computed and returned).
      data: a worked-examples document shaped like :func:`load_examples`'s (default: the shipped one).
    Returns:
      the Report with every example's result, the walkthrough steps and key numbers.
    """
    data = load_examples() if data is None else data
    if chapter is not None:
        known = sorted({e["chapter"] for e in data["examples"]})
        if not any(e["chapter"] == chapter for e in data["examples"]):
            raise ValueError(f"no worked examples in chapter {chapter}; chapters with examples: {known}")
    report = Report()
    p = _Printer(out)
    quiet = _Printer(None)
    src = data.get("source", {})
    with jax.default_matmul_precision("highest"):
        if not errata_only:
            p('Transformers for Absolute Dummies (Rimom Costa, MIT licence): the worked example "I love pizza"')
            p(f"recomputed with tfd_jax.ops; course.md at commit {str(src.get('commit', ''))[:12]}.")
            p("Numbers are shown at the course's printed precision. 'agrees' means within one unit of the")
            p("last printed decimal; 'from the course's own rounded numbers' means it follows from values")
            p("the course rounded and carried forward.")
            p()
            p("== The walkthrough")
        walkthrough(data, report, quiet if errata_only else p, chapter)
        if chapter is None and not errata_only:
            _conventions(data, p)
        results = [check_example(e, data) for e in data["examples"]]
    report.examples = [r for r in results if chapter is None or r.chapter == chapter]
    if not errata_only:
        p()
        p(f"== Worked examples ({len(report.examples)})")
        current = None
        for r in report.examples:
            if r.chapter != current:
                current = r.chapter
                p(f"-- Chapter {r.chapter}: {CHAPTER_NAMES.get(r.chapter, '')}")
            _print_example(r, p)
    _print_errata(report, p, chapter)
    if not errata_only:
        p()
        p(
            f"== Summary: {len(report.examples)} worked examples, {len(report.reproduced)} reproduced, "
            f"{len(report.errata)} course errors, {len(report.not_checkable)} not checkable"
        )
        for r in report.not_checkable:
            p(f"  not checkable: {r.id}: {r.not_checkable}")
        if not report.verdicts_match_record:
            for r in report.examples:
                if r.agrees_with_course != r.recorded_agrees:
                    p(f"  WARNING: {r.id}: our verdict {r.agrees_with_course} differs from the recorded "
                      f"{r.recorded_agrees}")
    return report


__all__ = ["CHAPTER_NAMES", "run", "walkthrough"]
