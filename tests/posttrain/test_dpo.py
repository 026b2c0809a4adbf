"""DPO through the one Trainer (``tfd-jax train --task dpo``, Chapter 18, beyond the course): a frozen
copy of the starting weights is the reference, so the loss of the first step is exactly log 2; the
preference accuracy of the implied rewards rises; a run killed with ``kill -9`` resumes to exactly
the uninterrupted run's losses (the reference is rebuilt from the same starting weights)."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from tfd_jax.data.tokenized import write_tokens
from tfd_jax.posttrain.data import chat_token_ids
from tfd_jax.posttrain.tasks import DPOTask
from tfd_jax.tokenizers import CharTokenizer
from tfd_jax.train import TrainConfig
from trainkit import resumed_equals_reference

STEPS = 30


def test_pairs_become_two_rows_whose_masks_cover_only_the_answers(tmp_path):
    task = DPOTask(pairs=50)
    cfg = TrainConfig(task="dpo", data="prefs", batch_size=4, seq_len=64)
    corpus = task.corpus(cfg, "train", None)
    tok = CharTokenizer.train(task.tokenizer_text(cfg, corpus.text), special_tokens=task.special_tokens)
    tf = write_tokens(corpus, tok, tmp_path / "train", progress=False)
    batch = next(task.iterator(cfg, tf, tok, seed=0))
    end = chat_token_ids(tok)["end"]
    for side in ("chosen", "rejected"):
        assert batch[f"{side}_tokens"].shape == (4, 64)
        for row in range(4):
            m = batch[f"{side}_mask"][row]
            answer = tok.decode([int(t) for t in batch[f"{side}_targets"][row][m]])
            assert answer.endswith("<|end|>") and answer.count("<|end|>") == 1
            prompt = tok.decode([int(t) for t in batch[f"{side}_tokens"][row][: int(np.argmax(m)) + 1]])
            assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
    assert (batch["chosen_targets"] != batch["rejected_targets"]).any(axis=1).all()
    assert int(batch["chosen_targets"][0][batch["chosen_mask"][0]][-1]) == end


def test_bad_pairs_are_refused_with_file_and_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "Tell me about cats.", "chosen": "Cats!", "rejected": "Cats!"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1:.*chosen"):
        DPOTask().corpus(TrainConfig(task="dpo", data=str(bad)), "train", None)


def _args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tfd_jax.cli", "train", "--task", "dpo", "--preset", "tiny", "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "16", "--lr", "1e-3", "--log-every", "1", "--eval-every",
            str(STEPS), "--eval-batches", "2", "--ckpt-every", "10", "--no-progress", *extra]


@pytest.mark.slow
def test_dpo_starts_at_log_2_learns_the_preferences_and_resumes_exactly(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref, _ = resumed_equals_reference(_args(ref_dir), _args(run_dir), ref_dir, run_dir, STEPS, ("preference_accuracy",))
    assert ref[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert ref[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert np.mean([r["loss"] for r in ref[-5:]]) < math.log(2) - 0.05
    assert ref[-1]["val_preference_accuracy"] > 0.6


def test_dpo_with_lora_adapters_uses_the_base_model_as_its_reference(sft_run, tmp_path):
    """``--lora 4``: only the adapters train, no frozen copy is made (the model with its adapters off
    is the reference), the first loss is still exactly log 2, and the base weights stay the SFT run's."""
    from flax import nnx

    from tfd_jax.train.checkpoint import load_for_inference
    from tfd_jax.train.metrics import read_metrics
    from trainkit import run_cli

    sft = sft_run
    run = run_cli(_args(tmp_path / "lora", "--init-from", str(sft), "--lora", "4", "--lora-targets",
                        "attn.q,attn.v,ffn.w_out", "--steps", "4", "--eval-every", "4", "--ckpt-every", "4"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "trained)" in run.stdout and "LoRA adapters: freshly initialised" in run.stdout
    records = read_metrics(tmp_path / "lora")
    assert records[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[-1]["loss"] != records[0]["loss"]
    base, _ = load_for_inference(sft, log=None)
    tuned, _ = load_for_inference(tmp_path / "lora", log=None)
    flat = dict(nnx.to_flat_state(nnx.state(tuned, nnx.Param)))
    for key, var in nnx.to_flat_state(nnx.state(base, nnx.Param)):
        np.testing.assert_array_equal(np.asarray(flat[key].get_value()), np.asarray(var.get_value()))
    moved = [k for k, v in flat.items() if k[-1] == "lora_b" and np.abs(np.asarray(v.get_value())).max() > 0]
    assert len(moved) == 3 * 2  # three kinds of layer in each of the two blocks
    # --reference: other weights as the reference (here the LoRA run's, folded): no longer log 2 at step 1
    other = run_cli(_args(tmp_path / "other_ref", "--init-from", str(sft), "--reference", str(tmp_path / "lora"),
                          "--steps", "1", "--eval-every", "1", "--ckpt-every", "1"))
    assert other.returncode == 0, other.stdout + other.stderr
    assert f"reference model: {tmp_path / 'lora'}" in other.stdout
    assert abs(read_metrics(tmp_path / "other_ref")[0]["dpo_loss"] - math.log(2)) > 1e-4
