"""Cluster simulation: where does the training pipeline stop scaling? A discrete-event model from measured costs.

The model is the driver's pipeline (``learner/driver.py``), event by event:

- the data is cut into batches of ``questions_per_step``; batch ``b`` may be handed out once the learner has made
  version ``b - max_staleness`` (the staleness window), and is rolled out with that version;
- each reward actor (one device) takes the next question, first loading the version the question needs if it holds
  another one (``sync``: the object-store pull to its node, then fetch + verify + load + state checksum), then scores
  it. Without prefetch the frame decode is part of the question's time; with prefetch (issue 18 #1) it overlaps the
  previous question's scoring, so a question costs ``max(decode, score)``;
- the learner group updates on the oldest batch once all its questions are in, strictly in order: each of ``W``
  ranks fetches its share of the payloads through its node's network, replays the optimiser steps on its
  ``ceil(Q / W)`` questions, all-reduces the gradient once per optimiser step (ring: ``2 (W-1)/W`` x gradient bytes),
  and rank 0 publishes the new version (one put + checksum, ``actors/weights.py``);
- the published version reaches the reward nodes by object-store pulls; a node that holds a copy serves others, so
  ``n`` nodes are reached after ``ceil(log2(n + 1))`` pull rounds of ``weight bytes / pull bandwidth``.

With ``cores`` set (this machine), every busy process (actor or learner rank) shares what is left of that many CPU
cores once the processes outside the pipeline's compute have taken theirs (``reserved_cores``: other users, the driver
and the Ray runtime, measured during each run from /proc), processor sharing, which is what limits the real runs
here; on a cluster each process has its own device.

Service times:
- ``cpu-tiny``: measured in this run, on this machine, with the shipped tiny model and the debug recipe
  (``RewardWorker.run`` per question, ``PolicyUpdater.update`` per question, publish and actor sync), single-threaded;
- ``a100-7b``: LLaVA-OV-7B at the recipe's settings from FLOP counts at a stated MFU on A100-40GB (the production
  reward and learner device); replaced by measurements (``s_per_question`` of the learner and
  ``actor_questions_per_s`` of section e) when ``benchmarks/results/gpu_suite.json`` exists.

Validation: real ``learner.driver.train`` runs on this machine (1, 2, 4 reward actors with 1 learner; 2 actors with
2 learners), compared with two predictions: *a priori* (the ``cpu-tiny`` costs measured in-process at the start, the
CPU share that measurement had, and the cores the run left to the pipeline) and *from the run* (the pipeline model
alone, fed the per-question actor and learner times the run measured itself). Then the sweep: 8..512 reward GPUs
x 1..16 learners at 7B, with utilisations, the bottleneck, bytes/s into the learners, and the broadcast time to all
reward nodes.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO_ROOT,
    annotate,
    base_parser,
    describe_device,
    finish,
    fmt_bytes,
    legend_below,
    load_result,
    local_ray,
    machine_info,
    new_figure,
    print_table,
    replot,
    resolve_model,
    save_figure,
    setup_process,
    synthetic_data,
)

RESULTS = REPO_ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------
# The model
@dataclass(frozen=True)
class Costs:
    """Per-question and per-version service times of one deployment (seconds, bytes)."""

    name: str
    reward_s: float
    """One question's scoring on one reward device (encode + policy scores + all iterations' combinations)."""
    reward_cv: float
    """Coefficient of variation of ``reward_s`` (lognormal): questions differ in length and answers."""
    decode_s: float
    """Frame decode + preprocessing of one question on the actor's CPUs (overlapped when the actor prefetches)."""
    learner_s: float
    """One question's share of an update on one learner device (every optimiser step's forward + backward)."""
    iterations: int
    """Optimiser steps per update (one gradient all-reduce each)."""
    grad_bytes: float
    """Gradient bytes all-reduced per optimiser step."""
    bytes_per_question: float
    """Trajectory payload into the learners per question."""
    weight_bytes: float
    """One published weight version."""
    publish_s: float
    """Rank 0's put + checksum of a version (plus the driver's own per-update work)."""
    sync_s: float
    """An actor's fetch + verify + load + state checksum of a version (once its node holds the object)."""
    source: str
    """Where the numbers come from."""


@dataclass(frozen=True)
class Setup:
    """One cluster configuration."""

    actors: int
    learners: int = 1
    questions_per_step: int = 8
    max_staleness: int = 4
    prefetch: bool = True
    cores: float | None = None
    """CPU cores shared by every busy process (this machine); None: each process has its own device."""
    reserved_cores: float = 0.0
    """Cores of ``cores`` taken by processes outside the pipeline's compute: other users, the driver, the Ray runtime
    (raylet, GCS, agents), measured as their CPU seconds over the run's steady window (:class:`CpuSampler`)."""
    calibration_share: float = 1.0
    """The CPU share the costs were measured with (CPU time / wall time of the single-threaded measuring process):
    measured times already include that slowdown, so rates are relative to it."""
    actors_per_node: int = 8
    learners_per_node: int = 8
    learner_nic_Bps: float = 12.5e9
    """Bytes/s into one learner node (100 Gb/s; p4d has 4 x 100 Gb/s EFA, the first one counts here)."""
    allreduce_Bps: float = 150e9
    """All-reduce bus bandwidth: NVLink within a learner node; above ``learners_per_node`` the network's."""
    inter_node_allreduce_Bps: float = 12.5e9
    pull_Bps: float = 12.5e9
    """Object-store pull bandwidth of one node."""


def lognormal(rng: np.random.Generator, mean: float, cv: float) -> float:
    if cv <= 0:
        return mean
    sigma2 = math.log(1 + cv * cv)
    return float(rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2)))


