"""One calculator per worked example of the course: recompute its printed outputs from its inputs.

Every calculator reads only the example's ``inputs`` (and, for two examples that continue an
earlier one, that example's inputs), so changing an input changes the result. Model operations go
through :mod:`tfd_jax.ops` (attention, masks, positions, LayerNorm, FFN, losses, sampling filters;
compiled via :mod:`tfd_jax.explain.kernels`) and the optimiser and schedule through optax; plain
arithmetic (matrix products of the printed numbers, parameter counts, costs) is numpy or Python.

A calculator returns :class:`Calc`: a :class:`~tfd_jax.explain.compare.Value` per printed output,
plus, for the course's errors, a short explanation in our words.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from tfd_jax.explain import kernels as kern
from tfd_jax.explain.compare import Value
from tfd_jax.explain.data import examples_by_id


@dataclass
class Calc:
    """Our side of one worked example."""

    values: dict[str, Value] = field(default_factory=dict)
    why: str = ""  # for a course error: what went wrong, in one line
    info: list[str] = field(default_factory=list)  # extra lines worth printing
    not_checkable: str = ""  # set when nothing the example prints can be recomputed


Calculator = Callable[[dict, dict, dict], Calc]
CALCULATORS: dict[str, Calculator] = {}


def calculator(example_id: str):
    """Register ``fn(inputs, course_outputs, data) -> Calc`` for the example ``example_id``."""

    def register(fn: Calculator) -> Calculator:
        CALCULATORS[example_id] = fn
        return fn

    return register


# ----------------------------------------------------------------------------- helpers


def _np(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _tolist(x) -> Any:
    return np.asarray(x, dtype=np.float64).tolist()


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _softmax(x) -> np.ndarray:
    return kern.f64(kern.softmax(_f32(x)))


def _neg_log(p: float) -> float:
    """``-ln p`` as the cross-entropy of a two-way choice (the right token, everything else)."""
    return float(kern.token_cross_entropy(np.log(_f32([p, 1.0 - p])), np.int32(0)))


def _count_suffix(text: str) -> float:
    """``"10k"`` -> 1e4, ``"1M"`` -> 1e6, ``"100"`` -> 100 (the number a key name ends with)."""
    m = re.search(r"(\d+(?:\.\d+)?)([kKmMbB]?)$", text)
    if not m:
        raise ValueError(f"no count at the end of {text!r}")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]


def _head(x) -> np.ndarray:
    """``[T, D]`` -> ``[B=1, T, H=1, D]`` for the attention ops."""
    return _f32(x)[None, :, None, :]


def compute(example: dict, data: dict) -> Calc:
    """Run the calculator for ``example``; a Calc saying why when there is none."""
    fn = CALCULATORS.get(example["id"])
    if fn is None:
        return Calc(not_checkable="no calculator for this example")
    return fn(example["inputs"], example["course_outputs"], data)


# ----------------------------------------------------------------------------- Chapters 1-3


@calculator("ch1.vocab_param_count")
def _ch1_vocab(inp, course, data):
    return Calc({"numbers": Value(inp["vocab"] * inp["d_model"], note="vocab x d_model weights")})


@calculator("ch2.bpe_counts_and_segmentation")
def _ch2_bpe(inp, course, data):
    joined = {"".join(split) for split in inp["splits"]}
    return Calc(
        {"vocab": Value(inp["base"] + inp["merges"], note="each merge adds one token")},
        info=[f"both segmentations join back to the same word: {len(joined) == 1} ({sorted(joined)[0]!r})"],
    )


@calculator("ch3.matmul_2x3_by_3x2")
def _ch3_matmul(inp, course, data):
    return Calc({"C": Value((_np(inp["A"]) @ _np(inp["B"])).tolist())})


@calculator("ch3.embedding_lookup_stack")
def _ch3_lookup(inp, course, data):
    vocab = data["data"]["vocabulary"]["vocab_size"]
    rows = {int(k.split()[0]): v for k, v in inp["table_rows"].items()}
    width = len(next(iter(rows.values())))
    table = np.zeros((vocab, width))
    table[list(rows)] = list(rows.values())
    X = table[inp["ids"]]
    return Calc({"X": Value(X.tolist(), note=f"rows of the {vocab} x {width} table, stacked")})


# ----------------------------------------------------------------------------- Chapter 4


@calculator("ch4.attempt1_add_integer_position")
def _ch4_attempt1(inp, course, data):
    emb = _np(list(inp["embeddings"].values()))
    pos = np.arange(len(emb), dtype=np.float64)[:, None]
    return Calc({"combined": Value(_tolist(emb + pos))})


@calculator("ch4.attempt1_lr_update_at_1000")
def _ch4_lr(inp, course, data):
    return Calc({"new_value": Value(inp["value"] - inp["lr"] * inp["gradient"])})


@calculator("ch4.attempt1_fp32_precision")
def _ch4_fp32(inp, course, data):
    stored = float(np.float32(inp["value"]))
    return Calc({"stored": Value(stored, note=f"float32 keeps {stored!r}")})


@calculator("ch4.attempt2_normalized_positions")
def _ch4_attempt2(inp, course, data):
    words = list(examples_by_id(data)["ch4.attempt1_add_integer_position"]["inputs"]["embeddings"].items())
    positions = [i / inp["sentence_11_words_divided_by"] for i in range(len(words))]
    emb = dict(words)
    names = [w for w, _ in words]
    out = {
        "positions": Value(positions),
        "homemade_combined": Value(_tolist(_np(emb["homemade"]) + positions[names.index("homemade")])),
        "friends_combined": Value(_tolist(_np(emb["friends"]) + positions[names.index("friends")])),
    }
    adjective = {}
    for key in course.get("adjective_example", {}):
        m = re.fullmatch(r"(\d+)word_(\w+)", key)
        sentence = inp["sentences"][m.group(1)].split()
        adjective[key] = sentence.index(m.group(2)) / len(sentence)
    # The course prints these positions to 2 dp (0.45); JSON keeps 0.5 without its trailing zero.
    out["adjective_example"] = Value(adjective, decimals=2, note="word index / sentence length")
    return Calc(
        out,
        why="position/length is misapplied in the 5- and 20-word examples "
        "(delicious is word 3 of 5: 2/5 = 0.4; in the 20-word sentence delicious/homemade are 0.50/0.55)",
    )


@calculator("ch4.attempt3_per_dimension_scales")
def _ch4_attempt3(inp, course, data):
    mult = _np(inp["multipliers"])
    enc = {k: _tolist(float(k) * mult) for k in course["encodings"]}
    out = {"encodings": Value(enc)}
    for key in course:
        if key.startswith("document_at_"):
            out[key] = Value(_tolist(_np(inp["document_embedding"]) + _count_suffix(key) * mult))
    return Calc(out)


@calculator("ch4.sine_table")
def _ch4_sin(inp, course, data):
    return Calc(
        {"sin": Value(np.sin(_np(inp["angles"])).tolist())},
        why="two entries of the sine table are misprinted (sin 8.5 = 0.80, sin 12.5 = -0.07)",
    )


@calculator("ch4.cosine_table")
def _ch4_cos(inp, course, data):
    return Calc(
        {"cos": Value(np.cos(_np(inp["angles"])).tolist())},
        why="three entries of the cosine table are misprinted (cos 6.5, cos 10.5, cos 11.5)",
    )


@calculator("ch4.frequency_speed_examples")
def _ch4_speed(inp, course, data):
    slow = [p / inp["slow_divisor"] for p in inp["positions"] if p]  # the course skips position 0
    printed_last_angle = course["slow_angles"][-1]
    return Calc(
        {
            "slow_angles": Value(slow, mixed=True, note="position / 464.159 (the course rounds the last to 0.2)"),
            "slow_sin_at_0.2": Value(
                math.sin(slow[-1]), carried=math.sin(printed_last_angle), note="sine of the rounded angle"
            ),
            "fast_sin": Value(_tolist(np.sin(_np(inp["fast_positions"])))),
        }
    )


@calculator("ch4.pe_divisors")
def _ch4_divisors(inp, course, data):
    d = inp["d_model"]
    exponents = [2 * i / d for i in inp["i"]]
    divisors = [inp["base"] ** e for e in exponents]
    return Calc(
        {
            "exponents": Value(exponents),
            "divisors": Value(divisors),
            "ratio_between_pairs": Value(divisors[1] / divisors[0]),
        }
    )


@calculator("ch4.pe_positions_0_1_2")
def _ch4_pe012(inp, course, data):
    pe = kern.f64(kern.sinusoidal_positions(max(inp["positions"]) + 1, inp["d_model"]))
    return Calc(
        {
            "4dp": Value({k: pe[int(k)].tolist() for k in course["4dp"]}),
            "2dp": Value({k: pe[int(k)].tolist() for k in course["2dp"]}, decimals=2),
        }
    )


@calculator("ch4.pe_table_0_to_9")
def _ch4_pe_table(inp, course, data):
    pe = kern.f64(kern.sinusoidal_positions(max(inp["positions"]) + 1, inp["d_model"]))
    return Calc(
        {
            "table": Value(pe.tolist()),
            "duplicate_lines": Value(None, unchecked="line numbers of the repeated table, not a value"),
        },
        why="column 2 prints the angle pos/21.544 instead of its sine at later positions (0.42 at position 9)",
    )


@calculator("ch4.position_aware_matrix")
def _ch4_xpos(inp, course, data):
    X = _np(inp["X"])
    pe_rounded = _np(inp["PE_rounded_2dp_as_used_by_course"])
    exact = kern.f64(kern.sinusoidal_positions(len(X), X.shape[1]))
    gap = np.abs((X + exact) - (X + pe_rounded)).max()
    return Calc(
        {"X_pos": Value(_tolist(X + pe_rounded), note="X + PE rounded to 2 dp, as the course carries it")},
        info=[f"with the exact PE instead, X_pos moves by at most {gap:.4f}"],
    )


@calculator("ch4.frozen_pe_after_training")
def _ch4_frozen(inp, course, data):
    return Calc({"combined": Value(_tolist(_np(inp["embedding"]) + _np(inp["PE2"])))})


@calculator("ch4.relative_position_rotation")
def _ch4_rotation(inp, course, data):
    worst = 0.0
    for p in inp["pos"]:
        for k in inp["k"]:
            rot = np.array([[math.cos(k), math.sin(k)], [-math.sin(k), math.cos(k)]])
            moved = rot @ np.array([math.sin(p), math.cos(p)])
            worst = max(worst, float(np.abs(moved - np.array([math.sin(p + k), math.cos(p + k)])).max()))
    return Calc({"identity_holds": Value(worst < 1e-9, note=f"largest error {worst:.1e}")})


# ----------------------------------------------------------------------------- Chapter 5


@calculator("ch5.overview_softmax")
def _ch5_overview(inp, course, data):
    return Calc(
        {"percent": Value(_tolist(100 * _softmax(inp["scores"])))},
        why="the percentages are not the softmax of the scores (22.7 / 29.7 / 47.6 %)",
    )


@calculator("ch5.dating_weighted_softmax")
def _ch5_dating1(inp, course, data):
    names = list(inp["scores"])
    pct = 100 * _softmax([inp["scores"][n] for n in names])
    return Calc(
        {"percent": Value(dict(zip(names, pct.tolist())))},
        why="scores this far apart give the top one almost all the weight; the shares are not a softmax",
    )


@calculator("ch5.dating_dot_softmax")
def _ch5_dating2(inp, course, data):
    return Calc(
        {"percent": Value(_tolist(100 * _softmax(list(inp["scores"].values()))))},
        why="softmax of 220/180/140 is essentially 100/0/0 %; the printed shares are not a softmax",
    )


@calculator("ch5.param_count_heads")
def _ch5_params(inp, course, data):
    d, h, dk = inp["d_model"], inp["h"], inp["d_k"]
    per_head = 3 * dk * dk
    return Calc(
        {
            "single_head_qkv": Value(3 * d * d),
            "per_head": Value(per_head),
            "two_heads": Value(h * per_head),
            "W_O": Value(d * d),
            "two_heads_total": Value(h * per_head + d * d),
        },
        info=[f"standard multi-head attention (every head sees all {d} inputs) has 4 x {d}^2 = {4 * d * d} weights"],
    )


@calculator("ch5.xavier_sigma_3x3")
def _ch5_xavier(inp, course, data):
    return Calc({"sigma": Value(math.sqrt(2 / (inp["d_in"] + inp["d_out"])))})


@calculator("ch5.qkv_head1")
def _ch5_qkv(inp, course, data):
    x = _np(inp["x_head1_rows"])
    out = {name: Value((x @ _np(inp[f"W_{name}1"])).tolist(), decimals=3) for name in "QKV"}
    return Calc(out, why="the third component of V for 'love' and 'pizza' uses wrong W_V entries (0.217, 0.277)")


def _parse_vectors(text: str) -> list[np.ndarray]:
    return [_np([float(t) for t in body.split(",")]) for body in re.findall(r"\[([^\]]*)\]", text)]


@calculator("ch5.dot_product_examples")
def _ch5_dots(inp, course, data):
    out = {}
    for key, text in inp.items():
        a, b = _parse_vectors(text)
        out[key] = Value(float(a @ b))
    return Calc(out)


@calculator("ch5.scores_I")
def _ch5_scores(inp, course, data):
    q, K = _np(inp["Q_I"]), _np(inp["K"])
    terms = K * q[None, :]
    printed_terms = _np(course["terms"])
    return Calc(
        {
            "terms": Value(terms.tolist(), note="q_i * k_i for each key"),
            "scores": Value((K @ q).tolist(), carried=printed_terms.sum(axis=1).tolist(), note="Q_I . K_j"),
        }
    )


@calculator("ch5.scaled_scores_I")
def _ch5_scaled(inp, course, data):
    return Calc({"scaled": Value(_tolist(_np(inp["scores"]) / inp["sqrt_dk"]))})


@calculator("ch5.cake_simple_division")
def _ch5_cake_div(inp, course, data):
    s = _np(inp["scores"])
    return Calc({"percent": Value((100 * s / s.sum()).tolist())})


def _exp_sum_share(scaled, course, exp_key="exp", sum_key="sum", share_key="percent", scale=100.0, mixed=False):
    """exp, their sum and the shares, each also carried from the course's printed previous step."""
    scaled = _np(scaled)
    e = np.exp(scaled)
    out = {}
    if exp_key in course:
        carried = None
        if "scaled" in course:
            carried = np.exp(_np(course["scaled"])).tolist()
        out[exp_key] = Value(e.tolist(), carried=carried, mixed=mixed)
    printed_e = _np(course[exp_key]) if exp_key in course else None
    if sum_key in course:
        out[sum_key] = Value(float(e.sum()), carried=None if printed_e is None else float(printed_e.sum()))
    if share_key in course:
        carried = None
        if printed_e is not None and sum_key in course:
            carried = (scale * printed_e / course[sum_key]).tolist()
        out[share_key] = Value((scale * _softmax(scaled)).tolist(), carried=carried)
    return out


