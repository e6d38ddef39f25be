"""End to end on this machine: ``cluster/submit.sh`` -> ``ray job submit`` -> a local Ray head.

The path of docs/CLUSTER.md "Local dress rehearsal" (issue 6, Tests, second bullet):

- a head started with ``ray start --head --block`` on free loopback ports and its own
  ``--temp-dir``, so it neither clashes with nor is found by the other Ray instances on the machine
  (``ray.init()`` elsewhere reads ``/tmp/ray/ray_current_cluster``; this head writes its address
  file under its own temp dir); it is stopped by its process id, never with ``ray stop``;
- the debug-local job submitted by ``cluster/submit.sh`` with the shipped
  ``cluster/runtime_env.local.yaml``, made small by overrides (3 updates, 24 generated synthetic
  records, outputs in a temp dir), waited for until SUCCEEDED; then its checkpoints, policy,
  metrics and offline wandb run, the job's metadata and what the working_dir upload held;
- a job with a misspelt config key (submitted from an interpreter without the package, so that
  submit.sh's local check is skipped and the typo reaches the cluster): FAILED, ``submit.sh --wait``
  exits non-zero and ``ray job logs`` names the key; with the package, submit.sh stops the same
  typo before anything is submitted.

The job runs with this interpreter's environment: the head's PATH starts with the directory of
``sys.executable`` (the venv's ``bin``: ``ray`` and ``cacovid-rl``), which is where the job
supervisor finds the entrypoint's ``cacovid-rl``. About 1.5 minutes on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cacovid_rl.config import load_config
from learner.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
SUBMIT = ROOT / "cluster" / "submit.sh"
RUNTIME_ENV = "cluster/runtime_env.local.yaml"
CONFIG = "configs/debug_local.yaml"
BIN = Path(sys.executable).parent  # not resolved: the venv's bin, where `ray` and `cacovid-rl` live
STEPS = 3
HEAD_START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 360.0
HEAD_STOP_TIMEOUT_S = 60.0
# Never in the working_dir upload (cluster/runtime_env.local.yaml excludes).
NOT_UPLOADED = {".git", "data", "runs", "wandb", ".venv", "build", "dist", ".hypothesis", ".pytest_cache"}


@dataclass
class Head:
    proc: subprocess.Popen
    root: Path  # everything of this test lives under it: the head's --temp-dir and the job outputs
    temp_dir: Path
    address: str  # the dashboard (job server), http://127.0.0.1:PORT
    env: dict[str, str]
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else "(no head log)"


# ------------------------------------------------------------------------------------------------
# Processes: this head's, found by session id (ray start is the leader of a new session) or by
# our unique temp root in their command line (the job entrypoint runs in a session of its own).


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a live process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
    return fields[0], int(fields[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""


def _owned_pids(head: Head) -> dict[int, str]:
    """Live (not zombie) processes of this head: pid -> command line."""
    found = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        stat = _proc_stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        cmd = _cmdline(pid)
        if stat[1] == head.proc.pid or str(head.root) in cmd:
            found[pid] = cmd
    return found


def _core_pids(pids: dict[int, str]) -> dict[int, str]:
    return {p: c for p, c in pids.items() if "gcs_server" in c or "raylet" in c}


# ------------------------------------------------------------------------------------------------
# Ports


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _worker_port_range(count: int = 64) -> tuple[int, int]:
    """A block of free ports below the kernel's ephemeral range (where port 0 binds land)."""
    for _ in range(100):
        lo = random.randint(20000, 32000 - count)
        if all(_bindable(p) for p in range(lo, lo + count)):
            return lo, lo + count - 1
    raise RuntimeError("no free block of worker ports")


def _has_ray_client() -> bool:
    # `ray start --ray-client-server-port` needs ray[client] (grpc); without it no client server
    # starts at all, and with it the default port 10001 would clash with other heads.
    return importlib.util.find_spec("grpc") is not None


# ------------------------------------------------------------------------------------------------
# The head


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


def _start_head(root: Path, attempt: int) -> Head:
    temp_dir = root / f"ray{attempt}"
    names = [
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port",
    ]  # fmt: skip
    if _has_ray_client():
        names.append("ray-client-server-port")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    lo, hi = _worker_port_range()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS etc.
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # bind to 127.0.0.1 only
        RAY_AUTH_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--num-cpus=2", "--object-store-memory=200000000",
        "--dashboard-host=127.0.0.1", "--include-dashboard=true",
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
    return Head(proc, root, temp_dir, f"http://127.0.0.1:{ports['dashboard-port']}", env, log, ports)


def _wait_ready(head: Head) -> bool:
    """The node is up (its address file is written) and the job server answers; False if the head
    process died (e.g. a port taken in between)."""
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            return False
        if (head.temp_dir / "ray_current_cluster").is_file() and _http_ok(f"{head.address}/api/jobs/"):
            return True
        time.sleep(0.5)
    raise TimeoutError(f"Ray head not ready after {HEAD_START_TIMEOUT_S}s:\n{head.log_tail()}")


