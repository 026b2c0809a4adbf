"""Notebook 9, the ChatGPT pipeline end to end (every stage a real run), on one device: on 8 fake
CPU devices its five runs take twice as long, and each stage's runs are tested sharded over 8 in
tests/posttrain (``python colab/run.py 09_from_language_model_to_chatgpt --devices 8`` runs it so)."""
import pytest

pytestmark = pytest.mark.slow  # run early: see tests/conftest.py


def test_notebook_runs(run_notebook):
    nb = run_notebook("09_from_language_model_to_chatgpt", devices=1)
    table = next(o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.get("text", "").startswith("stage "))
    assert all(stage in table for stage in ("pretrain", "sft", "reward", "ppo", "dpo"))