@calculator("ch5.cake_softmax")
def _ch5_cake_softmax(inp, course, data):
    out = _exp_sum_share(inp["scores"], course, mixed=True)
    e = np.exp(_np(inp["scores"]))
    printed = course["exp"]
    out["ratio_alice_bob"] = Value(float(e[0] / e[1]), carried=printed[0] / printed[1])
    return Calc(out)


@calculator("ch5.exp_examples")
def _ch5_exp(inp, course, data):
    return Calc({"values": Value(np.exp(_np(inp["x"])).tolist(), mixed=True)})


@calculator("ch5.softmax_I")
def _ch5_softmax_I(inp, course, data):
    return Calc(_exp_sum_share(inp["scaled_scores"], course, share_key="weights", scale=1.0))


@calculator("ch5.weighted_sum_I")
def _ch5_weighted(inp, course, data):
    w, V = _np(inp["weights"]), _np(inp["V_as_printed"])
    return Calc(
        {
            "terms": Value((w[:, None] * V).tolist(), note="w_j * V_j"),
            "output": Value((w @ V).tolist(), carried=_np(course["terms"]).sum(axis=0).tolist()),
        },
        info=["uses V as printed; with V corrected (Chapter 5 errata) the third component becomes 0.2255"],
    )


@calculator("ch5.output_projection_I")
def _ch5_wo(inp, course, data):
    concat = _np(inp["head1"]).tolist() + _np(inp["head2_given_not_computed"]).tolist()
    projected = _np(concat) @ _np(inp["W_O"])
    return Calc(
        {"concat": Value(concat), "attention_output": Value(projected.tolist(), note="concat @ W_O")},
        why="the printed attention output is an invented 'simplified' vector, not concat @ W_O",
    )