def start_with_retries(
    root: Path,
    start: Callable[[Path, int], Head],
    wait: Callable[[Head], bool],
    stop: Callable[[Head], None],
    attempts: int = 3,
) -> Head:
    """A started head: ``start`` (with fresh ports each attempt), ``wait`` until it is ready; a head that died while
    starting (most likely a port taken in between) is stopped and started again, at most ``attempts`` times."""
    for attempt in range(attempts):
        head = start(root, attempt)
        try:
            ready = wait(head)
        except BaseException:
            stop(head)
            raise
        if ready:
            return head
        stop(head)
    raise AssertionError(f"Ray head failed to start {attempts} times:\n{head.log_tail()}")


def _stop_head(head: Head) -> None:
    """SIGTERM to `ray start --block` (it drains the node and stops its processes), SIGKILL to the
    process group if it hangs, then make sure nothing of this head is left: its GCS and raylet must
    be gone; stragglers (workers, a job entrypoint) are killed by pid."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(HEAD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.proc.pid, signal.SIGKILL)
            head.proc.wait(10)
    deadline = time.monotonic() + 30
    while _owned_pids(head) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _owned_pids(head)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _owned_pids(head) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _core_pids(left), f"GCS/raylet still running after the head stopped: {_core_pids(left)}"
    assert not _owned_pids(head), f"processes of the head survived SIGKILL: {_owned_pids(head)}"


@pytest.fixture(scope="module")
def head():
    import aiohttp  # noqa: F401  the Ray job server and client need it (ray[default]): missing, this fails

    for tool in ("ray", "cacovid-rl"):
        assert (BIN / tool).is_file(), f"{tool} not found next to {sys.executable}: install the package in this venv"
    # Short path: Ray's unix sockets live under --temp-dir (107-byte limit); pytest's tmp paths are long.
    root = Path(tempfile.mkdtemp(prefix="cacovid-e2e-", dir="/tmp" if Path("/tmp").is_dir() else None))
    started = None
    try:
        started = start_with_retries(root, _start_head, _wait_ready, _stop_head)
        yield started
    finally:
        if started is not None:
            _stop_jobs(started)
            _stop_head(started)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Jobs


def _client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address)


def _stop_jobs(head: Head) -> None:
    from ray.job_submission import JobStatus

    with contextlib.suppress(Exception):
        client = _client(head)
        for job in client.list_jobs():
            if job.submission_id and job.status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
                client.stop_job(job.submission_id)


def _submit(head: Head, *args: str, python: str = sys.executable, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(head.env, RAY_ADDRESS=head.address, RAY=str(BIN / "ray"), PYTHON=python)
    return subprocess.run(
        [str(SUBMIT), "--runtime-env", RUNTIME_ENV, "--config", CONFIG, *args],
        cwd=head.root,  # submit.sh runs from the repository root whatever the caller's directory
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ray(head: Head, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args, "--address", head.address],
        env=head.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait_job(head: Head, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    client = _client(head)
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status)
        if time.monotonic() > deadline:
            logs = client.get_job_logs(job_id)
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} still {status} after {timeout}s; logs:\n{logs[-6000:]}")
        if status == JobStatus.PENDING and head.proc.poll() is not None:
            raise RuntimeError(f"the Ray head died:\n{head.log_tail()}")
        time.sleep(1.0)


def _unpacked_working_dir(head: Head, uri: str) -> Path:
    """Where the head unpacked a job's working_dir package (gcs://_ray_pkg_<hash>.zip)."""
    name = uri.rsplit("/", 1)[-1].removesuffix(".zip")
    found = head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files" / name
    assert found.is_dir(), f"{uri} not unpacked under {head.temp_dir}"
    return found


