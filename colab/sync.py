"""Keep each notebook and its plain-text twin in step.

The ``.py`` files (jupytext's percent format) are what people review and edit; each ``.ipynb`` is
written from its twin, with no outputs, so git holds no images or execution counts.

    python colab/sync.py            # rewrite every .ipynb from its .py twin
    python colab/sync.py --check    # exit 1 if a pair differs or a notebook holds outputs

Needs ``jupytext`` (``pip install jupytext``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def twins() -> list[tuple[Path, Path]]:
    """(``NN_name.py``, ``NN_name.ipynb``) for every numbered notebook here."""
    return [(py, py.with_suffix(".ipynb")) for py in sorted(HERE.glob("[0-9][0-9]_*.py"))]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def problems() -> list[str]:
    """What is out of step: a missing twin, cells that differ, outputs kept in git."""
    import jupytext

    found = []
    pairs = twins()
    if not pairs:
        return [f"no notebooks in {HERE}"]
    for py, ipynb in pairs:
        if not ipynb.exists():
            found.append(f"{ipynb.name} is missing: run python colab/sync.py")
            continue
        nb, text = jupytext.read(ipynb), jupytext.read(py)
        if _cells(nb) != _cells(text):
            found.append(f"{ipynb.name} differs from {py.name}: run python colab/sync.py")
        if any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code"):
            found.append(f"{ipynb.name} holds outputs: run python colab/sync.py to strip them")
    orphans = {p.stem for p in HERE.glob("[0-9][0-9]_*.ipynb")} - {py.stem for py, _ in pairs}
    found += [f"{name}.ipynb has no .py twin" for name in sorted(orphans)]
    return found


def write_all() -> list[Path]:
    """Write each ``.ipynb`` from its ``.py`` twin, outputs stripped; returns the ones that changed."""
    import jupytext

    written = []
    for py, ipynb in twins():
        nb = jupytext.read(py)
        for i, c in enumerate(nb.cells):
            c.id = f"cell-{i:02d}"  # stable ids: a sync changes only the cells that changed
            if c.cell_type == "code":
                c.outputs, c.execution_count = [], None
        nb.metadata.setdefault("colab", {"provenance": []})
        before = ipynb.read_text(encoding="utf-8") if ipynb.exists() else None
        jupytext.write(nb, ipynb)
        if ipynb.read_text(encoding="utf-8") != before:
            written.append(ipynb)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check; exit 1 if anything is out of step")
    args = p.parse_args(argv)
    if args.check:
        found = problems()
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    for path in write_all():
        print(path.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
