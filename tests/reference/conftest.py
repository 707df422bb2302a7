"""Reference tests run Google's scripts in the TensorFlow venv named by BERTFORGE_REFERENCE_PYTHON
(`make test` creates it and sets the variable; run directly without it, these tests skip)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("google_runner.py")


class Google:
    """Calls google_runner.py with a list of tasks in one TensorFlow process."""

    def __init__(self, python: str) -> None:
        self.python = python

    def run(self, tasks: list[dict], workdir: Path) -> None:
        job = workdir / "job.json"
        job.write_text(json.dumps({"tasks": tasks}))
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(
            [self.python, str(RUNNER), str(job)], capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, f"Google's script failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="session")
def google() -> Google:
    python = os.environ.get("BERTFORGE_REFERENCE_PYTHON")
    if not python:
        pytest.skip("BERTFORGE_REFERENCE_PYTHON is not set (make test sets it)")
    assert Path(python).exists(), f"BERTFORGE_REFERENCE_PYTHON={python} does not exist"
    return Google(python)
