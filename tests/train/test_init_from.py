"""``tfd-jax train --init-from``: a new run that starts from a run's newest checkpoint or from a
Hugging Face model directory, with its model config and tokenizer (Chapter 18).

The exact check for both: the loss a run logs at step 1 is the loss of its starting weights on its
first batch (before the update), so it must equal that loss computed here, independently: with the
source checkpoint's weights for a run, with transformers on the same batch for Hugging Face weights.
Refusals are checked in-process (they come before any data is read) and must leave ``--out`` unmade.
"""
import json
import shutil

import numpy as np
import pytest

from tfd_jax.cli import main
from tfd_jax.data.pipeline import make_iterator
from tfd_jax.data.tokenized import load_tokens
from tfd_jax.tokenizers import CharTokenizer, load_tokenizer
from tfd_jax.train import OptimConfig, train
from trainkit import MODEL_FLAGS, cfg, cli_args, losses, write_corpus

SRC_STEPS = 4  # checkpoints at steps 2 and 4: the new run must take the newest


def first_batch(run_dir, seed=0):
    """The run's first training batch, as its iterator draws it (trainkit's batch 8 x 16)."""
    return next(make_iterator(load_tokens(run_dir / "data" / "train"), batch_size=8, seq_len=16, seed=seed,
                              sampling="random"))


def mean_ce(logits, targets, mask) -> float:
    """Masked mean next-token cross-entropy, in float64 numpy."""
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    m = np.asarray(mask, np.float64)
    return float(((lse - picked) * m).sum() / m.sum())


