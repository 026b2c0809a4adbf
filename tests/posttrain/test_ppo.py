"""RLHF with PPO (``tfd-jax train --task ppo``, Chapter 18): the sampler's log-probabilities are the
trainer's, a rollout becomes experience laid out token by token as the losses expect, a run killed
with ``kill -9`` (in the middle of a rollout's updates) resumes exactly, and bad settings are refused
in one line before anything is written."""
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfd_jax import decode
from tfd_jax.cli import main
from tfd_jax.models import GPTConfig
from tfd_jax.models.reward import RewardModel
from tfd_jax.posttrain.data import builtin_charset, builtin_prompts, chat_token_ids, render_prompt
from tfd_jax.posttrain.ppo import PPOTask, load_prompts
from tfd_jax.posttrain.tasks import CHAT_TOKENIZER_SPECIALS
from tfd_jax.tokenizers import CharTokenizer
from tfd_jax.train import TrainConfig
from trainkit import resumed_equals_reference, run_cli

TOK = CharTokenizer.train(builtin_charset(), special_tokens=CHAT_TOKENIZER_SPECIALS)
END = chat_token_ids(TOK)["end"]


def _model(seed: int, **kw) -> RewardModel:
    # Xavier's initialisation: weights large enough that the distributions are far from uniform
    cfg = GPTConfig.preset("tiny", vocab_size=TOK.vocab_size, context_length=64, dropout=0.0, init="xavier", **kw)
    model = RewardModel(cfg, rngs=nnx.Rngs(seed))
    model.eval()
    return model


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_samplers_log_probs_are_the_trainers_log_probs(temperature):
    """Through the KV cache (prefill, then one token at a time) and in fp32: within 1e-5 of the
    training forward's ``-token_losses`` of the same tokens, greedy and with temperature."""
    model = _model(0)
    prompts = [render_prompt(p, TOK) for p in builtin_prompts("train", n=3, seed=0)]
    out = decode.rollout(model, prompts, 20, key=jax.random.key(3), temperature=temperature)
    tokens, logps, lengths = (np.asarray(x) for x in (out.tokens, out.log_probs, out.lengths))
    for b, p in enumerate(prompts):
        seq = np.asarray(p + tokens[b, : lengths[b]].tolist(), np.int32)[None]
        trainer = -np.asarray(model.token_losses(jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:])))[0]
        np.testing.assert_allclose(logps[b, : lengths[b]], trainer[len(p) - 1:], rtol=0, atol=1e-5)
        if temperature == 0:  # greedy: every token is the argmax of the trainer's distribution
            logits = np.asarray(model(jnp.asarray(seq[:, :-1])))[0, len(p) - 1:]
            np.testing.assert_array_equal(logits.argmax(-1), tokens[b, : lengths[b]])


def _task_and_batch(B=4, seq_len=64, **kw):
    task = PPOTask(response_length=24, epochs=2, minibatches=2, **kw)
    task.configure(TrainConfig(task="ppo", seq_len=seq_len, batch_size=B))
    task.setup(TOK, None)
    prompts = [render_prompt(p, TOK) for p in builtin_prompts("train", n=B, seed=1)]
    P = seq_len - 24
    batch = {"prompt_tokens": jnp.asarray([p + [task.pad_id] * (P - len(p)) for p in prompts], jnp.int32),
             "prompt_length": jnp.asarray([len(p) for p in prompts], jnp.int32)}
    return task, batch, prompts


def _frozen(task, policy, reward):
    task.reward_graph, reward_params, task.reward_rest = nnx.split(reward, nnx.Param, ...)
    return {"reference": nnx.split(policy, nnx.Param, ...)[1], "reward": reward_params}