# ----------------------------------------------------------------------------- Chapters 6-9


@calculator("ch6.dropout")
def _ch6_dropout(inp, course, data):
    x, p = _np(inp["x"]), inp["p"]
    draws = {k: _np(v) for k, v in inp.items() if k.startswith("random_")}
    out = {}
    for key in course:
        if key.startswith("mask_"):
            out[key] = Value((draws[f"random_{key[5:]}"] > p).astype(float).tolist())
    last = draws[sorted(draws)[-1]]  # the draw that drops a unit
    keep = last > p
    out["masked"] = Value(np.where(keep, x, 0.0).tolist(), note="keep where the draw > p")
    # Inverted dropout, as ops.dropout does it: survivors scaled by 1 / (1 - p).
    out["scaled"] = Value(np.where(keep, x / (1.0 - p), 0.0).tolist(), note="survivors / (1 - p)")
    return Calc(out)


@calculator("ch7.ffn_hidden_first6")
def _ch7_hidden(inp, course, data):
    hidden = _np(inp["x"]) @ _np(inp["W1_first6_columns_6x6"]) + _np(inp["b1_first6"])
    return Calc(
        {
            "hidden_first10": Value(
                hidden.tolist(), unchecked="needs W1 columns and b1 entries the course does not print"
            )
        },
        why="hidden units 3-6 do not follow from the printed W1 columns and b1 (0.525, 0.041, 0.2905, -0.078)",
    )


