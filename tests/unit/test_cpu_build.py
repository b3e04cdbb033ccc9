"""The CPU kernel cache: content-keyed, loaded without a compiler, builds bounded and killed
past their timeout, and resolving a config never compiles."""

from __future__ import annotations

import dataclasses
import time

import psutil
import pytest
import torch

from kvtide.kernels import cpu_attention, cpu_build, cpu_ops
from kvtide.workers.attention import default_attention_backend


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIDE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_the_key_covers_source_and_flags():
    ext = cpu_ops.EXTENSION
    assert dataclasses.replace(ext, source=ext.source + "\n").key != ext.key
    assert dataclasses.replace(ext, cflags=(*ext.cflags, "-g")).key != ext.key
    assert dataclasses.replace(ext).key == ext.key
    assert cpu_attention.EXTENSION.module_name != cpu_ops.EXTENSION.module_name


def test_loading_what_is_not_built_names_the_missing_file(empty_cache):
    assert not cpu_build.is_built(cpu_ops.EXTENSION)
    with pytest.raises(FileNotFoundError, match=r"cpu_ops kernel is not built \(no .*extensions"):
        cpu_build.load(cpu_ops.EXTENSION)


def test_a_build_past_its_timeout_is_killed_with_its_compiler_and_leaves_nothing_half_built(empty_cache):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    (result,) = cpu_build.build([cpu_ops.EXTENSION], timeout_s=1.0)
    assert result.error == "the build did not finish within 1 s (KVTIDE_KERNEL_BUILD_TIMEOUT_S)"
    assert not cpu_build.is_built(cpu_ops.EXTENSION)
    assert not (empty_cache / "extensions" / cpu_ops.EXTENSION.module_name).exists()
    deadline = time.monotonic() + 10
    while (left := {p.pid for p in psutil.Process().children(recursive=True)} - before):
        assert time.monotonic() < deadline, f"build processes left running: {left}"
        time.sleep(0.1)


def test_a_build_reports_the_compilers_error(empty_cache, monkeypatch):
    monkeypatch.setenv("CXX", "/bin/false")  # torch's compiler of choice; fails at once
    (result,) = cpu_build.build([cpu_ops.EXTENSION], timeout_s=120)
    assert result.error is not None and result.error.startswith("the compiler failed (exit 1)")
    assert not cpu_build.is_built(cpu_ops.EXTENSION)


def test_choosing_the_cpu_backend_never_compiles(empty_cache):
    assert default_attention_backend(torch.device("cpu"), torch.float32) == "cpu"
    assert not (empty_cache / "extensions").exists()
    assert default_attention_backend(torch.device("cpu"), torch.bfloat16) == "torch"


def test_without_a_compiler_or_a_build_the_torch_backend_is_chosen(empty_cache, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert default_attention_backend(torch.device("cpu"), torch.float32) == "torch"


def test_the_built_kernels_load_without_a_compiler(monkeypatch):
    """The default cache was built by ``make`` before the tests; loading needs no compiler."""
    if not cpu_build.is_built(cpu_ops.EXTENSION):
        pytest.skip("run `make kernels` first")
    monkeypatch.setenv("CXX", "/bin/false")
    module = cpu_build.load(cpu_ops.EXTENSION)
    assert hasattr(module, "fused_add_rms_norm")
