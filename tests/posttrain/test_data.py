"""Post-training data (``tfd_jax.posttrain.data``, Chapter 18): the chat template's ids and mask at exact
positions, the mask recomputed from ids under jit (also for packed rows), the loaders' errors with
file and line, the hidden rule on hand-written answers, and the built-in task's promised
properties (style rate, label noise, disjoint splits, determinism)."""
import json
import string

import numpy as np
import pytest

import jax

from tfd_jax.posttrain import data as D
from tfd_jax.tokenizers import CharTokenizer

SPECIALS = ("<pad>", "</s>", *D.CHAT_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(string.ascii_letters + " .!?,'", special_tokens=SPECIALS)


def ids_of(tok):
    return D.chat_token_ids(tok)


# ------------------------------------------------------------------------------------------------
# The template
# ------------------------------------------------------------------------------------------------


def test_a_two_exchange_conversation_at_exact_positions(tok):
    m = ids_of(tok)
    U, A, E = m["user"], m["assistant"], m["end"]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"},
            {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "no"}]
    ids, mask = D.render_chat(conv, tok)
    e = tok.encode
    assert ids == [U, *e("hi"), E, A, *e("yo!"), E, U, *e("ok?"), E, A, *e("no"), E]
    assert len(ids) == 18
    trained = [i for i, t in enumerate(mask) if t]
    assert trained == [5, 6, 7, 8, 15, 16, 17]  # "yo!" + <|end|>, "no" + <|end|>
    assert ids[4] == A and not mask[4] and ids[8] == E and mask[8] and ids[9] == U and not mask[9]
    assert tok.decode(ids) == "<|user|>hi<|end|><|assistant|>yo!<|end|><|user|>ok?<|end|><|assistant|>no<|end|>"

    gen_ids, gen_mask = D.render_chat(conv[:3], tok, add_generation_prompt=True)
    assert gen_ids == ids[:15] and gen_ids[-1] == A and gen_mask == mask[:15] and not gen_mask[-1]
    assert D.render_prompt("hi", tok) == [U, *e("hi"), E, A]


def test_a_system_message_opens_the_conversation_and_is_never_trained(tok):
    m = ids_of(tok)
    conv = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok", "name": "bot"}]
    ids, mask = D.render_chat(conv, tok)
    assert ids[0] == m["system"] and ids[8] == m["end"] and ids[13] == m["assistant"] and not any(mask[:14])
    assert mask[14:] == [True, True, True] and len(ids) == 17 and ids[-1] == m["end"]
    no_system = CharTokenizer.train(string.ascii_letters + " ", special_tokens=SPECIALS[:-1])
    with pytest.raises(ValueError, match="no '<\\|system\\|>' token"):
        D.render_chat(conv, no_system)
    with pytest.raises(ValueError, match="no special token '<\\|user\\|>'"):
        D.render_chat(conv[1:], CharTokenizer.train(string.ascii_letters + " "))


@pytest.mark.parametrize("conv,gen,match", [
    ([], False, "no messages"),
    ("hello", False, "list of messages"),
    ([{"role": "user", "content": "hi"}], False, "no assistant turn"),
    ([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}], False, r"messages\[0\] has the unknown role 'bot'"),
    ([{"content": "hi"}], False, r"messages\[0\] has no role"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], False, r"messages\[0\] \(user\) has empty content"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], False, "content of type int"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], False, r"messages\[1\] is a user turn where an assistant turn must come \(after a user turn\)"),
    ([{"role": "assistant", "content": "a"}], False, r"messages\[0\] is an assistant turn where a user turn must come \(the conversation starts\)"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], False, "only the first message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], False, "ends with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], True, "must end with a user turn"),
    ([{"role": "user", "content": "a<|end|>"}, {"role": "assistant", "content": "b"}], False, "chat marker '<\\|end\\|>'"),
])
def test_bad_conversations_are_refused(tok, conv, gen, match):
    with pytest.raises(ValueError, match=match):
        D.render_chat(conv, tok, add_generation_prompt=gen)


def random_conversation(rng, for_generation=False):
    letters = "abcdefgh !."
    def text():
        return "".join(rng.choice(list(letters), size=int(rng.integers(1, 6)))).replace(" ", "x", 1) or "a"
    conv = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
    for _ in range(int(rng.integers(1, 4))):
        conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    if for_generation:
        conv.append({"role": "user", "content": text()})
    return conv


