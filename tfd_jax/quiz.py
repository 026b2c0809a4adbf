"""Chapter 20's quizzes, each answer backed by a live check the library computes.

Every question of the course's two quizzes (for kids and for engineers) has its answer and a small
experiment that shows the answer is true of *this* library's code: the checks call
:mod:`tfd_jax.ops`, :mod:`tfd_jax.nn` and the models through their modules, so if one of those
functions were wrong (scores not divided by sqrt(d_k), a mask that lets queries see the future, a
LayerNorm that looked across the batch) the matching check would fail. ``tests/test_quiz.py``
shows that it does.

    from tfd_jax.quiz import run_quiz
    for r in run_quiz():
        print(r.id, r.passed, r.measured)

or ``tfd-jax quiz`` (``--id E1`` for one question, ``--json`` for machines; exit status 1 if a
check fails).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Question:
    id: str  # "K1".."K5" (kids), "E1".."E11" (engineers)
    question: str
    answer: str
    check: str  # what the live check computes
    run: Callable[[], tuple[bool, str]]  # -> (passed, what was measured)


@dataclass(frozen=True)
class QuizResult:
    id: str
    question: str
    answer: str
    check: str
    measured: str
    passed: bool


def _attention_module():
    """``tfd_jax.ops.attention`` the module (the package's ``attention`` attribute is the function)."""
    import importlib

    return importlib.import_module("tfd_jax.ops.attention")


def _key(i: int):
    import jax

    return jax.random.key(i)


def _normal(i: int, shape):
    import jax

    return jax.random.normal(_key(i), shape)


# ----------------------------------------------------------------------------- kids


def _k1_positions():
    """Without positions, attention is blind to word order: the words of "pizza love I" get exactly the
    vectors they get in "I love pizza", only shuffled. Adding the sinusoidal table breaks the tie."""
    import jax
    import jax.numpy as jnp

    from tfd_jax import ops

    x = _normal(1, (3, 6))  # "I", "love", "pizza"
    w_q, w_k, w_v = (_normal(2 + i, (6, 6)) for i in range(3))
    perm = jnp.array([2, 1, 0])  # "pizza love I"

    def words(x):  # bidirectional self-attention, one head of width 6: [3, 6] -> [3, 6]
        q, k, v = ((x @ w)[None, :, None, :] for w in (w_q, w_k, w_v))
        return ops.attention(q, k, v)[0, :, 0]

    @jax.jit
    def gaps(x, pe):  # how far each word's vector moves when the sentence is reversed
        return (jnp.abs(words(x[perm]) - words(x)[perm]).max(),
                jnp.abs(words(x[perm] + pe) - words(x + pe)[perm]).max())

    same, with_pe = map(float, gaps(x, ops.sinusoidal_positions(3, 6)))
    return same < 1e-5 and with_pe > 1e-2, (f"no positions: each word's vector is the same in both orders (max "
                                             f"difference {same:.1e}); with positions it differs by {with_pe:.3f}")


def _k2_whispering():
    """Each word's new vector is a weighted average of what every word says (its value), with
    non-negative weights that add up to 1."""
    import jax.numpy as jnp

    from tfd_jax import ops

    q, k, v = (_normal(10 + i, (1, 5, 2, 4)) for i in range(3))
    w = ops.attention_weights(q, k)  # [B, H, T, S]
    out = ops.attention(q, k, v)
    manual = jnp.einsum("bhts,bshd->bthd", w, v)
    rows = float(jnp.abs(w.sum(-1) - 1).max())
    gap = float(jnp.abs(out - manual).max())
    return bool(rows < 1e-5 and float(w.min()) >= 0 and gap < 1e-5), (
        f"weights >= 0 (min {float(w.min()):.3f}), rows sum to 1 (off by {rows:.1e}), output = weights @ values "
        f"(off by {gap:.1e})")


def _k3_echo():
    """A residual connection adds each layer's change to what came in, so the input is still "heard"
    after many layers: the output stays close to the input. Without it, the signal is replaced."""
    import jax
    import jax.numpy as jnp

    from tfd_jax import ops

    M, F, L = 32, 64, 12
    x = _normal(20, (8, M))
    layers = [(0.1 * _normal(100 + i, (M, F)) / math.sqrt(M), 0.1 * _normal(200 + i, (F, M)) / math.sqrt(F))
              for i in range(L)]

    def cos(a, b):  # mean cosine similarity of matching rows (0 for a vector that vanished)
        a, b = (v / jnp.maximum(jnp.abs(v).max(-1, keepdims=True), 1e-30) for v in (a, b))  # any scale
        norms = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
        return float(jnp.mean(jnp.sum(a * b, -1) / norms))

    @jax.jit
    def stacks(x):
        h_res, h_plain = x, x
        for w_in, w_out in layers:
            h_res = h_res + ops.feed_forward(h_res, w_in, None, w_out, None)
            h_plain = ops.feed_forward(h_plain, w_in, None, w_out, None)
        return h_res, h_plain

    h_res, h_plain = stacks(x)
    with_res, without = cos(x, h_res), cos(x, h_plain)
    scale = float(jnp.linalg.norm(h_plain) / jnp.linalg.norm(x))
    return with_res > 0.9 and abs(without) < 0.5, (
        f"after {L} layers, cosine(input, output) = {with_res:.3f} with residuals and {without:.3f} without "
        f"(the plain stack also shrank the signal to {scale:.1e} of its size)")


def _k4_dropout():
    """Dropout closes a random 10% of the "ears" (units) during training and turns the others up by
    1/0.9, so the average stays the same; at inference nobody is deaf."""
    import jax.numpy as jnp

    from tfd_jax import ops

    x = jnp.ones((200_000,))
    y = ops.dropout(x, 0.1, _key(30))
    closed = float(jnp.mean(y == 0))
    survivors = float(y[y > 0].min()), float(y[y > 0].max())
    mean = float(jnp.mean(y))
    same = bool(jnp.array_equal(ops.dropout(x, 0.1, _key(30), deterministic=True), x))
    ok = abs(closed - 0.1) < 0.005 and abs(mean - 1.0) < 0.01 and abs(survivors[0] - 1 / 0.9) < 1e-6 \
        and survivors[0] == survivors[1] and same
    return ok, (f"{closed:.2%} zeroed, survivors x{survivors[0]:.4f} (1/0.9 = {1 / 0.9:.4f}), mean {mean:.4f}; "
                f"identity at inference: {same}")


def _k5_cake():
    """Softmax shares one cake: every slice is positive, the slices add up to the whole cake, and a
    bigger score gets a bigger slice. The course's scores 0.15, 0.42, 0.89 get 22.7%, 29.7% and 47.6%."""
    import jax.numpy as jnp

    from tfd_jax import ops

    scores = jnp.array([0.15, 0.42, 0.89])
    # one query of width 1 against three keys, unscaled: the weights are softmax(scores)
    w = ops.attention_weights(jnp.ones((1, 1, 1, 1)), scores.reshape(1, 3, 1, 1), scale=1.0)[0, 0, 0]
    share = [round(float(p) * 100, 1) for p in w]
    ok = share == [22.7, 29.7, 47.6] and abs(float(w.sum()) - 1) < 1e-6 and bool(jnp.all(jnp.diff(w) > 0))
    return ok, f"shares {share}% (the course prints 19/31/50, erratum 11), total {float(w.sum()) * 100:.1f}%"


# ----------------------------------------------------------------------------- engineers


def _e1_sqrt_dk():
    """Dot products of d_k unit-variance numbers have variance d_k; dividing by sqrt(d_k) brings them
    back to variance 1, so the softmax is not pushed to one-hot (saturated, with vanishing gradients)."""
    import jax.numpy as jnp

    att = _attention_module()

    d_k = 64
    q, k = _normal(40, (4, 128, 1, d_k)), _normal(41, (4, 128, 1, d_k))
    scaled = att.attention_scores(q, k)
    raw = jnp.einsum("bthd,bshd->bhts", q, k)
    w_scaled = att.attention_weights(q, k)
    w_raw = att.attention_weights(q, k, scale=1.0)
    var_s, var_r = float(jnp.var(scaled)), float(jnp.var(raw))
    top_s, top_r = float(w_scaled.max(-1).mean()), float(w_raw.max(-1).mean())
    ok = 0.8 < var_s < 1.25 and var_r > 0.5 * d_k and top_s < 0.2 < top_r
    return ok, (f"d_k = {d_k}: variance of q.k/sqrt(d_k) = {var_s:.3f}, of q.k = {var_r:.1f}; largest weight per "
                f"row {top_s:.3f} scaled vs {top_r:.3f} unscaled")


def _flops(fn, *args) -> float:
    import jax

    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def _e2_complexity():
    """Every token scores every token: an n x n table of d-long dot products, O(n^2 d). Doubling the
    sentence quadruples the work; doubling the width doubles it. (The course's toy: 3^2 x 6 = 54.)"""
    import jax.numpy as jnp

    att = _attention_module()

    def cost(n, d):
        q = jnp.zeros((1, n, 1, d))
        return _flops(lambda q, k, v: att.attention(q, k, v), q, q, q)

    base = cost(128, 32)
    longer, wider = cost(256, 32) / base, cost(128, 64) / base
    shape = att.attention_weights(jnp.zeros((1, 3, 1, 6)), jnp.zeros((1, 3, 1, 6))).shape
    ok = 3.6 < longer < 4.4 and 1.8 < wider < 2.2 and shape[-2:] == (3, 3)
    return ok, (f"XLA's FLOP count: x{longer:.2f} for twice the tokens, x{wider:.2f} for twice the width; the weights "
                f"of 3 tokens are a {shape[-2]} x {shape[-1]} table")


def _e3_gradient_highway():
    """d(x + f(x))/dx = I + df/dx: the identity term carries the gradient back through every layer,
    however small f's own derivative is. Without the residual the gradient shrinks layer by layer."""
    import jax
    import jax.numpy as jnp

    from tfd_jax import ops

    M, F, L = 16, 32, 12
    x = _normal(50, (M,))
    layers = [(0.1 * _normal(300 + i, (M, F)) / math.sqrt(M), 0.1 * _normal(400 + i, (F, M)) / math.sqrt(F))
              for i in range(L)]

    def stack(x, residual):
        for w_in, w_out in layers:
            y = ops.feed_forward(x, w_in, None, w_out, None)
            x = x + y if residual else y
        return x

    u = _normal(51, (M,))
    u = u / jnp.linalg.norm(u)  # a unit gradient arriving at the top of the stack

    @jax.jit
    def backward(x):  # |u^T d out / d in| with and without residuals, and one layer's Jacobian
        g_res = jax.vjp(lambda x: stack(x, True), x)[1](u)[0]
        g_plain = jax.vjp(lambda x: stack(x, False), x)[1](u)[0]
        one = jax.jacfwd(lambda x: x + ops.feed_forward(x, layers[0][0], None, layers[0][1], None))(x)
        return jnp.linalg.norm(g_res), jnp.linalg.norm(g_plain), jnp.abs(jnp.diag(one) - 1).max()

    s_res, s_plain, identity_part = map(float, backward(x))
    ok = 0.5 < s_res < 2.0 and s_plain < 1e-6
    return ok, (f"a unit gradient at the top of {L} layers reaches the input with size {s_res:.3f} through "
                f"residuals and {s_plain:.1e} without; one residual layer's Jacobian is I + small (diagonal within "
                f"{identity_part:.3f} of 1)")


def _e4_layernorm():
    """LayerNorm normalises each token's own vector, so a sample's output never depends on the rest of
    the batch or on how long the other sequences are; BatchNorm's does (and it needs batch statistics
    at inference)."""
    import jax
    import jax.numpy as jnp

    from tfd_jax.ops import norms

    def batch_norm(x):  # statistics over batch and positions, per feature
        return (x - x.mean((0, 1))) / jnp.sqrt(x.var((0, 1)) + 1e-5)

    @jax.jit
    def measure(a, b):
        ln_a, ln_b = norms.layer_norm(a, None, None), norms.layer_norm(b, None, None)
        alone = norms.layer_norm(a[:1, :3], None, None)  # the first sample's first 3 tokens, batch of one
        return (jnp.abs(ln_a[0] - ln_b[0]).max(), jnp.abs(ln_a[0, :3] - alone[0]).max(),
                jnp.abs(batch_norm(a)[0] - batch_norm(b)[0]).max(),
                jnp.abs(ln_a.mean(-1)).max(), jnp.abs(ln_a.var(-1) - 1).max())

    a = _normal(60, (4, 7, 16)) * 3 + 1
    b = a.at[1:].set(_normal(61, (3, 7, 16)) * 10 - 5)  # same first sample, different batch mates
    ln_gap, short_gap, bn_gap, *rows = map(float, measure(a, b))
    ok = ln_gap < 1e-5 and short_gap < 1e-5 and bn_gap > 0.1 and rows[0] < 1e-4 and rows[1] < 1e-2
    return ok, (f"sample 0 after LayerNorm moves by {ln_gap:.1e} when its batch mates change and by {short_gap:.1e} "
                f"when it is normalised alone and shorter; after BatchNorm by {bn_gap:.2f}")


def _e5_multi_head():
    """Several heads look at the sentence in different learned subspaces at the same cost: with the
    same width, 1, 2 or 4 heads have the same 4 d^2 projection weights, and the heads' attention
    patterns differ from one another."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tfd_jax import nn
    from tfd_jax.models import count_params

    att = _attention_module()
    M = 12
    counts = {}
    for H in (1, 2, 4):
        mha = nn.MultiHeadAttention(M, H, rngs=nnx.Rngs(0))  # the library's default initialisation
        counts[H] = count_params(mha)
    # as after training, weights large enough for the scores to matter (the default init is small)
    mha = nn.MultiHeadAttention(M, 4, kernel_init=jax.nn.initializers.normal(1 / math.sqrt(M)), rngs=nnx.Rngs(1))
    x = _normal(70, (1, 6, M))
    q = att.split_heads(mha.q(x), 4)
    k = att.split_heads(mha.k(x), 4)
    w = att.attention_weights(q, k)[0]  # [H, T, S]
    gaps = [float(jnp.abs(w[i] - w[j]).mean()) for i in range(4) for j in range(i + 1, 4)]
    ok = len(set(counts.values())) == 1 and counts[1] == 4 * M * M and min(gaps) > 0.01
    return ok, (f"projection weights at d_model {M}: {counts} (4 d^2 = {4 * M * M}) whatever the number of heads; "
                f"mean difference between two heads' patterns >= {min(gaps):.3f}")


def _apply(cls, config, fn, *args):
    """``fn(model, *args)`` for a fresh ``cls(config)`` in eval mode, built and run inside one jitted
    function (on a CPU much faster than creating the parameters op by op and compiling twice)."""
    import jax
    from flax import nnx

    def run(*a):
        model = cls(config, rngs=nnx.Rngs(0))
        model.eval()
        return fn(model, *a)

    return jax.jit(run)(*args)


def _gpt_logits(tokens):
    """The course's GPT (random weights, vocabulary 50): logits ``[B, T, 50]``."""
    from tfd_jax.models import GPT, GPTConfig

    return _apply(GPT, GPTConfig.preset("course", vocab_size=50, attention_impl="reference"), lambda m, t: m(t), tokens)


def _e6_decoder_only():
    """The course builds a decoder-only model (GPT): a token's prediction can use only the tokens before
    it, so changing a later token changes nothing earlier."""
    import jax.numpy as jnp

    a = jnp.array([3, 7, 11, 19, 23])
    logits = _gpt_logits(jnp.stack([a, a.at[3].set(42)]))  # both sentences in one batch
    before = float(jnp.abs(logits[0, :3] - logits[1, :3]).max())
    after = float(jnp.abs(logits[0, 3:] - logits[1, 3:]).max())
    ok = before < 1e-6 and after > 1e-4
    return ok, (f"GPT('course'): changing token 3 moves the logits at positions 0-2 by {before:.1e} and at 3-4 by "
                f"{after:.3f}")


def _e7_encoder_vs_decoder():
    """An encoder (BERT) reads the whole sentence in both directions; a decoder (GPT) reads left to right.
    Their masks: all ones, and the lower triangle."""
    import jax.numpy as jnp
    from flax import nnx

    from tfd_jax.models import Bert, BertConfig
    att = _attention_module()

    a = jnp.array([3, 7, 11, 19])
    pair = jnp.stack([a, a.at[3].set(42)])
    h = _apply(Bert, BertConfig.preset("course-encoder", vocab_size=50), lambda m, t: m.encode(t), pair)
    logits = _gpt_logits(pair)
    enc = float(jnp.abs(h[0, 0] - h[1, 0]).max())
    dec = float(jnp.abs(logits[0, 0] - logits[1, 0]).max())
    pos = jnp.arange(4)[None]
    m_enc = att.attention_mask(q_positions=pos, k_positions=pos, causal=False)
    m_dec = att.attention_mask(q_positions=pos, k_positions=pos, causal=True)
    tril = np.tril(np.ones((4, 4), bool))
    m_enc, m_dec = (np.broadcast_to(np.asarray(True if m is None else m), (1, 1, 4, 4))[0, 0] for m in (m_enc, m_dec))
    shapes_ok = bool(m_enc.all()) and np.array_equal(m_dec, tril)
    ok = enc > 1e-4 and dec < 1e-6 and shapes_ok
    return ok, (f"changing the last token moves the first position's output by {enc:.3f} in BERT and {dec:.1e} in "
                f"GPT; masks all-True and lower-triangular: {shapes_ok}")


def _e8_encoder_decoder():
    """Translation and summarisation map one sequence to another of a different length: the encoder
    reads the whole source, and every target position's cross-attention can look at all of it."""
    import jax.numpy as jnp
    from flax import nnx

    from tfd_jax.models import EncoderDecoder, Seq2SeqConfig

    src = jnp.array([5, 6, 7, 8, 9, 10, 11])  # 7 source tokens
    tgt = jnp.array([[1, 12, 13]])  # 3 target tokens
    # row 0 the source, row 1 + s the source with token s changed: one batch
    srcs = jnp.concatenate([src[None], jnp.stack([src.at[s].set(30) for s in range(7)])])
    out, maps = _apply(EncoderDecoder, Seq2SeqConfig.preset("tiny", vocab_size=40),
                       lambda m, s, t: (m(s, jnp.repeat(t, 8, axis=0))[:, 0],  # the first target position
                                        m.cross_attention_weights(s[:1], t)), srcs, tgt)
    moved = [float(x) for x in jnp.abs(out[1:] - out[0]).max(-1)]
    shape = tuple(maps[0].shape[-2:])
    ok = min(moved) > 1e-5 and shape == (3, 7) and bool(jnp.all(maps[0] > 0))
    return ok, (f"the first target token's logits move when any of the 7 source tokens changes (smallest change "
                f"{min(moved):.1e}); cross-attention maps are target x source = {shape[0]} x {shape[1]}")


def _e9_pretrain_vs_finetune():
    """Pre-training learns language from raw text (every next token is a target); fine-tuning continues
    from those weights on a small task-shaped dataset, e.g. conversations where only the assistant's
    reply is trained on."""
    from tfd_jax.posttrain.data import render_chat
    from tfd_jax.posttrain.tasks import CHAT_TOKENIZER_SPECIALS
    from tfd_jax.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.!?,", special_tokens=CHAT_TOKENIZER_SPECIALS)
    user, reply = "Tell me about cats.", "Cats are lovely!"
    ids, mask = render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], tok)
    trained = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    share = sum(mask) / len(mask)
    ok = reply in trained and user not in trained and 0 < share < 1
    return ok, (f"pre-training: every token of a window is a target; SFT on a conversation of {len(ids)} tokens "
                f"trains on {sum(mask)} ({share:.0%}): {trained!r}")


