"""Sections on the training loop's parts: (e) learner update, (f) weight broadcast, (h) end to end on one device.
Each returns ``comparisons`` (both sides) and its details; see ``sections.py``."""

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    REPO_ROOT,
    Stats,
    default_dtype,
    param_count,
    qwen2_7b_config,
    sync_device,
    synthetic_data,
)
from benchmarks.gpu_suite.context import PLAN_S_PER_QUESTION, Ctx, comparison

# ----------------------------------------------------------------------------------------------------------------------
# (e) learner: one update of I iterations at the 7B width


def _policy_at_width(ctx: Ctx) -> Any:
    """The 7B-width policy (a Qwen2-7B decoder layer + heads, ~250M parameters) alone, on the device."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    from cacovid_rl.policy.network import CacovidPolicy

    text = qwen2_7b_config()
    if ctx.quick:
        text = qwen2_7b_config(num_layers=2)
        text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 128, 256, 4, 2
    torch.manual_seed(ctx.seed)
    with torch.device(ctx.device), default_dtype(ctx.dtype):
        layer, rotary = Qwen2DecoderLayer(text, 0), Qwen2RotaryEmbedding(text)
        return CacovidPolicy.from_blueprint(layer, rotary, text)


def _trajectories(ctx: Ctx, policy: Any, q: int, iterations: int, group: tuple[int, int, int], layout) -> list:
    from cacovid_rl.config import SamplingConfig
    from cacovid_rl.policy.sampling import sample_combinations
    from cacovid_rl.rl.rollout import RolloutResult
    from cacovid_rl.rl.trajectory import Trajectory
    from cacovid_rl.types import EncodedQuestion, PolicyScores, QuestionMemory

    t, n = layout
    d = int(policy.text_config.hidden_size)
    sampling = SamplingConfig(num_content=group[0], num_token=group[1], num_frame=group[2], rate=0.02)
    gen = torch.Generator().manual_seed(ctx.seed)
    trajs = []
    for i in range(q):
        length = t * n + 101
        emb = (0.5 * torch.randn(length, d, generator=gen)).to(ctx.device, ctx.dtype)
        enc = EncodedQuestion(emb, torch.arange(length, device=ctx.device), 14, t, n)
        with torch.no_grad():
            s = policy.score(enc)
        old = PolicyScores(token=s.token.float().cpu(), frame=s.frame.float().cpu())
        memory = QuestionMemory()
        for _ in range(iterations):
            combos = sample_combinations(old, enc.video_features().float().cpu(), 0.02, sampling, gen)
            memory.append(combos, (torch.rand(len(combos), generator=gen) < 0.5).float())  # mixed: a real signal
        res = RolloutResult(enc=enc, old=old, memory=memory)
        traj = Trajectory.from_rollout(
            res, sample_id=f"q{i}", epoch=0, batch_index=0, weight_version=0, problem_type="multiple choice"
        )
        trajs.append(Trajectory.from_bytes(traj.to_bytes()))  # what the learner decodes from the object store
    return trajs


def section_e(ctx: Ctx) -> dict[str, Any]:
    from cacovid_rl.config import LearnerConfig, LossConfig
    from cacovid_rl.rl.update import PolicyUpdater

    policy = _policy_at_width(ctx)
    q, iterations = (2, 2) if ctx.quick else (8, 5)
    group = (1, 5, 2) if ctx.quick else (1, 23, 8)
    layout = (4, 16) if ctx.quick else (32, 196)
    trajs = _trajectories(ctx, policy, q, iterations, group, layout)
    updater = PolicyUpdater(
        policy, LearnerConfig(device=ctx.device, total_steps=100), LossConfig(), iterations, ctx.device
    )
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    updater.update(trajs, version=0)  # warm-up: kernels, AdamW state
    times = []
    for _ in range(ctx.reps(3, 1)):
        sync_device(ctx.device)
        t0 = time.perf_counter()
        updater.update(trajs, version=0)
        sync_device(ctx.device)
        times.append(time.perf_counter() - t0)
    st = Stats.of(times)
    per_q = st.median / q
    out: dict[str, Any] = {
        "policy_params": param_count(policy),
        "policy_dtype": str(policy.dtype).removeprefix("torch."),
        "hidden_size": int(policy.text_config.hidden_size),
        "questions_per_update": q,
        "iterations": iterations,
        "combinations_per_iteration": sum(group),
        "seq_len": layout[0] * layout[1] + 101,
        "update_s": st,
        "s_per_question": per_q,
        "questions_per_s": 1.0 / per_q,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if ctx.cuda else None,
        "comparisons": [
            comparison(
                "learner s/question (one update)",
                "measured",
                per_q,
                "plan (configs/llava_ov_7b.yaml: ~5 s/step at 8 q/step)",
                PLAN_S_PER_QUESTION,
                "s",
            )
        ],
    }
    b = ctx.results.get("b", {}).get("rates", {}).get("0.02")
    if b:  # one reward actor's questions/s at the training rate (section b's actor path, I iterations a question)
        actor_q_s = b["combos_per_s"]["actor"].median / (b["group_size"] * iterations)
        out["actor_questions_per_s"] = actor_q_s
        out["comparisons"].append(
            comparison(
                "questions/s: one learner vs one reward actor (section b)",
                "learner",
                1.0 / per_q,
                "actor",
                actor_q_s,
                "q/s",
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# (f) weight broadcast to 1-4 actors sharing the device


def section_f(ctx: Ctx) -> dict[str, Any]:
    from actors.reward_actor import RewardActor
    from actors.weights import WeightHandle
    from benchmarks.common import resolve_model, setup_process
    from benchmarks.weight_broadcast import PolicyOnlyWorker, build_policy

    class DeviceRewardActor(RewardActor):
        """A ``RewardActor`` whose worker holds only a policy copy, on the actor's device: ``sync`` (fetch, verify,
        load) is the library's code path, unchanged."""

        def __init__(self, size: str, model_path: str, device: str) -> None:
            setup_process(1)
            self._attach(PolicyOnlyWorker(build_policy(size, model_path).to(device)), device)

        def timed_sync(self, handle: WeightHandle) -> dict[str, float]:
            version = self.sync(handle)
            return {"version": version, "done_at": time.time(), "load_s": self.sync_load_s}

    size = "tiny" if ctx.quick else "7b"
    model_path = resolve_model("tiny", ctx.seed)[0]
    counts = [1, 2] if ctx.quick else [1, 2, 4]
    repeats = ctx.reps(5, 1)
    policy = build_policy(size, model_path)
    opts: dict[str, Any] = {"num_cpus": 1}
    if ctx.cuda:  # actors share the one device: fractional GPUs, as reward actors co-located on a GPU would
        opts = {"num_cpus": 0.5, "num_gpus": round(1.0 / max(counts) - 0.01, 2)}
    per_count: dict[str, Any] = {}
    ray = ctx.ray()
    remote = ray.remote(DeviceRewardActor).options(**opts)
    actors = [remote.remote(size, model_path, ctx.device) for _ in range(max(counts))]
    ray.get([a.info.remote() for a in actors], timeout=600)
    version = 0
    with torch.no_grad():
        flat, meta = policy.flat_state()
        version += 1
        ray.get([a.timed_sync.remote(WeightHandle.publish(flat, meta, version)) for a in actors], timeout=600)
        first = next(iter(policy.parameters()))
        for n in counts:
            rows: dict[str, list[float]] = {"to_all_s": [], "flatten_s": [], "put_checksum_s": [], "load_s": []}
            for _ in range(repeats):
                version += 1
                first.add_(1e-3)
                t0 = time.time()
                flat, meta = policy.flat_state()
                t1 = time.time()
                handle = WeightHandle.publish(flat, meta, version)
                t2 = time.time()
                got = ray.get([a.timed_sync.remote(handle) for a in actors[:n]], timeout=600)
                if any(o["version"] != version for o in got):
                    raise RuntimeError(f"an actor did not reach version {version}")
                rows["to_all_s"].append(max(o["done_at"] for o in got) - t0)
                rows["flatten_s"].append(t1 - t0)
                rows["put_checksum_s"].append(t2 - t1)
                rows["load_s"] += [o["load_s"] for o in got]
                del handle, flat
            per_count[str(n)] = {k: Stats.of(v) for k, v in rows.items()}
    for a in actors:
        ray.kill(a)
    nbytes = int(sum(t.numel() * t.element_size() for t in policy.state_dict().values()))
    lo, hi = str(counts[0]), str(counts[-1])
    return {
        "policy": size,
        "params": param_count(policy),
        "dtype": str(policy.dtype).removeprefix("torch."),
        "bytes": nbytes,
        "actor_device": ctx.device,
        "actor_options": opts,
        "actors": per_count,
        "comparisons": [
            comparison(
                f"publish -> all actors s ({param_count(policy) / 1e6:.3g}M params)",
                f"{lo} actor",
                per_count[lo]["to_all_s"].median,
                f"{hi} actors",
                per_count[hi]["to_all_s"].median,
                "s",
            )
        ],
    }