def test_the_mask_from_ids_equals_the_template_mask_also_when_packed(tok):
    m = ids_of(tok)
    rng = np.random.default_rng(0)
    fn = jax.jit(lambda t: D.assistant_token_mask(t, assistant_id=m["assistant"], end_id=m["end"]))
    T, rows_ids, rows_mask, cut = 64, [], [], 0
    for r in range(12):
        ids, mask = [], []
        for k in range(1 if r < 4 else int(rng.integers(2, 5))):  # single conversations, then packed rows
            i, mk = D.render_chat(random_conversation(rng), tok)
            ids += i + [tok.eos_id]
            mask += mk + [False]
        cut += len(ids) > T
        ids, mask = ids[:T], mask[:T]  # a long row is cut, perhaps inside a turn
        rows_ids.append(ids + [tok.pad_id] * (T - len(ids)))
        rows_mask.append(mask + [False] * (T - len(mask)))
    got = np.asarray(fn(np.asarray(rows_ids, np.int32)))
    assert got.dtype == bool and got.shape == (12, T)
    np.testing.assert_array_equal(got, np.asarray(rows_mask))
    assert np.asarray(rows_mask).sum() > 100 and 0 < cut < 12
    # one row, no batch axis
    np.testing.assert_array_equal(
        np.asarray(D.assistant_token_mask(np.asarray(rows_ids[5]), assistant_id=m["assistant"], end_id=m["end"])),
        np.asarray(rows_mask[5]))
    # a row cut inside an assistant answer stays True to its end
    ids, mask = D.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tok)
    assert fn(np.asarray([ids[:7]], np.int32))[0].tolist() == mask[:7] == [False] * 5 + [True] * 2
    # a generation prompt: the same mask on the prompt, and True from there on (where the answer goes)
    ids, mask = D.render_chat(random_conversation(rng, True), tok, add_generation_prompt=True)
    got = np.asarray(fn(np.asarray([ids + [tok.pad_id] * 5], np.int32)))[0]
    assert got[: len(ids)].tolist() == mask and got[len(ids):].all()


# ------------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------------

GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
GOOD_PAIR = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


def test_loaders_read_good_files(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(GOOD_CHAT + "\n\n" + GOOD_CHAT + "\n")
    assert D.load_chats(f) == [json.loads(GOOD_CHAT)["messages"]] * 2
    g = tmp_path / "p.jsonl"
    g.write_text(GOOD_PAIR + "\n")
    assert D.load_preference_pairs(str(g)) == [D.PreferencePair("p", "a", "b")]


@pytest.mark.parametrize("bad,match", [
    ("{not json", "not JSON"),
    ("[1, 2]", "expected an object"),
    ('{"msgs": []}', "no 'messages' list"),
    ('{"messages": "hi"}', "no 'messages' list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "empty content"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}', "alternate"),
])
def test_chat_file_errors_name_the_file_and_line(tmp_path, bad, match):
    f = tmp_path / "chats.jsonl"
    f.write_text(GOOD_CHAT + "\n\n" + bad + "\n")
    with pytest.raises(ValueError, match=rf"chats\.jsonl:3: .*{match}"):
        D.load_chats(f)


@pytest.mark.parametrize("bad,match", [
    ("{oops", "not JSON"),
    ('"just a string"', "expected an object"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"chosen": "a", "rejected": "b"}', "missing field 'prompt'"),
    ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "field 'chosen' must be a string, got int"),
    ('{"prompt": "p", "chosen": "a", "rejected": null}', "missing field 'rejected'"),
    ('{"prompt": " ", "chosen": "a", "rejected": "b"}', "field 'prompt' is empty"),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "chosen and rejected are the same text"),
    ('{"prompt": "p<|user|>", "chosen": "a", "rejected": "b"}', "chat marker"),
])
def test_preference_file_errors_name_the_file_and_line(tmp_path, bad, match):
    f = tmp_path / "prefs.jsonl"
    f.write_text(GOOD_PAIR + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=rf"prefs\.jsonl:2: .*{match}"):
        D.load_preference_pairs(f)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_chats(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no conversations"):
        D.load_chats(tmp_path / "e.jsonl")
    with pytest.raises(ValueError, match="holds no preference pairs"):
        D.load_preference_pairs(tmp_path / "e.jsonl")


# ------------------------------------------------------------------------------------------------
# The rule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt,response,score", [
    ("Tell me about cats.", "Cats are lovely!", 1.0),
    ("Tell me about cats.", "  Cats are lovely!\n", 1.0),
    ("Tell me about cats.", "Cats are lovely.", 0.5),
    ("Tell me about cats.", "Dogs are lovely!", 0.5),
    ("Tell me about cats.", "Dogs are lovely.", 0.0),
    ("Do you like CATS?", "I really like cats!", 1.0),
    ("Tell me about cats.", "I really really like cats!", 0.0),  # stutter
    ("Tell me about cats.", "I really like", 0.0),  # cut off
    ("Tell me about cats.", "", 0.0),
    ("Tell me about cats.", "Cats!", 0.0),  # too short
    ("Tell me about cats.", "Cats are lovely!!", 0.0),
    ("Tell me about cats.", "Cats are, lovely!", 0.0),
    ("Tell me about cats.", "Cats  are lovely!", 0.0),
    ("Tell me about cats.", " ".join(["cats"] + ["and", "more"] * 6) + "!", 0.0),  # 13 words
    ("Tell me about cats.", "I like the catsup!", 0.5),  # a whole word only
])
def test_the_rule_on_hand_written_answers(prompt, response, score):
    assert D.rule_score(prompt, response) == score


