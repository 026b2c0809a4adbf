"""Notebooks 5 (also on one device), 8, 10 and 11, executed on 8 fake devices (see test_notebooks.py)."""
import pytest


@pytest.mark.parametrize("name,devices", [("05_training", 8), ("05_training", 1), ("08_gpt2_from_hugging_face", 8),
                                          ("10_three_architectures", 8), ("11_quizzes", 8)])
def test_notebook_runs(run_notebook, name, devices):
    run_notebook(name, devices=devices)
