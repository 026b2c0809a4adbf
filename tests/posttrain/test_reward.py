"""The reward model (Chapter 18): a GPT with a scalar head read at the last real token, trained on
preference pairs through the one Trainer (``--task reward``), started from a language-model run's
weights with a fresh head, and resumed exactly after ``kill -9``."""
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfd_jax.models import GPTConfig
from tfd_jax.models.reward import RewardModel
from trainkit import resumed_equals_reference, run_cli

STEPS = 40


def test_the_score_is_the_head_on_the_last_real_token_and_ignores_padding():
    model = RewardModel(GPTConfig.preset("tiny", vocab_size=50, dropout=0.0), rngs=nnx.Rngs(0))
    model.eval()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 12)), jnp.int32)
    lengths = jnp.asarray([12, 7, 3])
    got = model.score(tokens, lengths)
    h = model.hidden_states(model.embed(tokens, jnp.broadcast_to(jnp.arange(12), (3, 12))))
    h = model.final_norm(h)
    kernel, bias = np.asarray(model.value_head.kernel[...], np.float64), np.asarray(model.value_head.bias[...], np.float64)
    for b, n in enumerate([12, 7, 3]):
        want = np.asarray(h[b, n - 1], np.float64) @ kernel[:, 0] + bias[0]
        assert float(got[b]) == pytest.approx(want, abs=1e-5)
    garbage = tokens.at[1, 7:].set(5).at[2, 3:].set(9)
    np.testing.assert_allclose(np.asarray(model.score(garbage, lengths)), np.asarray(got), atol=1e-6)


def _args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tfd_jax.cli", "train", "--task", "reward", "--preset", "tiny", "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "16", "--log-every", "1", "--eval-every", str(STEPS),
            "--eval-batches", "8", "--ckpt-every", "10", "--no-progress", *extra]


@pytest.mark.slow
def test_reward_model_learns_the_preferences_resumes_exactly_and_starts_from_a_gpt_run(sft_run, tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref, _ = resumed_equals_reference(_args(ref_dir), _args(run_dir), ref_dir, run_dir, STEPS, ("pairwise_accuracy",))
    assert ref[-1]["val_pairwise_accuracy"] > 0.6
    assert json.loads((run_dir / "config.json").read_text())["arch"] == "reward"

    # a GPT run (here: two SFT steps) starts the backbone; the scalar head starts fresh
    rm = run_cli(_args(tmp_path / "rm", "--init-from", str(sft_run), "--steps", "1", "--eval-every", "1"))
    assert rm.returncode == 0, rm.stdout + rm.stderr
    assert "has no value_head: freshly initialised" in rm.stdout