def _e10_chatgpt():
    """ChatGPT = a pre-trained GPT + instruction tuning (SFT) + RLHF (a reward model learned from human
    preferences, then PPO). The library's pipeline runs exactly those stages; the reward model's
    pairwise loss is ln 2 when it cannot tell a better answer from a worse one and falls as it ranks
    the better one higher."""
    import jax.numpy as jnp

    from tfd_jax.posttrain import losses
    from tfd_jax.posttrain.pipeline import DEFAULT_STEPS

    stages = list(DEFAULT_STEPS)
    tie = float(jnp.mean(losses.reward_model_loss(jnp.zeros(4), jnp.zeros(4))))
    better = float(jnp.mean(losses.reward_model_loss(jnp.full(4, 2.0), jnp.zeros(4))))
    ok = stages[:4] == ["pretrain", "sft", "reward", "ppo"] and abs(tie - math.log(2)) < 1e-6 and better < tie
    return ok, (f"pipeline stages {stages}; reward-model loss {tie:.4f} (ln 2 = {math.log(2):.4f}) at a tie, "
                f"{better:.4f} when the chosen answer scores 2 higher")


def _e11_no_millions():
    """You do not need millions: start from pre-trained weights and fine-tune only a little of them.
    With LoRA of rank 8 on GPT-2's attention, well under 1% of the numbers train."""
    import jax
    from flax import nnx

    from tfd_jax.models import GPT, GPTConfig, count_params

    cfg = GPTConfig.preset("gpt2", lora_rank=8, lora_alpha=16)
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))  # shapes only: nothing is allocated
    from tfd_jax.nn.lora import LORA_FILTER

    lora = sum(int(x.size) for x in jax.tree.leaves(nnx.state(abstract, LORA_FILTER)))
    total = count_params(abstract)
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    expected = cfg.num_layers * len(targets) * 8 * (cfg.d_model + cfg.d_model)  # q and v are [M, M]
    ok = lora == expected and lora / total < 0.01
    return ok, (f"GPT-2 124M with LoRA rank 8 on {', '.join(targets)}: {lora:,} of {total:,} numbers "
                f"train ({lora / total:.3%}); r (in + out) per layer gives {expected:,}")