def update_time(c: Costs, s: Setup) -> dict[str, float]:
    """One update of the learner group: fetch, compute, all-reduce, publish (seconds)."""
    w = s.learners
    share = math.ceil(s.questions_per_step / w)
    ranks_per_node = min(w, s.learners_per_node)
    fetch = share * ranks_per_node * c.bytes_per_question / s.learner_nic_Bps
    compute = share * c.learner_s
    bw = s.allreduce_Bps if w <= s.learners_per_node else s.inter_node_allreduce_Bps
    allreduce = c.iterations * 2 * (w - 1) / w * c.grad_bytes / bw if w > 1 else 0.0
    return {"fetch": fetch, "compute": compute, "allreduce": allreduce, "publish": c.publish_s}


def broadcast_time(c: Costs, s: Setup) -> float:
    """From the put until every reward node holds the version (pull rounds of a spreading copy)."""
    if s.cores is not None:  # one machine: no pull
        return 0.0
    nodes = math.ceil(s.actors / s.actors_per_node)
    return math.ceil(math.log2(nodes + 1)) * c.weight_bytes / s.pull_Bps


def simulate(c: Costs, s: Setup, updates: int = 60, warmup: int = 10, seed: int = 0) -> dict[str, Any]:
    """Run the pipeline for ``updates`` versions; steady-state figures after ``warmup`` of them."""
    rng = np.random.default_rng(seed)
    q, lag = s.questions_per_step, s.max_staleness
    ut = update_time(c, s)
    upd_work = sum(ut.values())
    bcast = broadcast_time(c, s)
    # Processor sharing: each active job has remaining work; all progress at min(1, cores / active processes).
    jobs: dict[Any, float] = {}  # job key -> remaining work
    weight: dict[Any, int] = {}  # processes a job occupies (the learner group: W ranks)
    actor_version = [-1] * s.actors
    actor_job: list[Any] = [None] * s.actors
    version_ready_at: dict[int, float] = {0: 0.0}
    queue: list[tuple[int, int]] = []  # (batch, index) in dispatch order
    done_in_batch: dict[int, int] = {}
    next_batch = 0
    version = 0
    learner_busy = False
    t = 0.0
    busy_actor = 0.0
    busy_learner = 0.0
    t_warm = None
    v_warm = 0
    waits: list[tuple[float, int]] = []  # (time, actor) actors waiting for a pull to land
    seq = 0

    def open_window() -> None:
        nonlocal next_batch
        while next_batch <= version + lag and next_batch < updates + lag + 1:
            queue.extend((next_batch, i) for i in range(q))
            next_batch += 1

    def start_actor(a: int) -> None:
        nonlocal seq
        if actor_job[a] is not None or not queue:
            return
        batch, _ = queue[0]
        need = max(0, batch - lag)
        if actor_version[a] != need:
            ready = version_ready_at[need] + bcast
            if ready > t + 1e-12:
                heapq.heappush(waits, (ready, a))
                return
            queue.pop(0)
            work = c.sync_s + lognormal(rng, c.reward_s, c.reward_cv) + (0.0 if s.prefetch else c.decode_s)
            if s.prefetch:
                work = max(work, c.decode_s)
            actor_version[a] = need
        else:
            queue.pop(0)
            r = lognormal(rng, c.reward_s, c.reward_cv)
            work = max(r, c.decode_s) if s.prefetch else r + c.decode_s
        seq += 1
        key = ("a", a, batch, seq)
        actor_job[a] = key
        jobs[key], weight[key] = work, 1

    def start_learner() -> None:
        nonlocal learner_busy
        if not learner_busy and done_in_batch.get(version, 0) >= q:
            learner_busy = True
            key = ("l", version)
            jobs[key], weight[key] = upd_work, (s.learners if s.cores is not None else 1)

    open_window()
    for a in range(s.actors):
        start_actor(a)
    while version < updates:
        procs = sum(weight[k] for k in jobs)
        if s.cores is None:
            rate = 1.0
        else:
            free = max(0.05 * s.cores, s.cores - s.reserved_cores)  # floor: a fully taken machine still runs ours
            rate = min(1.0, free / max(1e-9, procs)) / s.calibration_share
        next_done = min(jobs.values()) / rate if jobs else math.inf
        next_wait = waits[0][0] - t if waits else math.inf
        dt = min(next_done, next_wait)
        if not math.isfinite(dt):
            raise RuntimeError(f"the pipeline stalled at version {version} ({s})")
        n_actor_jobs = sum(1 for k in jobs if k[0] == "a")
        if t_warm is not None:
            busy_actor += n_actor_jobs * dt
            busy_learner += dt if learner_busy else 0.0
        t += dt
        for k in list(jobs):
            jobs[k] -= dt * rate
        finished = [k for k, w in jobs.items() if w <= 1e-9]
        for k in finished:
            del jobs[k], weight[k]
            if k[0] == "a":
                _, a, batch, _ = k
                actor_job[a] = None
                done_in_batch[batch] = done_in_batch.get(batch, 0) + 1
            else:
                learner_busy = False
                version += 1
                version_ready_at[version] = t
                if version == warmup:
                    t_warm, v_warm = t, version
                open_window()
        while waits and waits[0][0] <= t + 1e-12:
            heapq.heappop(waits)
        start_learner()
        for a in range(s.actors):
            start_actor(a)
    span = t - (t_warm or 0.0)
    qps = (version - v_warm) * q / span
    reward_util = busy_actor / (s.actors * span)
    learner_util = busy_learner / span
    return {
        "questions_per_s": qps,
        "reward_utilisation": reward_util,
        "learner_utilisation": learner_util,
        "bottleneck": bottleneck(c, s, reward_util, learner_util, ut),
        "bytes_per_s_into_learners": qps * c.bytes_per_question,
        "update_s": ut,
        "broadcast_to_all_nodes_s": bcast,
        "window_questions": (lag + 1) * q,
    }


