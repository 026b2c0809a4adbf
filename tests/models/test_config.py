"""GPTConfig: presets, parameter counts, and clear errors for bad settings."""
import dataclasses

import pytest

from flax import nnx

from tfd_jax.models import GPT, PRESETS, GPTConfig, count_params


def abstract_params(cfg: GPTConfig) -> int:
    """Parameter count of the real module, built abstractly (shapes only, nothing allocated)."""
    return count_params(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_params_equals_formula_for_every_preset(name):
    cfg = GPTConfig.preset(name)
    assert abstract_params(cfg) == cfg.num_params()


def test_gpt2_small_has_124m_params_with_tied_embeddings():
    cfg = GPTConfig.preset("gpt2")
    assert cfg.tie_embeddings
    assert cfg.num_params() == 124_439_808
    # Untying adds exactly one V x M matrix.
    untied = cfg.replace(tie_embeddings=False)
    assert untied.num_params() - cfg.num_params() == cfg.vocab_size * cfg.d_model


VARIANTS = {
    "course-rmsnorm": dict(name="course", vocab_size=50, norm="rmsnorm"),
    "course-head-bias": dict(name="course", vocab_size=50, lm_head_bias=True),
    "course-final-norm": dict(name="course", vocab_size=50, final_norm=True, norm_bias=False),
    "tiny-rope": dict(name="tiny", positions="rope"),
    "tiny-swiglu": dict(name="tiny", gated_ffn=True, activation="silu"),
    "tiny-no-biases": dict(name="tiny", qkv_bias=False, out_bias=False, ffn_bias=False, d_ff=100),
    "tiny-untied": dict(name="tiny", tie_embeddings=False, positions="none"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_count_params_equals_formula_for_variants(variant):
    kw = dict(VARIANTS[variant])
    cfg = GPTConfig.preset(kw.pop("name"), **kw)
    assert abstract_params(cfg) == cfg.num_params()


def test_course_count_by_hand():
    cfg = GPTConfig.preset("course", vocab_size=50)
    # Per block: W_Q,K,V,O 4*36 (no biases), FFN 6*24+24+24*6+6, two LayerNorms 2*(6+6).
    per_block = 4 * 36 + (6 * 24 + 24 + 24 * 6 + 6) + 2 * 12
    # Plus the token table and the untied head (no position table: sinusoidal is fixed).
    assert cfg.num_params() == 3 * per_block + 50 * 6 + 6 * 50
    assert cfg.num_params(include_embeddings=False) == 3 * per_block


def test_course_preset_fields():
    cfg = GPTConfig.preset("course")
    assert (cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.num_layers) == (6, 2, 3, 24, 3)
    assert cfg.norm_position == "post" and not cfg.final_norm
    assert cfg.activation == "relu" and cfg.positions == "sinusoidal"
    assert not cfg.tie_embeddings and not cfg.qkv_bias and not cfg.out_bias and cfg.ffn_bias


def test_d_ff_defaults_to_four_times_width():
    assert GPTConfig(d_model=32, num_heads=4, num_layers=1).d_ff == 128


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=10, num_heads=3), "not divisible"),
        (dict(d_model=6, num_heads=2, positions="rope"), "even head dim"),
        (dict(norm_position="middle"), "norm_position"),
        (dict(activation="tanh"), "activation"),
        (dict(positions="alibi"), "positions"),
        (dict(dropout=1.0), "dropout"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(dtype="float8"), "dtypes"),
        (dict(attention_impl="flash"), "attention_impl"),
        (dict(logits_dtype="float16"), r"logits_dtype must be one of \('float32', 'bfloat16'\), got 'float16'"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_divisibility_error_suggests_head_counts():
    with pytest.raises(ValueError, match=r"d_model=10 is not divisible by num_heads=3.*1, 2, 5, 10"):
        GPTConfig.preset("tiny", d_model=10, num_heads=3)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'.*gpt2"):
        GPTConfig.preset("gpt5")


def test_dict_round_trip_and_unknown_field():
    cfg = GPTConfig.preset("course", vocab_size=50)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_embd": 6})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 8  # type: ignore[misc]


def test_llama_family_presets_have_the_published_parameter_counts():
    """The shapes of TinyLlama, SmolLM2, Qwen2.5 and Llama 2 (Chapter 19, Part 7): grouped-query
    attention, SwiGLU, RMSNorm and untied (or tied) heads give each model's published size."""
    published = {"tinyllama-1.1b": 1_100_048_384, "smollm2-135m": 134_515_008, "qwen2.5-0.5b": 494_032_768,
                 "llama2-7b": 6_738_415_616}
    for name, count in published.items():
        cfg = GPTConfig.preset(name)
        assert cfg.num_params() == count, name
        assert cfg.norm == "rmsnorm" and cfg.gated_ffn and cfg.positions == "rope" and not cfg.out_bias
    tiny = GPTConfig.preset("llama-tiny")
    assert tiny.num_kv_heads < tiny.num_heads and not tiny.tie_embeddings
