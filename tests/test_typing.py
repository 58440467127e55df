"""A user's script type-checks as its author expects: precise types from `vaelink.encode/decode`
and `VAE` (overloads on `output=`), under `mypy --strict` and pyright (basedpyright: pyright with
its own Node.js, from PyPI), and a misspelt keyword is an error in both."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "typing"
BIN = Path(sys.executable).parent


def check(command: list[str], script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, script], cwd=SCRIPTS, capture_output=True, text=True, timeout=600
    )


def mypy() -> list[str]:
    return [sys.executable, "-m", "mypy", "--strict", "--cache-dir", "/dev/null"]


def pyright() -> list[str]:
    found = shutil.which("basedpyright", path=str(BIN)) or shutil.which("basedpyright")
    assert found, "basedpyright is in the dev extra"
    return [found, "--pythonpath", sys.executable, "--project", str(SCRIPTS)]


@pytest.mark.parametrize("checker", [mypy, pyright])
def test_a_users_script_gets_precise_types(checker):
    result = check(checker(), "user_script.py")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("checker", [mypy, pyright])
def test_a_misspelt_option_is_a_type_error(checker):
    result = check(checker(), "misspelt.py")
    assert result.returncode != 0
    assert "misspelt.py:7" in result.stdout, result.stdout
