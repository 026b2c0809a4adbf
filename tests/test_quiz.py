"""Chapter 20's quiz: a wrong implementation of what a question is about makes that question's check
fail. (That every check passes on the library is asserted by colab/11_quizzes, which the suite
executes; these run the questions they need.)"""
import importlib

import jax.numpy as jnp

from tfd_jax.cli import main
from tfd_jax.quiz import QUESTIONS, run_quiz

att = importlib.import_module("tfd_jax.ops.attention")  # the module (tfd_jax.ops.attention is the function)
norms = importlib.import_module("tfd_jax.ops.norms")


def _verdicts(ids):
    return {r.id: r.passed for r in run_quiz(ids)}


def test_every_question_of_both_quizzes_has_an_answer_and_a_check():
    assert [q.id for q in QUESTIONS] == [f"K{i}" for i in range(1, 6)] + [f"E{i}" for i in range(1, 12)]
    assert all(q.question.endswith("?") and q.answer and q.check for q in QUESTIONS)


def test_scores_not_divided_by_sqrt_dk_fail_the_scaling_check(monkeypatch):
    def unscaled(q, k, *, scale=None, bias=None):  # forgets the 1/sqrt(d_k)
        scores = jnp.einsum("bthd,bshd->bhts", q, att.repeat_kv(k, q.shape[2]))
        return scores * (1.0 if scale is None else scale)

    monkeypatch.setattr(att, "attention_scores", unscaled)
    assert _verdicts(["E1", "K5"]) == {"E1": False, "K5": True}  # K5 asks for scale 1 itself


def test_a_mask_that_lets_queries_see_the_future_fails_the_decoder_checks(monkeypatch):
    monkeypatch.setattr(att, "causal_mask", lambda T, S=None, offset=0: jnp.ones((T, T if S is None else S), bool))
    assert _verdicts(["E6", "E7", "E4"]) == {"E6": False, "E7": False, "E4": True}


def test_a_layernorm_with_batch_statistics_fails_the_layernorm_check(monkeypatch):
    def batch_stats(x, scale, bias, eps=1e-5):  # BatchNorm in LayerNorm's clothes
        return (x - x.mean(0)) / jnp.sqrt(x.var(0) + eps)

    monkeypatch.setattr(norms, "layer_norm", batch_stats)
    assert _verdicts(["E4"]) == {"E4": False}


def test_the_command_prints_each_answer_and_its_check_and_fails_on_unknown_ids(capsys):
    assert main(["quiz", "--id", "K5", "--id", "e10"]) == 0
    out = capsys.readouterr().out
    assert "K5. What is softmax like?" in out and "PASS" in out and "2/2 checks pass" in out
    assert main(["quiz", "--id", "Z9"]) == 2
    assert "unknown quiz question Z9" in capsys.readouterr().err
