"""What several post-training tests start from: one tiny SFT run, made once per test session."""
import sys

import pytest

from trainkit import run_cli


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """A two-step SFT run of the tiny preset on the built-in conversations (for settings, resume and
    starting points, not quality)."""
    out = tmp_path_factory.mktemp("posttrain") / "sft"
    done = run_cli([sys.executable, "-m", "tfd_jax.cli", "train", "--task", "sft", "--preset", "tiny", "--out", str(out),
                    "--steps", "2", "--batch-size", "4", "--no-progress", "--ckpt-every", "2"])
    assert done.returncode == 0, done.stdout + done.stderr
    return out
