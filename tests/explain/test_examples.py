"""Every worked example of the course, recomputed by tfd_jax.explain (all chapters)."""
import copy
import math

import numpy as np
import pytest

from tfd_jax.explain import CARRIED, DIFFERS, UNCHECKED, check_example, load_examples, run
from tfd_jax.explain.compare import compare, decimals_of, parse_printed, Value
from tfd_jax.explain.examples import CALCULATORS, compute

DATA = load_examples()
EXAMPLES = DATA["examples"]
AGREEING = [e["id"] for e in EXAMPLES if e["agrees"] is True]
WRONG = [e["id"] for e in EXAMPLES if e["agrees"] is False]
UNKNOWN = [e["id"] for e in EXAMPLES if e["agrees"] is None]


@pytest.fixture(scope="module")
def report():
    return run(None)


def test_shipped_data_is_complete():
    assert len(EXAMPLES) == DATA["summary"]["n_examples"] == 71
    assert sorted(WRONG) == sorted(DATA["summary"]["disagreeing_ids"])
    assert set(CALCULATORS) == {e["id"] for e in EXAMPLES}
    assert "Rimom Costa" in __import__("tfd_jax.explain", fromlist=["x"]).__doc__


def test_load_examples_returns_a_fresh_copy():
    a = load_examples()
    a["examples"].clear()
    assert len(load_examples()["examples"]) == 71


def test_every_verdict_matches_the_record(report):
    assert len(report.examples) == 71
    assert {e.id: e.agrees_with_course for e in report.examples} == {e["id"]: e["agrees"] for e in EXAMPLES}
    assert report.verdicts_match_record
    assert (len(report.reproduced), len(report.errata), len(report.not_checkable)) == (50, 20, 1)


@pytest.mark.parametrize("example_id", AGREEING)
def test_agreeing_examples_are_reproduced(report, example_id):
    r = report.example(example_id)
    assert r.agrees_with_course is True
    judged = [c for c in r.checks if c.status != UNCHECKED]
    assert judged, "nothing was compared"
    for c in judged:
        assert c.status != DIFFERS, c
        printed = parse_printed(c.course)
        if printed is None:  # booleans
            assert c.ours == c.course
            continue
        tol = printed.unit * 10.0 ** -c.decimals * (1 + 1e-9) + 1e-12 * max(1, abs(printed.value))
        ours = c.ours if c.status != CARRIED else c.carried
        assert abs(ours - printed.value) <= tol or (math.isinf(ours) and ours == printed.value), c


def _number(x):
    if isinstance(x, str):
        if "inf" in x.lower():
            return math.inf
        return parse_printed(x).value
    return float(x)


@pytest.mark.parametrize("example_id", WRONG)
def test_course_errors_are_listed_with_the_correct_value(report, example_id):
    r = report.example(example_id)
    assert r.agrees_with_course is False
    assert r in report.errata and r.errors and r.why
    recorded = next(e for e in EXAMPLES if e["id"] == example_id)
    for m in recorded["mismatches"]:
        course, correct = _number(m["course"]), _number(m["recomputed"])
        candidates = [
            c for c in r.errors if parse_printed(c.course) is not None and parse_printed(c.course).value == course
        ]
        assert candidates, f"no flagged entry printed as {m['course']}"
        if math.isinf(correct):
            assert any(math.isinf(c.ours) for c in candidates)
        else:
            assert any(np.isclose(c.ours, correct, rtol=2e-3, atol=1e-6) for c in candidates), (m, candidates)


def test_not_checkable_example_says_why(report):
    assert UNKNOWN == ["ch11.batch_loss"]
    r = report.example("ch11.batch_loss")
    assert r.agrees_with_course is None
    assert "5 of the 32" in r.not_checkable


def test_unchecked_entries_carry_a_reason(report):
    unchecked = [(r.id, c) for r in report.examples for c in r.checks if c.status == UNCHECKED]
    assert {i for i, _ in unchecked} >= {"ch7.ffn_hidden_first6", "ch10.top_p", "ch15.gradient_checkpointing"}
    assert all(c.reason for _, c in unchecked)


def test_errors_that_only_follow_from_an_earlier_slip_are_marked(report):
    t05 = report.example("ch10.temperature_0_5")
    status = {c.path: c.status for c in t05.checks}
    assert status["exp[1]"] == DIFFERS  # e^6.4 is not 665
    assert status["sum"] == CARRIED and status["percent[0]"] == CARRIED