# ----------------------------------------------------------------------------------------------------------------------
# (h) end to end: policy updates with 2 reward actors and a learner on one device


def section_h(ctx: Ctx) -> dict[str, Any]:
    from cacovid_rl.config import load_config
    from cacovid_rl.models.tiny import save_adapter
    from learner.driver import train

    work = Path(tempfile.mkdtemp(prefix="gpu_suite_e2e_", dir=ctx.work))
    try:
        if ctx.cache.model_path == "random":
            t0 = time.perf_counter()
            built = ctx.cache.model("llava_onevision")
            model_path, model_desc = str(save_adapter(built.adapter, work / "model")), built.describe()
            save_s = time.perf_counter() - t0
        else:
            model_path, model_desc, save_s = ctx.cache.model_path, ctx.cache.get(None).describe(), 0.0
        ctx.cache.release()  # the actors and the learner load their own copies
        data = synthetic_data()
        steps, qps = (3, 2) if ctx.quick else (20, 2)
        frames = 4 if ctx.quick else 32
        group = (1, 5, 2) if ctx.quick else (1, 23, 8)
        overrides = [
            f"model.path={model_path}",
            f"model.device={ctx.device}",
            f"model.dtype={str(ctx.dtype).removeprefix('torch.')}",
            f"model.max_new_tokens={4 if ctx.quick else 16}",
            f"data.train_path={data / 'train.json'}",
            f"data.eval_path={data / 'test.json'}",
            f"data.video_root={data}",
            f"data.num_frames={frames}",
            f"data.max_fps={frames}",
            "data.blind_filter=false",
            f"sampling.num_content={group[0]}",
            f"sampling.num_token={group[1]}",
            f"sampling.num_frame={group[2]}",
            "sampling.rate=0.02",
            "sampling.max_group_prob=2.0",
            "sampling.frame_ratio=0.125",
            f"rollout.iterations={2 if ctx.quick else 5}",
            "rollout.min_rate=0.01",
            "rollout.max_rate=0.12",
            f"output_dir={work / 'run'}",
            f"learner.total_steps={steps}",
            f"learner.questions_per_step={qps}",
            "learner.max_staleness=2",
            "learner.lr=1e-6",
            f"learner.device={ctx.device}",
            f"learner.checkpoint_dir={work / 'ckpt'}",
            "learner.checkpoint_every=100000",
            "learner.warmup_steps=0",
            "cluster.min_actors=2",
            "cluster.max_actors=2",
            "cluster.num_cpus=2",
            "cluster.pool_resize_every_s=1.0",
            f"cluster.actor_num_gpus={0.5 if ctx.cuda else 0.0}",
            f"cluster.actor_num_cpus={1.0}",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        ]
        cfg = load_config(REPO_ROOT / "configs" / "debug_local.yaml", overrides)
        t0 = time.perf_counter()
        ctx.ray()  # the learner takes Ray's "GPU 0" and the actors 0.5 each of "GPU 1": all on device 0 (Ctx.ray)
        summary = train(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "timing/step" in r]
        steady = rows[1:] or rows  # the first update waits for the actors' start-up
        step_s = float(sum(r["timing/step"] for r in steady))
        questions = float(sum(r.get("data/questions", 0.0) for r in steady))
        learner_q = [r["timing/learner_update"] / r["data/questions"] for r in steady if r.get("data/questions")]
        util = [r["perf/actor_utilisation"] for r in steady if "perf/actor_utilisation" in r]
        learner_s = float(np.mean(learner_q)) if learner_q else float("nan")
        res = {
            "model": model_desc,
            "model_save_s": save_s,
            "updates": len(rows),
            "steady_updates": len(steady),
            "wall_s_incl_startup": wall,
            "questions_per_s": questions / step_s,
            "updates_per_s": len(steady) / step_s,
            "actor_utilisation": float(np.mean(util)) if util else float("nan"),
            "learner_s_per_question": learner_s,
            "sync_load_s": float(np.mean([r["sync/load_s"] for r in steady if "sync/load_s" in r] or [np.nan])),
            "consumed": summary["counters"]["consumed"],
            "duplicates": summary["counters"]["duplicates"],
            "config": {
                "steps": steps,
                "questions_per_step": qps,
                "frames": frames,
                "group": list(group),
                "actors": 2,
                "actor_num_gpus": cfg.cluster.actor_num_gpus,
            },
        }
        res["comparisons"] = [
            comparison(
                "questions/s: whole loop vs its learner alone",
                "loop",
                res["questions_per_s"],
                "learner ceiling",
                1.0 / learner_s,
                "q/s",
            )
        ]
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)
