"""``tfd-jax generate``: input errors are caught before any weights load or compile; streamed text."""
import io
import sys
import types

import pytest

from tfd_jax.cli import main
from tfd_jax.decode import TRACE_COUNTS
from tfd_jax.decode.cli import _TextStream
from tfd_jax.tokenizers.char import CharTokenizer


@pytest.fixture
def fake_run(monkeypatch, tiny_model):
    """Make ``load_for_inference`` return the tiny model and a 97-character tokenizer (or none)."""
    state = {"tokenizer": CharTokenizer([chr(0x100 + i) for i in range(97)]), "loads": 0}

    def load_for_inference(run_dir):
        state["loads"] += 1
        return tiny_model, state["tokenizer"]

    fake = types.ModuleType("tfd_jax.train.checkpoint")
    fake.load_for_inference = load_for_inference
    monkeypatch.setitem(sys.modules, "tfd_jax.train.checkpoint", fake)
    return state


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--temperature", "nan"], "temperature"),
        (["--seed", "-1"], "--seed must be in 0..2^31-1"),
        (["--top-p", "1.5"], "top_p"),
        (["--top-p", "0"], "top_p"),
        (["--top-k", "0"], "top_k"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--chunk-size", "0"], "chunk-size"),
    ],
)
def test_bad_sampling_flags_fail_before_loading(fake_run, capsys, flags, message):
    assert main(["generate", "--run", "r", "--prompt", "ĀĀ", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfd-jax generate: error:") and message in err and "Traceback" not in err
    assert fake_run["loads"] == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "Ā" * 60, "--max-new-tokens", "10"], "context length 64"),
        (["--prompt", ""], "empty"),
        (["--prompt", "abc"], "not in this tokenizer's vocabulary"),
        (["--prompt", "Ā", "--prompt-ids", "1"], "not both"),
        ([], "--prompt"),
        (["--prompt-ids", "1 x"], "integers"),
        (["--prompt-ids", "1 200"], "outside"),
    ],
)
def test_bad_prompts_fail_clearly_without_compiling(fake_run, capsys, flags, message):
    before = dict(TRACE_COUNTS)
    assert main(["generate", "--run", "r", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert dict(TRACE_COUNTS) == before


def test_text_prompt_needs_a_tokenizer(fake_run, capsys):
    fake_run["tokenizer"] = None
    assert main(["generate", "--run", "r", "--prompt", "hi"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def test_run_or_hf_is_required(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi"])
    assert e.value.code == 2


def test_text_stream_holds_back_half_a_character():
    """A byte-level tokenizer can end a chunk inside a UTF-8 character: print it only once complete."""

    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    out = io.StringIO()
    s = _TextStream(Bytes(), out)
    s.add(list(b"caf"))
    s.add([0xC3])  # first byte of "é"
    assert out.getvalue() == "caf"
    s.add([0xA9, ord("!")])
    s.add([], final=True)
    assert out.getvalue() == "café!"
