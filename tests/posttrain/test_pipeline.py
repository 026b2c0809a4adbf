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


@pytest.mark.slow
def test_the_whole_chain_runs_and_reports_every_stage(tmp_path):
    """``tfd-jax pipeline --json`` end to end at a few steps per stage (the figures of a real run are in
    the README): one JSON object per stage, in order, each an ordinary run directory."""
    import json
    import sys

    from trainkit import run_cli

    out = run_cli([sys.executable, "-m", "tfd_jax.cli", "pipeline", "--out", str(tmp_path), "--pretrain-steps", "20",
                   "--sft-steps", "10", "--reward-steps", "10", "--ppo-steps", "4", "--dpo-steps", "4",
                   "--eval-prompts", "8", "--json"], timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in records] == ["pretrain", "sft", "reward", "ppo", "dpo"]
    by = {r["stage"]: r for r in records}
    assert 0.0 <= by["reward"]["pairwise_accuracy"] <= 1.0
    assert by["sft"]["kl"] == pytest.approx(0.0, abs=1e-4) and by["pretrain"]["kl"] is None
    for stage in ("pretrain", "sft", "ppo", "dpo"):
        assert 0.0 <= by[stage]["rule_score"] <= 1.0 and 0.0 <= by[stage]["rule_score_train"] <= 1.0
        assert (tmp_path / stage / "metrics.jsonl").is_file()
    assert by["ppo"]["kl"] is not None and by["dpo"]["kl"] is not None