def bottleneck(c: Costs, s: Setup, reward_util: float, learner_util: float, ut: dict[str, float]) -> str:
    """Which resource sets the pace: the one that is (nearly) always busy, or the window that starves both."""
    busy = reward_util * s.actors + learner_util * s.learners
    free = None if s.cores is None else max(0.05 * s.cores, s.cores - s.reserved_cores)
    if free is not None and busy > 0.9 * free and s.actors + s.learners > free:
        return "cpu cores"
    if learner_util > 0.9:
        parts = {"fetch": "transfer into learners", "allreduce": "gradient all-reduce", "publish": "weight publish"}
        worst = max(ut, key=ut.get)
        return parts.get(worst, "learner compute") if ut[worst] > 0.5 * sum(ut.values()) else "learner compute"
    if reward_util > 0.85:
        return "reward actors"
    if (s.max_staleness + 1) * s.questions_per_step < 2 * s.actors:
        return "staleness window"
    return "pipeline latency"


# ------------------------------------------------------------------------------------------------
# Costs
DRIVER_OVERHEAD_S = 0.03
"""Per update, the driver's bookkeeping and the Ray round trips around the learner call (stated, not measured): part of
``publish_s`` in every prediction, since the learner waits for it before the next update starts."""
# The production models at the recipe's settings (configs/*.yaml): LLM and policy size, video tokens per question,
# tokens kept per question at rate 0.02, vision tower FLOP per question.
MODELS = {
    "llava-ov-7b": {"llm": 7.6e9, "hidden": 3584, "policy": 256.6e6, "video": 6272, "kept": 4 * 32,
                    "vision": 2 * 400e6 * 32 * 729},
    "qwen2.5-vl-7b": {"llm": 7.6e9, "hidden": 3584, "policy": 256.6e6, "video": 4096, "kept": 5 * 16,
                      "vision": 2 * 675e6 * 4 * 4096},
    "qwen2.5-vl-3b": {"llm": 3.1e9, "hidden": 2048, "policy": 83e6, "video": 4096, "kept": 5 * 16,
                      "vision": 2 * 675e6 * 4 * 4096},
}  # fmt: skip
A100 = {"name": "A100-40GB", "bf16_flops": 312e12, "hbm_Bps": 1.555e12}
MFU_PREFILL = 0.35  # batched prefill of 32 short sequences; the reward side is prefill-dominated
MFU_TRAIN = 0.35  # one decoder layer's forward + backward at 4-6k tokens
MBU_DECODE = 0.6  # decode steps read all LLM weights once each


def flop_costs(model: str = "llava-ov-7b", source_note: str = "") -> Costs:
    """A production model's reward and learner costs per question on A100-40GB from FLOP counts at a stated MFU."""
    m = MODELS[model]
    iterations, group, text = 5, 32, 100
    seq = m["video"] + text + 1
    prefill = 2 * m["llm"] * iterations * group * (m["kept"] + text)
    policy_fwd = 2 * m["policy"] * seq + 4 * seq * seq * m["hidden"]
    decode_steps = iterations * 4  # multiple choice: 1 step; free-form and numbers a few: ~4 on average
    reward_s = (prefill + m["vision"] + iterations * policy_fwd) / (A100["bf16_flops"] * MFU_PREFILL)
    reward_s += decode_steps * 2 * m["llm"] / (A100["hbm_Bps"] * MBU_DECODE)
    train = iterations * 3 * policy_fwd  # forward + backward = 3 forwards, once per optimiser step
    learner_s = train / (A100["bf16_flops"] * MFU_TRAIN)
    payload = seq * m["hidden"] * 2 + seq * 4 + (m["video"] + 32) * 4 + iterations * group * (m["kept"] * 4 + 10)
    weight_bytes = m["policy"] * 2
    return Costs(
        name=f"a100-{model}",
        reward_s=reward_s,
        reward_cv=0.3,
        decode_s=0.3 * reward_s,  # decord on the actor's CPUs; issue 18 puts it at ~30% of the scoring time
        learner_s=learner_s,
        iterations=iterations,
        grad_bytes=m["policy"] * 2,
        bytes_per_question=payload,
        weight_bytes=weight_bytes,
        publish_s=0.15 + weight_bytes / 5e9,  # put + XXH3 of the bf16 policy (weight_broadcast.json, CPU)
        sync_s=0.15,
        source=(
            f"{model}: FLOP counts at MFU {MFU_PREFILL} (reward prefill), {MFU_TRAIN} (learner), decode at MBU "
            f"{MBU_DECODE} on {A100['name']} ({A100['bf16_flops'] / 1e12:.0f} TFLOP/s bf16): reward "
            f"{prefill / 1e12:.0f} TFLOP prefill + {m['vision'] / 1e12:.0f} vision + "
            f"{iterations * policy_fwd / 1e12:.0f} policy per question ({reward_s:.2f} s), learner "
            f"{train / 1e12:.0f} TFLOP per question ({learner_s:.2f} s){source_note}"
        ),
    )


def flop_costs_7b() -> Costs:
    """LLaVA-OV-7B (the sweep's model)."""
    return flop_costs("llava-ov-7b")