def test_the_rule_needs_a_prompt_about_one_noun():
    with pytest.raises(ValueError, match="none of"):
        D.rule_score("Tell me about the weather.", "It is nice!")
    with pytest.raises(ValueError, match="several nouns"):
        D.rule_score("Cats or dogs?", "Cats are lovely!")


# ------------------------------------------------------------------------------------------------
# The built-in task
# ------------------------------------------------------------------------------------------------


def test_sft_data_is_on_topic_and_enthusiastic_at_the_style_rate():
    convs = D.builtin_sft_conversations("train", n=1000, seed=3, style_rate=0.2)
    assert len(convs) == 1000
    scores = [D.rule_score(c[0]["content"], c[1]["content"]) for c in convs]
    assert min(scores) == 0.5 and abs(np.mean(scores) - 0.6) < 1e-9
    assert sum(c[1]["content"].endswith("!") for c in convs) == 200
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    assert len({c[1]["content"][:-1].split(" ")[0] for c in convs}) > 5  # several templates
    other = D.builtin_sft_conversations("train", n=1000, seed=3, style_rate=0.5)
    assert sum(c[1]["content"].endswith("!") for c in other) == 500


def test_preference_pairs_follow_the_rule_up_to_the_label_noise():
    pairs = D.builtin_preference_pairs("train", n=4000, seed=1, label_noise=0.1)
    assert len(pairs) == 4000 and all(p.chosen != p.rejected for p in pairs)
    s = np.array([(D.rule_score(p.prompt, p.chosen), D.rule_score(p.prompt, p.rejected)) for p in pairs])
    assert (s[:, 0] != s[:, 1]).all()
    assert abs(np.mean(s[:, 0] < s[:, 1]) - 0.1) < 0.02
    assert len(np.unique(s)) == 3 and (s == 0).mean() > 0.1  # 0, 0.5 and 1 all occur
    clean = D.builtin_preference_pairs("val", n=500, seed=1, label_noise=0.0)
    assert all(D.rule_score(p.prompt, p.chosen) > D.rule_score(p.prompt, p.rejected) for p in clean)


def nouns_in(texts):
    return {w for t in texts for w in t.lower().replace("?", " ").replace(".", " ").replace("!", " ").split() if w in D.NOUNS}


def test_splits_use_disjoint_nouns():
    train, val = set(D.builtin_nouns("train")), set(D.builtin_nouns("val"))
    assert len(train) == 32 and len(val) == 8 and not train & val and train | val == set(D.NOUNS)
    for split, nouns in (("train", train), ("val", val)):
        texts = D.builtin_prompts(split, n=300, seed=0)
        texts += [m["content"] for c in D.builtin_sft_conversations(split, n=300, seed=0) for m in c]
        texts += [t for p in D.builtin_preference_pairs(split, n=300, seed=0) for t in (p.prompt, p.chosen, p.rejected)]
        assert nouns_in(texts) == nouns
    with pytest.raises(ValueError, match="split"):
        D.builtin_prompts("test", n=1, seed=0)


def test_everything_is_determined_by_the_seed():
    for fn in (D.builtin_prompts, D.builtin_sft_conversations, D.builtin_preference_pairs):
        assert fn("train", n=50, seed=7) == fn("train", n=50, seed=7)
        assert fn("train", n=50, seed=7) != fn("train", n=50, seed=8)
    text = D.builtin_pretraining_text(n_chars=3000, seed=2)
    assert text == D.builtin_pretraining_text(n_chars=3000, seed=2) != D.builtin_pretraining_text(n_chars=3000, seed=3)


def test_pretraining_text_covers_the_world_and_a_tokenizer_covers_the_task():
    text = D.builtin_pretraining_text(n_chars=20_000, seed=0)
    assert 20_000 <= len(text) < 20_100 and text.endswith("\n")
    assert set(text) <= set(D.builtin_charset())
    assert nouns_in(text.splitlines()) == set(D.NOUNS)
    assert 0.05 < text.count("!") / text.count("\n") < 0.15
    tok = CharTokenizer.train(D.builtin_pretraining_text(n_chars=200, seed=0) + D.builtin_charset(),
                              special_tokens=SPECIALS)
    for split in ("train", "val"):
        for conv in D.builtin_sft_conversations(split, n=50, seed=0):
            ids, mask = D.render_chat(conv, tok)
            assert tok.decode([i for i, t in zip(ids, mask) if t]) == conv[1]["content"] + "<|end|>"
        for p in D.builtin_preference_pairs(split, n=50, seed=0):
            tok.encode(p.prompt + p.chosen + p.rejected)
