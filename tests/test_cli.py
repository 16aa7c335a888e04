"""The `seed-lightning` command: a quiet stderr."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess:
    """`python -m ...` from the repository root, as a user runs it (PYTHONPATH is inherited)."""
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_call_does_not_print_lightnings_args_warning():
    result = run("seed_lightning.cli", "tokenizer", "fit", "-c", "conf/tokenizer/tiny.yaml", "--print_config")
    assert result.returncode == 0, result.stderr
    assert "trainer:" in result.stdout
    assert "args parameter" not in result.stderr