def test_debug_local_job_succeeds(head: Head) -> None:
    work = head.root / "job"
    syn, out, ckpt = work / "synthetic", work / "out", work / "ckpt"
    job_id = f"cacovid-e2e-ok-{os.getpid()}"
    overrides = [
        f"output_dir={out}",
        f"data.synthetic_dir={syn}",
        f"data.train_path={syn / 'train.json'}",
        f"data.eval_path={syn / 'test.json'}",
        f"data.video_root={syn}",
        "data.synthetic_size=24",
        f"learner.total_steps={STEPS}",
        "learner.warmup_steps=1",
        "learner.checkpoint_every=2",
        f"learner.checkpoint_dir={ckpt}",
        "rollout.iterations=2",
        "eval.every_steps=0",
        "cluster.call_timeout_s=180",
        "cluster.startup_timeout_s=180",
        "wandb.mode=offline",
        "wandb.run_name=e2e",
    ]
    t0 = time.monotonic()
    sub = _submit(head, "--submission-id", job_id, *overrides)  # --no-wait, the default
    assert sub.returncode == 0, f"submit.sh failed:\n{sub.stdout}\n{sub.stderr}"
    assert f"job logs --address {head.address} -f {job_id}" in sub.stdout  # how to follow it
    assert f"job stop --address {head.address} {job_id}" in sub.stdout
    (resume,) = [line for line in sub.stdout.splitlines() if "resume later:" in line]
    assert f"learner.checkpoint_dir={ckpt}" in resume and resume.endswith(" --resume"), resume

    status = _wait_job(head, job_id, JOB_TIMEOUT_S)
    logs = _ray(head, "job", "logs", job_id)
    assert status == "SUCCEEDED", f"job ended {status} after {time.monotonic() - t0:.0f}s:\n{logs.stdout[-6000:]}"
    shown = _ray(head, "job", "status", job_id)
    assert shown.returncode == 0 and f"Job '{job_id}' succeeded" in shown.stdout + shown.stderr, shown

    # What `ray job logs` shows: the entrypoint, the generated data, the driver's summary.
    assert logs.returncode == 0, logs.stderr
    assert f"Running entrypoint for job {job_id}: cacovid-rl train --config {CONFIG}" in logs.stdout
    assert "generating 24 synthetic records" in logs.stdout
    # The driver's summary (its lines may interleave with forwarded actor output: no JSON parse).
    for line in (f'"version": {STEPS},', f'"checkpoint": "{ckpt / f"step_{STEPS:08d}"}"', '"stopped_early": false'):
        assert line in logs.stdout, f"{line} not in the job logs:\n{logs.stdout[-4000:]}"

    # Checkpoints, policy, metrics and the offline wandb run, where the overrides put them.
    assert (syn / "train.json").is_file()
    assert latest_checkpoint(ckpt) == ckpt / f"step_{STEPS:08d}"  # LATEST names it (and the run) and it verifies
    assert (ckpt / "step_00000002").is_dir() and (ckpt / f"step_{STEPS:08d}" / "state.msgpack").is_file()
    assert (out / "policy" / "model.safetensors").is_file() and (out / "policy" / "policy_config.json").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss/total" in m] == list(range(1, STEPS + 1))
    # debug_local's questions per step (a stale or skipped one may be missing)
    qps = load_config(ROOT / "configs" / "debug_local.yaml").learner.questions_per_step
    assert all(0 < m["data/questions"] + m["data/dropped_stale"] <= qps for m in metrics if "loss/total" in m), metrics
    wandb_lines = [line for line in logs.stdout.splitlines() if "wandb" in line.lower()]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), f"no offline wandb run: {wandb_lines}"

    # The job's record: metadata from submit.sh, the exact entrypoint.
    info = _client(head).get_job_info(job_id)
    assert info.metadata["config"] == CONFIG and info.metadata["git_commit"]
    assert info.entrypoint.startswith(f"cacovid-rl train --config {CONFIG} output_dir={out}")

    # The upload: the code, not the data, outputs, git history or a venv.
    pkg = _unpacked_working_dir(head, info.runtime_env["working_dir"])
    top = {p.name for p in pkg.iterdir()}
    assert {"cacovid_rl", "actors", "learner", "configs", "pyproject.toml"} <= top, top
    assert (pkg / "cacovid_rl" / "assets" / "tiny_vlm").is_dir(), "the shipped tiny model must be uploaded"
    assert not top & NOT_UPLOADED, f"uploaded: {sorted(top & NOT_UPLOADED)}"
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert size < 50e6, f"working_dir upload is {size / 1e6:.0f} MB"


def test_failing_job_shows_failed_and_the_error(head: Head) -> None:
    client = _client(head)
    typo = "learner.totl_steps=3"

    # With the package installed locally, submit.sh stops the typo before anything is submitted.
    before = {j.submission_id for j in client.list_jobs()}
    early = _submit(head, "--submission-id", f"cacovid-e2e-never-{os.getpid()}", typo)
    assert early.returncode == 2 and "unknown config key 'learner.totl_steps'" in early.stderr, early.stderr
    assert {j.submission_id for j in client.list_jobs()} == before, "submit.sh submitted an invalid config"

    # Without it (PYTHON cannot import cacovid_rl), the typo reaches the cluster and the job fails.
    job_id = f"cacovid-e2e-typo-{os.getpid()}"
    sub = _submit(head, "--submission-id", job_id, "--wait", typo, python="false", timeout=JOB_TIMEOUT_S)
    assert "checked only on the cluster" in sub.stderr, sub.stderr
    assert sub.returncode == 1, f"submit.sh --wait must fail with the job:\n{sub.stdout}\n{sub.stderr}"
    assert "unknown config key 'learner.totl_steps'" in sub.stdout  # --wait streams the job's logs

    assert _wait_job(head, job_id, 60) == "FAILED"
    shown = _ray(head, "job", "status", job_id)
    assert f"Job '{job_id}' failed" in shown.stdout + shown.stderr, shown
    logs = _ray(head, "job", "logs", job_id)
    assert logs.returncode == 0, logs.stderr
    assert "unknown config key 'learner.totl_steps'" in logs.stdout, logs.stdout
    assert "total_steps" in logs.stdout  # the message lists the valid keys
    info = client.get_job_info(job_id)
    assert "exit code 2" in (info.message or ""), info.message
