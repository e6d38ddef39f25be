"""The reward-actor pool on an autoscaling cluster: the driver's ``request_resources`` makes the cluster grow.

A head with Ray's fake multi-node provider (``ray.cluster_utils.AutoscalingCluster``'s setup: the autoscaler
launches real raylets on this machine as "nodes") and no ``reward_actor`` capacity at all. ``learner.driver.train``
with a pool of 1 to 2 actors: the pool starts one pending actor and asks the autoscaler for ``max_actors`` slots of
``reward_actor`` (``learner/pool.py::_request_autoscaler_capacity``); the autoscaler launches two reward nodes and
the pool grows to two actors. Only the explicit request can bring the second node: the pending-actor demand is one
actor (the pool's target follows the live capacity), so a request that does nothing, or one that fails, leaves the
cluster at one reward node and the pool at one actor.

Why not ``AutoscalingCluster`` itself: its ``start()`` and ``shutdown()`` run ``ray stop --force``, which kills every
Ray process of this user on the machine (other test runs and jobs included). The head here is started the way
``AutoscalingCluster.start`` starts it (same generated config, ``AUTOSCALER_UPDATE_INTERVAL_S=1``,
``RAY_FAKE_CLUSTER=1``) but with its own ``--temp-dir`` and free loopback ports, and stopped by process id
(``tests/cluster/test_job_submit_e2e.py``'s helpers): the fake nodes' processes carry the head's temp dir in
their command lines, so they are found and stopped with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster.test_job_submit_e2e import (
    BIN,
    HEAD_START_TIMEOUT_S,
    Head,
    _free_ports,
    _has_ray_client,
    _owned_pids,
    _worker_port_range,
    start_with_retries,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

MAX_ACTORS = 2
GROW_TIMEOUT_S = 240.0
REWARD_NODE = "reward.node"


def autoscaling_config(gcs_address: str, max_reward_nodes: int) -> dict:
    """``AutoscalingCluster._generate_config`` on Ray's ``fake_multi_node/example.yaml`` (not shipped in the wheel,
    so written out here), with the GCS address given to the provider: it otherwise assumes the default port 6379,
    which may be another cluster's. The head has the learner's resource, the worker type the pool's; the node type
    allows more nodes than the request asks for, so the request (not the cap) decides how many launch."""
    return {
        "cluster_name": "cacovid-fake-autoscaling",
        "max_workers": max_reward_nodes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1, "learner": 1}, "node_config": {}, "max_workers": 0},
            REWARD_NODE: {
                "resources": {"CPU": 1, "reward_actor": 1, "object_store_memory": 100 * 1024**2},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_reward_nodes,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,  # no scale-down while the test runs
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def _start_autoscaling_head(root: Path, attempt: int) -> Head:
    temp_dir = root / f"ray{attempt}"
    names = [
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port",
    ]  # fmt: skip
    if _has_ray_client():
        names.append("ray-client-server-port")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    lo, hi = _worker_port_range()
    gcs = f"127.0.0.1:{ports['port']}"
    config = root / f"autoscaling{attempt}.json"
    config.write_text(json.dumps(autoscaling_config(gcs, MAX_ACTORS + 1)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS etc.
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind to 127.0.0.1 only (the fake nodes inherit it)
        RAY_AUTH_MODE="disabled",
        AUTOSCALER_UPDATE_INTERVAL_S="1",  # as AutoscalingCluster.start
        RAY_FAKE_CLUSTER="1",
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--autoscaling-config={config}", "--num-cpus=1", "--resources={\"learner\": 1}",
        "--object-store-memory=150000000", "--include-dashboard=false",
        f"--temp-dir={temp_dir}", f"--min-worker-port={lo}", f"--max-worker-port={hi}",
        *(f"--{name}={port}" for name, port in ports.items()),
    ]  # fmt: skip
    log = root / f"head{attempt}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Head(proc, root, temp_dir, gcs, env, log, ports)


def _wait_head(head: Head) -> bool:
    """The head's address file is written; False if ``ray start`` died (e.g. a port taken in between)."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            return False
        if (head.temp_dir / "ray_current_cluster").is_file():
            return True
        time.sleep(0.5)
    raise TimeoutError(f"Ray head not ready after {HEAD_START_TIMEOUT_S}s:\n{head.log_tail()}")


