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


def _kvtide_modules(path: Path) -> set[str]:
    """Every ``kvtide.*`` module ``path`` imports, as written (``kvtide.workers.engine``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        found.update(n for n in names if n.startswith("kvtide."))
    return found


def _kvtide_imports(path: Path) -> set[str]:
    return {m.split(".")[1] for m in _kvtide_modules(path)}


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


# ARCHITECTURE.md: one sub-package of cluster/ per process. The frontend and the replica never
# import each other (a message crosses between them, never a module); both may use the state
# store. The top-level modules (serve, cli, client, threads) compose them.
CLUSTER_ALLOWED = {
    "frontend": {"frontend", "state"},
    "replica": {"replica", "state"},
    "state": {"state"},
    "bench": {"bench", "client"},
    "autoscaler": {"autoscaler", "state"},
}


def _cluster_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "cluster" else None


@pytest.mark.parametrize("sub", sorted(CLUSTER_ALLOWED))
def test_cluster_subpackages_import_only_what_their_process_may(sub):
    files = list((ROOT / "cluster" / sub).rglob("*.py"))
    assert files, f"cluster/{sub}/ is missing"
    for path in files:
        parts = {_cluster_part(m) for m in _kvtide_modules(path)} - {None}
        bad = parts - CLUSTER_ALLOWED[sub]
        assert not bad, f"{path.relative_to(ROOT)} imports kvtide.cluster.{', kvtide.cluster.'.join(sorted(bad))}"


def test_the_frontend_core_runs_without_ray():
    """The gateway talks to replicas through typed handles; only the Ray handle module and the
    servers' composition import Ray, so the gateway's tests need none."""
    for name in ("gateway.py", "replicas.py", "errors.py", "requests.py"):
        path = ROOT / "cluster" / "frontend" / name
        if path.exists():
            text = path.read_text()
            assert "import ray" not in text and "from ray" not in text, f"{path.relative_to(ROOT)} imports ray"


def test_cluster_uses_workers_through_its_public_surface():
    for path in (ROOT / "cluster").rglob("*.py"):
        private = sorted(m for m in _kvtide_modules(path) if m.startswith("kvtide.workers."))
        assert not private, f"{path.relative_to(ROOT)} imports {private}; import them from kvtide.workers"


MAX_MODULE_LINES = 300


def test_no_library_module_is_over_300_lines():
    """STYLE.md: one noun, one file, short. Generated protobuf code is exempt."""
    long = []
    for top in TOP_LEVEL:
        for path in (ROOT / top).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES:
                long.append(f"{path.relative_to(ROOT)} ({n})")
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {', '.join(long)}"
