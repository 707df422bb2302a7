"""bench/tune_check.py: `--tune`'s gradient check for each option, with its margin."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import BENCH


def test_each_option_against_the_default_step_in_fp32():
    """bf16 on a CPU (no Triton in this environment: packed and split q/k/v only): the default
    step's own distance from fp32 is bf16's rounding, not 0; each option lands near it and
    passes tune's rule."""
    argv = [sys.executable, str(BENCH / "tune_check.py"), "--model-size", "tiny", "--seq-len", "32"]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    got = [(r["layout"], r["option"]) for r in report["results"]]
    assert got == [("packed", "packed"), ("padded", "split_qkv"), ("packed", "split_qkv")]
    for r in report["results"]:
        assert 0 < r["default_from_fp32"] < 0.5 and r["margin"] < 0, r
        assert abs(r["from_fp32"] - r["default_from_fp32"]) < 0.05, r
        assert r["from_default"] < 0.1, r
        # where the margin is: a distance and its limit (a gradient's, a norm's or the loss's)
        assert abs(r["margin"] - (r["margin_distance"] - r["margin_limit"])) < 2e-5, r
        assert r["margin_at"] == "the loss" or r["margin_at"].endswith(("gradient", "norm")), r
    assert report["floor"] == {"norm": 0.02, "difference": 0.02} and report["rounding"] == 1.5
