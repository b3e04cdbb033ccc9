"""Builds kvtide's compiled CPU kernels once, into a cache kvtide owns, and loads them.

Never on a request: ``make`` builds them at setup (``python -m kvtide.kernels.cpu_build``), and
a CPU shard that finds them missing builds them before it reports ready (``prepare``). A
kernel that cannot be built is reported once, naming the cause, and its pure-torch twin serves.

Cache: ``$KVTIDE_CACHE_DIR/extensions`` (default ``~/.cache/kvtide/extensions``), one directory
per extension and content key: the key covers the source, the flags, the torch and Python
versions and the machine, so a changed kernel builds afresh and a stale ``.so`` is never loaded.

Build: in a child process per extension (they compile in parallel), bounded by ``timeout_s``
and killed with its compiler past it. Each child builds into a private temporary directory that
is renamed into place only when complete, so a killed build leaves no half-built extension,
and torch's own ``lock`` file only ever lives in that abandoned directory: nothing waits on it.
Builders of one extension serialize on an ``flock``, which the kernel releases when its holder
dies, so a dead build never blocks the next one.

Load: ``importlib`` from the built ``.so``; no compiler, ninja or lock file is involved.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

BUILD_TIMEOUT_S = float(os.environ.get("KVTIDE_KERNEL_BUILD_TIMEOUT_S", "300"))
"""How long a build may take before the torch twins serve instead."""

PROGRESS_LINE = "compiling CPU kernels ({names}) into {root}, about a minute on 2 cores"


@dataclass(frozen=True)
class CppExtension:
    """One C++ extension: its source and build flags. ``name`` is the kernel module's own."""

    name: str
    source: str
    functions: tuple[str, ...]
    cflags: tuple[str, ...]

    @property
    def key(self) -> str:
        import torch

        h = hashlib.sha256()
        for part in (self.source, *self.functions, *self.cflags, torch.__version__,
                     platform.python_version(), platform.machine()):  # fmt: skip
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:16]

    @property
    def module_name(self) -> str:
        return f"kvtide_{self.name}_{self.key}"


def cache_root() -> Path:
    """``$KVTIDE_CACHE_DIR`` (default ``~/.cache/kvtide``): converted models and built kernels."""
    env = os.environ.get("KVTIDE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kvtide"


def extensions_root() -> Path:
    return cache_root() / "extensions"


def library_path(ext: CppExtension) -> Path:
    return extensions_root() / ext.module_name / f"{ext.module_name}.so"


def is_built(ext: CppExtension) -> bool:
    return library_path(ext).is_file()


def buildable(ext: CppExtension) -> bool:
    """Built already, or a C++ compiler is on the PATH: what choosing a compiled kernel in a
    config needs (the shard builds it at start-up; resolving a config never compiles)."""
    return is_built(ext) or shutil.which(os.environ.get("CXX", "c++")) is not None


def load(ext: CppExtension) -> ModuleType:
    """Import the built extension; raises ``FileNotFoundError`` when it is not built."""
    import torch  # noqa: F401 - the extension links against the libraries torch loads

    path = library_path(ext)
    if not path.is_file():
        raise FileNotFoundError(f"the {ext.name} kernel is not built (no {path})")
    spec = importlib.util.spec_from_file_location(ext.module_name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class BuildResult:
    name: str
    error: str | None
    """None when the extension is built; else why not, in one line."""
    seconds: float


def build(exts: Sequence[CppExtension], timeout_s: float = BUILD_TIMEOUT_S) -> list[BuildResult]:
    """Build every extension of ``exts`` that is not built yet, all at once in child processes,
    within ``timeout_s`` in all. Logs the progress line first when there is anything to build."""
    missing = [e for e in exts if not is_built(e)]
    if not missing:
        return [BuildResult(e.name, None, 0.0) for e in exts]
    root = extensions_root()
    logger.warning(PROGRESS_LINE.format(names=", ".join(e.name for e in missing), root=root))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    children = {e.name: _spawn(e) for e in missing}
    results = [BuildResult(e.name, None, 0.0) for e in exts if e not in missing]
    for ext in missing:
        proc, log = children[ext.name]
        left_s = max(0.0, timeout_s - (time.monotonic() - t0))
        try:
            code = proc.wait(timeout=left_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = None
        error = None
        if code is None:
            error = f"the build did not finish within {timeout_s:g} s (KVTIDE_KERNEL_BUILD_TIMEOUT_S)"
        elif code != 0 or not is_built(ext):
            error = f"the compiler failed (exit {code}): {_last_line(log)}"
        log.close()
        results.append(BuildResult(ext.name, error, time.monotonic() - t0))
    built = [r.name for r in results if r.error is None and r.seconds]
    if built:
        logger.warning("compiled the CPU kernels (%s) in %.0f s", ", ".join(built), time.monotonic() - t0)
    return results


def prepare(timeout_s: float = BUILD_TIMEOUT_S) -> list[BuildResult]:
    """Build what is missing of kvtide's CPU kernels and load them into this process, so that no
    step ever compiles. Each one that fails is reported (once) and its torch twin serves."""
    modules = _kernel_modules()
    results = build([m.EXTENSION for m in modules], timeout_s)
    for module in modules:
        module.available()
    return results


def _spawn(ext: CppExtension) -> tuple[subprocess.Popen, tempfile.SpooledTemporaryFile]:
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtide.kernels.cpu_build", "--child", ext.name],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return proc, log


def _kill(proc: subprocess.Popen) -> None:
    """The child and its compiler (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _last_line(log) -> str:
    log.seek(0)
    lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def _build_here(ext: CppExtension) -> None:
    """The child's work: take the extension's lock, and build unless someone else just did."""
    root = extensions_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{ext.module_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # bounded by the parent's timeout, which kills us
        if is_built(ext):
            return
        target = root / ext.module_name
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{ext.module_name}-", dir=root))
        try:
            from torch.utils.cpp_extension import load_inline

            load_inline(
                name=ext.module_name, cpp_sources=[ext.source], functions=list(ext.functions),
                extra_cflags=list(ext.cflags), build_directory=str(tmp), verbose=False,
            )  # fmt: skip
            shutil.rmtree(target, ignore_errors=True)  # a leftover without its .so
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_abandoned(root)


def _remove_abandoned(root: Path, older_than_s: float = 3600.0) -> None:
    """Temporary build directories of killed builds (another build may still own a young one)."""
    now = time.time()
    for path in root.glob(".tmp-*"):
        if now - path.stat().st_mtime > older_than_s:
            shutil.rmtree(path, ignore_errors=True)


def _kernel_modules() -> tuple[ModuleType, ...]:
    """The modules of kvtide's compiled CPU kernels, each with ``EXTENSION`` and ``available()``."""
    from kvtide.kernels import cpu_attention, cpu_linear, cpu_ops

    return cpu_attention, cpu_linear, cpu_ops


def _extensions() -> dict[str, CppExtension]:
    return {m.EXTENSION.name: m.EXTENSION for m in _kernel_modules()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build kvtide's compiled CPU kernels into its cache.")
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    parser.add_argument("--timeout-s", type=float, default=BUILD_TIMEOUT_S)
    args = parser.parse_args(argv)
    if args.child:
        _build_here(_extensions()[args.child])
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = build(list(_extensions().values()), args.timeout_s)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"warning: the {r.name} kernel did not build: {r.error}; its torch twin will serve", file=sys.stderr)
    if not failed:
        print(f"CPU kernels ready in {extensions_root()}")
    return 0  # a missing kernel is slower, not broken: setup goes on


if __name__ == "__main__":
    sys.exit(main())