@calculator("ch7.relu")
def _ch7_relu(inp, course, data):
    return Calc(
        {
            "relu": Value(kern.f64(kern.relu(_f32(inp["hidden"]))).tolist()),
            "scalars": Value(kern.f64(kern.relu(_f32(inp["scalars"]))).tolist()),
        }
    )


@calculator("ch7.gpt3_param_split")
def _ch7_gpt3(inp, course, data):
    d, L, f = inp["d_model"], inp["layers"], inp["d_ff"]
    return Calc(
        {
            "attention_B": Value(4 * d * d * L / 1e9, note="W_Q, W_K, W_V, W_O: 4 d^2 per layer"),
            "ffn_B": Value(2 * d * f * L / 1e9, note="W1 and W2: 2 d d_ff per layer"),
            "d_ff": Value(4 * d),
        },
        why="the FFN holds 2 x 12288 x 49152 x 96 = 116.0B weights, not 117B",
    )


@calculator("ch8.residual_add")
def _ch8_residual(inp, course, data):
    return Calc({"sum": Value(_tolist(_np(inp["sublayer_output"]) + _np(inp["input"])))})


@calculator("ch8.test_score_standardization")
def _ch8_zscore(inp, course, data):
    A, B = _np(inp["class_A"]), _np(inp["class_B"])
    distance = A[0] - A.mean()
    std = A.std()  # population std, as LayerNorm uses
    return Calc(
        {
            "mean_A": Value(A.mean()),
            "mean_B": Value(B.mean()),
            "distance": Value(distance),
            "standardized": Value(distance / std, carried=course["distance"] / std),
        },
        info=[f"with the sample standard deviation instead: {distance / A.std(ddof=1):.2f}"],
        why="the top score is (95 - 91.67) / 2.87 = 1.16 standard deviations above the mean, not 0.8",
    )


