"""The one way training connects to Ray: :func:`init_ray`, called by the driver (benchmarks size their own
loopback instances in benchmarks/common.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import ray

from cacovid_rl.config import ClusterConfig


def init_ray(cluster: ClusterConfig) -> bool:
    """Connect to (or start) Ray as ``cluster`` says. Returns True when this call started a local instance (the
    caller then owns it and shuts it down); False when Ray was already up or a cluster was joined.

    ``cluster.address == "local"`` without ``RAY_ADDRESS`` starts a new loopback-only instance of ``num_cpus`` CPUs
    and ``object_store_memory_mb``, never another session's cluster on this machine; any other address (``auto``,
    ``ray://...``, ``host:port``) joins that cluster.
    """
    if ray.is_initialized():
        return False
    if cluster.address == "local" and not os.environ.get("RAY_ADDRESS"):
        # Loopback only: Ray binds to 127.0.0.1 with this set.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        with _ray_processes_in_own_session():
            ray.init(
                address="local",
                num_cpus=cluster.num_cpus,
                object_store_memory=cluster.object_store_memory_mb * 1024 * 1024,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        return True
    ray.init(address=None if cluster.address == "local" else cluster.address, logging_level=logging.WARNING)
    return False


@contextlib.contextmanager
def _ray_processes_in_own_session() -> Iterator[None]:
    """Start the local Ray instance's processes (raylet, GCS, ...) in a session of their own.

    In the driver's process group, the SIGTERM that ``timeout``, a supervisor or ``kill -- -PGID`` sends to the group
    would kill the raylet while the driver writes its stop checkpoint (``tests/ray/test_robust_signals.py``). Ray does
    the same on Windows; on Linux it only blocks SIGINT in its children. Their life stays tied to the driver: Ray's
    kernel fate sharing (``PR_SET_PDEATHSIG``) ends them when the driver dies, and it is the condition for doing this
    at all. Ray-internal, so any mismatch leaves Ray's own behaviour.
    """
    try:
        from ray._private import services
        from ray._private.utils import detect_fate_sharing_support
    except ImportError:
        yield
        return
    base = getattr(services, "ConsolePopen", None)
    if base is None or not sys.platform.startswith("linux") or not detect_fate_sharing_support():
        yield
        return

    class _OwnSessionPopen(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = _OwnSessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = base
