"""CPU thread settings: the spin that keeps a decode step's parallel regions fast under PASSIVE."""

from __future__ import annotations

import os

import pytest

from kvtide.cluster.threads import configure_threads


def test_passive_policy_with_a_short_spin_and_one_thread_per_core(monkeypatch):
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KVTIDE_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)  # torch is loaded in the tests
    assert configure_threads() == 3
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert os.environ["GOMP_SPINCOUNT"] == "10000"
    assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "3"


def test_an_operators_settings_win(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    monkeypatch.setenv("KVTIDE_NUM_THREADS", "1")
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)
    assert configure_threads() == 1
    assert os.environ["GOMP_SPINCOUNT"] == "0"
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        configure_threads(0)
