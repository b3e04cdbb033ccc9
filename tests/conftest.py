"""Test-wide settings. Thread settings must be in the environment before torch loads.

CUDA belongs to the tests marked ``gpu``; every other test runs on the CPU whatever the
machine has, so ``make test`` on a GPU workstation runs the same CPU tests as CI. For a test
not marked ``gpu`` (``CudaGuard``):
- ``torch.cuda.is_available()`` is False and ``torch.cuda.device_count()`` 0, so the code
  under test resolves ``device="auto"`` to the CPU (with fp32 and the CPU backends);
- on a machine with CUDA, ``CUDA_VISIBLE_DEVICES`` is "" for the processes it starts (servers,
  Ray nodes and workers). Not on one without: there is nothing to hide, and Ray refuses to
  start a node that declares fake GPUs (tests/integration/test_gpu_placement.py) when the
  variable lists fewer devices than it declares;
- touching CUDA fails it: ``torch.cuda._lazy_init`` raises ``CudaTouchedError`` (torch calls
  it for the first CUDA tensor of a process and in every ``torch.cuda`` query), and the test
  fails after its call even when the code under test swallowed that error. Once a gpu test
  has initialized CUDA, torch stops calling ``_lazy_init`` for new tensors, so an allocation
  counted by the CUDA caching allocator during the test fails it as well.
These hold from a test's setup to its teardown, fixtures of any scope included. Outside a
test (collection, plugins) torch answers for the machine: ``tests/unit/triton_env.py`` reads
it at import to choose compiled Triton kernels or the interpreter.
"""

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]