def test_a_rollout_becomes_experience_laid_out_as_the_losses_expect():
    task, batch, prompts = _task_and_batch(missing_eos_penalty=0.5)
    policy, reward = _model(0), _model(1)
    frozen = _frozen(task, policy, reward)
    key = jax.random.key(5)
    exp = jax.jit(lambda f, b: task._rollout(policy, f, b, key, jnp.float32(0.1)))(frozen, batch)
    direct = decode.rollout_traced(policy, batch["prompt_tokens"], batch["prompt_length"], 24, key=key,
                                   eos_id=END, pad_id=task.pad_id)
    answers, lengths = np.asarray(direct.tokens), np.asarray(direct.lengths)
    mask = np.asarray(exp["mask"])
    trainer = -np.asarray(policy.token_losses(exp["tokens"], exp["targets"]))
    seqs = []
    for b, p in enumerate(prompts):
        n = int(lengths[b])
        np.testing.assert_array_equal(np.asarray(exp["tokens"])[b, : len(p)], p)  # the prompt, then the answer
        np.testing.assert_array_equal(np.asarray(exp["targets"])[b][mask[b]], answers[b, :n])
        assert np.flatnonzero(mask[b]).tolist() == list(range(len(p) - 1, len(p) - 1 + n))
        seqs.append(p + answers[b, :n].tolist())
        # the sampler's log-probs (the old policy's) sit on the answer's targets and equal the trainer's
        np.testing.assert_allclose(np.asarray(exp["old_logps"])[b][mask[b]], trainer[b][mask[b]], atol=1e-5)
    assert np.all(np.asarray(exp["old_logps"])[~mask] == 0) and np.all(np.asarray(exp["advantages"])[~mask] == 0)
    # the reference starts as the policy: no KL yet
    np.testing.assert_allclose(np.asarray(exp["kl"]), 0.0, atol=1e-4)
    # the reward model's score of prompt + answer at its last token, less the penalty for no <|end|>
    width = max(len(s) for s in seqs)
    padded = jnp.asarray([s + [task.pad_id] * (width - len(s)) for s in seqs], jnp.int32)
    finished = np.array([END in answers[b, : lengths[b]] for b in range(len(prompts))])
    want = np.asarray(reward.score(padded, jnp.asarray([len(s) for s in seqs]))) - 0.5 * ~finished
    np.testing.assert_allclose(np.asarray(exp["score"]), want, atol=1e-5)
    # whitened advantages over the answer tokens; the value head's estimates kept beside them
    adv = np.asarray(exp["advantages"])[mask]
    assert abs(adv.mean()) < 1e-5 and abs(adv.std() - 1) < 1e-3
    _, values = policy.policy_outputs(exp["tokens"])
    np.testing.assert_allclose(np.asarray(exp["old_values"])[mask], np.asarray(values)[mask], atol=1e-5)
    # the first update is at the old policy: ratio 1, so nothing is clipped and the policy loss is -mean(A) = 0
    loss_sum, count, m = task.loss_fn(policy, {k: v for k, v in exp.items() if k != "kl_coef"} |
                                      {"kl_coef": jnp.full((4,), 0.1)}, frozen)
    assert float(m["clip_fraction"]) == 0.0 and abs(float(m["policy_loss"]) / float(count)) < 1e-5
    assert float(count) == mask.sum()


def test_minibatches_cover_the_rollout_once_per_epoch_and_the_experience_stays_between_rollouts():
    task, batch, _ = _task_and_batch()
    policy, reward = _model(0), _model(1)
    frozen = _frozen(task, policy, reward)
    base = jax.random.key(9)
    buffer = task.experience_buffer()
    seen = []
    for step in range(4):  # epochs * minibatches = 4 steps per rollout
        buffer, mb = task.experience(policy, frozen, buffer, batch, jnp.int32(step), base)
        if step == 0:
            first = jax.tree.map(np.asarray, buffer)
        else:  # no new rollout until step 4
            jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, buffer), first)
        seen.append({tuple(r) for r in np.asarray(mb["tokens"]).tolist()})
    rows = {tuple(r) for r in first["tokens"].tolist()}
    assert seen[0] | seen[1] == rows and seen[2] | seen[3] == rows
    new, _ = task.experience(policy, frozen, buffer, batch, jnp.int32(4), base)
    assert not np.array_equal(np.asarray(new["tokens"]), first["tokens"])  # a fresh rollout, another key


def test_the_kl_penalty_in_the_reward_and_the_adaptive_coefficient():
    task, batch, _ = _task_and_batch(kl_target=1.0, kl_horizon=100.0)
    policy, reward = _model(0), _model(1)
    frozen = _frozen(task, policy, reward)
    frozen["reference"] = nnx.split(_model(2), nnx.Param, ...)[1]  # another reference: KL > 0
    exp = task._rollout(policy, frozen, batch, jax.random.key(1), jnp.float32(0.1))
    mask = np.asarray(exp["mask"])
    log_ratio = np.where(mask, np.asarray(exp["old_logps"]) - np.asarray(exp["ref_logps"]), 0.0)
    np.testing.assert_allclose(np.asarray(exp["kl"]), log_ratio.sum(1), atol=1e-4)
    # returns - values are GAE's advantages before whitening; with gamma = lam = 1 they telescope to
    # score - coef * (the KL still to come) - value
    task.lam = 1.0
    exp = task._rollout(policy, frozen, batch, jax.random.key(1), jnp.float32(0.1))
    to_come = np.flip(np.cumsum(np.flip(log_ratio, 1), 1), 1)
    want = (np.asarray(exp["score"])[:, None] - 0.1 * to_come)[mask]
    np.testing.assert_allclose(np.asarray(exp["returns"])[mask], want, atol=1e-4)
    kl = log_ratio.sum(1).mean()
    assert float(exp["kl_coef"]) == pytest.approx(0.1 * (1 + np.clip(kl / 1.0 - 1, -0.2, 0.2) * 4 / 100), rel=1e-5)


