"""Make kvtide importable on a bare GPU machine: no venv, no pip, no network.

kvtide's packages are this repository's folders, mapped to ``kvtide.<name>`` by
pyproject.toml's ``[tool.setuptools] package-dir``. ``link_tree`` turns that mapping into a
folder for sys.path (``<work>/site/kvtide/workers -> <repo>/workers``, ...): the live tree,
nothing copied or built, nothing written outside the work folder. Why not
``pip install --no-deps --no-build-isolation -e .``: it runs setuptools' build backend, which
needs setuptools >= 68 and wheel on the machine (a bare torch machine has setuptools through
torch, not necessarily wheel), writes into the machine's site-packages, and in strict mode
misses a module added since.

What a machine with only torch, triton and transformers lacks comes as wheels (``CARRIED``):
fetched here with pip (``fetch_wheels``, the one step that needs PyPI) into
build/gpu_check/wheels, carried to the GPU machine with the tree, and unpacked there into the
same site folder when the machine lacks the distribution or has an older one. They are all
pure Python (py3-none-any), so unpacking is installing.

Already on such a machine, through torch (filelock, typing-extensions, setuptools, sympy,
networkx, jinja2 + MarkupSafe, fsspec) and transformers (numpy, safetensors, tokenizers,
huggingface-hub, pyyaml, regex, tqdm, packaging): everything kvtide.workers and
kvtide.kernels import at module level except gguf. kvtide.proto's package imports no
protobuf (only its generated ``*_pb2`` modules do, which workers never import).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

CARRIED: dict[str, tuple[str, str]] = {
    "gguf": ("0.19.0", "kvtide.workers.model_files imports it: Engine.load resolves every model through it"),
    "pytest": ("9.2.0", "runs the gpu-marked tests"),
    "pluggy": ("1.7.0", "pytest"),
    "iniconfig": ("2.3.1", "pytest"),
    "pygments": ("2.21.0", "pytest"),
    "packaging": ("26.4", "pytest needs >= 24; transformers takes any >= 20"),
}
"""Distribution: (version tested with kvtide, who needs it). About 3 MB of wheels in all."""

WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-.*\.whl$")


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    action: str
    """"unpacked", or why not ("present 9.2.0")."""


def package_dirs(repo: Path) -> dict[str, Path]:
    """``kvtide.<name>`` -> folder, from pyproject.toml, the one declaration of the layout."""
    setuptools = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: repo / folder for name, folder in setuptools["package-dir"].items()}


def link_tree(repo: Path, site: Path) -> list[str]:
    """Make ``site/kvtide`` hold one link per top-level kvtide package; returns their names.
    Raises ``ValueError`` when a nested package is not its parent's sub-folder (a link cannot
    express that mapping)."""
    dirs = package_dirs(repo)
    top = {n: d for n, d in dirs.items() if n.count(".") == 1}
    for name, folder in dirs.items():
        parent = name.rsplit(".", 1)[0]
        if parent in dirs and folder != dirs[parent] / name.rsplit(".", 1)[1]:
            raise ValueError(f"{name} maps to {folder}, not to a sub-folder of {parent} ({dirs[parent]})")
    root = site / "kvtide"
    root.mkdir(parents=True, exist_ok=True)
    for name, folder in top.items():
        link = root / name.split(".", 1)[1]
        if link.is_symlink() or link.exists():
            if link.resolve() == folder.resolve():
                continue
            link.unlink()
        link.symlink_to(folder.resolve(), target_is_directory=True)
    return sorted(top)


def activate(site: Path) -> None:
    """Put ``site`` first on this process's path and on its children's (``PYTHONPATH``)."""
    entry = str(site.resolve())
    if entry not in sys.path:
        sys.path.insert(0, entry)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != entry]
    os.environ["PYTHONPATH"] = os.pathsep.join([entry, *paths])
    importlib.invalidate_caches()


def unpack_wheels(wheels: Path, site: Path) -> list[Wheel]:
    """Unpack each carried wheel the machine lacks (or has older) into ``site``."""
    done = []
    for path in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        m = WHEEL_NAME.match(path.name)
        if m is None:
            continue
        name, version = m["name"], m["version"]
        present = installed_version(name)
        if present is not None and version_key(present) >= version_key(version):
            done.append(Wheel(name, version, f"present {present}"))
            continue
        with zipfile.ZipFile(path) as z:
            z.extractall(site)
        done.append(Wheel(name, version, "unpacked" if present is None else f"unpacked over {present}"))
    importlib.invalidate_caches()
    return done


def missing_carried() -> list[str]:
    """Carried distributions this process cannot import, after unpacking."""
    return [name for name in CARRIED if installed_version(name) is None]


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4])


def fetch_wheels(dest: Path) -> None:
    """Download the carried wheels from PyPI (on a machine with network, before a GPU run)."""
    dest.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={version}" for name, (version, _) in CARRIED.items()]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(dest), *specs],
        check=True,
    )  # fmt: skip
