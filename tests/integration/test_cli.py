"""The README's main job: ``kvtide generate`` on the real model, as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _kvtide() -> str:
    exe = Path(sys.executable).with_name("kvtide")
    assert exe.exists() or shutil.which("kvtide"), "the kvtide console script is not installed"
    return str(exe) if exe.exists() else "kvtide"


def test_generate_streams_a_greedy_completion():
    out = subprocess.run(
        [_kvtide(), "generate", "What is the capital of France?", "--max-tokens", "12", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tok/s" in out.stderr


def test_generate_rejects_bad_input_with_a_clear_error():
    out = subprocess.run(
        [_kvtide(), "generate", "hi", "--max-tokens", "100000", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "max_tokens is too large: 100000" in out.stderr
