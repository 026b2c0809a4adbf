"""Hugging Face tokenizers read without transformers: the same ids and text as transformers gives.

Every tokenizer here is trained offline inside the test (with the ``tokenizers`` and
``sentencepiece`` packages), saved as a Hugging Face directory with transformers' ``save_pretrained``,
then loaded both by ``transformers.AutoTokenizer`` and by ``load_hf_tokenizer``.
"""
from __future__ import annotations

import io
import json
import shutil

import pytest

pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
import sentencepiece  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, BertTokenizer, GPT2TokenizerFast, LlamaTokenizer  # noqa: E402

from tfd_jax.tokenizers import (  # noqa: E402
    BERT_SPECIAL_TOKENS,
    ByteLevelBPETokenizer,
    SentencePieceTokenizer,
    WordPieceTokenizer,
    load_hf_tokenizer,
    load_tokenizer,
)
from tfd_jax.tokenizers.bytelevel import bytes_to_unicode  # noqa: E402

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ünïcödé façade über",
    "日本語のテキスト 中文字符 한국어 текст",
    "emoji 😀 🎉 👍🏽 and more 😀😀",
    "  double  spaces\tand\ttabs\nnew lines  ",
    "numbers 1234567890 3.14159 1,000,000 2024",
    "punctuation: (a) [b] {c} <d> \"quoted\" 'single' -- ... !? ; $5 ^_^ ~",
    "It's we'll don't I'm they've you're",
] * 8

TEXTS = [
    "Hello world! The quick brown fox.",
    "café naïve Ünïcödé résumé ÉCOLE",
    "日本語のテキスト 中文字符 한국어",
    "emoji 😀🎉 and 👍🏽 flags 🇫🇷",
    "double  spaces,\ttabs\t\tand\nnewlines\n\n  trailing spaces   ",
    "numbers 1234567890123 3.14159 1,000,000",
    "punctuation: (a) [b] {c} <d> \"quoted\" 'single' -- ... !?;",
    "It's we'll don't I'm they've you're",
    "zebra xylophone quizzical",  # letters the corpus barely has
    " leading space",
    "",
    " ",
    "\n",
]


def assert_same_ids(ours, theirs, texts):
    for text in texts:
        expected = theirs.encode(text, add_special_tokens=False)
        ids = ours.encode(text)
        assert ids == expected, repr(text)
        assert ours.decode(ids) == theirs.decode(ids), repr(text)