@calculator("ch8.hadamard")
def _ch8_hadamard(inp, course, data):
    return Calc({"out": Value(_tolist(_np(inp["a"]) * _np(inp["b"])))})


@calculator("ch8.layernorm")
def _ch8_layernorm(inp, course, data):
    x = _np(inp["x"])
    n, eps = len(x), inp["eps"]
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    ln = kern.f64(kern.layer_norm(_f32(x), _f32(inp["gamma"]), _f32(inp["beta"]), eps))
    c = course
    return Calc(
        {
            "sum": Value(x.sum()),
            "mean": Value(mean, carried=c["sum"] / n),
            "sq_diffs": Value(((x - mean) ** 2).tolist(), carried=((x - c["mean"]) ** 2).tolist()),
            "sq_sum": Value(((x - mean) ** 2).sum(), carried=sum(c["sq_diffs"])),
            "variance": Value(var, carried=c["sq_sum"] / n),
            "std": Value(math.sqrt(var + eps), carried=math.sqrt(c["variance"] + eps)),
            "normalized": Value(ln.tolist(), carried=((x - c["mean"]) / c["std"]).tolist(), note="ops.layer_norm"),
        }
    )


@calculator("ch9.block1_output_I")
def _ch9_block1(inp, course, data):
    ch8 = examples_by_id(data)["ch8.layernorm"]["inputs"]
    ln = kern.f64(kern.layer_norm(_f32(ch8["x"]), None, None, ch8["eps"]))
    return Calc(
        {"after_block1": Value(ln.tolist(), carried=inp["ch8_layernorm_output"], note="LN(FFN(a) + a) of Chapter 8")}
    )


# ----------------------------------------------------------------------------- Chapter 10


@calculator("ch10.weight_tying_savings")
def _ch10_tying(inp, course, data):
    return Calc(
        {
            "tiny": Value(inp["vocab"] * inp["d_model_tiny"]),
            "gpt3_million": Value(inp["vocab"] * inp["d_model_gpt3"] / 1e6),
        }
    )


@calculator("ch10.logits_softmax")
def _ch10_logits(inp, course, data):
    logits = _np(list(inp["logits"].values()))
    e = np.exp(logits)
    total = inp["assumed_sum_over_50000"]
    true6 = _softmax(logits)
    return Calc(
        {
            "exp": Value(e.tolist()),
            "prob": Value((e / total).tolist(), carried=(_np(course["exp"]) / total).tolist(), note="exp / 500"),
        },
        info=[
            "the course divides by an assumed total of "
            f"{total} over the whole vocabulary; over these six tokens alone softmax gives "
            + ", ".join(f"{k} {p:.4f}" for k, p in zip(inp["logits"], true6))
        ],
    )


@calculator("ch10.logits_vs_tied_embeddings")
def _ch10_tied(inp, course, data):
    h = _np(inp["h"])
    rows = {k.split(maxsplit=1)[1]: _np(v) for k, v in inp["E_rows"].items()}
    return Calc(
        {"logits": Value({w: float(h @ rows[w]) for w in course["logits"]}, note="h . E[id] (tied head)")},
        why="the printed logits are not h . E[id]: the example's output head is untied, although tying is recommended",
    )


def _temperature(inp, course):
    scaled = kern.f64(kern.apply_temperature(_f32(inp["logits"]), inp["T"]))
    exact = _np(inp["logits"]) / inp["T"]
    out = {"scaled": Value(scaled.tolist(), note="ops.apply_temperature")}
    out.update(_exp_sum_share(exact, course))
    return out


@calculator("ch10.temperature_0_5")
def _ch10_t05(inp, course, data):
    return Calc(
        _temperature(inp, course),
        why="e^6.4 is 601.8, not 665; the sum (12,757) and shares (94.76 / 4.72 / 0.52 %) change with it",
    )


@calculator("ch10.temperature_1_5")
def _ch10_t15(inp, course, data):
    return Calc(_temperature(inp, course))


