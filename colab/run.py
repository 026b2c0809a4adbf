"""Execute notebooks in test mode with a real kernel, as the tests do, and say how long each took.

    python colab/run.py                       # every notebook, one device; one JSON line each
    python colab/run.py 05_training --devices 8   # one notebook on 8 fake CPU devices (a TPU v2-8's count)
    python colab/run.py --full                # without test mode: the real sizes (slow on a CPU)

Needs ``nbclient`` and ``ipykernel`` (``pip install -e ".[test]"``).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

COLAB = Path(__file__).resolve().parent


def kernel_env(out_dir: Path, devices: int, test: bool = True) -> dict:
    """The kernel's environment: test mode, its run directory, ``devices`` fake CPU devices."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTEST_CURRENT_TEST")}
    env.update(TFD_NOTEBOOK_TEST="1" if test else "0", TFD_NOTEBOOK_OUT=str(out_dir), TFD_JAX_DEBUG="1")
    if devices > 1:  # fake devices are CPU devices
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def names() -> list[str]:
    return sorted(p.stem for p in COLAB.glob("[0-9][0-9]_*.ipynb"))


def execute(name: str, out_dir: Path, *, devices: int = 1, test: bool = True, timeout: int = 600):
    """Run every cell of ``colab/<name>.ipynb`` in a fresh kernel; returns the executed notebook.

    Raises ``nbclient.exceptions.CellExecutionError`` (with the failing cell and its traceback) on
    the first error."""
    import nbclient
    import nbformat

    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(out_dir)}})
    client.execute(env=kernel_env(out_dir, devices, test))  # the kernel's environment, not this process's
    return nb


def images(nb) -> int:
    """How many pictures the executed notebook shows."""
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(description="execute the colab/ notebooks with a real kernel")
    p.add_argument("names", nargs="*", help="notebooks to run, e.g. 05_training (default: all)")
    p.add_argument("--devices", type=int, default=1, help="fake this many CPU devices (default 1)")
    p.add_argument("--full", action="store_true", help="not in test mode: the notebooks' real sizes")
    p.add_argument("--out", default=None, help="where the notebooks' runs go (default: a temporary directory)")
    args = p.parse_args(argv)
    failed = 0
    for name in args.names or names():
        out = Path(args.out or tempfile.mkdtemp(prefix="tfd_nb_")) / name
        t = time.time()
        try:
            nb = execute(name, out, devices=args.devices, test=not args.full)
            record = {"notebook": name, "devices": args.devices, "ok": True, "pictures": images(nb)}
        except Exception as e:  # noqa: BLE001 - report each notebook and go on
            failed += 1
            record = {"notebook": name, "devices": args.devices, "ok": False, "error": str(e).splitlines()[0][:300]}
        record["wall_s"] = round(time.time() - t, 1)
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
