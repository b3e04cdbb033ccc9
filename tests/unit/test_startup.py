"""``engine_for_cluster``: what ``--device`` becomes on the Ray cluster, and when a GPU replica
is refused at once (no Ray started: the cluster's resources are faked)."""

from __future__ import annotations

import logging

import pytest

from kvtide.cluster import startup
from kvtide.cluster.serve_config import ServeConfig, StartupError
from kvtide.workers import EngineConfig


def _config(device: str, address: str | None = None, tp: int = 1) -> ServeConfig:
    return ServeConfig(engine=EngineConfig.from_kwargs(device=device, tensor_parallel_size=tp), address=address)


@pytest.fixture
def gpus(monkeypatch):
    def set_gpus(n: int) -> None:
        monkeypatch.setattr(startup.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(n)})

    return set_gpus


def test_auto_follows_the_cluster(gpus):
    gpus(0)
    assert startup.engine_for_cluster(_config("auto")).model.device == "cpu"
    gpus(2)
    assert startup.engine_for_cluster(_config("auto")).model.device == "cuda"


def test_a_private_cluster_without_enough_gpus_is_refused_with_the_numbers(gpus):
    gpus(1)
    with pytest.raises(StartupError, match=r"a replica needs 2 GPU\(s\) \(tp=2 x pp=1, --device cuda\) but the Ray "
                                           r"cluster has 1"):  # fmt: skip
        startup.engine_for_cluster(_config("cuda", tp=2))


def test_a_joined_cluster_waits_for_its_autoscaler_to_add_gpus(gpus, caplog):
    gpus(0)
    with caplog.at_level(logging.WARNING, logger=startup.__name__):
        engine = startup.engine_for_cluster(_config("cuda", address="auto"))
    assert engine.model.device == "cuda"
    assert "waiting up to 600 s for Ray's autoscaler to add GPU nodes" in caplog.text