QUESTIONS: tuple[Question, ...] = (
    Question("K1", "Why do we add position signals?",
             "Because attention alone treats a sentence as a bag of words: \"I love pizza\" and \"pizza love I\" "
             "would look the same.", "self-attention of a shuffled sentence, with and without positions", _k1_positions),
    Question("K2", "What is attention like?",
             "Friends whispering: each word listens to all the others, more to the ones that matter to it, and "
             "mixes what they say.", "attention weights and the weighted sum of values", _k2_whispering),
    Question("K3", "What are residual connections like?",
             "An echo in a long hallway: what you said at the start can still be heard at the end.",
             "input/output similarity after 12 layers, with and without residuals", _k3_echo),
    Question("K4", "What does dropout do?",
             "It closes some ears at random during practice, so no single listener is relied on.",
             "ops.dropout's zeroed fraction, survivor scale and mean", _k4_dropout),
    Question("K5", "What is softmax like?",
             "Sharing a cake fairly: everyone gets a positive slice, bigger scores get bigger slices, and the "
             "slices make one whole cake.", "softmax of the course's scores 0.15, 0.42, 0.89", _k5_cake),
    Question("E1", "Why divide the attention scores by sqrt(d_k)?",
             "q.k sums d_k products, so its variance grows with d_k; large scores saturate the softmax and its "
             "gradients vanish. Dividing by sqrt(d_k) keeps the variance near 1.",
             "variance of scaled and unscaled scores of random q, k; how peaked the weights are", _e1_sqrt_dk),
    Question("E2", "What is the complexity of self-attention?",
             "O(n^2 d): n x n scores, each a d-long dot product (plus the same again to mix the values).",
             "XLA's FLOP count of ops.attention as n and d double", _e2_complexity),
    Question("E3", "Why do residual connections help deep networks train?",
             "They are a gradient highway: the derivative of x + f(x) contains the identity, so gradients reach "
             "early layers undiminished.", "the Jacobian of a 12-layer stack with and without residuals",
             _e3_gradient_highway),
    Question("E4", "Why LayerNorm rather than BatchNorm?",
             "It normalises each token by its own statistics, so it works for any sequence length and batch size, "
             "the same in training and inference.", "one sample's LayerNorm output as its batch changes, next to "
             "BatchNorm's", _e4_layernorm),
    Question("E5", "What is multi-head attention for?",
             "Several heads attend in different learned subspaces at once (one to syntax, one to meaning ...), "
             "for the same number of weights as one big head.",
             "projection weights for 1, 2, 4 heads; how different the heads' patterns are", _e5_multi_head),
    Question("E6", "Which architecture did we learn?",
             "Decoder-only (GPT): causal self-attention, predicting the next token.",
             "the course model's logits when a later token changes", _e6_decoder_only),
    Question("E7", "Encoder versus decoder?",
             "An encoder sees the whole input in both directions (understanding); a decoder sees only the past "
             "(generation).", "BERT's and GPT's first output when the last token changes; their masks",
             _e7_encoder_vs_decoder),
    Question("E8", "When do you use an encoder-decoder?",
             "When the output is a different sequence made from a whole input: translation, summarisation.",
             "which source tokens reach the decoder's first output; the cross-attention map's shape",
             _e8_encoder_decoder),
    Question("E9", "Pre-training versus fine-tuning?",
             "Pre-training learns general language from huge raw text; fine-tuning adapts those weights to a task "
             "with little data.", "which tokens the LM and the SFT losses train on", _e9_pretrain_vs_finetune),
    Question("E10", "What is ChatGPT, in one line?",
             "GPT-3(.5) + instruction tuning + RLHF.", "the pipeline's stages; the reward model's pairwise loss",
             _e10_chatgpt),
    Question("E11", "Do you need millions of dollars to use transformers?",
             "No: fine-tune a pre-trained model; with LoRA only a tiny fraction of the weights even trains.",
             "LoRA's trainable share of GPT-2 124M, from shapes alone", _e11_no_millions),
)