@calculator("ch10.top_k")
def _ch10_topk(inp, course, data):
    pct = _np(list(inp["top_probs_percent"].values()))
    kept = kern.top_k_filter(np.log(_f32(pct)), inp["k"])
    renorm = 100 * _softmax(kept)
    return Calc(
        {
            "sum_percent": Value(float(pct[np.isfinite(kern.f64(kept))].sum())),
            "renormalised_percent": Value(renorm.tolist(), note="softmax of the top-k filtered log-probabilities"),
        }
    )


@calculator("ch10.top_p")
def _ch10_topp(inp, course, data):
    head = _np(inp["sorted_percent_head"])
    before, amazing = inp["tail"]["beautiful"][1], inp["tail"]["amazing"]
    target = 100 * inp["p"]
    crosses = before < target <= before + amazing
    return Calc(
        {
            "cumulative": Value(np.cumsum(head).tolist()),
            "amazing_cumulative": Value(before + amazing),
            "kept_tokens": Value(None, unchecked="the ~40 tokens between the head and the tail are not printed"),
        },
        info=[f"'amazing' is the token that crosses p = {inp['p']} and is kept: {crosses}"],
    )


# ----------------------------------------------------------------------------- Chapter 11


@calculator("ch11.neg_log_table")
def _ch11_neglog(inp, course, data):
    ps = inp["p"]
    return Calc(
        {
            "loss": Value([_neg_log(p) for p in ps[: len(course["loss"])]]),
            "rounded_row": Value([_neg_log(p) for p in sorted(ps, reverse=True)], mixed=True),
        }
    )


@calculator("ch11.cross_entropy_pizza")
def _ch11_ce(inp, course, data):
    named = [inp["P_pizza"], inp["P_the"], inp["P_is"]]
    probs = _f32(named + [1.0 - sum(named)])  # last entry: every other token
    loss = float(kern.token_cross_entropy(np.log(probs), np.int32(0)))
    return Calc(
        {
            "log": Value(math.log(inp["P_pizza"])),
            "loss": Value(loss, note="ops.token_cross_entropy"),
            "loss_alt": Value(_neg_log(inp["P_correct_alt"])),
        }
    )


@calculator("ch11.batch_loss")
def _ch11_batch(inp, course, data):
    known = inp["known_losses"]
    return Calc(
        not_checkable=f"only {len(known)} of the {inp['batch_size']} per-example losses are printed",
        info=[f"mean of the {len(known)} printed losses: {np.mean(known):.4f}"],
    )


@calculator("ch11.chain_rule_factory")
def _ch11_chain(inp, course, data):
    widgets = inp["dparts"] * inp["widgets_per_part"]
    return Calc({"widgets": Value(widgets), "boxes": Value(widgets * inp["boxes_per_widget"])})


@calculator("ch11.backprop_W_vocab_0_999")
def _ch11_backprop(inp, course, data):
    P, h0 = inp["P_pizza"], inp["h0"]
    logits = np.log(_f32([P, 1.0 - P]))
    dlogit = kern.f64(kern.cross_entropy_grad(logits, np.int32(0)))[0]  # = P - 1
    c = course
    return Calc(
        {
            "dL_dP": Value(-1.0 / P),
            "dP_dlogit": Value(P * (1.0 - P)),
            "grad": Value(
                float(dlogit) * h0, carried=c["dL_dP"] * c["dP_dlogit"] * h0, note="(P - 1) * h0 via jax.grad"
            ),
        }
    )


@calculator("ch11.sgd_update")
def _ch11_sgd(inp, course, data):
    step = -inp["lr"] * inp["grad"]
    printed_step = course["W_new"] - inp["W"]
    out = {"W_new": Value(inp["W"] + step)}
    for key in course:
        if key.startswith("after_"):
            n = _count_suffix(key)
            out[key] = Value(n * step, carried=n * printed_step, note=f"change after {n:,.0f} equal steps")
    return Calc(out)


@calculator("ch11.adam_step1")
def _ch11_adam(inp, course, data):
    b1, b2, eps, lr = inp["beta1"], inp["beta2"], inp["eps"], inp["lr"]
    step = kern.adam_step(lr, b1, b2, eps)
    W_new, m1, v1 = (float(t) for t in step(*_f32([inp["W"], inp["g1"], inp["m0"], inp["v0"]])))
    c = course
    return Calc(
        {
            "m1": Value(m1, note="optax.adam first moment"),
            "v1": Value(v1, note="second moment"),
            "m_hat": Value(m1 / (1 - b1), carried=c["m1"] / (1 - b1)),
            "v_hat": Value(v1 / (1 - b2), carried=c["v1"] / (1 - b2)),
            "W_new": Value(
                W_new,
                carried=inp["W"] - lr * c["m_hat"] / (math.sqrt(c["v_hat"]) + eps),
            ),
        }
    )


# ----------------------------------------------------------------------------- Chapters 12-17


def _sentence_tokens(data) -> list[str]:
    return data["data"]["vocabulary"]["sentence"]["text"].split()