def gpu_suite_costs(base: Costs, path: Path) -> Costs | None:
    """``base`` with the measured learner s/question and reward questions/s of ``gpu_suite.json`` (section e)."""
    if not path.is_file():
        return None
    try:
        e = json.loads(path.read_text())["results"]["sections"]["e"]
        learner_s = float(e["s_per_question"])
        reward_s = 1.0 / float(e["actor_questions_per_s"])
        device = json.loads(path.read_text())["machine"].get("gpu") or "GPU"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return replace(base, name="gpu-suite-7b", learner_s=learner_s, reward_s=reward_s,
                   source=f"measured on {device} (benchmarks/results/gpu_suite.json, section e)")  # fmt: skip


def measure_cpu_costs(model_path: str, data: Path, overrides: list[str]) -> tuple[Costs, dict[str, Any]]:
    """The tiny model's service times on this machine, single-threaded, in this process (no Ray)."""
    from actors.weights import publish_policy, state_checksum
    from cacovid_rl.config import load_config
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.rl.trajectory import Trajectory
    from cacovid_rl.rl.update import PolicyUpdater
    from cacovid_rl.rl.worker import RewardWorker
    from learner.staleness import DataCursor

    cfg = load_config(REPO_ROOT / "configs" / "debug_local.yaml", [f"model.path={model_path}", *overrides])
    load = os.getloadavg()[0]
    worker = RewardWorker(cfg)
    worker.version = 0
    cursor = DataCursor(load_records(data / "train.json", data).records, cfg.seed)
    reward, decode, trajs, sizes = [], [], [], []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(8):
        item = cursor.item(i, 0)
        rec = item.to_record()
        t0 = time.perf_counter()
        read_frames(rec.video, cfg.data.num_frames, cfg.data.max_fps)
        decode.append(time.perf_counter() - t0)
        status, payload = worker.run(item)
        if status.ok:
            reward.append(status.elapsed_s)
            trajs.append(Trajectory.from_bytes(payload))
            sizes.append(len(payload))
    # The share of a core this single-threaded measurement got on the shared machine: its times are relative to it.
    cpu_share = min(1.0, (time.process_time() - cpu0) / (time.perf_counter() - wall0))
    policy = worker.policy
    updater = PolicyUpdater(policy, cfg.learner, cfg.loss, cfg.rollout.iterations)
    policy.bind_flat_buffer()
    q = cfg.learner.questions_per_step
    updater.update(trajs[:q], version=0)  # warm-up
    t0 = time.perf_counter()
    updater.update(trajs[:q], version=0)
    learner_s = (time.perf_counter() - t0) / min(q, len(trajs))
    with local_ray(num_cpus=1, object_store_mb=400):  # the put and the actor's sync, through a real object store
        # The first put of a process sets up its object-store client (~0.35 s here): a learner pays that once, not
        # per version, so the per-version cost is the median of the puts after it.
        t0 = time.perf_counter()
        handle = publish_policy(policy, 1)
        publish_first_s = time.perf_counter() - t0
        puts = []
        for v in range(2, 8):
            t0 = time.perf_counter()
            handle = publish_policy(policy, v)
            puts.append(time.perf_counter() - t0)
        publish_s = float(np.median(puts))
        t0 = time.perf_counter()
        flat = handle.fetch()
        policy.load_flat_state(flat, handle.meta)
        state_checksum(policy)
        sync_s = time.perf_counter() - t0
        weight_bytes = float(flat.nbytes)
        del handle, flat
    decode_mean = float(np.mean(decode))
    reward_mean = float(np.mean(reward))
    n_params = sum(p.numel() for p in policy.parameters())
    costs = Costs(
        name="cpu-tiny",
        reward_s=reward_mean - decode_mean,  # the decode is modelled on its own (and overlapped with prefetch)
        reward_cv=float(np.std(reward) / reward_mean),
        decode_s=decode_mean,
        learner_s=learner_s,
        iterations=cfg.rollout.iterations,
        grad_bytes=4.0 * n_params,
        bytes_per_question=float(np.mean(sizes)),
        weight_bytes=weight_bytes,
        publish_s=publish_s + DRIVER_OVERHEAD_S,
        sync_s=sync_s,
        source="measured in this run on this machine: tiny model, debug recipe, 1 torch thread, no Ray",
    )
    detail = {
        "reward_samples": reward,
        "decode_samples": decode,
        "load_avg_1m": load,
        "load_avg_1m_end": os.getloadavg()[0],
        "cpu_share": cpu_share,
        "publish_first_s": publish_first_s,
        "publish_samples": puts,
    }
    return costs, detail


