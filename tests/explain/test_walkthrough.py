"""The "I love pizza" walkthrough against float64 references (Chapters 3-14)."""
import io

import numpy as np
import pytest

from tfd_jax.explain import AGREES, CARRIED, DIFFERS, load_examples, run
from tfd_jax.explain.walkthrough import _block_diagonal_check

REF = load_examples()["data"]["derived_reference_head1_full_attention"]


@pytest.fixture(scope="module")
def report():
    return run(None)


@pytest.mark.parametrize(
    "name, ref",
    [
        ("Q", "Q"),
        ("K", "K"),
        ("V", "V"),
        ("scaled_scores", "scaled_scores"),
        ("weights_bidirectional", "bidirectional_weights"),
        ("output_bidirectional", "bidirectional_output"),
        ("weights_causal", "causal_weights"),
        ("output_causal", "causal_output"),
    ],
)
def test_head1_attention_matches_the_float64_reference(report, name, ref):
    np.testing.assert_allclose(np.asarray(report.walkthrough[name]), np.asarray(REF[ref]), atol=1e-5)


def test_causal_first_row_is_its_own_value(report):
    np.testing.assert_allclose(report.walkthrough["output_causal"][0], report.walkthrough["V"][0], atol=1e-6)


def test_step_statuses(report):
    status = {s.name: s.status for s in report.steps}
    for name in ("ids", "X", "PE", "X_pos", "Q", "K", "weights_I", "dropout_scaled", "residual", "layer_norm",
                 "probs_assumed_sum", "top_k", "loss", "grad", "sgd", "adam_m1", "adam_v1", "adam_W"):
        assert status[name] == AGREES, name
    assert status["scores_I"] == CARRIED
    for name in ("V", "output_I", "attention_output_I", "ffn_hidden", "lr_schedule"):
        assert status[name] == DIFFERS, name


def test_key_numbers(report):
    w = report.walkthrough
    assert w["loss"] == pytest.approx(4.422849, abs=1e-5)
    assert w["adam_W"] == pytest.approx(0.5001, abs=1e-7)
    assert w["grad"] == pytest.approx(-0.70148, abs=1e-5)
    np.testing.assert_allclose(w["layer_norm"], [0.582834, -1.651363, 1.185095, 0.213706, -1.010245, 0.679973],
                               atol=1e-5)
    np.testing.assert_allclose(w["ffn_hidden"], [-0.0045, -0.1675, 0.525, 0.041, 0.2905, -0.078], atol=1e-6)
    np.testing.assert_allclose(w["attention_output_I"], [0.07908, 0.13671, 0.09157, 0.05331, 0.15476, 0.05699],
                               atol=1e-5)
    assert w["top_p_kept"] == [False, False, False, True, True, True]  # is, the, cat
    assert max(abs(a - b) for a, b in zip(w["X_pos"][1], w["X_pos_exact"][1])) < 0.005


def test_course_heads_are_block_diagonal_standard_attention():
    assert _block_diagonal_check(load_examples()) < 1e-6


def test_chapter_filter_prints_only_that_chapter():
    buf = io.StringIO()
    r = run(buf, chapter=8)
    text = buf.getvalue()
    assert {e.chapter for e in r.examples} == {8}
    assert "ops.layer_norm" in text and "ch8.test_score_standardization" in text
    assert "ops.attention_weights" not in text and "ch5.qkv_head1" not in text
    with pytest.raises(ValueError):
        run(None, chapter=19)


def test_printed_text_has_every_section():
    buf = io.StringIO()
    run(buf)
    text = buf.getvalue()
    for header in ("== The walkthrough", "== Where the course's conventions matter", "== Worked examples (71)",
                   "== Errata: 20", "== Summary: 71 worked examples, 50 reproduced, 20 course errors, 1 not checkable"):
        assert header in text
    assert "block-diagonal" in text and "Post-LN" in text and "Untied" in text and "sqrt(d_model)" in text
    assert "V[2][2]: course 0.200, correct 0.277" in text