@calculator("ch12.causal_mask_softmax")
def _ch12_causal(inp, course, data):
    scores = _np(inp["scores"])
    mask = np.asarray(kern.causal_mask(scores.shape[0]))
    masked = np.where(mask, scores, -np.inf)
    row = _sentence_tokens(data).index("love")
    e = np.exp(masked[row])
    printed_e = _np(course["love_row_exp"])
    return Calc(
        {
            "masked": Value(masked.tolist(), note="-inf above the diagonal (ops.causal_mask)"),
            "love_row_exp": Value(e.tolist()),
            "sum": Value(float(e.sum()), carried=float(printed_e.sum())),
            "love_row_weights": Value(
                _softmax(masked[row]).tolist(), carried=(printed_e / course["sum"]).tolist()
            ),
        }
    )


@calculator("ch12.mask_scores_vs_ch5")
def _ch12_vs_ch5(inp, course, data):
    Q, K = _np(inp["Q_printed"]), _np(inp["K_printed"])
    w = kern.f64(kern.attention_weights(_head(Q), _head(K), kern.causal_mask(len(Q))))[0, 0]
    return Calc(
        {"scores": Value((Q @ K.T / inp["sqrt_dk"]).tolist(), note="Q K^T / sqrt(3) from Chapter 5")},
        info=["causal weights from the Chapter 5 Q and K: " + str(np.round(_np(w), 4).tolist())],
        why="rows 'love' and 'pizza' of the masked score matrix are not the Chapter 5 head-1 scores",
    )


@calculator("ch13.kv_cache_op_counts")
def _ch13_ops(inp, course, data):
    out = {}
    for n in inp["n"]:
        full = n * (n + 1) // 2  # step t re-processes all t tokens
        cached = n  # one new token per step
        if f"no_cache_{n}" in course:
            out[f"no_cache_{n}"] = Value(full)
        c = course.get(f"cache_{n}")
        if c is not None:
            out[f"cache_{n}"] = Value([cached] * len(c) if isinstance(c, list) else cached)
        if f"speedup_{n}" in course:
            printed_cached = c[0] if isinstance(c, list) else c
            out[f"speedup_{n}"] = Value(full / cached, carried=course[f"no_cache_{n}"] / printed_cached)
    return Calc(out)


@calculator("ch13.kv_cache_memory")
def _ch13_memory(inp, course, data):
    per_token = 2 * inp["layers"] * inp["heads"] * inp["d_k"]
    bytes_per_token = per_token * inp["bytes"]
    printed_mb = course["MB_per_token"]
    ctx = inp["context"]
    table = {k: int(k) * bytes_per_token for k in course["table"]}
    return Calc(
        {
            "numbers_per_token": Value(per_token, note="K and V, every layer and head"),
            "MB_per_token": Value(bytes_per_token / 1e6),
            f"GB_{ctx}": Value(ctx * bytes_per_token / 1e9, carried=ctx * printed_mb / 1e3),
            "table": Value(table, carried={k: int(k) * printed_mb * 1e6 for k in course["table"]}),
        }
    )


@calculator("ch14.head_dim_gpt3")
def _ch14_dk(inp, course, data):
    return Calc({"d_k": Value(inp["d_model"] / inp["h"])})


@calculator("ch14.lr_schedule")
def _ch14_lr(inp, course, data):
    schedule = kern.warmup_cosine(inp["peak"], inp["warmup_steps"], inp["total_steps"], inp["min_lr"])
    steps = inp["steps"]
    as_written = [inp["peak"] * 0.5 * (1 + math.cos(math.pi * t / inp["total_steps"])) for t in steps]
    return Calc(
        {
            "lr": Value(
                [float(schedule(t)) for t in steps],
                decimals=5,
                note="optax.warmup_cosine_decay_schedule: linear warmup, cosine down to the floor",
            )
        },
        info=["the printed formula alone (no warmup offset, no floor) gives "
              + ", ".join(f"{v:.2e}" for v in as_written)],
        why="the table fits neither the printed formula nor warmup + cosine decay to 6e-5 "
        "(5.64e-4 at 20k, 3.48e-4 at 50k)",
    )


@calculator("ch15.gradient_accumulation")
def _ch15_accum(inp, course, data):
    g = inp["micro_grads"]
    return Calc(
        {
            "sum": Value(sum(g)),
            "mean": Value(sum(g) / inp["accum_steps"]),
            "effective_batch": Value(inp["micro_batch"] * inp["accum_steps"]),
        }
    )


def _fp16(x: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float16(x))