def shadowing_folders(root: Path = ROOT) -> list[Path]:
    """The repo's package folders whose name an installed distribution also has."""
    found = []
    for folder in sorted(root.iterdir()):
        if not (folder / "__init__.py").is_file():
            continue
        try:
            importlib.metadata.distribution(folder.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(folder)
    return found


def prefer_installed_packages(root: Path = ROOT) -> list[str]:
    """Import each installed distribution that shares a name with one of the repo's folders.

    pytest puts the repository root on ``sys.path`` (``tests/`` is a package), and there each
    source folder is importable under its bare name as well as its installed one
    (``kernels/`` is ``kvtide.kernels``). kvtide only ever uses the installed names, but a
    library asking for a top-level package would get our folder: transformers >= 5.x depends
    on Hugging Face's ``kernels`` and does ``from kernels import CUDAProperties`` on import,
    which found ``kernels/__init__.py`` here. Importing the installed package first, with the
    root off ``sys.path``, puts it in ``sys.modules`` for everyone after. Returns the names.
    """
    imported = []
    for folder in shadowing_folders(root):
        saved = sys.path[:]
        sys.path[:] = [p for p in saved if Path(p or ".").resolve() != root]
        try:
            importlib.import_module(folder.name)
            imported.append(folder.name)
        finally:
            sys.path[:] = saved
    return imported


prefer_installed_packages()

import contextlib  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ALLOCATOR_COUNTERS = ("allocation.all.allocated", "allocated_bytes.all.allocated")
"""Cumulative counters of the CUDA caching allocator: any growth is a new CUDA tensor."""


class CudaTouchedError(RuntimeError):
    """A test not marked ``gpu`` used CUDA."""


def is_gpu_test(item: pytest.Item) -> bool:
    return item.get_closest_marker("gpu") is not None


class CudaGuard:
    """Hides CUDA from the code under test while ``allowed`` is False, and records every use.

    Installed once per session: it replaces ``torch.cuda.is_available``, ``device_count`` and
    ``_lazy_init`` with functions that answer for the machine while ``allowed`` and refuse
    otherwise; ``uninstall`` puts torch's back. ``machine_has_cuda`` is asked once, before any
    ``CUDA_VISIBLE_DEVICES`` change.
    """

    def __init__(self) -> None:
        self.cuda = torch.cuda
        self.originals = {n: getattr(torch.cuda, n) for n in ("is_available", "device_count", "_lazy_init")}
        self.machine_has_cuda = bool(self.originals["is_available"]())
        self.num_devices = int(self.originals["device_count"]()) if self.machine_has_cuda else 0
        self.allowed = True
        self.test_name = ""
        self.touches: list[str] = []

    def install(self) -> None:
        self.cuda.is_available = self.is_available
        self.cuda.device_count = self.device_count
        self.cuda._lazy_init = self.lazy_init

    def uninstall(self) -> None:
        for name, original in self.originals.items():
            setattr(self.cuda, name, original)

    def is_available(self) -> bool:
        return self.allowed and self.originals["is_available"]()

    def device_count(self) -> int:
        return self.originals["device_count"]() if self.allowed else 0

    def lazy_init(self) -> None:
        if not self.allowed:
            where = "".join(traceback.format_list(_caller_frames()))
            self.touches.append(where)
            raise CudaTouchedError(self.message(f"torch.cuda was initialized or queried from:\n{where}"))
        self.originals["_lazy_init"]()

    def message(self, what: str) -> str:
        return (
            f"{self.test_name} is not marked gpu but touched CUDA; CPU tests run on the CPU whatever "
            f"the machine has (mark it @pytest.mark.gpu if it needs a GPU): {what}"
        )

    def allocations(self) -> tuple[int, ...]:
        """The allocator's cumulative counters on every device; () before CUDA is initialized."""
        if not (self.machine_has_cuda and self.cuda.is_initialized()):
            return ()
        counts = []
        for index in range(self.num_devices):
            stats = self.cuda.memory_stats(index)  # reads torch's counters, no _lazy_init
            counts += [int(stats.get(key, 0)) for key in ALLOCATOR_COUNTERS]
        return tuple(counts)

    @contextlib.contextmanager
    def for_test(self, name: str, gpu: bool) -> Iterator[None]:
        """The state for one test's setup, call and teardown: CUDA hidden unless ``gpu``."""
        self.allowed, self.test_name, self.touches = gpu, name, []
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not gpu and self.machine_has_cuda:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        try:
            yield
        finally:
            self.allowed, self.test_name = True, ""
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved

    def check(self, before: tuple[int, ...]) -> None:
        """After one phase of a non-gpu test (``before``: ``allocations()`` ahead of it): raise if
        it touched CUDA, even when the code under test caught the error (an engine turns a
        failed step into an error result). A touch is reported once."""
        touches, self.touches = self.touches, []
        if touches:
            raise CudaTouchedError(self.message(f"first touch:\n{touches[0]}"))
        if before and self.allocations() != before:
            raise CudaTouchedError(self.message("the CUDA caching allocator counted new allocations"))


def _caller_frames() -> list[traceback.FrameSummary]:
    """The frames from the test (or fixture) down to the call into torch, innermost last."""
    import _pytest
    import pluggy

    runner = tuple(os.path.dirname(m.__file__) for m in (_pytest, pluggy))
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename != __file__]
    start = max((i + 1 for i, f in enumerate(frames) if f.filename.startswith(runner)), default=0)
    torch_dir = os.path.dirname(torch.__file__)
    return [f for f in frames[start:] if not f.filename.startswith(torch_dir)][-6:]


CUDA_GUARD: CudaGuard | None = None


def pytest_configure(config):
    global CUDA_GUARD
    CUDA_GUARD = CudaGuard()
    CUDA_GUARD.install()


def pytest_unconfigure(config):
    if CUDA_GUARD is not None:
        CUDA_GUARD.uninstall()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with CUDA_GUARD.for_test(item.nodeid, is_gpu_test(item)):
        return (yield)


def _checked_phase(item):
    if is_gpu_test(item):
        return (yield)
    before = CUDA_GUARD.allocations()
    result = yield  # a phase that failed already keeps its own error
    CUDA_GUARD.check(before)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _checked_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _checked_phase(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _checked_phase(item))


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if CUDA_GUARD.machine_has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