# ------------------------------------------------------------------------------------------------
# Validation runs (real driver, this machine)
class CpuSampler:
    """Who used this machine's CPU during a real run, step by step: a thread that snapshots CPU seconds whenever the
    run's ``metrics.jsonl`` gains a line (one line per update), so any window of updates can be measured.

    Classes: ``workers`` (Ray worker processes: the reward actors and learner ranks, the pipeline's compute),
    ``driver`` (this process: the scheduling loop), ``ray_runtime`` (every other process of this Ray session:
    raylet, GCS, agents) and ``others`` (the machine's busy time less all of ours: other users).
    """

    def __init__(self, metrics_path: Path, poll_s: float = 0.05) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._path = metrics_path
        self._poll_s = poll_s
        self.snapshots: dict[int, dict[str, Any]] = {}  # metrics lines written -> snapshot taken when they appeared
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self.snapshots[0] = self._snapshot()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _snapshot(self) -> dict[str, Any]:
        procs: dict[int, tuple[str, float]] = {}
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                if proc.pid == self._me.pid:
                    kind = "driver"
                else:
                    kind = "workers" if " ".join(proc.cmdline()).startswith("ray::") else "ray_runtime"
                procs[proc.pid] = (kind, t.user + t.system)
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        m = self._psutil.cpu_times()
        busy = sum(m) - m.idle - getattr(m, "iowait", 0.0) - getattr(m, "guest", 0.0) - getattr(m, "guest_nice", 0.0)
        return {"t": time.perf_counter(), "machine_busy_s": busy, "procs": procs}

    def _lines(self) -> int:
        try:
            with self._path.open("rb") as fh:
                return fh.read().count(b"\n")
        except OSError:
            return 0

    def _loop(self) -> None:
        seen = 0
        while not self._stop.wait(self._poll_s):
            n = self._lines()
            if n != seen:
                seen = n
                self.snapshots[n] = self._snapshot()

    def cores(self, first_line: int, last_line: int) -> dict[str, float]:
        """Cores each class used between the snapshots at ``first_line`` and ``last_line`` metrics lines (a process
        that started inside the window counts from 0; one that ended inside it is left out)."""
        keys = sorted(self.snapshots)
        a = self.snapshots[max(k for k in keys if k <= first_line)]
        b = self.snapshots[min((k for k in keys if k >= last_line), default=keys[-1])]
        span = b["t"] - a["t"]
        used = dict.fromkeys(("workers", "driver", "ray_runtime"), 0.0)
        for pid, (kind, cpu) in b["procs"].items():
            before = a["procs"].get(pid)
            used[kind] += cpu - (before[1] if before and before[0] == kind else 0.0)
        ours = sum(used.values())
        out = {k: v / span for k, v in used.items()}
        out["machine"] = (b["machine_busy_s"] - a["machine_busy_s"]) / span
        out["others"] = max(0.0, out["machine"] - ours / span)
        out["window_s"] = span
        return out


VALIDATION = [(1, 1), (2, 1), (4, 1), (2, 2)]


def validation_overrides(qps: int) -> list[str]:
    return [f"learner.questions_per_step={qps}", "learner.max_staleness=2", "loss.kl_coef=0.01"]


def run_real(actors: int, learners: int, model_path: str, data: Path, work: Path, steps: int, warm: int,
             qps: int) -> dict[str, Any]:  # fmt: skip
    from cacovid_rl.config import load_config
    from learner.driver import train

    out = work / f"a{actors}_l{learners}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        REPO_ROOT / "configs" / "debug_local.yaml",
        [
            f"model.path={model_path}",
            f"data.train_path={data / 'train.json'}",
            f"data.eval_path={data / 'test.json'}",
            f"data.video_root={data}",
            "data.blind_filter=false",
            f"output_dir={out}",
            f"learner.total_steps={steps}",
            *validation_overrides(qps),
            f"learner.num_learners={learners}",
            f"learner.checkpoint_dir={out / 'ckpt'}",
            "learner.checkpoint_every=100000",
            f"cluster.min_actors={actors}",
            f"cluster.max_actors={actors}",
            f"cluster.num_cpus={actors}",
            "cluster.object_store_memory_mb=400",
            "cluster.pool_resize_every_s=1.0",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        ],
    )
    load = os.getloadavg()[0]
    metrics_path = out / "metrics.jsonl"
    with (
        CpuSampler(metrics_path) as cpu,
        local_ray(num_cpus=actors, object_store_mb=cfg.cluster.object_store_memory_mb),
    ):
        train(cfg)
    lines = metrics_path.read_text().splitlines()
    numbered = [(n, json.loads(line)) for n, line in enumerate(lines, start=1)]
    steps = [(n, r) for n, r in numbered if "timing/step" in r]
    window_lines = (steps[warm - 1][0] if warm else 0, steps[-1][0])
    rows = [r for _, r in steps[warm:]]
    step_s = float(sum(r["timing/step"] for r in rows))
    questions = float(sum(r.get("data/questions", 0.0) for r in rows))
    # The actors' busy seconds and finished items over the window (each row: the monitor's deltas since the previous
    # update), so the per-question time is the mean over every question of the window, not one status per row.
    busy = sum(r.get("perf/actor_busy_mean", np.nan) * actors * r["timing/step"] for r in rows)
    items = sum(r.get("perf/questions_per_s", np.nan) * r["timing/step"] for r in rows)
    learner = sum(r["timing/learner_fetch"] + r["timing/learner_update"] for r in rows)
    res = {
        "actors": actors,
        "learners": learners,
        "questions_per_s": questions / step_s,
        "steady_updates": len(rows),
        "actor_utilisation": float(np.mean([r.get("perf/actor_utilisation", np.nan) for r in rows])),
        "learner_update_s": float(np.mean([r["timing/learner_update"] for r in rows])),
        "learner_fetch_s": float(np.mean([r["timing/learner_fetch"] for r in rows])),
        # The service times this run saw (other sessions' load included): the pipeline model's own inputs. The
        # learner's fetch + update includes publishing the new version (learner_actor.py, learner_group.py).
        "run_reward_s": busy / items if items > 0 else float("nan"),
        "run_learner_s": learner / questions if questions > 0 else float("nan"),
        "run_sync_load_s": float(np.mean([r.get("sync/load_s", 0.0) for r in rows])),
        "cpu_cores": cpu.cores(*window_lines),
        "load_avg_1m_start": load,
        "load_avg_1m_end": os.getloadavg()[0],
    }
    shutil.rmtree(out, ignore_errors=True)
    return res


def from_run_costs(base: Costs, real: dict[str, Any]) -> Costs:
    """``base`` with a real run's own service times: the pipeline model alone, no CPU-sharing model.

    The run's learner time per question is the learner's fetch + update, and the update call includes publishing
    the new version (``Learner.update``, ``LearnerWorker.update_shard``), so the publish is not added a second time:
    only the driver's per-update overhead is."""
    return replace(base, name="from-run", reward_s=real["run_reward_s"], decode_s=0.0, learner_s=real["run_learner_s"],
                   sync_s=real["run_sync_load_s"], publish_s=DRIVER_OVERHEAD_S,
                   source="the service times a real run measured itself")  # fmt: skip


