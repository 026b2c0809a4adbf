"""Tiny random Hugging Face models for parity tests: no downloads, a few thousand parameters each.

Import as ``from interop.hf_tiny import tiny_llama`` (``tests/`` is on ``sys.path``, see
``tests/conftest.py``). torch and transformers are test extras: import this module only after
``pytest.importorskip("transformers")``.

Every builder seeds torch, uses ``initializer_range=0.2`` (GPT-2's 0.02 gives near-uniform outputs,
which hide a wrong activation or norm; BART's field is ``init_std``, T5 scales its own per-layer
initialisation by ``initializer_factor=2.0``) and then draws every norm weight from N(1, 0.3^2) and every
bias from N(0, 0.3^2): Hugging Face starts them at exactly 1 and 0, so a swapped scale/bias, a
missing bias or a LayerNorm-for-RMSNorm mix-up would otherwise go unnoticed. Models are returned in
eval mode (no dropout).
"""
import numpy as np
import torch
import transformers

GPT2_SIZES = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)

LLAMA_SIZES = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention: 2 query heads per key/value head
    max_position_embeddings=64,
)

BERT_SIZES = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=40,
    type_vocab_size=2,
)
BERT_LABELS = 3

# Encoder and decoder of different depths, and relative-position settings that are not the defaults
# (8 buckets up to distance 20: the log-spaced buckets start at distance 2, inside a short source).
T5_SIZES = dict(
    vocab_size=99,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)

BART_SIZES = dict(
    vocab_size=99,
    d_model=32,
    encoder_layers=2,
    decoder_layers=3,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=40,
)


def randomize_norms_and_biases(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Norm weights (names containing "norm", any case) from N(1, std^2), every bias from N(0, std^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.normal_(1.0, std)
            elif name.endswith("bias"):
                p.normal_(0.0, std)
    return model


def tiny_gpt2(seed: int = 0, **config):
    """A ``GPT2LMHeadModel`` of :data:`GPT2_SIZES` (GPT-2 ties its head to ``wte``)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        **{**GPT2_SIZES, **config}, initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    return randomize_norms_and_biases(transformers.GPT2LMHeadModel(cfg)).eval()


def tiny_llama(model_type: str = "llama", seed: int = 0, **config):
    """A ``LlamaForCausalLM`` (or ``Qwen2ForCausalLM`` for ``model_type="qwen2"``, with its Q/K/V
    biases) of :data:`LLAMA_SIZES`, untied unless ``tie_word_embeddings=True``."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    cfg = config_cls(
        **{**LLAMA_SIZES, "tie_word_embeddings": False, **config},
        initializer_range=0.2,
        rope_theta=1000.0,  # not the default, so a base that is not read shows
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return randomize_norms_and_biases(model_cls(cfg)).eval()


def tiny_t5(v1_1: bool = False, seed: int = 0, **config):
    """A ``T5ForConditionalGeneration`` of :data:`T5_SIZES`: v1.0 (ReLU, head tied to ``shared`` and
    scaled by ``d_model**-0.5``) or, with ``v1_1``, v1.1 (gated GELU, a head of its own).

    T5 draws its weights from ``initializer_factor`` times per-layer scales; 2.0 keeps the logits
    from being near-uniform. The relative-position tables are drawn from N(0, 1) so that a wrong
    bucket shows in the outputs. transformers 5.x ties the head of every T5 it builds; the v1.1 head
    is replaced by a fresh tensor afterwards (a v1.1 checkpoint unties it the same way on load).
    """
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        **{**T5_SIZES, **config},
        feed_forward_proj="gated-gelu" if v1_1 else "relu",
        tie_word_embeddings=not v1_1,
        initializer_factor=2.0,
        dropout_rate=0.0,
        decoder_start_token_id=0,
    )
    model = transformers.T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0.0, 1.0)
        if v1_1:
            model.lm_head.weight = torch.nn.Parameter(0.3 * torch.randn(cfg.vocab_size, cfg.d_model))
    return randomize_norms_and_biases(model).eval()