def test_prompt_files_name_file_and_line(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "Tell me about cats."}\n\n{"prompt": "Describe owls.", "chosen": "x"}\n')
    assert load_prompts(good) == ["Tell me about cats.", "Describe owls."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Tell me about cats."}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'prompt'"):
        load_prompts(bad)


# ---- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_and_reward(sft_run, tmp_path_factory):
    """The session's two-step SFT run and a reward model trained from it (tiny: for settings and
    resume, not quality)."""
    rm = tmp_path_factory.mktemp("ppo") / "rm"
    out = run_cli([sys.executable, "-m", "tfd_jax.cli", "train", "--task", "reward", "--init-from", str(sft_run),
                   "--out", str(rm), "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--no-progress",
                   "--ckpt-every", "2"])
    assert out.returncode == 0, out.stdout + out.stderr
    return sft_run, rm


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_bad_settings_are_refused_in_one_line_before_anything_is_written(sft_and_reward, tmp_path, capsys):
    sft, rm = sft_and_reward
    out = tmp_path / "ppo"
    code, err = _cli(capsys, "train", "--task", "ppo", "--init-from", sft, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "--task ppo needs --reward-model RUN" in err
    # a reward model that reads other ids
    other = tmp_path / "other_rm"
    shutil.copytree(rm, other)
    shutil.rmtree(other / "tokenizer")
    CharTokenizer.train("abc <>|", special_tokens=CHAT_TOKENIZER_SPECIALS).save(other / "tokenizer")
    code, err = _cli(capsys, "train", "--task", "ppo", "--init-from", sft, "--reward-model", other, "--out", out)
    assert code == 2 and err.count("\n") == 1 and "have different tokenizers" in err
    # a prompt longer than what the context leaves it
    code, err = _cli(capsys, "train", "--task", "ppo", "--init-from", sft, "--reward-model", rm, "--out", out,
                     "--seq-len", "60")
    assert code == 2 and err.count("\n") == 1 and "longer than the 12 left for it" in err, err
    # answers the reward model could not read to the end
    code, err = _cli(capsys, "train", "--task", "ppo", "--init-from", sft, "--reward-model", rm, "--out", out,
                     "--seq-len", "200")
    assert code == 2 and err.count("\n") == 1 and "reads at most 128 tokens" in err, err
    # a "reward model" that is not one; flags a task does not use; LoRA where it cannot go
    for argv, says in ((("--task", "ppo", "--init-from", sft, "--reward-model", sft), "holds a gpt model, not a reward model"),
                       (("--task", "sft", "--reward-model", rm), "--reward-model is for --task ppo, not --task sft"),
                       (("--task", "sft", "--reference", sft), "--reference is for tasks with a reference model"),
                       (("--task", "dpo", "--init-from", sft, "--reference", sft, "--lora", "4"), "--reference with --lora"),
                       (("--task", "mlm", "--lora", "4"), "LoRA adapters are for GPT models"),
                       (("--task", "dpo", "--init-from", sft, "--lora", "4", "--lora-targets", "attn.nope"),
                        "matches no Linear layer")):
        code, err = _cli(capsys, "train", *argv, "--out", out)
        assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not out.exists()


def _args(out: Path, sft: Path, rm: Path) -> list[str]:
    return [sys.executable, "-m", "tfd_jax.cli", "train", "--task", "ppo", "--init-from", str(sft), "--reward-model",
            str(rm), "--out", str(out), "--steps", "10", "--batch-size", "8", "--lr", "3e-3", "--log-every", "1",
            "--ckpt-every", "3", "--no-progress"]


@pytest.mark.slow
def test_ppo_resumes_exactly_after_kill_9_in_the_middle_of_a_rollouts_updates(sft_and_reward, tmp_path):
    """Checkpoints every 3 steps, a rollout every 4: the kill lands after step 6 (or 9), in the middle
    of a rollout's updates, and the resumed run must continue from the same experience."""
    sft, rm = sft_and_reward
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref, resumed = resumed_equals_reference(_args(ref_dir, sft, rm), _args(run_dir, sft, rm), ref_dir, run_dir, 10,
                                            ("reward", "kl", "clip_fraction", "entropy", "value_loss"))
    assert "resumed from step 6" in resumed or "resumed from step 9" in resumed  # mid-rollout either way
    assert ref[0]["kl"] == pytest.approx(0.0, abs=1e-4) and ref[0]["clip_fraction"] == 0.0
    assert ref[0]["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # the first update is at the sampling policy
    assert max(r["clip_fraction"] for r in ref) > 0  # later updates move the policy far enough to clip
    assert {"entropy", "explained_variance", "response_length", "kl_coef"} <= set(ref[-1])
    assert "rule_score" in resumed
    # tfd-jax plot on this real run: its curves, and the reward and KL of RLHF
    from matplotlib.image import imread

    assert main(["plot", str(ref_dir), "--dpi", "60"]) == 0
    for name in ("training", "rlhf", "metrics"):
        img = imread(ref_dir / "plots" / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 300 and img[..., :3].std() > 0.05, name
    # the same run on this process's eight devices (data=8; the experience's rows split over them):
    # the first rollout's updates give the one-device losses
    from tfd_jax.train.metrics import read_metrics

    eight = tmp_path / "eight"
    assert main([*_args(eight, sft, rm)[3:], "--ckpt-every", "10"]) == 0
    for a, b in zip(ref[:4], read_metrics(eight)):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["reward"] == pytest.approx(a["reward"], abs=1e-4)


def test_frozen_models_kept_in_bf16_give_nearly_the_same_experience():
    """``frozen_dtype="bfloat16"`` halves the frozen models' memory; they are read back in the
    policy's dtypes, so the reference's log-probs and the scores move by bf16 rounding only."""
    task, batch, _ = _task_and_batch()
    policy, reward = _model(0), _model(1)
    frozen = _frozen(task, policy, reward)
    frozen["reference"] = nnx.split(_model(2), nnx.Param, ...)[1]
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)  # as PPOTask.frozen stores them
    full_exp = task._rollout(policy, frozen, batch, jax.random.key(4), jnp.float32(0.1))
    half_exp = task._rollout(policy, half, batch, jax.random.key(4), jnp.float32(0.1))
    np.testing.assert_array_equal(np.asarray(half_exp["tokens"]), np.asarray(full_exp["tokens"]))  # the policy's own
    mask = np.asarray(full_exp["mask"])
    gap = np.abs(np.asarray(half_exp["ref_logps"]) - np.asarray(full_exp["ref_logps"]))[mask]
    assert 0 < gap.max() < 0.1
    np.testing.assert_allclose(np.asarray(half_exp["score"]), np.asarray(full_exp["score"]), atol=0.05)


def test_the_frozen_models_are_sharded_like_the_policy_and_can_be_bf16(sft_and_reward):
    """On a data x fsdp mesh of the test's eight devices: the reward model's parameters take the
    partition rules the policy's take, the reference is the policy's own placement, both in bf16."""
    from tfd_jax.train import sharding as shd
    from tfd_jax.train.checkpoint import load_for_inference

    sft, rm = sft_and_reward
    mesh = shd.make_mesh("data=2,fsdp=4")
    policy, tok = load_for_inference(sft, log=None)
    params = nnx.state(policy, nnx.Param)
    params = jax.device_put(params, shd.param_shardings(params, mesh))
    task = PPOTask(frozen_dtype="bfloat16")
    task.configure(TrainConfig(task="ppo", reward_model=str(rm), seq_len=96, batch_size=8))
    task.setup(tok, policy.config)
    frozen = task.frozen(params, nnx.State({}))
    reward_params = nnx.state(load_for_inference(rm, log=None)[0], nnx.Param)
    want = shd.param_shardings(reward_params, mesh)
    got = jax.tree.map(lambda x: x.sharding, frozen["reward"])
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in jax.tree.leaves(got))  # really split
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, frozen["reference"])) == \
        jax.tree.leaves(jax.tree.map(lambda x: x.sharding, params))
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}


def test_with_lora_the_reference_is_the_policy_with_its_adapters_off():
    """No reference copy: inside the jitted step (and its rollout branch) the reference log-probs
    are the policy's with every adapter switched off."""
    from tfd_jax.nn.lora import lora_disabled

    task, batch, _ = _task_and_batch()
    task.lora = True
    policy, reward = _model(0, lora_rank=2), _model(1)
    for path, var in nnx.to_flat_state(nnx.state(policy, nnx.Param)):
        if path[-1] == "lora_b":  # adapters that have learned something
            var.set_value(0.5 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
    frozen = _frozen(task, policy, reward)
    del frozen["reference"]
    step = jax.jit(lambda f, b: task.experience(policy, f, task.experience_buffer(), b, jnp.int32(0), jax.random.key(0)))
    exp, _ = step(frozen, batch)
    mask = np.asarray(exp["mask"])
    with lora_disabled(policy):
        base = -np.asarray(policy.token_losses(exp["tokens"], exp["targets"]))
    np.testing.assert_allclose(np.asarray(exp["ref_logps"])[mask], base[mask], atol=1e-5)
    assert np.abs(np.asarray(exp["kl"])).max() > 1e-2  # the adapted policy has moved away from its base