# ------------------------------------------------------------------------------------------------
REWARD_GPUS = [8, 16, 32, 64, 128, 256, 512]
LEARNERS = [1, 2, 4, 8, 16]


def sweep(c: Costs, qps_per_learner: int, lag: int, updates: int) -> dict[str, Any]:
    """Every (reward GPUs, learners) point. Questions per step grow with the learners (``qps_per_learner`` each,
    as the reference's 1 question per GPU keeps the per-rank batch) and with the reward GPUs, so that the staleness
    window ``(lag + 1) x questions_per_step`` holds >= 2 questions per actor: the window never starves the pool."""
    out: dict[str, Any] = {}
    for a in REWARD_GPUS:
        for w in LEARNERS:
            qps = max(qps_per_learner * w, math.ceil(2 * a / (lag + 1)))
            s = Setup(actors=a, learners=w, questions_per_step=qps, max_staleness=lag)
            r = simulate(c, s, updates=updates, warmup=max(3, updates // 6))
            r["questions_per_step"] = qps
            out[f"{a}x{w}"] = r
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__ or "", "cluster_simulation.json")
    p.add_argument("--validate", default="1x1,2x1,4x1,2x2", help="actors x learners of the real runs ('' = none)")
    p.add_argument("--steps", type=int, default=0, help="updates per validation run (default 12, --quick 3)")
    p.add_argument("--questions-per-step", type=int, default=4)
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args, plot)
    setup_process(args.threads)
    started = time.perf_counter()
    model_path, source = resolve_model(args.model, args.seed)
    data = synthetic_data()
    qps = args.questions_per_step
    steps = args.steps or (3 if args.quick else 12)
    warm = 1 if args.quick else 3
    cpu, detail = measure_cpu_costs(model_path, data, validation_overrides(qps))
    cores = float(machine_info()["cores_usable"])
    validation = []
    pairs = [tuple(int(x) for x in v.split("x")) for v in args.validate.split(",") if v]
    if args.quick:
        pairs = pairs[:1]
    work = Path(tempfile.mkdtemp(prefix="cacovid_sim_"))
    try:
        for actors, learners in pairs:
            real = run_real(actors, learners, model_path, data, work, steps, warm, qps)
            # What the run left to its actors and learners: the cores other users, the driver and the Ray runtime
            # used during its steady window.
            used = real["cpu_cores"]
            reserved = used["others"] + used["driver"] + used["ray_runtime"]
            s = Setup(actors=actors, learners=learners, questions_per_step=qps, max_staleness=2, prefetch=False,
                      cores=cores, reserved_cores=reserved, calibration_share=detail["cpu_share"])  # fmt: skip
            real["reserved_cores"] = reserved
            pred = simulate(cpu, s, updates=40, warmup=8)
            alone = simulate(from_run_costs(cpu, real), replace(s, cores=None), updates=40, warmup=8)
            real["predicted_from_run_questions_per_s"] = alone["questions_per_s"]
            real["error_from_run"] = alone["questions_per_s"] / real["questions_per_s"] - 1
            real["predicted_questions_per_s"] = pred["questions_per_s"]
            real["predicted_bottleneck"] = pred["bottleneck"]
            real["predicted_reward_utilisation"] = pred["reward_utilisation"]
            real["error"] = pred["questions_per_s"] / real["questions_per_s"] - 1
            validation.append(real)
            print(f"{actors} actor(s) x {learners} learner(s): measured {real['questions_per_s']:.2f} q/s, "
                  f"predicted {pred['questions_per_s']:.2f} ({real['error']:+.0%}) a priori, "
                  f"{alone['questions_per_s']:.2f} ({real['error_from_run']:+.0%}) from the run's service times",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flop = flop_costs_7b()
    measured = gpu_suite_costs(flop, RESULTS / "gpu_suite.json")
    gpu = measured or flop
    updates = 12 if args.quick else 40
    results = {
        "costs": {
            "cpu-tiny": asdict(cpu),
            "a100-7b-flops": asdict(flop),
            **({"gpu-suite": asdict(measured)} if measured else {}),
        },
        "cpu_detail": detail,
        "validation": validation,
        "sweep_costs": gpu.name,
        "sweep": {
            "no_prefetch": sweep(replace(gpu, name=gpu.name), 8, 4, updates) if not args.quick else {},
            "prefetch": sweep(gpu, 8, 4, updates),
        },
        "production": production_points(gpu, updates),
    }
    if args.quick:
        del results["sweep"]["no_prefetch"]
    config = {
        "model": source,
        "validation_recipe": f"configs/debug_local.yaml, questions_per_step={qps}, max_staleness=2, kl 0.01, "
        f"{steps} updates ({warm} ignored)",
        "cores": cores,
        "sweep_reward_gpus": REWARD_GPUS,
        "sweep_learners": LEARNERS,
        "sweep_rule": "questions_per_step = max(8 x learners, ceil(2 x actors / (max_staleness + 1))), "
        "max_staleness 4, prefetch on (and off for comparison)",
    }
    notes = [
        "Validation: a priori = costs measured in-process at the start of this run (a "
        f"{detail['cpu_share']:.2f}-core share, load average {detail['load_avg_1m']:.1f}) + processor sharing of the "
        "cores the run left to its actors and learners (others, driver and Ray runtime measured from /proc over the "
        "run's steady window); from the run = the pipeline model fed each run's own per-question actor and learner "
        "times (learner fetch + update + publish) plus the stated driver overhead per update.",
        "7B sweep: " + gpu.source,
    ]
    out = finish(args, "cluster_simulation", config=config, results=results, notes=notes, started=started,
                 argv=argv, report=report, plot=plot)  # fmt: skip
    Path(args.out).with_suffix(".md").write_text(markdown(load_result(args.out)))
    return out


def production_points(c: Costs, updates: int) -> dict[str, Any]:
    """The production configs' shapes (configs/*.yaml) before and after issue 18: one learner without prefetch,
    and the shipped shape with ``cluster.prefetch`` on (its default) and off; LLaVA-OV-7B with ``c`` (measured when
    the GPU suite exists), the Qwen models from FLOP counts."""
    shapes = {
        "before: 32 actors, 1 learner, 8 q/step, staleness 4, no prefetch": Setup(32, 1, 8, 4, prefetch=False),
        "2 learners, staleness 7, no prefetch": Setup(32, 2, 8, 7, prefetch=False),
        "2 learners, staleness 7, prefetch": Setup(32, 2, 8, 7, prefetch=True),
        "shipped: 32 actors, 4 learners, 8 q/step, staleness 7, prefetch": Setup(32, 4, 8, 7, prefetch=True),
        "shipped with cluster.prefetch=false": Setup(32, 4, 8, 7, prefetch=False),
        "4 learners, staleness 4 (window too small), prefetch": Setup(32, 4, 8, 4, prefetch=True),
    }
    out: dict[str, Any] = {}
    for model, costs in (("llava-ov-7b", c), ("qwen2.5-vl-7b", None), ("qwen2.5-vl-3b", None)):
        costs = costs or flop_costs(model)
        for k, s in shapes.items():
            out[f"{model} | {k}"] = simulate(costs, s, updates=updates, warmup=max(3, updates // 6))
    return out


def markdown(payload: dict[str, Any]) -> str:
    res, m = payload["results"], payload["machine"]
    lines = [f"# Cluster simulation ({describe_device(m)}; `{payload['command']}`)", ""]
    cpu, detail = res["costs"]["cpu-tiny"], res["cpu_detail"]
    lines += ["## Validation against real runs on this machine (tiny model, debug recipe)", "",
              f"a priori = costs measured in-process at the start ({cpu['reward_s'] * 1e3:.0f} ms scoring + "
              f"{cpu['decode_s'] * 1e3:.0f} ms decode per question, learner {cpu['learner_s'] * 1e3:.0f} ms per "
              f"question, publish {cpu['publish_s'] * 1e3:.0f} ms per update incl. {DRIVER_OVERHEAD_S * 1e3:.0f} ms "
              f"stated driver overhead; measured with a {detail['cpu_share']:.2f}-core share) + processor sharing of "
              f"the cores the run left to its actors and learners ({m.get('cores_usable', m['cores'])} less what other "
              "users, the driver and the Ray runtime used over the run's steady window, from /proc); from the run = "
              "the pipeline model alone, fed the run's own mean per-question actor time (busy seconds / items) and "
              f"learner time (fetch + update + publish, per question) + {DRIVER_OVERHEAD_S * 1e3:.0f} ms per update.",
              "",
              "| actors | learners | measured q/s | a priori q/s (error) | from the run q/s (error) | "
              "predicted bottleneck | run: actor s/q, learner s/q | cores used: workers / others / driver / Ray "
              "runtime | load avg |",
              "| ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]  # fmt: skip
    for v in res["validation"]:
        c = v.get("cpu_cores", {})
        cores = " / ".join(f"{c.get(k, float('nan')):.2f}" for k in ("workers", "others", "driver", "ray_runtime"))
        lines.append(
            f"| {v['actors']} | {v['learners']} | {v['questions_per_s']:.2f} | {v['predicted_questions_per_s']:.2f} "
            f"({v['error']:+.0%}) | {v['predicted_from_run_questions_per_s']:.2f} ({v['error_from_run']:+.0%}) | "
            f"{v['predicted_bottleneck']} | {v['run_reward_s']:.3f}, {v['run_learner_s']:.3f} | {cores} | "
            f"{v['load_avg_1m_start']:.1f} |"
        )
    util = ", ".join(f"{v['actor_utilisation']:.0%}" for v in res["validation"])
    lines += ["", "The learner's logged update time includes publishing the new version (`Learner.update`, "
              "`LearnerWorker.update_shard`), so the from-the-run prediction counts the publish once, inside the "
              "learner's time. It starts an actor's next question the moment the previous one ends; the real actors "
              f"also wait for the driver's next dispatch (their utilisation in these runs: {util}), a wait the model "
              "leaves out and one reason it predicts high."]  # fmt: skip
    if "publish_first_s" in detail:
        first, later = detail["publish_first_s"] * 1e3, float(np.median(detail["publish_samples"])) * 1e3
        lines += ["", f"Publish: the first put of the measuring process took {first:.0f} ms (object-store client "
                  f"set-up, paid once per learner), the next ones {later:.1f} ms (median): the per-update cost is the "
                  "latter."]  # fmt: skip
    lines += ["", f"## 7B sweep ({res['sweep_costs']}, prefetch on): questions/s, reward / learner utilisation, "
              "bottleneck", "", "| reward GPUs | " + " | ".join(f"{w} learner(s)" for w in LEARNERS) + " |",
              "| ---: |" + " --- |" * len(LEARNERS)]  # fmt: skip
    for a in REWARD_GPUS:
        cells = []
        for w in LEARNERS:
            r = res["sweep"]["prefetch"][f"{a}x{w}"]
            cells.append(
                f"{r['questions_per_s']:.1f} q/s, {r['reward_utilisation']:.0%} / {r['learner_utilisation']:.0%}, "
                f"{r['bottleneck']}, {fmt_bytes(r['bytes_per_s_into_learners'])}/s"
            )
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Production shapes",
        "",
        "| shape | q/s | reward util | learner util | bottleneck | bytes/s into learners | broadcast to all nodes |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for k, r in res["production"].items():
        lines.append(
            f"| {k} | {r['questions_per_s']:.2f} | {r['reward_utilisation']:.0%} | {r['learner_utilisation']:.0%} | "
            f"{r['bottleneck']} | {fmt_bytes(r['bytes_per_s_into_learners'])}/s | "
            f"{r['broadcast_to_all_nodes_s']:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def report(res: dict[str, Any]) -> None:
    rows = [[v["actors"], v["learners"], f"{v['questions_per_s']:.2f}", f"{v['predicted_questions_per_s']:.2f}",
             f"{v['error']:+.0%}", f"{v['predicted_from_run_questions_per_s']:.2f}", f"{v['error_from_run']:+.0%}",
             v["predicted_bottleneck"]] for v in res["validation"]]  # fmt: skip
    print_table("Validation (this machine): questions/s", ["actors", "learners", "measured", "a priori", "error",
                                                          "from run", "error", "bottleneck"], rows)  # fmt: skip
    rows = []
    for a in REWARD_GPUS:
        row = [a]
        for w in LEARNERS:
            r = res["sweep"]["prefetch"][f"{a}x{w}"]
            row.append(f"{r['questions_per_s']:.1f} ({r['bottleneck']})")
        rows.append(row)
    print_table(f"7B sweep ({res['sweep_costs']}): questions/s (bottleneck)", ["reward GPUs", *LEARNERS], rows)


SERIES = {
    "N learner(s) (left)": "simulated questions/s at 7B width against reward GPUs for N data-parallel learners, "
    "prefetch on; dotted: 1 learner without prefetch",
    "reward / learner utilisation (middle)": "busy fraction of the reward devices (solid) and of the learner group "
    "(dashed), same runs",
    "measured / predicted (right)": "real learner.driver.train runs on this machine (tiny model); predicted a "
    "priori: from costs measured in-process at the start, shared over the cores the run left to its actors and "
    "learners (others, driver and Ray runtime measured from /proc); predicted from the run's service times: the "
    "pipeline model fed the per-question actor and learner (incl. publish) times each run measured itself",
}


def plot(res: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    fig, (ax, bx, cx) = new_figure(ncols=3, width=5.2, height=5.0)
    sw = res["sweep"]["prefetch"]
    for w in LEARNERS:
        qs = [sw[f"{a}x{w}"]["questions_per_s"] for a in REWARD_GPUS]
        ax.plot(REWARD_GPUS, qs, marker="o", label=f"{w} learner(s)")
        bx.plot(REWARD_GPUS, [sw[f"{a}x{w}"]["reward_utilisation"] for a in REWARD_GPUS], marker="o",
                label=f"reward, {w} learner(s)")  # fmt: skip
        bx.plot(REWARD_GPUS, [sw[f"{a}x{w}"]["learner_utilisation"] for a in REWARD_GPUS], ls="--",
                color=bx.lines[-1].get_color(), label=f"learner, {w} learner(s)")  # fmt: skip
    if res["sweep"].get("no_prefetch"):
        nq = [res["sweep"]["no_prefetch"][f"{a}x1"]["questions_per_s"] for a in REWARD_GPUS]
        ax.plot(REWARD_GPUS, nq, ls=":", color="k", label="1 learner, no prefetch")
    for ax_ in (ax, bx):
        ax_.set_xscale("log", base=2)
        ax_.set_xticks(REWARD_GPUS, [str(a) for a in REWARD_GPUS])
        ax_.set_xlabel("reward GPUs")
    ax.set_yscale("log")
    ax.set_ylabel("questions/s (simulated)")
    ax.set_title(f"7B width ({res['sweep_costs']})", fontsize=10)
    bx.set_ylabel("utilisation")
    bx.set_title("reward / learner utilisation", fontsize=10)
    legend_below(ax)
    legend_below(bx, ncol=2)
    val = res["validation"]
    labels = [f"{v['actors']}a x {v['learners']}l" for v in val]
    x = np.arange(len(val))
    cx.bar(x - 0.27, [v["questions_per_s"] for v in val], width=0.27, label="measured")
    cx.bar(x, [v["predicted_questions_per_s"] for v in val], width=0.27, label="predicted a priori")
    cx.bar(x + 0.27, [v["predicted_from_run_questions_per_s"] for v in val], width=0.27,
           label="predicted from the run's service times")  # fmt: skip
    for i, v in enumerate(val):
        cx.annotate(f"{v['error']:+.0%}", (i, v["predicted_questions_per_s"]), ha="center", va="bottom", fontsize=6)
        cx.annotate(f"{v['error_from_run']:+.0%}", (i + 0.27, v["predicted_from_run_questions_per_s"]), ha="center",
                    va="bottom", fontsize=6)  # fmt: skip
    cx.set_xticks(x, labels)
    cx.set_ylabel("questions/s")
    cx.set_title("validation on this machine (tiny model)", fontsize=10)
    legend_below(cx)
    annotate(fig, payload, "Cluster simulation: questions/s and utilisation vs reward GPUs and learners",
             "LLaVA-OV-7B (sweep, modelled) and the shipped tiny model (validation, measured)", SERIES)  # fmt: skip
    save_figure(fig, path)


if __name__ == "__main__":
    main()
