"""``tfd-jax chat`` (Chapter 18): one turn with ``--prompt``, an interactive conversation whose every
turn is rendered with the chat template, and clear refusals for models that cannot chat."""
import argparse
import io

import pytest
from flax import nnx

from tfd_jax.cli import UserError
from tfd_jax.models import GPT, GPTConfig
from tfd_jax.posttrain import chat
from tfd_jax.posttrain.data import builtin_charset
from tfd_jax.posttrain.tasks import CHAT_TOKENIZER_SPECIALS
from tfd_jax.tokenizers import CharTokenizer


def _args(**kw):
    return argparse.Namespace(**{"run": "RUN", "prompt": None, "temperature": 0.0, "top_p": None,
                                 "max_new_tokens": 8, "seed": 0, **kw})


@pytest.fixture
def chat_model(monkeypatch):
    tok = CharTokenizer.train(builtin_charset(), special_tokens=CHAT_TOKENIZER_SPECIALS)
    model = GPT(GPTConfig.preset("tiny", vocab_size=tok.vocab_size, context_length=128, dropout=0.0), rngs=nnx.Rngs(0))
    model.eval()
    seen = []
    real_reply = chat.reply

    def recording_reply(m, t, messages, **kw):
        seen.append([dict(x) for x in messages])
        return real_reply(m, t, messages, **kw)

    monkeypatch.setattr("tfd_jax.train.checkpoint.load_for_inference", lambda run: (model, tok))
    monkeypatch.setattr(chat, "reply", recording_reply)
    return model, tok, seen


def test_one_turn_prints_the_greedy_answer(chat_model):
    model, tok, seen = chat_model
    out = io.StringIO()
    assert chat.run_chat(_args(prompt="Tell me about cats."), out=out) == 0
    want = chat.reply(model, tok, [{"role": "user", "content": "Tell me about cats."}], temperature=0.0,
                      max_new_tokens=8)
    assert out.getvalue() == want + "\n"
    assert seen[0] == [{"role": "user", "content": "Tell me about cats."}]


def test_an_interactive_conversation_keeps_its_history_and_ends_on_an_empty_line(chat_model):
    _, _, seen = chat_model
    out = io.StringIO()
    assert chat.run_chat(_args(), stdin=io.StringIO("Describe dogs.\nAnd owls?\n\n"), out=out) == 0
    assert out.getvalue().count("assistant> ") == 2
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"] and seen[1][2]["content"] == "And owls?"


def test_too_long_a_conversation_and_a_tokenizer_without_the_template_are_refused(chat_model, monkeypatch):
    with pytest.raises(UserError, match="model.s context is 128"):
        chat.run_chat(_args(prompt="Tell me about cats. " * 8), out=io.StringIO())
    plain = CharTokenizer.train(builtin_charset())
    model = GPT(GPTConfig.preset("tiny", vocab_size=plain.vocab_size), rngs=nnx.Rngs(0))
    monkeypatch.setattr("tfd_jax.train.checkpoint.load_for_inference", lambda run: (model, plain))
    with pytest.raises(UserError, match="task sft"):
        chat.run_chat(_args(prompt="hi"), out=io.StringIO())
