"""Where to look when something Ray runs did not finish: timeouts name it in their message."""

from __future__ import annotations

import ray


def ray_logs_hint() -> str:
    """'the shard logs in DIR (worker-*.err)' for this node's Ray session, or a generic hint."""
    try:
        logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001 - not connected, or Ray moved its internals
        logs = "/tmp/ray/session_latest/logs"
    return f"the Ray worker logs in {logs} (worker-*.err; every node has its own)"