def config(run_dir) -> dict:
    return json.loads((run_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("init_from")
    corpus = write_corpus(d / "corpus.txt")
    src = d / "src"
    # In-process (the runs under test are the subprocesses), on the test's eight CPU devices; a high,
    # constant learning rate moves the weights far from their initialisation in a few steps.
    train(cfg(corpus, src, steps=SRC_STEPS, ckpt_every=2, eval_every=100, eval_batches=1,
              optim=OptimConfig(lr=0.02, min_lr=0.02, warmup_steps=0)))
    return d, src


def test_init_from_run_starts_from_its_newest_checkpoint(source_run):
    from tfd_jax.train.checkpoint import load_for_inference

    d, src = source_run
    # A corpus with fewer characters: a char tokenizer of its own would be smaller than the source's.
    narrow = d / "narrow.txt"
    narrow.write_text(" ".join(np.random.default_rng(1).choice(["alpha", "beta", "\n"], size=6000)))
    new = d / "new"
    # In-process, through the command line's own entry point (a subprocess would spend its time importing)
    assert main(cli_args(narrow, new, steps=1, eval_every=100, eval_batches=1)[3:] + ["--init-from", str(src)]) == 0
    record = config(new)
    assert record["init_from"] == {"path": str(src), "kind": "run"}
    assert record["model"] == config(src)["model"]
    src_tok, new_tok = load_tokenizer(src / "tokenizer"), load_tokenizer(new / "tokenizer")
    assert new_tok.fingerprint() == src_tok.fingerprint()
    assert CharTokenizer.train(narrow.read_text()).vocab_size < new_tok.vocab_size  # so it is not its own

    batch = first_batch(new)
    assert set(np.unique(batch["tokens"])) <= {new_tok.encode(c)[0] for c in "alphbet \n"}  # the new corpus

    def loss_of(step):
        model, _ = load_for_inference(src, step=step)
        return mean_ce(model(batch["tokens"]), batch["targets"], batch["mask"])

    newest, older = loss_of(SRC_STEPS), loss_of(2)
    logged = losses(new)[1]
    assert logged == pytest.approx(newest, abs=1e-5)
    assert abs(newest - older) > 1e-3  # the check tells the checkpoints apart
    assert logged < losses(src)[1] - 0.1  # far below the source's own random start


def _train_hf_bpe(text: str, tokenizers, vocab_size=300):
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return tok


def test_init_from_hf_gpt2_dir_fine_tunes_from_its_weights(source_run):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from interop.hf_tiny import tiny_gpt2

    d, _ = source_run
    corpus = d / "corpus.txt"
    tok = _train_hf_bpe(corpus.read_text(), tokenizers)
    V = tok.get_vocab_size()
    hf = d / "hf_gpt2"
    model = tiny_gpt2(vocab_size=V)
    model.save_pretrained(hf)
    tok.save_model(str(hf))  # vocab.json + merges.txt beside the weights
    new = d / "from_hf"
    args = cli_args(corpus, new, steps=1, eval_every=100, eval_batches=1)
    i = args.index(MODEL_FLAGS[0])
    del args[i: i + len(MODEL_FLAGS)]  # the model is the checkpoint's, not trainkit's TINY
    # In-process, through the command line's own entry point (a subprocess would spend its time importing)
    assert main(args[3:] + ["--init-from", str(hf)]) == 0

    record = config(new)
    assert record["init_from"] == {"path": str(hf), "kind": "hf"}
    hf_cfg = model.config
    got = {k: record["model"][k] for k in ("d_model", "num_layers", "num_heads", "vocab_size", "context_length")}
    assert got == {"d_model": hf_cfg.n_embd, "num_layers": hf_cfg.n_layer, "num_heads": hf_cfg.n_head,
                   "vocab_size": V, "context_length": hf_cfg.n_positions}
    ours = load_tokenizer(new / "tokenizer")
    sample = corpus.read_text()[:400]
    assert ours.vocab_size == V and ours.encode(sample) == tok.encode(sample).ids

    batch = first_batch(new)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(np.asarray(batch["tokens"], np.int64))).logits.numpy()
    assert losses(new)[1] == pytest.approx(mean_ce(logits, batch["targets"], batch["mask"]), abs=1e-4)


def _refused(argv, out, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tfd-jax train: error: --init-from"), err
    assert not out.exists()
    return err


def test_refusals_are_one_line_and_write_nothing(source_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    d, src = source_run
    corpus = d / "corpus.txt"
    out = tmp_path / "out"
    base = cli_args(corpus, out, steps=1)[3:]  # after "python -m tfd_jax.cli"
    assert "is a file" in _refused(base + ["--init-from", str(corpus)], out, capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _refused(base + ["--init-from", str(empty)], out, capsys)
    assert "no such directory" in _refused(base + ["--init-from", str(tmp_path / "nope")], out, capsys)
    # a run directory that has not saved a checkpoint yet: its config and tokenizer, but no weights
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    for name in ("config.json", "tokenizer"):
        (shutil.copytree if (src / name).is_dir() else shutil.copy)(src / name, unsaved / name)
    assert "no checkpoint" in _refused(base + ["--init-from", str(unsaved)], out, capsys)

    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(bert)
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "d", "e"]))
    err = _refused(base + ["--task", "lm", "--init-from", str(bert)], out, capsys)
    assert "bert model" in err and "--task lm" in err

    # tokenizer files that cannot belong to the weights: more ids than embeddings
    big = tmp_path / "big_tok"
    transformers.BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(big)
    (big / "vocab.txt").write_text((bert / "vocab.txt").read_text())
    err = _refused(base + ["--task", "mlm", "--init-from", str(big)], out, capsys)
    assert "10 tokens" in err and "8 embeddings" in err


def test_architecture_override_is_refused(source_run, tmp_path, capsys):
    """``--model num_heads=4`` on 2-head weights changes no shape (d_model stays 32): they would load
    and compute something else. Refused; today by ``init.load_weights``, once the run directory
    exists (``loop._open_run`` should call ``init.check_model_config`` before making it), so only
    the absence of a checkpoint is asserted."""
    d, src = source_run
    out = tmp_path / "out"
    argv = cli_args(d / "corpus.txt", out, steps=1)[3:] + ["--model", "num_heads=4", "--init-from", str(src)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_heads=2 there, 4 here" in err, err
    assert not (out / "checkpoints").exists()
