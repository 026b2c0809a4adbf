"""The colab/ notebooks: each twin in sync, each opening the same way, and each executed top to
bottom in test mode (TFD_NOTEBOOK_TEST=1) by a real kernel on 8 fake CPU devices, as on a TPU v2-8
(the ChatGPT pipeline's on one, to spare the suite's time). The executions are split over test_notebooks_*.py so that test
workers can share them."""
import re
from pathlib import Path

import nbformat

COLAB = Path(__file__).resolve().parents[2] / "colab"
NOTEBOOKS = sorted(p.stem for p in COLAB.glob("[0-9][0-9]_*.ipynb"))


def _sync():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tfd_colab_sync", COLAB / "sync.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_each_notebook_has_its_text_twin_and_no_outputs_in_git():
    assert len(NOTEBOOKS) == 11
    assert _sync().problems() == []


def test_each_notebook_says_what_it_teaches_installs_only_when_missing_and_never_waits_for_input():
    setups = set()
    for name in NOTEBOOKS:
        nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
        intro, setup = nb.cells[0], nb.cells[1]
        assert intro.cell_type == "markdown" and re.match(r"# \d+\. ", intro.source), name
        assert "Chapter" in intro.source, name
        assert setup.cell_type == "code" and 'find_spec("tfd_jax") is None' in setup.source, name
        setups.add(setup.source)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "input(" not in code and "getpass" not in code, name
        assert "notebook.summary()" in code, name  # says which devices it runs on
    assert len(setups) == 1  # one setup cell, the same everywhere
