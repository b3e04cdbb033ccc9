"""workers/host_memory.py: glibc's thresholds, set per process (each case runs in a child)."""

import os
import platform
import resource
import subprocess
import sys

import pytest

LIBC, LIBC_VERSION = platform.libc_ver()
pytestmark = pytest.mark.skipif(
    LIBC != "glibc" or tuple(map(int, LIBC_VERSION.split("."))) < (2, 33), reason="needs glibc 2.33+ (mallinfo2)"
)

REUSE = """
import ctypes, resource, torch
from kvtide.workers import host_memory
print("applied", host_memory.keep_step_buffers(), host_memory.keep_step_buffers())
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
def step():  # a layer's activations of a 940-token prefill step, freed in a different order
    a = torch.empty(940 * 3072).fill_(1.0)
    b = torch.empty(940 * 1536).fill_(2.0)
    del a
    c = torch.empty(940 * 960).fill_(3.0)
    d = torch.empty(5 << 20).fill_(4.0)
    mapped = libc.mallinfo2().hblkhd
    del b, c, d
    return mapped
for _ in range(20):
    before, faults_before = libc.mallinfo2(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mapped = step()
    after, faults_after = libc.mallinfo2(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print("step", mapped - before.hblkhd, before.arena, after.arena, faults_after - faults_before)
"""


def run(env_value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KVTIDE_HOST_MALLOC"}
    if env_value is not None:
        env["KVTIDE_HOST_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-P", "-c", REUSE], env=env, capture_output=True, text=True, timeout=120)


def steps(p: subprocess.CompletedProcess) -> list[tuple[int, int, int, int]]:
    assert p.returncode == 0, p.stderr
    return [tuple(map(int, line.split()[1:])) for line in p.stdout.splitlines() if line.startswith("step ")]


def test_tuned_heap_reuses_a_steps_pages():
    # What the thresholds promise, read from glibc itself (mallinfo2) rather than from the page
    # faults alone: no step buffer gets its own mapping, the heap is never trimmed, and every page
    # fault is the heap growing (a new fragmentation pattern; 0-20 MB now and then), none a page
    # unmapped and mapped again. A bare fault count also counted that growth: CI's layout grew
    # the heap by 20 MB inside the measured steps (5,120 faults) in both of two children.
    p = run(None)
    measured = steps(p)  # first: a child that crashed says so, with its stderr
    assert "applied True True" in p.stdout  # once, and idempotent
    for i, (mapped, arena_before, arena_after, faults) in enumerate(measured):
        assert mapped == 0, f"step {i}: {mapped} bytes of step buffers mmapped"
        assert arena_after >= arena_before, f"step {i}: heap trimmed from {arena_before} to {arena_after}"
        grown_pages = (arena_after - arena_before) // resource.getpagesize()
        assert faults <= grown_pages + 200, f"step {i}: {faults} faults, heap grew {grown_pages} pages"


def test_glibc_defaults_map_a_steps_buffers():
    # The check above can fail: with the defaults' adaptive threshold the first step's buffers
    # above 128 KB each get their own mmap (and the first free raises the threshold).
    assert steps(run("default"))[0][0] > 10 << 20


def test_default_leaves_glibc_alone():
    p = run("default")
    assert p.returncode == 0, p.stderr
    assert "applied False False" in p.stdout


def test_a_bad_setting_names_the_variable_and_the_choices():
    p = run("jemalloc")
    assert p.returncode != 0
    assert "KVTIDE_HOST_MALLOC must be 'tuned' or 'default', got 'jemalloc'" in p.stderr
