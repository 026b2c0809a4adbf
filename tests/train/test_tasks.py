"""Tasks: masked-LM corruption statistics, the MLM task's batches, and a loss written only here
training through the same Trainer (no change under tfd_jax/train/)."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from tfd_jax import ops
from tfd_jax.models import Bert, BertConfig
from tfd_jax.tokenizers import BERT_SPECIAL_TOKENS, CharTokenizer
from tfd_jax.train import OptimConfig, Trainer
from tfd_jax.train.metrics import read_metrics
from tfd_jax.train.tasks import MLMTask, Task
from trainkit import cfg, write_corpus


def test_masking_statistics_over_many_draws():
    """15% +- 1 of eligible positions chosen; of those 80/10/10 [MASK] / random / kept; never an
    ineligible position."""
    B, T, V, MASK = 64, 128, 1000, 3
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(10, V, size=(B, T)), jnp.int32)
    eligible = jnp.asarray(rng.random((B, T)) < 0.7)
    chosen_n = masked = randomised = kept = elig_n = 0
    for i in range(20):  # 20 draws x ~5,700 eligible positions
        inputs, chosen = ops.mlm_mask(jax.random.key(i), tokens, eligible, mask_id=MASK, vocab_size=V)
        inputs, chosen, tok, el = map(np.asarray, (inputs, chosen, tokens, eligible))
        assert not (chosen & ~el).any()  # only eligible positions
        assert (inputs[~chosen] == tok[~chosen]).all()  # everything else untouched
        elig_n += el.sum()
        chosen_n += chosen.sum()
        masked += (inputs[chosen] == MASK).sum()
        kept += (inputs[chosen] == tok[chosen]).sum()
        randomised += ((inputs[chosen] != MASK) & (inputs[chosen] != tok[chosen])).sum()
    assert abs(chosen_n / elig_n - 0.15) < 0.01
    assert abs(masked / chosen_n - 0.8) < 0.02
    # a random draw may hit the original token (1 in V): "kept" is 10% plus that
    assert abs(randomised / chosen_n - 0.1) < 0.015
    assert abs(kept / chosen_n - 0.1) < 0.015
    again, _ = ops.mlm_mask(jax.random.key(0), tokens, eligible, mask_id=MASK, vocab_size=V)
    first, _ = ops.mlm_mask(jax.random.key(0), tokens, eligible, mask_id=MASK, vocab_size=V)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))  # the key decides: resumable


def test_mlm_task_never_chooses_special_tokens_or_padding_and_labels_only_chosen_positions():
    tok = CharTokenizer.train("abcdefgh [MASK] ijk", special_tokens=BERT_SPECIAL_TOKENS)
    task = MLMTask(rate=0.5)
    task.setup(tok, BertConfig.preset("tiny", vocab_size=tok.vocab_size))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, tok.vocab_size, size=(32, 24)).astype(np.int32)  # specials included at random
    real = np.ones((32, 24), bool)
    real[:, 18:] = False  # right padding
    batch = task.prepare({"tokens": jnp.asarray(ids), "targets": jnp.asarray(ids), "mask": jnp.asarray(real)},
                         jax.random.key(0))
    targets, chosen = np.asarray(batch["targets"]), np.asarray(batch["mask"])
    special = np.isin(targets, tok.all_special_ids())
    assert (targets[:, 0] == tok.cls_id).all() and (targets[:, -1] == tok.sep_id).all()
    assert chosen.any() and not (chosen & special).any() and not (chosen & ~real).any()
    np.testing.assert_array_equal(np.asarray(batch["padding_mask"]), real)
    inputs = np.asarray(batch["tokens"])
    assert (inputs[~chosen] == targets[~chosen]).all()
    # the loss counts chosen positions only: a model's loss ignores the logits everywhere else
    model = Bert(BertConfig.preset("tiny", vocab_size=tok.vocab_size, dropout=0.0, d_model=16, num_heads=2,
                                   num_layers=1, d_ff=32), rngs=nnx.Rngs(0))

    @nnx.jit
    def run(model, batch):
        return task.loss_fn(model, batch, None), model.mlm_logits(batch["tokens"], padding_mask=batch["padding_mask"])

    (s, c, extra), logits = run(model, batch)
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, targets[..., None], -1)[..., 0][chosen].sum()
    assert float(c) == chosen.sum()
    assert float(s) == pytest.approx(want, rel=1e-5)
    assert float(extra["masked_accuracy"]) == (logits.argmax(-1) == targets)[chosen].sum()


class PooledRegression(Task):
    """A loss of this test's own: predict the share of vowels in a window from BERT's pooled
    vector (its first component), training only the pooler."""

    name = "pooled-regression"
    arch = "bert"
    trainable = nnx.PathContains("pooler")

    def setup(self, tokenizer, model_config):
        ids = []
        for ch in "aeiou":
            try:
                ids += tokenizer.encode(ch)
            except ValueError:  # not in this character vocabulary
                pass
        self.vowels = jnp.asarray(ids, jnp.int32)

    def loss_fn(self, model, batch, frozen):
        target = 0.9 - jnp.mean(jnp.isin(batch["tokens"], self.vowels), axis=1)
        pred = model.pooled(batch["tokens"])[:, 0]
        sq = (pred - target) ** 2
        return jnp.sum(sq), jnp.float32(sq.shape[0]), {"mse": jnp.sum(sq)}


def test_a_loss_written_in_a_test_trains_through_the_trainer(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    c = cfg(corpus, tmp_path / "run", steps=30, ckpt_every=30, eval_every=30,
            optim=OptimConfig(lr=3e-2, min_lr=3e-3, warmup_steps=2),
            preset="tiny", model_overrides={"d_model": 32, "num_heads": 2, "num_layers": 1, "d_ff": 64,
                                            "context_length": 32, "dropout": 0.0})
    summary = Trainer(c, PooledRegression()).run()
    records = read_metrics(tmp_path / "run")
    assert summary["steps"] == 30 and "mse" in records[-1] and "val_mse" in records[-1]
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.5 * first, (first, last)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"] == "pooled-regression" and config["arch"] == "bert"
    # only the pooler trained: every other parameter is still the initial one (same seed)
    init = Bert(BertConfig.from_dict(config["model"]), rngs=nnx.Rngs(params=c.seed, dropout=c.seed + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # orbax: "Sharding info not provided" (read onto one device here)
        saved = ocp.CheckpointManager((tmp_path / "run" / "checkpoints").absolute()).restore(
            30, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    assert set(saved["params"]) == {"pooler"} and "fixed" in saved
    fixed = dict(nnx.to_flat_state(nnx.state(init, nnx.Not(nnx.PathContains("pooler")))))
    for key, leaf in jax.tree_util.tree_flatten_with_path(saved["fixed"])[0]:
        path = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key)
        path = tuple(p for p in path if p != "value")
        match = [v for k, v in fixed.items() if tuple(map(str, k)) == tuple(map(str, path))]
        assert match, path
        # (equal up to the last bit of the initialiser, jitted there and eager here; training moves them ~1e-2)
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(match[0].get_value()), rtol=1e-6, atol=1e-7)
    pooler0 = np.asarray(init.pooler.kernel[...])
    assert not np.allclose(np.asarray(saved["params"]["pooler"]["kernel"]["value"]
                                      if isinstance(saved["params"]["pooler"]["kernel"], dict)
                                      else saved["params"]["pooler"]["kernel"]), pooler0)