def _stop_autoscaling_head(head: Head) -> None:
    """Stop the head and the nodes its autoscaler launched, by process id only.

    SIGTERM to ``ray start --block`` stops the head node's own processes (GCS, raylet, the autoscaler); the fake
    nodes' raylets outlive it (they wait for a GCS that is gone), so whatever still carries this head's temp root in
    its command line (or is in its session) then gets SIGTERM, and SIGKILL if it lingers."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.proc.pid, signal.SIGKILL)
            head.proc.wait(10)
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        for pid in _owned_pids(head):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while _owned_pids(head) and time.monotonic() < deadline:
            time.sleep(0.2)
    assert not _owned_pids(head), f"processes of the autoscaling head survived SIGKILL: {_owned_pids(head)}"


@pytest.fixture
def autoscaling_head():
    # Short path: Ray's unix sockets live under --temp-dir (107-byte limit); pytest's tmp paths are long.
    root = Path(tempfile.mkdtemp(prefix="cacovid-as-", dir="/tmp" if Path("/tmp").is_dir() else None))
    started = None
    try:
        started = start_with_retries(root, _start_autoscaling_head, _wait_head, _stop_autoscaling_head)
        yield started
    finally:
        import ray

        ray.shutdown()  # this process's connection first: the test process is not one of the head's
        if started is not None:
            _stop_autoscaling_head(started)
        shutil.rmtree(root, ignore_errors=True)


def _reward_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("reward_actor", 0) > 0]


def test_pool_larger_than_the_cluster_requests_nodes_and_grows(autoscaling_head: Head, tmp_path: Path) -> None:
    import ray
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    from cacovid_rl.data.synthetic import make_synthetic
    from tests.ray.conftest import CLUSTER_OVERRIDES, BackgroundRun, make_cfg, read_metrics, wait_for

    data = tmp_path / "data"
    make_synthetic(data, n=12, seed=7)
    cfg = make_cfg(
        tmp_path / "run",
        data,
        *CLUSTER_OVERRIDES,  # reward actors need `reward_actor` (none on the head), the learner `learner`
        "cluster.min_actors=1",
        f"cluster.max_actors={MAX_ACTORS}",
        f"cluster.address={autoscaling_head.address}",
        f"cluster.startup_timeout_s={GROW_TIMEOUT_S}",
        "learner.total_steps=1000",  # stopped once the pool has grown
        "learner.checkpoint_every=1000",
    )
    ray.init(address=autoscaling_head.address, logging_level="WARNING")
    assert _reward_nodes() == [], "the cluster starts with no reward capacity: every reward node is the autoscaler's"

    run = BackgroundRun(cfg)
    try:

        def grown() -> bool:
            rows = [r for r in read_metrics(tmp_path / "run") if "pool/size" in r]
            return bool(rows) and rows[-1]["pool/size"] == MAX_ACTORS and rows[-1]["pool/ready"] == MAX_ACTORS

        wait_for(lambda: grown() or not run.thread.is_alive(), GROW_TIMEOUT_S, f"a pool of {MAX_ACTORS} actors")
        assert run.thread.is_alive(), "training ended before the pool grew (see the thread's traceback above)"
        # The standing request the autoscaler read: max_actors slots of the actor resource.
        request = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
        assert request == [{"reward_actor": 1}] * MAX_ACTORS
    finally:
        run.stop.set()
    summary = run.join(timeout=180)
    assert summary["stopped_early"] and summary["version"] >= 1
    rows = [r for r in read_metrics(tmp_path / "run") if "pool/size" in r]
    # The pool grew into the new nodes: one actor while the cluster had no reward capacity (its target follows the
    # live capacity), two once both nodes were up; no actor was replaced on the way.
    assert rows[0]["pool/created"] >= 1 and rows[-1]["pool/size"] == MAX_ACTORS
    assert max(r["pool/created"] for r in rows) == MAX_ACTORS
    # Exactly the requested nodes were launched (the node type allows one more), all of them the reward type.
    nodes = _reward_nodes()
    assert len(nodes) == MAX_ACTORS, nodes
    assert all(n["Resources"].get("learner", 0) == 0 for n in nodes)
