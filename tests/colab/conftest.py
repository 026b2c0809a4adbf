"""Executing a notebook: a fresh kernel in test mode (colab/run.py), its runs in a temporary directory."""
import importlib.util
from pathlib import Path

import pytest

COLAB = Path(__file__).resolve().parents[2] / "colab"


def load_colab_script(name: str):
    """``colab/<name>.py`` as a module (the scripts beside the notebooks: run.py, sync.py)."""
    spec = importlib.util.spec_from_file_location(f"tfd_colab_{name}", COLAB / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def run_notebook(tmp_path):
    runner = load_colab_script("run")

    def run(name: str, devices: int):
        nb = runner.execute(name, tmp_path / name, devices=devices)
        assert runner.images(nb) >= 1, f"{name} shows no picture"
        return nb

    return run
