"""The suite on a GPU machine, and ``make gpu-check`` on a CPU one.

- tests/conftest.py's CUDA guard, run on a simulated GPU workstation: a pytest run in a
  subprocess whose torch claims one CUDA device, where CPU tests must still see no CUDA and
  fail when they touch it, and gpu tests see the machine.
- kvtide.workers and kvtide.kernels import on a machine without Ray, Redis, gRPC or FastAPI
  (the bare GPU machine ``make gpu-check`` runs on).
- ``tools/gpu_check/run.py --dry-run``: everything that needs no CUDA, its table and JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from tests.conftest import CUDA_GUARD, CudaTouchedError

REPO = Path(__file__).resolve().parents[2]

# -- the CUDA guard ------------------------------------------------------------------------

FAKE_CUDA = '''
"""A GPU workstation as torch describes it: one CUDA device, already initialized (as after a
gpu test), whose caching allocator counts allocations. Loaded with -p before the conftest."""
import torch

allocated = [0]

def allocate():
    """What creating a CUDA tensor does once CUDA is initialized: no _lazy_init call."""
    allocated[0] += 1

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.is_initialized = lambda: True
torch.cuda.memory_stats = lambda device=None: {"allocation.all.allocated": allocated[0]}
'''

INNER_TESTS = '''
import os
import subprocess
import sys

import pytest
import torch

import fake_cuda


@pytest.fixture(scope="module")
def device_of_a_module_fixture():
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_cpu_test_sees_no_cuda(device_of_a_module_fixture):
    assert device_of_a_module_fixture == "cpu"
    assert not torch.cuda.is_available()
    assert torch.cuda.device_count() == 0
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "''"


def test_cpu_test_touching_cuda_fails_even_if_it_swallows_the_error():
    try:
        torch.zeros(1, device="cuda")
    except Exception:
        pass


def test_cpu_test_allocating_on_an_initialized_device_fails():
    fake_cuda.allocate()


@pytest.mark.gpu
def test_gpu_test_sees_the_machine():
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    fake_cuda.allocate()


def test_cpu_test_after_a_gpu_test_sees_no_cuda_again():
    assert not torch.cuda.is_available()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
'''


def run_inner_suite(tmp_path: Path) -> dict[str, str]:
    """Runs INNER_TESTS under tests/conftest.py on the fake GPU workstation; returns each
    test's outcome: "passed", or the failure message."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "fake_cuda.py").write_text(FAKE_CUDA)
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "CUDA_VISIBLE_DEVICES": "3"}
    subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fake_cuda", "-p", "no:cacheprovider", "-q",
         "--junitxml", str(tmp_path / "report.xml"), "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    outcomes = {}
    for case in ET.parse(tmp_path / "report.xml").iter("testcase"):
        problems = [e for e in case if e.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = "passed" if not problems else f"{problems[0].tag}: {problems[0].get('message')}"
    return outcomes


def test_the_guard_hides_cuda_from_cpu_tests_and_fails_those_that_touch_it(tmp_path):
    outcomes = run_inner_suite(tmp_path)
    assert outcomes["test_cpu_test_sees_no_cuda"] == "passed"
    assert outcomes["test_gpu_test_sees_the_machine"] == "passed"
    assert outcomes["test_cpu_test_after_a_gpu_test_sees_no_cuda_again"] == "passed"
    touched = outcomes["test_cpu_test_touching_cuda_fails_even_if_it_swallows_the_error"]
    assert touched.startswith("failure:") and "CudaTouchedError" in touched, touched
    assert "test_cpu_test_touching_cuda_fails_even_if_it_swallows_the_error is not marked gpu" in touched
    assert "test_inner.py" in touched  # where it happened
    allocated = outcomes["test_cpu_test_allocating_on_an_initialized_device_fails"]
    assert "CudaTouchedError" in allocated and "counted new allocations" in allocated, allocated


def test_this_cpu_test_runs_under_the_guard():
    assert CUDA_GUARD is not None and torch.cuda._lazy_init == CUDA_GUARD.lazy_init
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    with pytest.raises(CudaTouchedError, match="is not marked gpu but touched CUDA"):
        try:
            torch.empty(1, device="cuda")
        finally:
            CUDA_GUARD.touches.clear()  # this test expects the touch; the guard must not fail it
