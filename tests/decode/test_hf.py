"""Greedy generation on Hugging Face GPT-2 weights equals the model's own ``generate`` (Chapter 13).

A tiny random ``GPT2LMHeadModel`` (no downloads) is ported with ``load_hf_gpt2``; the CLI is checked on
the same weights, saved with ``save_pretrained``. torch and transformers are test extras.
"""
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tfd_jax.cli import main  # noqa: E402
from tfd_jax.decode import TRACE_COUNTS, generate  # noqa: E402
from tfd_jax.interop.hf import load_hf_gpt2  # noqa: E402
from tfd_jax.tokenizers.char import CharTokenizer  # noqa: E402

V = 97
PROMPTS = [[5, 17, 3], [8, 1, 2, 3, 4, 5, 6, 7, 9], [42, 42, 11, 60, 2]]
N_NEW = 20


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=0.2,  # larger than GPT-2's 0.02, so greedy continuations vary
        bos_token_id=None, eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_reference(hf_model):
    ref = np.array([hf_greedy(hf_model, p, N_NEW) for p in PROMPTS])
    assert len(set(ref.ravel().tolist())) > 8, "degenerate reference; change the seed"
    return ref


def test_greedy_generate_equals_hf_generate(hf_model, hf_reference):
    model = load_hf_gpt2(hf_model)
    tokens, lengths = generate(model, PROMPTS, N_NEW)  # one ragged batch; HF ran row by row
    np.testing.assert_array_equal(lengths, [N_NEW] * 3)
    np.testing.assert_array_equal(tokens, hf_reference)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_gpt2")
    hf_model.save_pretrained(d)  # weights only: no tokenizer files
    return d


def test_cli_hf_weights_without_tokenizer_print_ids(hf_dir, hf_reference, capsys):
    argv = ["generate", "--hf", str(hf_dir), "--prompt-ids", "5 17 3", "--max-new-tokens", "14",
            "--temperature", "0", "--chunk-size", "4"]
    assert main(argv) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]
    assert printed == hf_reference[0, :14].tolist()
    # Text needs a tokenizer, and there is none in a weights-only directory.
    assert main(["generate", "--hf", str(hf_dir), "--prompt", "hello"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def test_cli_run_dir_streams_text(hf_dir, hf_reference, capsys, monkeypatch):
    """``--run``: the model and tokenizer come from ``load_for_inference``; the text is the prompt plus
    the decoded continuation, written chunk by chunk."""
    tok = CharTokenizer([chr(0x100 + i) for i in range(V)])  # one printable character per id
    fake = types.ModuleType("tfd_jax.train.checkpoint")
    fake.load_for_inference = lambda run_dir: (load_hf_gpt2(hf_dir), tok)
    monkeypatch.setitem(sys.modules, "tfd_jax.train.checkpoint", fake)
    writes = []
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: writes.append(s) or real_write(s))
    before = dict(TRACE_COUNTS)
    prompt = tok.decode(PROMPTS[0])
    argv = ["generate", "--run", "some/run", "--prompt", prompt, "--max-new-tokens", "14", "--temperature", "0",
            "--chunk-size", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == prompt + tok.decode(hf_reference[0, :14].tolist()) + "\n"
    assert len([w for w in writes if w.strip()]) >= 4  # prompt, then first token, then chunks of 4
    assert dict(TRACE_COUNTS) == before  # same weights, batch and bucket as the --hf call: no compile


def test_cli_hf_directory_with_tokenizer_streams_text(hf_model, hf_reference, tmp_path, capsys):
    """With tokenizer files beside the weights, ``--prompt`` text is encoded with ``AutoTokenizer`` and
    the continuation is printed as text, stopping at the tokenizer's EOS."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(V - 1)} | {"<eos>": V - 1}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    hf_model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompt = "w5 w17 w3"  # = PROMPTS[0]
    assert main(["generate", "--hf", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "14",
                 "--temperature", "0"]) == 0
    expected = hf_reference[0, :14].tolist()
    if V - 1 in expected:
        expected = expected[: expected.index(V - 1)]
    assert capsys.readouterr().out == prompt + tok.decode(expected) + "\n"