@calculator("ch15.loss_scaling_fp16")
def _ch15_fp16(inp, course, data):
    scale = inp["scale"]
    f16, f32 = np.finfo(np.float16), np.finfo(np.float32)
    return Calc(
        {
            "scaled_loss": Value(inp["loss"] * scale),
            "scaled_grad": Value(inp["grad"] * scale),
            "fp16_no_scaling": Value(
                {k: _fp16(float(k)) for k in course["fp16_no_scaling"]}, stored=True, note="what float16 stores"
            ),
            "scaled_values": Value(
                {k: _fp16(float(k) * scale) for k in course["scaled_values"]},
                stored=True,
                note="float16(value x scale)",
            ),
            "fp16_range": Value({"max": float(f16.max), "min_normal": float(f16.tiny)}),
            "fp32_range": Value({"max": float(f32.max), "min_subnormal": float(f32.smallest_subnormal)}),
        },
        info=[f"float32's smallest subnormal is {float(f32.smallest_subnormal):.1e} (recorded as 0.0 in the data)"],
        why="float16 keeps 1.234e-5 as a subnormal (not 0), stores 1234.567 as 1235, "
        "and 1,264,197 overflows (max 65,504)",
    )


@calculator("ch15.gradient_checkpointing")
def _ch15_ckpt(inp, course, data):
    L, mb, k = inp["layers"], inp["MB_per_layer"], inp["checkpoints"]
    return Calc(
        {
            "no_ckpt_GB": Value(L * mb / 1e3),
            "ckpt_GB": Value(k * mb / 1e3),
            "memory_reduction": Value(L / k, note="layers / checkpoints"),
            "compute": Value(None, unchecked="depends on the cost of a forward pass relative to a backward pass"),
        },
        why=f"keeping {k} of {L} layers' activations saves {L // k}x memory, not {L}x",
    )


@calculator("ch15.xavier_6x24")
def _ch15_xavier(inp, course, data):
    var = 2 / (inp["d_in"] + inp["d_out"])
    return Calc({"var": Value(var), "sigma": Value(math.sqrt(var))})


@calculator("ch16.loss_diff")
def _ch16_diff(inp, course, data):
    return Calc({"diff": Value(inp["l1"] - inp["l2"])})


@calculator("ch17.embedding_plus_pe")
def _ch17_xpos(inp, course, data):
    emb, pe = _np(inp["embeddings"]), _np(inp["PE_2dp"])
    exact = kern.f64(kern.sinusoidal_positions(*emb.shape))
    same = bool(np.allclose(np.round(exact, 2), pe))
    return Calc(
        {"X_pos": Value((emb + pe).tolist())},
        info=[f"the PE rows used are ops.sinusoidal_positions rounded to 2 dp: {same}"],
    )


@calculator("ch17.final_layernorm")
def _ch17_final_ln(inp, course, data):
    ln = kern.f64(kern.layer_norm(_f32(inp["block3_pizza"]), None, None))
    mean = float(np.mean(course["final_ln"]))
    return Calc(
        {"final_ln": Value(ln.tolist(), note="ops.layer_norm with gamma 1, beta 0")},
        why=f"the printed output is not normalised (its mean is {mean:.2f}); a final LayerNorm also "
        "does not belong in a post-LN model",
    )


# ----------------------------------------------------------------------------- Final chapter


def course_param_count(cfg: dict, tied: bool = True) -> int:
    """Weights of the course's model: embedding, per-layer attention (block-diagonal heads), FFN, 2 LNs.

    The course's heads each project a ``d_model / h`` slice with square matrices; with an untied
    head another ``d_model x vocab`` matrix is added.
    """
    d, h, L, V, f = cfg["d_model"], cfg["heads"], cfg["layers"], cfg["vocab"], cfg["d_ff"]
    dk = d // h
    attention = h * 3 * dk * dk + d * d
    ffn = d * f + f + f * d + d
    norms = 2 * 2 * d
    total = V * d + L * (attention + ffn + norms)
    return total if tied else total + d * V


@calculator("final.scale_table")
def _final_scale(inp, course, data):
    tut, big = inp["tutorial"], inp["gpt3"]
    keys = ["d_model", "heads", "layers", "d_ff"]  # the rows the course gives a ratio for
    params = course_param_count(tut, tied=True)
    return Calc(
        {
            "ratios": Value([big[k] / tut[k] for k in keys]),
            "tutorial_params": Value(params, note="tied head, no final LayerNorm"),
            "param_ratio": Value(big["params"] / params, carried=big["params"] / course["tutorial_params"]),
        },
        info=[f"with an untied output head: {course_param_count(tut, tied=False):,} weights"],
        why="~5,000 leaves out the 50,000 x 6 embedding: the model has about 301k weights tied (601k untied)",
    )


@calculator("final.complexity")
def _final_complexity(inp, course, data):
    (n0, n1), (d0, d1), (f0, f1) = inp["n"], inp["d"], inp["d_ff"]
    return Calc(
        {
            "attn_tiny": Value(n0 * n0 * d0, note="n^2 d"),
            "attn_gpt3_billion": Value(n1 * n1 * d1 / 1e9),
            "ffn_tiny": Value(n0 * d0 * f0, note="n d d_ff"),
            "ffn_gpt3_trillion": Value(n1 * d1 * f1 / 1e12),
        }
    )


__all__ = ["CALCULATORS", "Calc", "compute", "course_param_count"]
