"""``kvtide serve`` (or ``make run``) as a subprocess in its own process group, its output
collected on a thread, for the tests that start the product the way a user does."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

READY_LINE = "Ctrl-C drains and stops"


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, cmd: list[str], env: dict[str, str], timeout_s: float, cwd: str | None = None) -> ServeProcess:
        """Start ``cmd`` and wait until it says it is serving; kills it and raises with its last
        lines when it exits or ``timeout_s`` passes first."""
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        sp = cls(proc)
        sp.reader = threading.Thread(target=lambda: sp.lines.extend(proc.stdout), daemon=True)
        sp.reader.start()
        deadline = time.monotonic() + timeout_s
        while not any(READY_LINE in line for line in sp.lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                sp.kill()
                raise AssertionError(f"{' '.join(cmd)} did not start within {timeout_s:g} s:\n{sp.tail()}")
            time.sleep(0.2)
        return sp

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    @property
    def grpc_port(self) -> int:
        return int(re.search(r"gRPC \(kvtide\.v1\.Kvtide, health, reflection\) on 127\.0\.0\.1:(\d+)", self.log)[1])

    @property
    def http_base(self) -> str:
        return re.search(r"OpenAI HTTP API on (http://127\.0\.0\.1:\d+/v1)", self.log)[1]

    @property
    def http_port(self) -> int:
        """The HTTP port, whatever address the server binds."""
        return int(re.search(r"OpenAI HTTP API on https?://[^\s/]+:(\d+)/v1", self.log)[1])

    def interrupt(self, sig: int = signal.SIGINT, timeout_s: float = 120.0) -> int:
        """What Ctrl-C in a terminal does: ``sig`` to the whole process group; returns the exit code."""
        os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout_s)
        self.reader.join(10)
        return code

    def terminate(self, timeout_s: float = 120.0) -> int:
        """SIGTERM to the server alone, as a process manager sends it; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout_s)
        self.reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        if self.reader is not None:
            self.reader.join(10)
        self.proc.stdout.close()


def clean_env(**overrides: str) -> dict[str, str]:
    """This environment without a Ray address to join, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(overrides)
    return env
