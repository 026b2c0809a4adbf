"""Notebook 9, the ChatGPT pipeline end to end (every stage a real run), here on one device: its five
runs take about a quarter longer on 8 fake CPU devices (51 s against 42 s), and tests/posttrain
tests each stage sharded over 8 (``python colab/run.py 09_from_language_model_to_chatgpt
--devices 8`` runs the notebook so)."""
import pytest

pytestmark = pytest.mark.slow


def test_notebook_runs(run_notebook):
    nb = run_notebook("09_from_language_model_to_chatgpt", devices=1)
    table = next(o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.get("text", "").startswith("stage "))
    assert all(stage in table for stage in ("pretrain", "sft", "reward", "ppo", "dpo"))
