"""Reward-actor prefetch: questions/s and scoring-busy fraction with the next item decoded in the background.

What is measured (issue 18 #1): one ``RewardWorker`` (the library half of a reward actor) rolls out the same
synthetic questions, the shipped tiny model, in three ways, interleaved round by round:

- ``scoring_only`` -- frames decoded in advance: the rate the actor would reach if decoding cost nothing (the target).
- ``no_prefetch`` -- today's path: ``run`` decodes, then scores (``cluster.prefetch=false``).
- ``prefetch`` -- ``cluster.prefetch=true``: before ``run(n)`` the worker gets the hint for item ``n+1`` (what the
  driver sends when it queues a second item on an actor), decoded on the prefetcher's thread while ``n`` is scored.

The decoder is the real one (decord on the synthetic mp4s) **slowed** by decoding the clip ``k`` times, with ``k``
calibrated so one decode costs ``--decode-share`` (default 30%) of one question's scoring time: a long real video
costs the same CPU work in one read. ``busy`` is the fraction of wall time the worker spends scoring (from frames in
hand to trajectory encoded), the rest being waits for frames. Trajectories are checked identical across the variants.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    annotate,
    base_parser,
    finish,
    model_name,
    new_figure,
    print_table,
    replot,
    resolve_model,
    save_figure,
    setup_process,
    synthetic_data,
)
from cacovid_rl.config import load_config
from cacovid_rl.data.records import load_records
from cacovid_rl.data.video import read_frames

SERIES = {
    "scoring_only": "frames decoded in advance (decode costs nothing): the rate to reach",
    "no_prefetch": "run() decodes (slowed decoder), then scores: cluster.prefetch=false",
    "prefetch": "the next item's decode on the prefetch thread while the current one is scored: cluster.prefetch=true",
}
TARGET = 0.95


def _content(payload: bytes) -> bytes:
    from cacovid_rl.rl.trajectory import Trajectory

    return dataclasses.replace(Trajectory.from_bytes(payload), timings={}).to_bytes()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__, "prefetch.json")
    p.add_argument("--questions", type=int, default=0, help="questions per pass (0: 16, --quick: 3)")
    p.add_argument("--decode-share", type=float, default=0.30, help="slowed decode time / scoring time per question")
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args, plot)
    setup_process(args.threads)
    started = time.perf_counter()
    from cacovid_rl.rl.worker import RewardWorker, WorkItem

    n_q = args.questions or (3 if args.quick else 16)
    rounds = args.repeats or (1 if args.quick else 3)
    model_path, source = resolve_model(args.model, args.seed)
    data = synthetic_data()
    overrides = [
        f"model.path={model_path}",
        f"model.device={args.device}",
        "data.num_frames=8",
        "rollout.iterations=5",  # the recipe's G = 32 combinations x 5 iterations per question
        f"cluster.torch_threads={args.threads}",
    ]
    cfg_on = load_config(None, [*overrides, "cluster.prefetch=true"])
    cfg_off = load_config(None, [*overrides, "cluster.prefetch=false"])
    records = load_records(data / "train.json", data).records[:n_q]
    items = [WorkItem(i, 0, 0, WorkItem.record_to_dict(r)) for i, r in enumerate(records)]
    # One worker per prefetch setting (identical weights: the policy is seeded by cfg.seed).
    # Same actor id: it is written into each trajectory, which the variants must reproduce byte for byte.
    on, off = RewardWorker(cfg_on, "reward-0"), RewardWorker(cfg_off, "reward-0")
    decoded = {str(r.video): read_frames(r.video, cfg_on.data.num_frames, cfg_on.data.max_fps) for r in records}

    # Calibrate: scoring time per question (frames in hand) and one real decode, then the repeat count k.
    off.decode = lambda rec: decoded[str(rec.video)]
    for it in items:  # warm-up
        off.run(it)
    score_s = float(np.median([off.run(it)[0]["elapsed_s"] for it in items]))
    t0 = time.perf_counter()
    for r in records:
        read_frames(r.video, cfg_on.data.num_frames, cfg_on.data.max_fps)
    one_decode_s = (time.perf_counter() - t0) / len(records)
    k = max(1, round(args.decode_share * score_s / one_decode_s))

    def slowed(rec):
        for _ in range(k - 1):
            read_frames(rec.video, cfg_on.data.num_frames, cfg_on.data.max_fps)
        return read_frames(rec.video, cfg_on.data.num_frames, cfg_on.data.max_fps)

    t0 = time.perf_counter()
    slowed(records[0])
    slowed_s = time.perf_counter() - t0

    def run_pass(name: str, epoch: int) -> dict[str, Any]:
        worker = on if name == "prefetch" else off
        worker.decode = (lambda rec: decoded[str(rec.video)]) if name == "scoring_only" else slowed
        # A fresh epoch per round: the prefetcher ignores hints for (index, epoch) keys it has already run.
        items_r = [dataclasses.replace(it, epoch=epoch) for it in items]
        statuses, payloads = [], []
        t_start = time.perf_counter()
        for n, it in enumerate(items_r):
            if name == "prefetch":
                if n == 0:
                    worker.prefetch(it)  # the driver's first dispatch to an idle actor sends two items at once
                if n + 1 < len(items_r):
                    worker.prefetch(items_r[n + 1])
            status, payload = worker.run(it)
            statuses.append(status)
            payloads.append(payload)
        wall = time.perf_counter() - t_start
        scoring = sum(s["elapsed_s"] - s["frames_wait_s"] for s in statuses)
        assert all(s["status"] == "ok" for s in statuses), statuses
        return {
            "wall_s": wall,
            "questions_per_s": len(items) / wall,
            "busy": scoring / wall,
            "frames_wait_s": sum(s["frames_wait_s"] for s in statuses),
            "prefetched": sum(bool(s["prefetched"]) for s in statuses),
            "payloads": [_content(b) for b in payloads],
        }

    names = list(SERIES)
    samples: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(run_pass(name, epoch=r + 1))
    identical = all(
        samples[n][r]["payloads"] == samples["scoring_only"][r]["payloads"] for n in names for r in range(rounds)
    )
    for runs in samples.values():
        for s in runs:
            s.pop("payloads")

    def med(name: str, key: str) -> float:
        return float(np.median([s[key] for s in samples[name]]))

    series = {
        n: {"questions_per_s": med(n, "questions_per_s"), "busy": med(n, "busy"), "runs": samples[n]} for n in names
    }
    # Per-round ratio to the scoring-only rate (a neighbour's load burst slows a whole round alike).
    for n in names:
        ratios = [
            a["questions_per_s"] / b["questions_per_s"]
            for a, b in zip(samples[n], samples["scoring_only"], strict=True)
        ]
        series[n]["of_scoring_only"] = float(np.median(ratios))
    results = {
        "series": series,
        "score_s_per_question": score_s,
        "one_decode_s": one_decode_s,
        "decode_repeats": k,
        "slowed_decode_s": slowed_s,
        "decode_share": slowed_s / score_s,
        "trajectories_identical": identical,
        "target_of_scoring_only": TARGET,
        "meets_target": series["prefetch"]["of_scoring_only"] >= TARGET,
    }
    config = {
        "model": source,
        "model_path": model_path,
        "questions": n_q,
        "rounds": rounds,
        "decode_share_requested": args.decode_share,
        "overrides": overrides,
    }
    notes = [
        "One RewardWorker per setting in one process; the prefetch thread and the scoring thread share the machine's "
        "cores (decord releases the GIL while it decodes).",
        "busy = time from frames in hand to trajectory encoded, over wall time.",
    ]
    out = finish(args, "prefetch", config=config, results=results, notes=notes, started=started, argv=argv,
                 report=report, plot=plot)  # fmt: skip
    from benchmarks.common import load_result

    Path(args.out).with_suffix(".md").write_text(markdown(load_result(args.out)))
    return out


def _rows(results: dict[str, Any]) -> list[list[str]]:
    return [
        [
            n,
            f"{s['questions_per_s']:.2f}",
            f"{100 * s['busy']:.0f}%",
            f"{100 * s['of_scoring_only']:.0f}%",
        ]
        for n, s in results["series"].items()
    ]


COLUMNS = ["series", "questions/s", "busy (scoring) fraction", "of scoring-only rate (per-round median)"]


def report(results: dict[str, Any]) -> None:
    print_table(
        f"Reward-actor prefetch: decode = {100 * results['decode_share']:.0f}% of scoring "
        f"({results['slowed_decode_s'] * 1e3:.0f} ms vs {results['score_s_per_question'] * 1e3:.0f} ms per question); "
        f"trajectories identical: {results['trajectories_identical']}",
        COLUMNS,
        _rows(results),
    )


def markdown(payload: dict[str, Any]) -> str:
    from benchmarks.common import describe_device

    r = payload["results"]
    lines = [
        "# Reward-actor prefetch (issue 18 #1)",
        "",
        f"Model: {model_name(payload['config'])}. Device: {describe_device(payload['machine'])}.",
        f"Command: `{payload['command']}` ({payload['created'][:10]}{', --quick' if payload.get('quick') else ''}).",
        "",
        f"Slowed decoder: {r['decode_repeats']} decodes of the clip = {r['slowed_decode_s'] * 1e3:.0f} ms, "
        f"{100 * r['decode_share']:.0f}% of the {r['score_s_per_question'] * 1e3:.0f} ms of scoring per question. "
        f"Trajectories identical across series: {r['trajectories_identical']}. Target: prefetch >= "
        f"{100 * r['target_of_scoring_only']:.0f}% of the scoring-only rate: "
        f"{'met' if r['meets_target'] else 'NOT met'}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in _rows(r)),
        "",
        *(f"- `{n}`: {t}" for n, t in SERIES.items()),
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    fig, (ax_rate, ax_busy) = new_figure(2, width=4.5, height=3.6)
    names = list(results["series"])
    x = np.arange(len(names))
    colors = ["#555555", "#d62728", "#2ca02c"]
    for i, n in enumerate(names):
        runs = results["series"][n]["runs"]
        ax_rate.bar(i, results["series"][n]["questions_per_s"], color=colors[i % 3])
        ax_rate.plot([i] * len(runs), [s["questions_per_s"] for s in runs], "k.", ms=4)
        ax_busy.bar(i, 100 * results["series"][n]["busy"], color=colors[i % 3])
    target = TARGET * results["series"]["scoring_only"]["questions_per_s"]
    ax_rate.axhline(target, ls="--", color="k", lw=0.8, label=f"{100 * TARGET:.0f}% of scoring_only")
    ax_rate.legend(fontsize=7)
    for ax, label in ((ax_rate, "questions/s (bars: median; dots: rounds)"), (ax_busy, "busy scoring (% of wall)")):
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel(label, fontsize=8)
    model = model_name(payload["config"]) if payload else "?"
    annotate(
        fig,
        payload,
        f"Reward-actor prefetch: decode = {100 * results['decode_share']:.0f}% of scoring time",
        model,
        SERIES,
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
