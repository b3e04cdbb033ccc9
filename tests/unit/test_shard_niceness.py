"""A shard below normal priority says so, naming its niceness and the fix."""

from __future__ import annotations

import logging

from kvtide.cluster.replica import shard_actor


def test_a_niced_shard_warns_with_its_niceness_and_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(shard_actor.os, "nice", lambda increment: 15)
    with caplog.at_level(logging.WARNING, logger=shard_actor.logger.name):
        shard_actor.warn_if_niced("shard (stage 0, tp_rank 0) on 127.0.0.1")
    (record,) = caplog.records
    assert "shard (stage 0, tp_rank 0) on 127.0.0.1 runs at niceness 15" in record.getMessage()
    assert "RAY_worker_niceness=0" in record.getMessage()


def test_a_shard_at_normal_priority_is_quiet(monkeypatch, caplog):
    monkeypatch.setattr(shard_actor.os, "nice", lambda increment: 0)
    with caplog.at_level(logging.WARNING, logger=shard_actor.logger.name):
        shard_actor.warn_if_niced("shard (stage 0, tp_rank 0) on 127.0.0.1")
    assert not caplog.records
