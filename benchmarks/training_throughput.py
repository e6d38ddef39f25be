"""Training throughput: the whole distributed loop (``learner.driver.train``) with 1, 2 and 4 reward actors.

What is measured (issue 5): the real driver, learner and ``RewardActor`` s on a local loopback Ray instance, the
debug-local recipe (``configs/debug_local.yaml``: the tiny video LLM, G = 28 combinations x 3 iterations per
question) on the synthetic needle videos. The 1/2/4 sweep is repeated ``--rounds`` times in rotated order (runs
cannot be interleaved finer than whole runs); figures are medians over rounds. From each run's own
``metrics.jsonl``, after the first ``--warmup-steps`` updates (actor start-up):

- combinations evaluated per second = questions consumed x G x iterations / sum of ``timing/step``;
- policy updates per second = updates / sum of ``timing/step``;
- broadcast latency ``sync/latency_s`` (mean over actors of their last pick-up of a new version);
- bytes per question actor -> learner ``transfer/bytes_per_question`` and learner seconds per question
  (``timing/learner_update`` / ``data/questions``);
- scaling efficiency = throughput(n) / (n x throughput(1)).

``learner.questions_per_step`` is 4 (not the debug config's 8) and ``learner.max_staleness`` 2 (the default; the
debug config trains on-policy, 0) for every actor count, so that the staleness window
(``(max_staleness + 1) x questions_per_step`` = 12 questions) can keep 4 actors x 2 in-flight items busy: otherwise
the window, not the actors, would cap the throughput. Ray gets ``num_cpus = n`` logical CPUs (one per actor, the
learner takes 0); the machine has only its physical cores (2 here), which is the real limit of the scaling.

CPU only: ``--device`` is recorded but the run uses the config's CPU placement (on a GPU cluster the same figures
come from the training job's own metrics). Also written: the bytes per question at the 7B width for the "ship
embeddings" design (what the trajectory carries) vs "ship frames" (and the learner-side cost each implies),
computed from the shapes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO_ROOT,
    Stats,
    annotate,
    base_parser,
    finish,
    fmt_bytes,
    legend_below,
    local_ray,
    machine_info,
    model_name,
    new_figure,
    print_table,
    replot,
    resolve_model,
    save_figure,
    setup_process,
    synthetic_data,
)

# LLaVA-OV-7B question at the method's settings.
SEVEN_B = {
    "frames": 32,
    "frame_px": 384,
    "video_tokens": 6272,
    "text_tokens": 100,
    "hidden": 3584,
    "group": 32,
    "iterations": 5,
    "keep_per_frame": 4,  # 2% of 196
    "siglip_params": 400e6,  # SigLIP-so400m vision tower
    "siglip_patches_per_frame": 729,
    "embed_params": 152_064 * 3584,  # Qwen2 embedding table (the learner needs it to rebuild the text embeddings)
    "policy_layer_params": 233e6,
}


def seven_b_transfer_table() -> dict[str, Any]:
    """Bytes per question actor -> learner at the 7B width, and what the learner must then compute or hold."""
    s = SEVEN_B
    seq = s["video_tokens"] + s["text_tokens"] + 1  # + image_newline
    samples = s["group"] * s["iterations"]
    k = s["keep_per_frame"] * s["frames"]
    common = (
        seq * 4  # position ids int32
        + (s["video_tokens"] + s["frames"]) * 4  # old token + frame scores float32
        + samples * k * 4  # kept indices int32
        + samples * (4 + 4 + 1 + 1)  # lengths, rewards, mode, iteration
    )
    emb = seq * s["hidden"] * 2
    frames = s["frames"] * s["frame_px"] ** 2 * 3
    vision_flops = 2 * s["siglip_params"] * s["frames"] * s["siglip_patches_per_frame"]
    policy_flops = 3 * 2 * s["policy_layer_params"] * seq * s["iterations"]  # fwd + bwd per optimiser step
    rows = {
        "ship_embeddings_fp16 (this design)": {
            "bytes": emb + common,
            "learner_holds": "the policy only",
            "learner_extra_flops": 0.0,
        },
        "ship_frames_uint8": {
            "bytes": frames + s["text_tokens"] * 4 + common,
            "learner_holds": "policy + frozen SigLIP tower + projector (~0.9 GB bf16) + embedding table (~1.1 GB)",
            "learner_extra_flops": vision_flops,
        },
    }
    for r in rows.values():
        r["relative_learner_compute"] = (policy_flops + r["learner_extra_flops"]) / policy_flops
    return {
        "assumptions": {
            **s,
            "seq_len": seq,
            "policy_fwd_bwd_flops_per_question": policy_flops,
            "vision_tower_flops_per_question": vision_flops,
        },
        "rows": rows,
        "frames_over_embeddings_bytes": rows["ship_frames_uint8"]["bytes"]
        / rows["ship_embeddings_fp16 (this design)"]["bytes"],
    }


def run_training(n: int, args: Any, model_path: str, data: Path, work: Path) -> dict[str, Any]:
    from cacovid_rl.config import load_config
    from learner.driver import train

    out = work / f"actors{n}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        args.config,
        [
            f"model.path={model_path}",
            f"data.train_path={data / 'train.json'}",
            f"data.eval_path={data / 'test.json'}",
            f"data.video_root={data}",
            f"output_dir={out}",
            f"learner.total_steps={args.steps}",
            f"learner.questions_per_step={args.questions_per_step}",
            "learner.max_staleness=2",
            f"learner.checkpoint_dir={out / 'ckpt'}",
            "learner.checkpoint_every=100000",
            f"cluster.min_actors={n}",
            f"cluster.max_actors={n}",
            f"cluster.num_cpus={n}",
            "cluster.object_store_memory_mb=400",
            "cluster.pool_resize_every_s=1.0",
            "eval.every_steps=0",
            "wandb.mode=disabled",
        ],
    )
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    with local_ray(num_cpus=n, object_store_mb=cfg.cluster.object_store_memory_mb):
        summary = train(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "timing/step" in r]
    steady = rows[args.warmup_steps :] or rows
    per_question = cfg.sampling.num_samples * cfg.rollout.iterations
    step_s = float(sum(r["timing/step"] for r in steady))
    questions = float(sum(r.get("data/questions", 0.0) for r in steady))

    def mean(key: str) -> float:
        vals = [r[key] for r in steady if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    learner_q = [r["timing/learner_update"] / r["data/questions"] for r in steady if r.get("data/questions")]
    res = {
        "actors": n,
        "updates": len(rows),
        "steady_updates": len(steady),
        "wall_s_incl_startup": wall,
        "combos_per_s": questions * per_question / step_s,
        "updates_per_s": len(steady) / step_s,
        "questions_per_s": questions / step_s,
        "step_s_median": float(np.median([r["timing/step"] for r in steady])),
        "sync_latency_s": mean("sync/latency_s"),
        "sync_load_s": mean("sync/load_s"),
        "bytes_per_question": mean("transfer/bytes_per_question"),
        "learner_s_per_question": float(np.mean(learner_q)) if learner_q else float("nan"),
        "learner_fetch_s": mean("timing/learner_fetch"),
        "actor_utilisation": mean("perf/actor_utilisation"),
        "combos_per_s_per_actor": mean("perf/combos_per_s_per_actor"),
        "staleness_mean": mean("policy/staleness_mean"),
        "reward_mean": mean("reward/mean"),
        "consumed": summary["counters"]["consumed"],
        "dispatched": summary["counters"]["dispatched"],
        "duplicates": summary["counters"]["duplicates"],
        "combos_per_question": per_question,
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": os.getloadavg()[0],
    }
    shutil.rmtree(out, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__ or "", "training_throughput.json")
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "debug_local.yaml"))
    p.add_argument("--actors", default="1,2,4")
    p.add_argument("--steps", type=int, default=0, help="learner updates per run (default 14, --quick 2)")
    p.add_argument("--warmup-steps", type=int, default=-1, help="updates ignored at the start (default 3, --quick 1)")
    p.add_argument("--questions-per-step", type=int, default=4)
    p.add_argument("--rounds", type=int, default=0, help="repeats of the whole 1/2/4 sweep, rotated (default 3)")
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args, plot)
    setup_process(args.threads)
    started = time.perf_counter()
    counts = [1] if args.quick else [int(x) for x in args.actors.split(",")]
    args.steps = args.steps or (2 if args.quick else 14)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.warmup_steps < 0:
        args.warmup_steps = 1 if args.quick else 3
    model_path, source = resolve_model(args.model, args.seed)
    data = synthetic_data()
    work = Path(tempfile.mkdtemp(prefix="cacovid_train_bench_"))
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            order = counts[r % len(counts) :] + counts[: r % len(counts)]  # rotated: load drifts hit every n alike
            done: dict[str, Any] = {}
            for n in order:
                print(f"round {r + 1}/{args.rounds}: {n} actor(s), {args.steps} updates ...", flush=True)
                done[str(n)] = run_training(n, args, model_path, data, work)
                print(f"  {done[str(n)]['combos_per_s']:.0f} combinations/s", flush=True)
            rounds.append(done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs: dict[str, Any] = {}
    for n in counts:
        per = [rd[str(n)] for rd in rounds]
        # per-round efficiency: each round's n-actor run against the same round's 1-actor run
        eff = [rd[str(n)]["combos_per_s"] / (n * rd[str(counts[0])]["combos_per_s"] / counts[0]) for rd in rounds]
        runs[str(n)] = {
            **{k: float(np.median([p[k] for p in per])) for k in per[0] if isinstance(per[0][k], (int, float))},
            "combos_per_s_stats": Stats.of([p["combos_per_s"] for p in per]),
            "scaling_efficiency": float(np.median(eff)),
            "scaling_efficiency_stats": Stats.of(eff),
            "rounds": per,
        }
    cores = machine_info()["cores_usable"]
    one = runs[str(counts[0])]
    results = {
        "runs": runs,
        "learner_ceiling_combos_per_s": one["combos_per_question"] / one["learner_s_per_question"],
        "core_limit": {
            "physical_cores": cores,
            "max_ideal_speedup": min(max(counts), cores),
            "note": f"{cores} cores shared by the actors, the learner, Ray and other sessions' processes",
        },
        "transfer_7b": seven_b_transfer_table(),
    }
    config = {
        "model": source,
        "model_path": model_path,
        "config": str(Path(args.config).relative_to(REPO_ROOT))
        if Path(args.config).is_relative_to(REPO_ROOT)
        else args.config,
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup_steps": args.warmup_steps,
        "questions_per_step": args.questions_per_step,
        "actor_counts": counts,
        "data": str(data),
    }
    notes = [
        "Throughput from the driver's per-update wall times (timing/step) after the warm-up updates; the 1/2/4 sweep "
        "is repeated in rotated order and every figure is the median over rounds (per-round samples kept).",
        "learner_ceiling_combos_per_s = combinations per question / learner seconds per question (1-actor runs): "
        "the rate at which the single learner can consume trajectories on this machine.",
        "bytes_per_question is the msgpack trajectory (float32 embeddings for the float32 tiny model).",
        "transfer_7b is computed from shapes, not measured.",
    ]
    if source.startswith("fallback"):
        notes.append("Model: a tiny RANDOM LLaVA-OV (the shipped trained model was missing when this ran).")
    return finish(args, "training_throughput", config=config, results=results, notes=notes, started=started, argv=argv,
                  report=report, plot=plot)  # fmt: skip


def report(res: dict[str, Any]) -> None:
    rows = []
    for n, r in res["runs"].items():
        rows.append(
            [n, f"{r['combos_per_s']:.0f}", f"{r['updates_per_s']:.2f}", f"{r['scaling_efficiency']:.0%}",
             f"{r['sync_latency_s'] * 1e3:.1f}", fmt_bytes(r["bytes_per_question"]),
             f"{r['learner_s_per_question'] * 1e3:.1f}", f"{r['actor_utilisation']:.0%}"]
        )  # fmt: skip
    print_table(
        f"Training loop (learner.driver.train), {res['core_limit']['physical_cores']} cores",
        ["actors", "combos/s", "updates/s", "scaling eff.", "sync latency ms", "bytes/question",
         "learner ms/question", "actor util."],
        rows,
    )  # fmt: skip
    t = res["transfer_7b"]
    print_table(
        f"Actor -> learner per question at 7B width (seq {t['assumptions']['seq_len']}, hidden 3584): computed",
        ["design", "bytes/question", "learner compute (x policy fwd+bwd)", "learner holds"],
        [
            [k, fmt_bytes(v["bytes"]), f"{v['relative_learner_compute']:.2f}x", v["learner_holds"]]
            for k, v in t["rows"].items()
        ],
    )


SERIES = {
    "measured": "combinations evaluated per second by the whole loop (driver, learner, reward actors), after the "
    "warm-up updates; median over rounds, bars p10-p90",
    "linear in actors": "n x the 1-actor throughput",
    "N-core ceiling": "min(n, physical cores) x the 1-actor throughput: what the machine's cores allow",
    "learner ceiling": "the rate one learner can consume trajectories: combinations per question / learner "
    "seconds per question (1-actor runs)",
    "core-limited ideal (right)": "min(n, cores) / n: the best scaling efficiency these cores allow",
}


def plot(res: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    fig, axes = new_figure(ncols=2, width=5.0, height=4.6)
    ns = [int(n) for n in res["runs"]]
    runs = [res["runs"][str(n)] for n in ns]
    thr = [r["combos_per_s"] for r in runs]
    st = [r["combos_per_s_stats"] for r in runs]
    ax = axes[0]
    ax.errorbar(ns, thr, yerr=[[t - s.p10 for t, s in zip(thr, st, strict=True)],
                               [s.p90 - t for t, s in zip(thr, st, strict=True)]],
                fmt="o-", color="tab:red", capsize=3, label="measured (median, p10-p90 over rounds)")  # fmt: skip
    ax.plot(ns, [thr[0] / ns[0] * n for n in ns], ":", color="grey", label="linear in actors")
    cores = res["core_limit"]["physical_cores"]
    ax.plot(ns, [thr[0] / ns[0] * min(n, cores) for n in ns], "--", color="tab:blue", label=f"{cores}-core ceiling")
    ax.axhline(res["learner_ceiling_combos_per_s"], color="tab:green", ls="-.", label="learner ceiling (1-actor runs)")
    ax.set_xticks(ns)
    ax.set_xlabel("reward actors")
    ax.set_ylabel("combinations evaluated / s")
    load = np.mean([r.get("load_avg_1m_start", np.nan) for r in runs])
    ax.set_title(f"Whole-loop throughput (machine load ~{load:.0f})", fontsize=10)
    legend_below(ax, ncol=2)
    ax = axes[1]
    eff = [r["scaling_efficiency_stats"] for r in runs]
    ax.bar([str(n) for n in ns], [r["scaling_efficiency"] for r in runs], color="tab:red",
           yerr=[[r["scaling_efficiency"] - e.p10 for r, e in zip(runs, eff, strict=True)],
                 [e.p90 - r["scaling_efficiency"] for r, e in zip(runs, eff, strict=True)]], capsize=3)  # fmt: skip
    ax.plot([str(n) for n in ns], [min(n, cores) / n for n in ns], "o--", color="tab:blue", label="core-limited ideal")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set_ylim(0, 1.2)
    ax.set_xlabel("reward actors")
    ax.set_ylabel("throughput(n) / (n x throughput(1))")
    ax.set_title("Scaling efficiency (per round)", fontsize=10)
    legend_below(ax)
    cfg = (payload or {}).get("config", {})
    recipe = f"{cfg.get('config', 'configs/debug_local.yaml')}, {cfg.get('questions_per_step', '?')} questions/update"
    annotate(
        fig,
        payload,
        "Training throughput: learner.driver.train with 1, 2 and 4 reward actors (local Ray)",
        f"{model_name(cfg)}; {recipe}",
        {k.replace("N-core", f"{cores}-core"): v for k, v in SERIES.items()},
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
