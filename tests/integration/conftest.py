"""A two-node Ray cluster on loopback, started once for the integration tests that need it."""

from __future__ import annotations

import os

# NOTE: must be set before Ray is imported: otherwise Ray resolves "127.0.0.1" to the host's
# external address (its notion of a "remotely reachable" IP) and the driver dials that.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

LOOPBACK = "127.0.0.1"
CPUS_PER_NODE = 4


@pytest.fixture(scope="session")
def cluster():
    """Two Ray nodes, both on 127.0.0.1; the test process is the driver."""
    assert ray._private.services.get_node_ip_address() == LOOPBACK, "set the env var before importing ray"
    head = {"num_cpus": CPUS_PER_NODE, "node_ip_address": LOOPBACK, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=head)
    try:
        c.add_node(num_cpus=CPUS_PER_NODE, node_ip_address=LOOPBACK)
        ray.init(address=c.address)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