# ----------------------------------------------------------------------------- honesty: inputs drive outputs


def _perturb(x):
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        return 2 * x + 1
    if isinstance(x, float):
        return x * 0.9 + 0.01
    if isinstance(x, list):
        return [_perturb(v) for v in x]
    if isinstance(x, dict):
        return {k: _perturb(v) for k, v in x.items()}
    return x


def _our_side(example, data):
    calc = compute(example, data)
    out = []
    for key in sorted(calc.values):
        v = calc.values[key]
        out.append((key, repr(v.ours), repr(v.carried)))
    return out


# Inputs that cannot move the result, and why.
_IMMUNE = {
    "ch4.relative_position_rotation": "an identity: it holds for every input",
    "ch5.dot_product_examples": "inputs are strings (edited in the next test)",
    "ch11.batch_loss": "not checkable",
}


@pytest.mark.parametrize("example_id", [e["id"] for e in EXAMPLES if e["id"] not in _IMMUNE])
def test_changing_the_inputs_changes_our_numbers(example_id):
    data = copy.deepcopy(DATA)
    ex = next(e for e in data["examples"] if e["id"] == example_id)
    before = _our_side(ex, data)
    ex["inputs"] = _perturb(ex["inputs"])
    assert _our_side(ex, data) != before


def test_a_perturbed_input_flows_through_run():
    data = copy.deepcopy(DATA)
    ex = next(e for e in data["examples"] if e["id"] == "ch11.cross_entropy_pizza")
    ex["inputs"]["P_pizza"] = 0.5
    r = run(None, data=data).example("ch11.cross_entropy_pizza")
    assert r.ours["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert r.agrees_with_course is False  # the course's 4.423 no longer follows

    data = copy.deepcopy(DATA)
    ex = next(e for e in data["examples"] if e["id"] == "ch5.qkv_head1")
    ex["inputs"]["W_V1"][2][2] = -0.5  # makes the course's V wrong in another place
    r = check_example(ex, data)
    V = np.asarray(r.ours["V"])
    x = np.asarray(ex["inputs"]["x_head1_rows"])
    np.testing.assert_allclose(V, x @ np.asarray(ex["inputs"]["W_V1"]), atol=1e-12)


def test_dot_products_are_parsed_from_the_printed_vectors():
    data = copy.deepcopy(DATA)
    ex = next(e for e in data["examples"] if e["id"] == "ch5.dot_product_examples")
    ex["inputs"]["[2,3,1].[4,1,2]"] = "[2,3,1].[4,1,5]"
    r = check_example(ex, data)
    assert r.ours["[2,3,1].[4,1,2]"] == 16.0  # 8 + 3 + 5
    assert r.agrees_with_course is False


# ----------------------------------------------------------------------------- the agreement rule


def test_printed_precision():
    assert decimals_of(0.2) == 1 and decimals_of(0.0775) == 4 and decimals_of(4.5e-05) == 6
    assert decimals_of(12820) == 0 and decimals_of(5000) == -3 and decimals_of(500000) == -5
    p = parse_printed("614 million")
    assert (p.value, p.decimals, p.unit) == (614e6, 0, 1e6)
    assert parse_printed("~21x").value == 21 and parse_printed("9.4 GB").value == pytest.approx(9.4e9)
    assert parse_printed("-inf").value == -math.inf
    assert parse_printed("a word") is None


def test_a_vector_shares_its_finest_precision_unless_mixed():
    # 0.2 printed beside 0.636 was 0.200: 0.277 is then wrong, not within 0.1.
    assert compare("v", [0.636, 0.2], Value([0.636, 0.277]))[1].status == DIFFERS
    assert compare("v", [0.636, 0.2], Value([0.636, 0.277], mixed=True))[1].status != DIFFERS


def test_carried_values_rescue_rounding_but_not_errors():
    checks = compare("s", -0.0426, Value(-0.042727, carried=-0.0426))
    assert checks[0].status == CARRIED
    checks = compare("s", 665, Value(601.8, carried=601.8))
    assert checks[0].status == DIFFERS


def test_stored_zero_must_match_exactly():
    assert compare("f", 0.0, Value(1.2e-5, stored=True))[0].status == DIFFERS
    assert compare("f", 0.0, Value(1.2e-5))[0].status != DIFFERS
