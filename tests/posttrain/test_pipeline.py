"""The pipeline's measurements (Chapter 18): the rule score of sampled answers and the KL estimate
against a reference, checked on models whose answers are known; and each stage's settings are the
command line's."""
import jax.numpy as jnp
import pytest
from flax import nnx

from tfd_jax.models import GPT, GPTConfig
from tfd_jax.posttrain.data import builtin_charset, builtin_prompts, render_prompt
from tfd_jax.posttrain.pipeline import _stage_config, format_table, sample_and_score
from tfd_jax.posttrain.tasks import CHAT_TOKENIZER_SPECIALS
from tfd_jax.tokenizers import CharTokenizer


def _setup():
    tok = CharTokenizer.train(builtin_charset(), special_tokens=CHAT_TOKENIZER_SPECIALS)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, context_length=96, dropout=0.0), rngs=nnx.Rngs(0))
    model.eval()
    return tok, model


def test_kl_of_a_model_against_itself_is_zero_and_against_another_is_positive_on_average():
    tok, model = _setup()
    prompts = builtin_prompts("val", n=16, seed=0)
    same = sample_and_score(model, tok, prompts, reference=model, seed=0, max_new_tokens=12)
    assert same["kl"] == pytest.approx(0.0, abs=1e-4)
    assert 0.0 <= same["rule_score"] <= 1.0
    other = GPT(model.config, rngs=nnx.Rngs(1))
    other.eval()
    assert sample_and_score(model, tok, prompts, reference=other, seed=0, max_new_tokens=12)["kl"] > 0.0


class _Scripted(nnx.Module):
    """A policy that writes ``answer`` after any prompt of ``prompt_len`` tokens: the decode loop
    only needs ``config``, ``init_cache``, ``forward_cached`` and ``logits``, and this one's hidden
    state is just each token's position."""

    def __init__(self, model, answer, prompt_len):
        self.inner, self.config = model, model.config
        self.answer, self.prompt_len = nnx.data(jnp.asarray(answer)), prompt_len

    def init_cache(self, *args, **kwargs):
        return self.inner.init_cache(*args, **kwargs)

    def forward_cached(self, tokens, cache, num_valid):
        _, new = self.inner.forward_cached(tokens, cache, num_valid)
        positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1])[None]
        return positions[..., None].astype(jnp.float32), new

    def logits(self, h):
        step = jnp.clip(h[..., 0].astype(jnp.int32) - self.prompt_len + 1, 0, self.answer.shape[0] - 1)
        return jnp.where(jnp.arange(self.config.vocab_size) == self.answer[step][..., None], 10.0, -10.0)


def test_answers_the_rule_favours_score_one_and_others_less():
    tok, model = _setup()
    prompts = ["Tell me about cats."] * 3
    n = len(render_prompt(prompts[0], tok))
    end = [tok.special_tokens["<|end|>"]]
    best = _Scripted(model, tok.encode("Cats are lovely!") + end, n)
    plain = _Scripted(model, tok.encode("Cats are lovely.") + end, n)
    assert sample_and_score(best, tok, prompts, max_new_tokens=24) == {"rule_score": 1.0, "kl": None}
    assert sample_and_score(plain, tok, prompts, max_new_tokens=24)["rule_score"] == 0.5
    unfinished = _Scripted(model, tok.encode("Cats are lovely and lovely and lovely"), n)
    assert sample_and_score(unfinished, tok, prompts, max_new_tokens=8)["rule_score"] == 0.0


def test_stage_settings_are_the_command_lines_and_the_table_shows_every_stage():
    cfg = _stage_config(["--task", "dpo", "--out", "/tmp/x", "--steps", "7"])
    assert (cfg.task, cfg.data, cfg.steps, cfg.optim.lr) == ("dpo", "prefs", 7, 1e-4)  # the task's defaults
    table = format_table([{"stage": "sft", "steps": 3, "rule_score": 0.5, "kl": 0.0},
                          {"stage": "reward", "steps": 3, "rule_score": None, "kl": None, "pairwise_accuracy": 0.75}])
    assert "sft" in table and "0.500" in table and "pairwise accuracy 0.750" in table


def test_the_command_prints_a_table_or_one_json_object_per_stage(monkeypatch, capsys):
    """``tfd-jax pipeline`` passes its flags on and prints what the stages report. The chain itself
    runs end to end, every stage a real run, in colab/09_from_language_model_to_chatgpt (executed by
    tests/colab/test_notebooks_c.py)."""
    import json

    from tfd_jax.cli import main
    from tfd_jax.posttrain import pipeline

    seen = {}
    records = [{"stage": "sft", "steps": 3, "rule_score": 0.5, "rule_score_train": 0.5, "kl": 0.0},
               {"stage": "reward", "steps": 2, "rule_score": None, "kl": None, "pairwise_accuracy": 0.75}]

    def fake(out, **kw):
        seen.update(kw, out=out)
        return records

    monkeypatch.setattr(pipeline, "run_pipeline", fake)
    assert main(["pipeline", "--out", "/tmp/p", "--sft-steps", "3", "--ppo-steps", "5", "--eval-prompts", "8",
                 "--json"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    assert seen["steps"]["sft"] == 3 and seen["steps"]["ppo"] == 5 and seen["eval_prompts"] == 8
    assert seen["steps"]["dpo"] == pipeline.DEFAULT_STEPS["dpo"] and seen["out"] == "/tmp/p"
    assert main(["pipeline", "--out", "/tmp/p"]) == 0
    assert "pairwise accuracy 0.750" in capsys.readouterr().out