# --- byte-level BPE (GPT-2) ----------------------------------------------------------------------
def _train_byte_level():
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    raw = _train_byte_level()
    hf = GPT2TokenizerFast(
        tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    hf.add_special_tokens({"mask_token": "[MASK]"})
    json_only = tmp_path_factory.mktemp("gpt2_json_only")
    hf.save_pretrained(json_only)
    classic = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(classic)
    raw.model.save(str(classic))  # vocab.json + merges.txt, as the GPT-2 repositories ship them
    assert (classic / "vocab.json").is_file() and (classic / "merges.txt").is_file()
    return classic, json_only


BPE_SPECIAL_TEXTS = [
    "first document<|endoftext|>second document",
    "<|endoftext|>",
    "mask me [MASK] please[MASK]!",
]


def test_byte_level_bpe_matches_transformers(gpt2_dirs):
    for d in gpt2_dirs:
        theirs = AutoTokenizer.from_pretrained(d)
        ours = load_hf_tokenizer(d)
        assert isinstance(ours, ByteLevelBPETokenizer)
        assert ours.vocab_size == len(theirs)
        assert_same_ids(ours, theirs, TEXTS + BPE_SPECIAL_TEXTS)
        for text in TEXTS + BPE_SPECIAL_TEXTS:
            assert ours.decode(ours.encode(text)) == text  # byte-level: lossless
        eot = theirs.convert_tokens_to_ids("<|endoftext|>")
        assert (ours.bos_id, ours.eos_id, ours.unk_id) == (eot, eot, eot)
        assert ours.mask_id == theirs.mask_token_id
        assert ours.special_tokens == {"<|endoftext|>": eot, "[MASK]": theirs.mask_token_id}
        assert ours.all_special_ids() == sorted({eot, theirs.mask_token_id})


def test_byte_level_bpe_save_load(gpt2_dirs, tmp_path):
    ours = load_hf_tokenizer(gpt2_dirs[0])
    out = ours.save(tmp_path / "tok")
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    back = load_tokenizer(out)
    assert isinstance(back, ByteLevelBPETokenizer)
    assert back.fingerprint() == ours.fingerprint()
    assert back.special_tokens == ours.special_tokens and back.special_ids() == ours.special_ids()
    for text in TEXTS + BPE_SPECIAL_TEXTS:
        assert back.encode(text) == ours.encode(text)
    # load_tokenizer also reads the Hugging Face directory itself
    assert load_tokenizer(gpt2_dirs[1]).encode(TEXTS[0]) == ours.encode(TEXTS[0])


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"


# --- WordPiece (BERT) ------------------------------------------------------------------------------
def _train_wordpiece(lowercase: bool):
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=list(BERT_SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module", params=["uncased", "cased"])
def bert_dir(request, tmp_path_factory):
    lowercase = request.param == "uncased"
    raw = _train_wordpiece(lowercase)
    d = tmp_path_factory.mktemp(f"bert_{request.param}")
    raw.model.save(str(d))  # vocab.txt
    hf = BertTokenizer(vocab=raw.get_vocab(), do_lower_case=lowercase)
    hf.save_pretrained(d)
    return d


BERT_SPECIAL_TEXTS = [
    "[CLS] the fox [MASK] over the dog. [SEP]",
    "[MASK][MASK]x[SEP]",
    "lower [mask] is not special",
    "a" * 101,  # longer than max_input_chars_per_word: [UNK]
    "zzzz qqqq \u0000control\u200bchars\ufeff",
]


def test_wordpiece_matches_transformers(bert_dir):
    theirs = AutoTokenizer.from_pretrained(bert_dir)
    ours = load_hf_tokenizer(bert_dir)
    assert isinstance(ours, WordPieceTokenizer)
    assert ours.vocab_size == len(theirs)
    assert_same_ids(ours, theirs, TEXTS + BERT_SPECIAL_TEXTS)
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == tuple(
        theirs.convert_tokens_to_ids(list(BERT_SPECIAL_TOKENS))
    )
    assert ours.encode("[MASK]") == [ours.mask_id]
    assert ours.encode("a" * 101) == [ours.unk_id]


def test_wordpiece_save_load(bert_dir, tmp_path):
    ours = load_hf_tokenizer(bert_dir)
    out = ours.save(tmp_path / "tok")
    assert (out / "vocab.txt").is_file()
    back = load_tokenizer(out)
    assert isinstance(back, WordPieceTokenizer) and back.fingerprint() == ours.fingerprint()
    assert back.special_ids() == ours.special_ids()
    for text in TEXTS + BERT_SPECIAL_TEXTS:
        assert back.encode(text) == ours.encode(text)


def test_wordpiece_from_vocab_txt_alone(bert_dir, tmp_path):
    d = tmp_path / "only_vocab"
    d.mkdir()
    shutil.copy(bert_dir / "vocab.txt", d / "vocab.txt")
    ours = load_hf_tokenizer(d)  # BertTokenizer's defaults: lowercase, the five BERT specials
    full = load_hf_tokenizer(bert_dir)
    assert ours.special_ids() == full.special_ids()
    assert ours.encode("Hello [MASK]!") == [*ours.encode("hello"), ours.mask_id, *ours.encode("!")]


# --- sentencepiece (Llama) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    d = tmp_path_factory.mktemp("llama")
    (d / "tokenizer.model").write_bytes(model.getvalue())
    LlamaTokenizer.from_pretrained(d).save_pretrained(d)  # adds tokenizer.json and tokenizer_config.json
    return d


LLAMA_SPECIAL_TEXTS = ["<s>hello world</s>", "a <s> b", "end</s>", "<s>", "x</s><s>y"]


def test_sentencepiece_matches_transformers(llama_dir):
    theirs = AutoTokenizer.from_pretrained(llama_dir)
    ours = load_hf_tokenizer(llama_dir)
    assert isinstance(ours, SentencePieceTokenizer)
    assert ours.vocab_size == len(theirs)
    assert_same_ids(ours, theirs, TEXTS + LLAMA_SPECIAL_TEXTS)
    assert (ours.unk_id, ours.bos_id, ours.eos_id) == (0, 1, 2)
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}


def test_sentencepiece_save_load_and_spiece_name(llama_dir, tmp_path):
    ours = load_hf_tokenizer(llama_dir)
    back = load_tokenizer(ours.save(tmp_path / "tok"))
    assert isinstance(back, SentencePieceTokenizer) and back.fingerprint() == ours.fingerprint()
    assert back.special_tokens == ours.special_tokens and back.prepend_scheme == ours.prepend_scheme
    for text in TEXTS + LLAMA_SPECIAL_TEXTS:
        assert back.encode(text) == ours.encode(text)
    # T5's file name, no configs: the model's own special ids
    t5 = tmp_path / "t5"
    t5.mkdir()
    shutil.copy(llama_dir / "tokenizer.model", t5 / "spiece.model")
    plain = load_hf_tokenizer(t5)
    assert plain.special_ids() == {"bos": 1, "eos": 2, "unk": 0}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(t5 / "spiece.model"))
    assert plain.encode(TEXTS[4]) == sp.encode(TEXTS[4])


# --- telling the directories apart, errors ---------------------------------------------------------
def test_our_record_and_hf_tokenizer_json_are_told_apart(gpt2_dirs, tmp_path):
    ours = load_hf_tokenizer(gpt2_dirs[1])
    saved = ours.save(tmp_path / "ours")
    assert json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))["kind"] == "hf_bpe"
    assert isinstance(load_tokenizer(saved / "tokenizer.json"), ByteLevelBPETokenizer)
    assert isinstance(load_tokenizer(gpt2_dirs[1] / "tokenizer.json"), ByteLevelBPETokenizer)


def test_directory_without_tokenizer_files_names_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"vocab.json \+ merges.txt, tokenizer.model or spiece.model, vocab.txt"):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer.json .*vocab.json \+ merges.txt"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such tokenizer directory"):
        load_hf_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ValueError, match="holds a Unigram tokenizer model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match="not a tokenizer record"):
        load_tokenizer(tmp_path)


def test_no_transformers_import(gpt2_dirs):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tfd_jax.tokenizers import load_hf_tokenizer\n"
        f"tok = load_hf_tokenizer({str(gpt2_dirs[0])!r})\n"
        "tok.encode('hello world')\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