def run_quiz(ids: list[str] | None = None) -> list[QuizResult]:
    """Run the live checks (all, or those in ``ids``) and return one :class:`QuizResult` each.

    A check that raises counts as failed, with the error as what was measured."""
    wanted = None if ids is None else {i.upper() for i in ids}
    known = {q.id for q in QUESTIONS}
    if wanted is not None and wanted - known:
        raise ValueError(f"unknown quiz question {', '.join(sorted(wanted - known))}; "
                         f"choose from {', '.join(q.id for q in QUESTIONS)}")
    results = []
    for q in QUESTIONS:
        if wanted is not None and q.id not in wanted:
            continue
        try:
            passed, measured = q.run()
        except Exception as e:  # noqa: BLE001 - a broken implementation fails its check, not the quiz
            passed, measured = False, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results.append(QuizResult(q.id, q.question, q.answer, q.check, measured, bool(passed)))
    return results


def format_results(results: list[QuizResult]) -> str:
    lines = []
    for r in results:
        lines += [f"{r.id}. {r.question}", f"    answer: {r.answer}", f"    check:  {r.check}",
                  f"    {'PASS' if r.passed else 'FAIL'}:   {r.measured}", ""]
    passed = sum(r.passed for r in results)
    lines.append(f"{passed}/{len(results)} checks pass")
    return "\n".join(lines)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "quiz",
        help="Chapter 20's quiz questions, each answer shown true by a live check of the library",
        description="Print each quiz question of Chapter 20 with its answer and run a small experiment that shows "
        "the answer holds for this library's code. Exit status 1 if any check fails.",
    )
    p.add_argument("--id", action="append", default=None, metavar="ID",
                   help="only this question (K1-K5, E1-E11); repeat for several")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    results = run_quiz(args.id)
    if args.json:
        for r in results:
            print(json.dumps(asdict(r)))
    else:
        print(format_results(results))
    sys.stdout.flush()
    return 0 if all(r.passed for r in results) else 1
