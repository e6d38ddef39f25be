"""The pool's autoscaler request: what it asks for, and that a failing request is reported, not swallowed."""

from __future__ import annotations

import logging

import pytest

from cacovid_rl.config import load_config
from learner.pool import ActorPool

CFG = load_config(None, ["cluster.address=auto", "cluster.actor_resource=reward_actor", "cluster.max_actors=3"])


def test_request_asks_for_max_actors_slots_of_the_actor_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.autoscaler.sdk

    asked: list = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda **kw: asked.append(kw))
    ActorPool(CFG)._request_autoscaler_capacity()
    assert asked == [{"bundles": [{"reward_actor": 1}] * 3}]


def test_failed_request_is_logged_once_per_error(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import ray.autoscaler.sdk

    errors = iter([RuntimeError("GCS unreachable"), RuntimeError("GCS unreachable"), None, RuntimeError("again")])

    def request_resources(**kw) -> None:
        err = next(errors)
        if err is not None:
            raise err

    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", request_resources)
    pool = ActorPool(CFG)
    with caplog.at_level(logging.WARNING, logger="learner.pool"):
        for _ in range(4):
            pool._request_autoscaler_capacity()  # resize calls it every few seconds
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "request_resources for 3 reward actors failed: RuntimeError: GCS unreachable",
        "request_resources for 3 reward actors failed: RuntimeError: again",  # a new failure after a success
    ]
