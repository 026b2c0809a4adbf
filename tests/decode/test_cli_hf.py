"""``tfd-jax generate --hf DIR`` for every causal family we load, with the directory's own tokenizer.

A tiny random ``LlamaForCausalLM`` (grouped-query attention) is saved with ``save_pretrained`` beside a
tiny byte-level BPE tokenizer trained here with the ``tokenizers`` package (``vocab.json`` +
``merges.txt``, as GPT-2 ships it). The command must print the prompt plus the same continuation as
transformers' greedy ``generate``, decoded by the ``tokenizers`` tokenizer itself, and must not import
transformers to do it. No downloads. torch, transformers and tokenizers are test extras.
"""
import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from interop.hf_tiny import tiny_llama  # noqa: E402
from trainkit import one_device_env  # noqa: E402

from tfd_jax.cli import main  # noqa: E402

PROMPT = "def gamma(x): return"
N_NEW = 8
CORPUS = ["def alpha(x): return beta(x) + gamma", "return delta(x) if x else alpha", "gamma: beta, delta"] * 50


def train_bpe():
    """A byte-level BPE (GPT-2's pre-tokenisation, the 256 bytes plus a few merges), trained offline."""
    tok = tokenizers.ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2, show_progress=False)
    return tok


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """(directory, tokenizer, the expected output line)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = train_bpe()
    vocab = tok.get_vocab_size()
    assert 256 < vocab <= 300
    model = tiny_llama(vocab_size=vocab)
    # Most of a random model's picks would be lone bytes >= 0x80, which all decode to U+FFFD and so
    # could not tell one continuation from another: zero the head rows of every token that is not
    # printable ASCII on its own (logit 0, below the best of the others).
    unprintable = [i for i in range(vocab) if not all(" " <= c <= "~" for c in tok.decode([i]))]
    assert 100 < len(unprintable) < vocab - 50
    with torch.no_grad():
        model.lm_head.weight[unprintable] = 0.0
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    model.save_pretrained(d)
    tok.save_model(str(d))  # vocab.json + merges.txt
    ids = torch.tensor([tok.encode(PROMPT).ids])
    assert ids.shape[1] > 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, do_sample=False,
                             pad_token_id=0)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == N_NEW and len(set(new)) > 2, "degenerate reference; change the seed"
    assert not set(new) & set(unprintable)
    return d, tok, PROMPT + tok.decode(new)


def test_generate_hf_llama_dir_equals_transformers_greedy(llama_dir):
    d, _, expected = llama_dir
    script = (
        "import sys; from tfd_jax.cli import main; "
        f"rc = main(['generate', '--hf', {str(d)!r}, '--prompt', {PROMPT!r}, '--max-new-tokens', '{N_NEW}', "
        "'--temperature', '0']); "
        "print('transformers imported:', 'transformers' in sys.modules, file=sys.stderr); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", script], env=one_device_env(), capture_output=True, text=True, check=False,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\ufffd" not in expected and len(expected) >= len(PROMPT) + N_NEW
    assert r.stdout == expected + "\n"
    assert "transformers imported: False" in r.stderr


def test_bert_dir_is_refused_before_loading(tmp_path, capsys):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    cfg.save_pretrained(tmp_path)  # config.json only: the refusal must come before any weights are read
    assert main(["generate", "--hf", str(tmp_path), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BERT is an encoder" in err and "cannot generate" in err


def test_unknown_model_type_and_missing_config_are_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert main(["generate", "--hf", str(tmp_path), "--prompt-ids", "1 2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'t5'" in err and "llama" in err
    (tmp_path / "config.json").unlink()
    assert main(["generate", "--hf", str(tmp_path), "--prompt-ids", "1 2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err


def test_dir_without_tokenizer_files_needs_prompt_ids(tmp_path, capsys):
    """Weights only: ``--prompt`` text fails in one line, naming the files looked for, before loading."""
    transformers.LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32).save_pretrained(tmp_path)  # no weights either
    assert main(["generate", "--hf", str(tmp_path), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer files" in err and "merges.txt" in err and "--prompt-ids" in err


def test_damaged_tokenizer_is_one_line(tmp_path, capsys):
    transformers.LlamaConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32).save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    assert main(["generate", "--hf", str(tmp_path), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokenizer cannot be read" in err and "vocab.json" in err
