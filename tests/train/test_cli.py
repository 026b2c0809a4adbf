"""``tfd-jax train`` flags land in the right config fields (parsing only: nothing trains here)."""
import pytest

from tfd_jax.cli import UserError, build_parser
from tfd_jax.models import GPTConfig
from tfd_jax.train.cli import config_from_args


def parse(*argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_model_flags_become_config_overrides():
    cfg = parse("--scan-layers", "--remat", "dots", "--attention", "xla", "--dropout", "0.1",
                "--model", "d_model=32", "--model", "tie_embeddings=false")
    assert cfg.model_overrides == {
        "scan_layers": True, "remat": "dots", "attention_impl": "xla", "dropout": 0.1,
        "d_model": 32, "tie_embeddings": False,
    }
    model = GPTConfig.preset("tiny", **cfg.model_overrides)  # all of them are valid GPTConfig fields
    assert model.scan_layers and model.remat_policy == "dots"


def test_defaults_leave_the_model_config_alone():
    assert parse().model_overrides == {}
    assert parse("--remat").model_overrides == {"remat": "full"}  # the bare flag keeps nothing


def test_unknown_model_field_is_refused():
    with pytest.raises(UserError, match="d_modle.*expected FIELD=VALUE"):
        parse("--model", "d_modle=32")
