"""``tfd-jax explain`` from the command line."""
import ast
import json
import pathlib
import sys

import tfd_jax.explain
from tfd_jax import cli
from tfd_jax.explain import load_examples

EXAMPLES = load_examples()["examples"]
WRONG = [e["id"] for e in EXAMPLES if e["agrees"] is False]


def test_explain_prints_the_errata(capsys):
    assert cli.main(["explain"]) == 0
    out = capsys.readouterr().out
    errata = out[out.index("== Errata"):]
    for example_id in WRONG:
        assert example_id in errata
    assert "ch8.layernorm" not in errata


def test_errata_only(capsys):
    assert cli.main(["explain", "--errata"]) == 0
    out = capsys.readouterr().out
    assert "Errata" in out and "== The walkthrough" not in out
    assert all(i in out for i in WRONG)


def test_json_report(capsys):
    assert cli.main(["explain", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["summary"] == {
        "examples": 71,
        "reproduced": 50,
        "course_errors": 20,
        "not_checkable": 1,
        "verdicts_match_record": True,
    }
    assert sorted(e["id"] for e in payload["errata"]) == sorted(WRONG)
    assert {s["name"] for s in payload["walkthrough"]} >= {"X_pos", "weights_causal", "adam_W"}


def test_chapter_option(capsys):
    assert cli.main(["explain", "--chapter", "10"]) == 0
    out = capsys.readouterr().out
    assert "ch10.top_k" in out and "ch5.qkv_head1" not in out
    assert cli.main(["explain", "--chapter", "19"]) == 2  # no worked examples there


def test_explain_imports_nothing_beyond_jax_optax_and_ops():
    """explain must work with only numpy, jax and optax installed: no Flax, models or training code."""
    allowed_third_party = {"numpy", "jax", "optax"}
    package = pathlib.Path(tfd_jax.explain.__file__).parent
    stdlib = set(sys.stdlib_module_names)
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = (
                    top in stdlib
                    or top in allowed_third_party
                    or name in ("tfd_jax", "tfd_jax.ops")
                    or name.startswith(("tfd_jax.ops.", "tfd_jax.explain"))
                )
                assert ok, f"{path.name} imports {name}"