def tiny_bart(seed: int = 0, **config):
    """A ``BartForConditionalGeneration`` of :data:`BART_SIZES` (head tied to ``shared`` unless
    ``tie_word_embeddings=False``), with ``final_logits_bias`` (a buffer) drawn from N(0, 0.3^2).

    With ``tie_word_embeddings=False``, transformers 5.x also unties both stacks' ``embed_tokens``
    from ``shared`` (4.x kept one table for both and untied only the head); they get ``shared``'s
    values here, so that the model is the BART of one token table and a head of its own.

    BartConfig's ``forced_eos_token_id=2`` is cleared from the generation config: ``generate`` then
    decodes plainly (a ``None`` passed to ``generate`` itself would fall back to the model's value)."""
    torch.manual_seed(seed)
    cfg = transformers.BartConfig(
        **{**BART_SIZES, **config}, init_std=0.2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    model = randomize_norms_and_biases(transformers.BartForConditionalGeneration(cfg))
    with torch.no_grad():
        model.final_logits_bias.normal_(0.0, 0.3)
        for stack in (model.model.encoder, model.model.decoder):
            if stack.embed_tokens.weight is not model.model.shared.weight:
                stack.embed_tokens.weight.copy_(model.model.shared.weight)
    model.generation_config.forced_eos_token_id = None
    return model.eval()


def seq2seq_batch(seed: int = 0, batch: int = 3, length: int = 11, target: int = 7, vocab: int = 99, pad: int = 0,
                  start: int = 0):
    """(source ids, source attention mask, decoder input ids), int64: source row ``b`` has
    ``length - 3b`` real tokens then ``pad`` (mask 0); every decoder row starts with ``start`` and
    has ``target`` tokens. Real tokens avoid the ids below 3 (pad, eos, bos in both families)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length))
    mask = np.zeros((batch, length), np.int64)
    for b in range(batch):
        mask[b, : length - 3 * b] = 1
    ids = np.where(mask == 1, ids, pad)
    dec = rng.integers(3, vocab, size=(batch, target))
    dec[:, 0] = start
    return ids.astype(np.int64), mask, dec.astype(np.int64)


def ragged_eos(reference: np.ndarray) -> int:
    """A token that, taken as EOS, ends the greedy rows ``reference [B, N]`` at different steps: the
    first (row by row) that ends one row after at least one token and is absent from another row.
    Random models rarely produce their own EOS, so tests stop on this one instead."""
    B, N = reference.shape
    for b in range(B):
        for k in range(1, N):
            t = reference[b, k]
            if t not in reference[b, :k] and any(t not in reference[o] for o in range(B) if o != b):
                return int(t)
    raise AssertionError(f"no token ends these rows at different steps; change the seed:\n{reference}")


def until_eos(row, eos: int) -> list[int]:
    """``row`` up to and including its first ``eos`` (all of it when there is none)."""
    row = list(row)
    return row[: row.index(eos) + 1] if eos in row else row


def tiny_bert_models(seed: int = 0, **config) -> dict:
    """``{"masked_lm", "base", "classifier"}``: a ``BertForMaskedLM``, a ``BertModel`` (with pooler)
    and a ``BertForSequenceClassification`` (:data:`BERT_LABELS` labels) sharing one encoder.

    The encoder, pooler and classifier come from the classifier model, the MLM head from the
    masked-LM model; :func:`bert_state_dict` merges them into one checkpoint that has every head.
    """
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        **{**BERT_SIZES, **config},
        initializer_range=0.2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=BERT_LABELS,
    )
    classifier = randomize_norms_and_biases(transformers.BertForSequenceClassification(cfg))
    masked_lm = randomize_norms_and_biases(transformers.BertForMaskedLM(cfg))
    base = transformers.BertModel(cfg)
    encoder = classifier.bert.state_dict()
    base.load_state_dict(encoder)
    masked_lm.bert.load_state_dict({k: v for k, v in encoder.items() if not k.startswith("pooler.")})
    masked_lm.tie_weights()
    return {"masked_lm": masked_lm.eval(), "base": base.eval(), "classifier": classifier.eval()}


def bert_state_dict(models: dict) -> dict:
    """One state dict with the encoder (``bert.``), pooler, MLM head and classifier of :func:`tiny_bert_models`."""
    state = dict(models["classifier"].state_dict())
    state.update({k: v for k, v in models["masked_lm"].state_dict().items() if k.startswith("cls.")})
    return state


def bert_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = BERT_SIZES["vocab_size"]):
    """(input ids, token types, attention mask), int64 ``[B, T]`` each: row ``b`` has ``length - 3b`` real
    tokens then padding (id 0, mask 0), and token type 1 from its middle on."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, length))
    mask = np.zeros((batch, length), np.int64)
    types = np.zeros((batch, length), np.int64)
    for b in range(batch):
        n = length - 3 * b
        mask[b, :n] = 1
        types[b, n // 2: n] = 1
    ids = np.where(mask == 1, ids, 0)
    return ids.astype(np.int64), types, mask


def torch_no_grad_numpy(fn, *arrays):
    """``fn(*tensors)`` under ``torch.no_grad()`` with numpy inputs."""
    with torch.no_grad():
        return fn(*(torch.from_numpy(np.asarray(a)) for a in arrays))
