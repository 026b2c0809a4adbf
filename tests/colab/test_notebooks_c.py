"""Notebook 9, the ChatGPT pipeline end to end (every stage a real run), on 8 fake devices (see
test_notebooks.py); tests/posttrain tests each stage's parts."""
import pytest

pytestmark = pytest.mark.slow  # run early: see tests/conftest.py


def test_notebook_runs(run_notebook):
    nb = run_notebook("09_from_language_model_to_chatgpt", devices=8)
    table = next(o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.get("text", "").startswith("stage "))
    assert all(stage in table for stage in ("pretrain", "sft", "reward", "ppo", "dpo"))
