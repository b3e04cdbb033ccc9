"""The README's main command on a fresh machine: ``make run`` with an empty kvtide cache (no
converted model, no built CPU kernels) serves its first request, and a build killed midway
(torch's ``lock`` file left behind) never stops a later start.

The test points ``KVTIDE_CACHE_DIR`` at a fresh temporary directory, so it compiles the kernels
and converts the GGUF from nothing, as every new machine does (two to three minutes here); one
scenario, so the suite pays for that build once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from kvtide.kernels import cpu_attention, cpu_linear, cpu_ops
from kvtide.kernels.cpu_build import PROGRESS_LINE
from tests.integration.serve_process import ServeProcess, clean_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 900.0
"""Setup, the kernel compiles and a conversion on a loaded 2-core CI machine, with room to spare."""
PROGRESS = PROGRESS_LINE.split(" (")[0]  # "compiling CPU kernels"
KERNELS = {m.EXTENSION.module_name for m in (cpu_attention, cpu_linear, cpu_ops)}
"""The directories of every compiled CPU kernel, named by their content keys."""


def _chat(server: ServeProcess) -> str:
    client = openai.OpenAI(base_url=server.http_base, api_key="unused", timeout=120, max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8, temperature=0,
    )  # fmt: skip
    assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content
    return reply.choices[0].message.content


def _built(cache: Path) -> list[Path]:
    return sorted((cache / "extensions").glob("kvtide_*/*.so"))


def _kill_a_build_midway(cache: Path) -> Path:
    """Start the real build of the attention kernel and SIGKILL it once torch has taken its
    build lock: what a Ctrl-C or an OOM kill during setup leaves. Returns the lock file."""
    env = clean_env(KVTIDE_CACHE_DIR=str(cache))
    child = subprocess.Popen(
        [sys.executable, "-m", "kvtide.kernels.cpu_build", "--child", "cpu_attention"], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while not (locks := list((cache / "extensions").glob(".tmp-*/lock"))):
            assert child.poll() is None, "the build ended before it took its lock"
            assert time.monotonic() < deadline, "the build never took its lock"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    return locks[0]


def test_make_run_serves_from_empty_caches_past_a_build_killed_midway(tmp_path):
    cache = tmp_path / "kvtide-cache"  # nothing converted, nothing built: a fresh machine...
    lock = _kill_a_build_midway(cache)  # ...whose first setup was interrupted
    # torch's own cache layout was the old trap: its lock in the extension's build directory.
    stale = cache / "extensions" / cpu_ops.EXTENSION.module_name / "lock"
    stale.parent.mkdir(parents=True)
    stale.touch()
    assert lock.exists() and not _built(cache)
    # NOTE: free ports instead of the defaults, so a server already running here does not
    # collide; everything else is `make run` as the README gives it.
    cmd = ["make", "--no-print-directory", "run", "SERVE_ARGS=--grpc-port 0 --http-port 0"]
    server = ServeProcess.start(cmd, clean_env(KVTIDE_CACHE_DIR=str(cache)), START_TIMEOUT_S, cwd=str(REPO))
    try:
        assert PROGRESS in server.log
        assert {p.parent.name for p in _built(cache)} == KERNELS, server.tail()
        assert list((cache / "models").glob("SmolLM2-135M-Instruct*/config.json"))
        assert "Paris" in _chat(server)
        # make re-raises the SIGINT it received once its child exited; a failing child would
        # have made it print "make: *** [run] Error N" (or "Interrupt") instead.
        assert server.interrupt(signal.SIGINT) in (0, -signal.SIGINT), server.tail()
        assert not re.search(r"make(\[\d+\])?: \*\*\*", server.log), server.tail()
        assert "Traceback" not in server.log, server.tail()
        assert server.lines[-1].strip() == "INFO kvtide.cluster.serve: stopped", server.tail()
    finally:
        server.kill()

    # `kvtide serve` itself, not make: the shard finds a kernel missing and builds it. One kernel,
    # not all three again: the first half already built everything from nothing.
    shutil.rmtree(cache / "extensions" / cpu_ops.EXTENSION.module_name)
    kvtide = Path(sys.executable).with_name("kvtide")
    cmd = [str(kvtide), "serve", "--grpc-port", "0", "--http-port", "0", "--kv-cache-gib", "0.05",
           "--max-model-len", "512", "--drain-timeout-s", "5"]  # fmt: skip
    server = ServeProcess.start(cmd, clean_env(KVTIDE_CACHE_DIR=str(cache)), START_TIMEOUT_S)
    try:
        assert PROGRESS in server.log and "cpu_ops" in server.log
        assert {p.parent.name for p in _built(cache)} == KERNELS
        assert "unavailable" not in server.log, server.tail()  # the compiled kernels serve
        _chat(server)
        assert server.terminate() == 0, server.tail()
    finally:
        server.kill()
