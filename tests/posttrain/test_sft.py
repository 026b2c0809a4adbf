"""Supervised fine-tuning (``tfd-jax train --task sft``, Chapter 18): packed conversations whose loss
counts only the assistant's answers, and a run killed with ``kill -9`` that resumes to exactly the
uninterrupted run's losses."""
import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tfd_jax.data.tokenized import write_tokens
from tfd_jax.posttrain.data import chat_token_ids
from tfd_jax.posttrain.tasks import SFTTask, chat_text
from tfd_jax.tokenizers import CharTokenizer
from tfd_jax.train import TrainConfig
from trainkit import resumed_equals_reference

STEPS = 30


def _answer_targets(stream: list[int], assistant: int, end: int) -> list[bool]:
    """Per target (stream[1:]): inside an assistant answer, scanning the ids one by one."""
    inside, out = False, []
    for prev, tok in zip(stream, stream[1:]):
        if prev == assistant:
            inside = True
        elif prev == end:
            inside = False
        out.append(inside)
    return out


def test_the_loss_counts_only_assistant_tokens_in_packed_rows(tmp_path):
    task = SFTTask(conversations=200)
    cfg = TrainConfig(task="sft", data="chat", batch_size=4, seq_len=96)
    corpus = task.corpus(cfg, "train", None)
    tok = CharTokenizer.train(corpus.text, special_tokens=task.special_tokens)
    assert tok.encode(chat_text([{"role": "user", "content": "Hi."}]))[0] == chat_token_ids(tok)["user"]
    tf = write_tokens(corpus, tok, tmp_path / "train", progress=False)
    task.setup(tok, None)
    batch = next(task.iterator(cfg, tf, tok, seed=0))
    got = jax.jit(lambda b: task.prepare(b, jax.random.key(0)))(batch)
    marks = chat_token_ids(tok)
    assert 0.2 < got["mask"].mean() < 0.8  # answers are counted, prompts are not
    for row in range(4):
        stream = [int(batch["tokens"][row, 0]), *map(int, batch["targets"][row])]
        want = np.array(_answer_targets(stream, marks["assistant"], marks["end"])) & batch["mask"][row]
        # a row that starts inside an answer (its conversation began in the row before) is not
        # counted until the next answer opens, in both
        np.testing.assert_array_equal(np.asarray(got["mask"][row]), want)
        ends = np.flatnonzero(batch["targets"][row] == marks["end"])
        assert any(got["mask"][row][ends]) and not all(got["mask"][row][ends])  # answers' ends only


def _args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tfd_jax.cli", "train", "--task", "sft", "--preset", "tiny", "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "8", "--log-every", "1", "--eval-every", str(STEPS),
            "--eval-batches", "2", "--ckpt-every", "10", "--no-progress", *extra]


@pytest.mark.slow
def test_sft_run_learns_and_resumes_exactly_after_kill_9(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref, resumed = resumed_equals_reference(_args(ref_dir), _args(run_dir), ref_dir, run_dir, STEPS)
    assert np.mean([r["loss"] for r in ref[-5:]]) < np.mean([r["loss"] for r in ref[:3]]) - 0.5
    summary = json.loads(resumed.strip().splitlines()[-1])
    assert 0.0 <= summary["rule_score"] <= 1.0 and "held-out rule score" in resumed


def test_sft_from_hugging_face_gpt2_gains_the_chat_markers_and_their_embeddings(tmp_path):
    """GPT-2's tokenizer has no chat markers: the run's tokenizer gets them as new ids after its last,
    the token table as many new rows (the mean of the others), and the rest of the weights are GPT-2's."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from interop.hf_tiny import tiny_gpt2
    from tfd_jax.cli import main
    from tfd_jax.interop import load_hf_gpt2
    from tfd_jax.posttrain.data import CHAT_SPECIAL_TOKENS, builtin_sft_conversations
    from tfd_jax.tokenizers import load_tokenizer
    from tfd_jax.train.checkpoint import load_for_inference

    text = "".join(c["content"] + "\n" for conv in builtin_sft_conversations("train", n=400, seed=0) for c in conv)
    hf_tok = tokenizers.ByteLevelBPETokenizer()
    hf_tok.train_from_iterator([text], vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                               show_progress=False)
    V = hf_tok.get_vocab_size()
    hf = tmp_path / "hf_gpt2"
    tiny_gpt2(vocab_size=V).save_pretrained(hf)
    hf_tok.save_model(str(hf))
    out = tmp_path / "sft"
    assert main(["train", "--task", "sft", "--init-from", str(hf), "--out", str(out), "--steps", "1",
                 "--batch-size", "8", "--seq-len", "64", "--no-progress", "--eval-batches", "1"]) == 0
    tok = load_tokenizer(out / "tokenizer")
    assert [tok.special_tokens[t] for t in CHAT_SPECIAL_TOKENS] == list(range(V, V + len(CHAT_SPECIAL_TOKENS)))
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == V + len(CHAT_SPECIAL_TOKENS)
    # one SFT step moved the weights a little; their starting point was GPT-2's table plus mean rows
    start = np.asarray(load_hf_gpt2(hf).tok_embed.embedding[...])
    tuned = np.asarray(load_for_inference(out, log=None)[0].tok_embed.embedding[...])
    np.testing.assert_allclose(tuned[:V], start, atol=2e-3)
    np.testing.assert_allclose(tuned[V:], np.broadcast_to(start.mean(0), tuned[V:].shape), atol=2e-3)
