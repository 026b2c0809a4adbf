"""Notebooks 5, 8, 10 and 11, executed on 8 fake devices (see test_notebooks.py)."""
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["05_training", "08_gpt2_from_hugging_face", "10_three_architectures", "11_quizzes"])
def test_notebook_runs(run_notebook, name):
    run_notebook(name, devices=8)
