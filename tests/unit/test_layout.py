"""Guards on the repository's shape: packaging lists every package, imports point one way."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("proto", "router", "workers", "kernels", "cluster")

# ARCHITECTURE.md: cluster -> {router, workers, proto}; workers -> {kernels, proto};
# router -> proto; kernels -> torch/triton only; proto -> nothing of ours.
ALLOWED = {
    "cluster": {"cluster", "router", "workers", "proto"},
    "workers": {"workers", "kernels", "proto"},
    "router": {"router", "proto"},
    "kernels": {"kernels"},
    "proto": {"proto"},
}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = _pyproject()["tool"]["setuptools"]
    mapped = {Path(v).as_posix(): k for k, v in setuptools["package-dir"].items()}
    folders = sorted(
        p.parent.relative_to(ROOT).as_posix()
        for top in TOP_LEVEL
        for p in (ROOT / top).rglob("__init__.py")
    )
    assert folders, "no packages found"
    for folder in folders:
        assert folder in mapped, f"{folder}/ has an __init__.py but is not in [tool.setuptools] package-dir"
        assert mapped[folder] == "kvtide." + folder.replace("/", "."), folder
        assert mapped[folder] in setuptools["packages"], f"{mapped[folder]} missing from packages"
    assert len(mapped) == len(folders), f"package-dir lists folders without __init__.py: {sorted(set(mapped) - set(folders))}"


def _kvtide_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "kvtide" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", TOP_LEVEL)
def test_imports_point_only_the_allowed_way(package):
    files = list((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = _kvtide_imports(path) - ALLOWED[package]
        assert not bad, f"{path.relative_to(ROOT)} imports kvtide.{', kvtide.'.join(sorted(bad))}"


def test_pure_layers_import_no_servers():
    """Scheduler, block pool and routing stay free of Ray, Redis and gRPC.

    The generated gRPC stubs (``proto/*_pb2_grpc.py``) are the exception: protoc puts them
    beside the messages, and only the servers and clients in cluster/ import them."""
    for package in ("workers", "router", "kernels", "proto"):
        for path in (ROOT / package).rglob("*.py"):
            if package == "proto" and path.name.endswith("_pb2_grpc.py"):
                continue
            text = path.read_text()
            for mod in ("ray", "redis", "grpc"):
                assert f"import {mod}" not in text and f"from {mod}" not in text, (
                    f"{path.relative_to(ROOT)} imports {mod}"
                )
