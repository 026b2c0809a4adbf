"""Notebooks 1-4 and 6-7, executed on 8 fake devices (see test_notebooks.py)."""
import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["01_tokens_embeddings_positions", "02_attention_and_masks", "03_the_block",
                                  "04_output_and_sampling", "06_inference_kv_cache", "07_complete_example"])
def test_notebook_runs(run_notebook, name):
    run_notebook(name, devices=8)
