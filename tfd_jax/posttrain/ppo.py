"""RLHF with PPO (Chapter 18): the policy writes answers, the reward model scores them, and PPO moves
the policy towards higher scores while a KL penalty keeps it near the model it started from.

``tfd-jax train --task ppo --init-from SFT_RUN --reward-model REWARD_RUN`` runs it on the one
``Trainer``. What the course leaves out and this module adds: the value head and GAE advantages,
the frozen reference and the per-token KL penalty, PPO's clipped policy and value losses over
minibatch epochs, and the adaptive KL coefficient.

**The models.** The policy is a :class:`~tfd_jax.models.reward.RewardModel`-shaped GPT: its
language-model head writes, its scalar head (started fresh) estimates the value of each state
(``policy_outputs``); the two share the blocks. Two frozen models ride along in ``Task.frozen``
(sharded like the policy, no optimizer state, optionally bf16): the **reference**, the starting
weights (or ``--reference RUN``; with LoRA adapters, ``--lora RANK``, no copy: the policy with its
adapters switched off), and the **reward model** of ``--reward-model`` (a ``--task
reward`` run with the policy's tokenizer).

**One rollout, several updates.** Every ``epochs * minibatches`` training steps, the step samples
answers to a batch of prompts (``tfd_jax.decode.rollout_traced``, inside the jitted step: the same
decode loop as ``generate``, whose log-probabilities are the old policy's), and computes once:

* the reward model's score of each prompt + answer (minus ``missing_eos_penalty`` for an answer
  cut off before ``<|end|>``);
* each answer token's KL to the reference (``losses.kl_estimate``, estimator ``kl_estimator``);
  with ``kl_placement="reward"`` (the InstructGPT recipe) ``-kl_coef * kl`` is added to every token's
  reward, with ``"loss"`` it is a term of the loss instead (``kl_coef`` times its mean; k2 or k3
  there, as the mean k1 of the old policy's samples has next to no gradient);
* values and GAE advantages (``losses.gae``; whitened) and returns.

That experience is kept in the training state (``state["buffer"]``), so a run resumed in the middle
of a rollout's updates carries on with exactly the same experience. Each step then trains on one
minibatch of it (a fresh permutation per epoch): ``ppo_policy_loss + vf_coef * value_loss``.
``kl_target`` (not None) makes ``kl_coef`` adaptive (``losses.adaptive_kl_update``, after each
rollout).

Answers are sampled at temperature 1 from the full distribution, so the sampler's log-probabilities
are the old policy's own (another temperature would make the update off-policy).

``metrics.jsonl`` logs per step: ``reward`` (the reward model's mean score), ``kl`` (mean summed k1
log-ratio per answer), ``kl_coef``, ``entropy`` (mean per answer token), ``clip_fraction``,
``approx_kl`` (old vs new policy), ``value_loss``, ``explained_variance`` of the value head and
``response_length``. At the end of a run on the built-in prompts, sampled answers to held-out
prompts are scored by the hidden rule (``rule_score``).

Shape letters: B rollout rows (``--batch-size``), P prompt width, N answer width
(``response_length``), T = P + N - 1 next-token positions.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfd_jax.posttrain.data import CHAT_SPECIAL_TOKENS, _check_text, _json_lines, builtin_prompts, chat_token_ids
from tfd_jax.posttrain.losses import (
    KL_ESTIMATORS,
    adaptive_kl_update,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)
from tfd_jax.posttrain.tasks import CHAT_TOKENIZER_SPECIALS, SFTTask, _examples_corpus, held_out_rule_score
from tfd_jax.train.config import TrainingError
from tfd_jax.train.tasks import Task

__all__ = ["PPOTask", "load_prompts"]

#: ``--data`` naming the built-in task's prompts
BUILTIN_PROMPTS = "prompts"


def load_prompts(path) -> list[str]:
    """Prompts for PPO from a JSONL file, one ``{"prompt": "..."}`` per line (blank lines skipped,
    other keys ignored, so a preference-pair file serves too). Errors name the file and line."""
    path = Path(path)
    out = [_check_text(row.get("prompt"), "prompt", f"{path}:{i}") for i, row in _json_lines(path, '{"prompt": "..."}')]
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


class _ReadPrompt:
    """Document index -> ``prompt_tokens`` int32 ``[P]`` (right-padded) and ``prompt_length``."""

    def __init__(self, tokens, offsets, width: int, pad_id: int):
        from tfd_jax.data.pipeline import _Tokens

        self.tokens, self.offsets, self.P, self.pad_id = _Tokens(tokens), np.asarray(offsets, np.int64), width, pad_id

    def __call__(self, doc: int) -> dict:
        d = np.asarray(self.tokens.array[self.offsets[doc]:self.offsets[doc + 1]], np.int32)
        row = np.full(self.P, self.pad_id, np.int32)
        row[: d.size] = d
        return {"prompt_tokens": row, "prompt_length": np.int32(d.size)}


class PPOTask(Task):
    """RLHF with PPO (Chapter 18); see the module notes. The defaults suit the built-in task on a CPU."""

    name = "ppo"
    arch = "reward"  # a GPT with a scalar head: here the value head
    init_archs = ("gpt",)
    fresh_params = ("value_head",)
    rows_add_up = False  # explained variance and the rollout means are statistics of the whole minibatch
    special_tokens = CHAT_TOKENIZER_SPECIALS
    extra_special_tokens = CHAT_SPECIAL_TOKENS
    takes_reward_model = True
    # Measured on the built-in task from the pipeline's SFT run (400 steps, 100 rollouts of 32): a
    # constant 1e-4 raised the held-out rule score 0.105 -> 0.485 at a KL of 3.1 nats; 3e-5 only
    # reached 0.21 in 200 steps, 3e-4 0.46 at a KL of 8.1.
    cli_defaults = {"data": BUILTIN_PROMPTS, "tokenizer": "char", "seq_len": 96, "batch_size": 32, "steps": 400,
                    "lr": 1e-4, "min_lr": 1e-4, "warmup": 0, "weight_decay": 0.0, "samples": 0, "dropout": 0.0}
    lora = False

    def __init__(self, *, response_length: int = 48, epochs: int = 2, minibatches: int = 2, clip: float = 0.2,
                 value_clip: float = 0.2, vf_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95,
                 kl_coef: float = 0.05, kl_estimator: str = "k1", kl_placement: str = "reward",
                 kl_target: float | None = None, kl_horizon: float = 10_000.0,
                 missing_eos_penalty: float = 1.0, frozen_dtype: str | None = None, prompts: int = 4000,
                 eval_prompts: int = 200):
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        if kl_placement not in ("reward", "loss"):
            raise ValueError(f"kl_placement must be 'reward' or 'loss', got {kl_placement!r}")
        if kl_placement == "loss" and kl_estimator == "k1":
            # the mean log-ratio of samples from the old policy has (nearly) zero gradient: no penalty at all
            raise ValueError("kl_placement='loss' needs a KL estimator whose gradient is the KL's: use 'k2' or 'k3'")
        for name, v in (("response_length", response_length), ("epochs", epochs), ("minibatches", minibatches)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if frozen_dtype not in (None, "bfloat16", "float32"):
            raise ValueError(f"frozen_dtype must be None, 'bfloat16' or 'float32', got {frozen_dtype!r}")
        self.response_length, self.epochs, self.minibatches = response_length, epochs, minibatches
        self.clip, self.value_clip, self.vf_coef, self.gamma, self.lam = clip, value_clip, vf_coef, gamma, lam
        self.kl_coef, self.kl_estimator, self.kl_placement = kl_coef, kl_estimator, kl_placement
        self.kl_target, self.kl_horizon = kl_target, kl_horizon
        self.missing_eos_penalty, self.frozen_dtype = missing_eos_penalty, frozen_dtype
        self.prompts, self.eval_prompts = prompts, eval_prompts

    # -- settings --------------------------------------------------------------------------------

    def check(self, cfg) -> list[str]:
        """Problems with the run's settings, found before anything is written."""
        from tfd_jax.train import rundir
        from tfd_jax.train.checkpoint import read_config

        problems = []
        if cfg.reward_model is None:
            problems.append("--task ppo needs --reward-model RUN: a run of --task reward (trained on preference "
                            "pairs with the policy's tokenizer) to score the answers")
        elif not rundir.is_run(cfg.reward_model):
            problems.append(f"--reward-model {cfg.reward_model} is not a run directory (no config.json)")
        else:
            reward_run = read_config(cfg.reward_model)
            arch = reward_run.get("arch", "gpt")
            if arch != "reward":
                problems.append(f"--reward-model {cfg.reward_model} holds a {arch} model, not a reward model; "
                                "train one with --task reward")
        if cfg.init_from is None and not cfg.resume:
            problems.append("--task ppo starts from a fine-tuned model: give --init-from RUN (e.g. the SFT run)")
        if cfg.seq_len <= self.response_length:
            problems.append(f"--seq-len {cfg.seq_len} leaves no room for a prompt before the {self.response_length}-token "
                            "answer; raise it")
        if cfg.batch_size % self.minibatches:
            problems.append(f"--batch-size {cfg.batch_size} must split into {self.minibatches} minibatches")
        if cfg.grad_accum != 1:
            problems.append("--task ppo updates on whole minibatches: --grad-accum must be 1")
        if not problems and cfg.init_from is not None:
            problems += self._tokenizer_problems(cfg.init_from, cfg.reward_model)
        if not problems:
            context = reward_run["model"].get("context_length", 0)
            if context < cfg.seq_len:
                problems.append(f"the reward model ({cfg.reward_model}) reads at most {context} tokens, fewer than a "
                                f"prompt and its answer (--seq-len {cfg.seq_len}); lower --seq-len")
        return problems

    @staticmethod
    def _tokenizer_problems(policy_dir, reward_dir) -> list[str]:
        from tfd_jax.train.init import open_source

        try:
            mine, theirs = open_source(policy_dir).tokenizer, open_source(reward_dir).tokenizer
        except TrainingError as e:
            return [str(e)]
        try:  # a policy from Hugging Face GPT-2 gains the chat markers, as its run's tokenizer will
            mine = mine.with_special_tokens(CHAT_SPECIAL_TOKENS)
        except ValueError:
            pass
        if mine.fingerprint() != theirs.fingerprint():
            return [f"the policy ({policy_dir}) and the reward model ({reward_dir}) have different tokenizers "
                    f"({mine.vocab_size:,} and {theirs.vocab_size:,} tokens, fingerprints {mine.fingerprint()} and "
                    f"{theirs.fingerprint()}); the reward model must read the policy's ids: train it from the same "
                    "SFT run (--task reward --init-from SFT_RUN)"]
        return []

    def configure(self, cfg) -> None:
        self.reward_dir = cfg.reward_model
        self.N, self.P = self.response_length, cfg.seq_len - self.response_length
        self.B, self.rows = cfg.batch_size, cfg.batch_size // self.minibatches

    def setup(self, tokenizer, model_config) -> None:
        if model_config is not None:  # (the data iterator calls setup with the tokenizer alone)
            self.lora = bool(getattr(model_config, "lora_rank", 0))
        marks = chat_token_ids(tokenizer)
        self.end_id = marks["end"]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    # -- data ------------------------------------------------------------------------------------

    def corpus(self, cfg, split, max_bytes):
        return _examples_corpus(cfg, split, BUILTIN_PROMPTS, "prompts", '{"prompt": "..."}',
                                lambda n: builtin_prompts(split, n=n, seed=cfg.seed), self.prompts, load_prompts,
                                lambda p: f"<|user|>{p}<|end|><|assistant|>")

    tokenizer_text = SFTTask.tokenizer_text

    def iterator(self, cfg, tokens, tokenizer, *, seed):
        from tfd_jax.data.pairs import documents_iterator

        self.configure(cfg)
        self.setup(tokenizer, None)
        lengths = np.diff(np.asarray(tokens.offsets, np.int64))
        if lengths.size and lengths.max() > self.P:
            k = int(np.argmax(lengths))
            raise TrainingError(f"prompt {k} of {tokens.path} is {int(lengths[k])} tokens in the chat template, longer "
                                f"than the {self.P} left for it (--seq-len {cfg.seq_len} minus the {self.N}-token "
                                "answer); raise --seq-len or shorten the prompt")
        read = _ReadPrompt(tokens.tokens, tokens.offsets, self.P, self.pad_id)
        return documents_iterator(tokens, read, batch_size=cfg.batch_size, seed=seed, what="prompts")

    # -- the frozen models -----------------------------------------------------------------------

    def frozen(self, params, fixed):
        from tfd_jax.train import sharding as shd
        from tfd_jax.train.checkpoint import load_for_inference

        reward, _ = load_for_inference(self.reward_dir, log=None)
        self.reward_graph, reward_params, self.reward_rest = nnx.split(reward, nnx.Param, ...)
        mesh = jax.tree.leaves(params)[0].sharding.mesh
        reward_params = jax.device_put(reward_params, shd.param_shardings(reward_params, mesh))
        trees = {"reward": reward_params}
        if not self.lora:  # (with LoRA the policy with its adapters off is the reference: no copy)
            trees["reference"] = nnx.merge_state(params, fixed) if jax.tree.leaves(fixed) else params
        if self.frozen_dtype == "bfloat16":  # half the memory; the models still compute as configured
            trees = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, trees)
        return trees

    def _reference_logps(self, policy, frozen, tokens, targets):
        if "reference" not in frozen:  # LoRA
            from tfd_jax.nn.lora import lora_disabled

            reference = nnx.merge(*nnx.split(policy))  # a copy of this trace's own, so its switches may change
            with lora_disabled(reference):
                return -reference.token_losses(tokens, targets)
        graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
        return -nnx.merge(graphdef, _like(frozen["reference"], params), rest).token_losses(tokens, targets)

    def _reward_scores(self, frozen, seq, lengths):
        params = _upcast(frozen["reward"])
        return nnx.merge(self.reward_graph, params, self.reward_rest).score(seq, lengths)

    # -- experience ------------------------------------------------------------------------------

    def experience_buffer(self):
        """The experience's shapes (zeros): what the training state holds between rollouts."""
        B, T = self.B, self.P + self.N - 1
        f = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
        return {"tokens": jnp.zeros((B, T), jnp.int32), "targets": jnp.zeros((B, T), jnp.int32),
                "mask": jnp.zeros((B, T), bool), "old_logps": f(B, T), "old_values": f(B, T),
                "ref_logps": f(B, T), "advantages": f(B, T), "returns": f(B, T), "score": f(B), "kl": f(B),
                "response_length": f(B), "kl_coef": jnp.asarray(self.kl_coef, jnp.float32)}

    def experience(self, policy, frozen, buffer, batch, step, base_key):
        K = self.epochs * self.minibatches
        i = step % K
        key = jax.random.fold_in(base_key, step - i)  # one key per rollout, whichever step asks
        buffer = jax.lax.cond(i == 0, lambda: self._rollout(policy, frozen, batch, key, buffer["kl_coef"]),
                              lambda: buffer)
        perm = jax.random.permutation(jax.random.fold_in(key, 1 + i // self.minibatches), self.B)
        rows = jax.lax.dynamic_slice_in_dim(perm, (i % self.minibatches) * self.rows, self.rows)
        minibatch = {k: v[rows] for k, v in buffer.items() if k != "kl_coef"}
        minibatch["kl_coef"] = jnp.broadcast_to(buffer["kl_coef"], (self.rows,))
        return buffer, minibatch

    def _rollout(self, policy, frozen, batch, key, kl_coef) -> dict:
        from tfd_jax.decode import rollout_traced

        prompts, plen = batch["prompt_tokens"], batch["prompt_length"]
        N, L = self.N, self.P + self.N
        # at temperature 1: the answers come from the policy itself, so its log-probs are the old policy's
        out = rollout_traced(policy, prompts, plen, N, key=key, temperature=1.0, eos_id=self.end_id,
                             pad_id=self.pad_id)
        t = jnp.arange(L)[None, :]
        k = t - plen[:, None]  # index into the answer
        answer = jnp.take_along_axis(out.tokens, jnp.clip(k, 0, N - 1), axis=1)
        padded_prompts = jnp.pad(prompts, ((0, 0), (0, N)), constant_values=self.pad_id)
        seq = jnp.where(k < 0, padded_prompts, jnp.where(k < out.lengths[:, None], answer, self.pad_id))
        tokens, targets = seq[:, :-1], seq[:, 1:]
        j = k[:, :-1] + 1  # the answer index of each target
        mask = (j >= 0) & (j < out.lengths[:, None])
        old_logps = jnp.where(mask, jnp.take_along_axis(out.log_probs, jnp.clip(j, 0, N - 1), axis=1), 0.0)
        ref_logps = jnp.where(mask, self._reference_logps(policy, frozen, tokens, targets), 0.0)
        _, values = policy.policy_outputs(tokens)
        values = jnp.where(mask, values, 0.0)
        finished = jnp.any(out.mask & (out.tokens == self.end_id), axis=1)
        score = self._reward_scores(frozen, seq, plen + out.lengths) - self.missing_eos_penalty * (~finished)
        kl = jnp.where(mask, kl_estimate(old_logps, ref_logps, self.kl_estimator), 0.0)
        last = mask & (j == out.lengths[:, None] - 1)
        rewards = score[:, None] * last - (kl_coef * kl if self.kl_placement == "reward" else 0.0)
        advantages, returns = gae(rewards, values, mask, gamma=self.gamma, lam=self.lam)
        advantages = jnp.where(mask, masked_whiten(advantages, mask), 0.0)
        seq_kl = jnp.sum(jnp.where(mask, old_logps - ref_logps, 0.0), axis=1)
        if self.kl_target is not None:
            kl_coef = adaptive_kl_update(kl_coef, jnp.mean(seq_kl), self.B, target=self.kl_target,
                                         horizon=self.kl_horizon).astype(jnp.float32)
        return {"tokens": tokens, "targets": targets, "mask": mask, "old_logps": old_logps, "old_values": values,
                "ref_logps": ref_logps, "advantages": advantages, "returns": returns, "score": score, "kl": seq_kl,
                "response_length": out.lengths.astype(jnp.float32), "kl_coef": jnp.asarray(kl_coef, jnp.float32)}

    # -- the loss --------------------------------------------------------------------------------

    def loss_fn(self, model, batch, frozen):
        mask = batch["mask"]
        logits, values = model.policy_outputs(batch["tokens"])
        logp_all = jax.nn.log_softmax(logits, axis=-1)
        logps = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
        policy_loss, stats = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, clip=self.clip)
        v_loss = value_loss(values, batch["old_values"], batch["returns"], mask, clip=self.value_clip)
        loss = policy_loss + self.vf_coef * v_loss
        if self.kl_placement == "loss":
            loss = loss + batch["kl_coef"][0] * masked_mean(kl_estimate(logps, batch["ref_logps"], self.kl_estimator), mask)
        entropy = masked_mean(-jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1), mask)
        residual = jnp.where(mask, batch["returns"] - batch["old_values"], 0.0)
        explained = 1.0 - _masked_var(residual, mask) / jnp.maximum(_masked_var(batch["returns"], mask), 1e-8)
        count = jnp.sum(mask.astype(jnp.float32))
        per = lambda x: jax.lax.stop_gradient(x) * count  # noqa: E731  (the Trainer divides sums by count)
        return loss * count, count, {
            "policy_loss": per(policy_loss), "value_loss": per(v_loss), "entropy": per(entropy),
            "clip_fraction": per(stats["clip_fraction"]), "approx_kl": per(stats["approx_kl"]),
            "explained_variance": per(explained), "reward": per(jnp.mean(batch["score"])),
            "kl": per(jnp.mean(batch["kl"])), "kl_coef": per(batch["kl_coef"][0]),
            "response_length": per(jnp.mean(batch["response_length"]))}

    def final_metrics(self, model, tokenizer, run_dir, cfg, log) -> dict | None:
        return held_out_rule_score(model, tokenizer, cfg, log, builtin=BUILTIN_PROMPTS, prompts=self.eval_prompts)


def _masked_var(x, mask):
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def _upcast(tree):
    """bf16-stored frozen weights back in float32 (the models' own compute dtype then applies)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, tree)


def _like(stored, params):
    """Frozen weights in the dtypes of the policy's parameters (bf16 storage read back)."""
    return jax.tree.map(lambda s, p: s.astype(p.dtype), stored, params)
