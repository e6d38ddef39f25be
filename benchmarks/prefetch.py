"""Reward-actor prefetch: questions/s and scoring-busy fraction with the next item decoded in the background.

What is measured (issue 18 #1): one ``RewardWorker`` (the library half of a reward actor) rolls out the same
synthetic questions, the shipped tiny model, interleaved round by round, as

- ``scoring_only`` -- frames decoded in advance: the rate the actor would reach if decoding cost nothing (the target);
- ``<mode>/no_prefetch`` -- today's path without the hint: ``run`` decodes, then scores (``cluster.prefetch=false``);
- ``<mode>/prefetch`` -- ``cluster.prefetch=true``: before ``run(n)`` the worker gets the hint for item ``n+1`` (what
  the driver sends when it queues a second item on an actor), decoded on the prefetcher's thread while ``n`` is scored;
- ``<mode>/prefetch_encode`` -- ``cluster.prefetch_encode=true`` as well: the same hint, and the prefetch thread also
  encodes item ``n+1`` (vision tower + prompt embedding) while ``n`` is scored.

The decoder is the real one (decord on the synthetic mp4s) slowed so that one decode costs ``--decode-share`` (default
30%) of one question's scoring time, in one of two ways (``--slow``, both by default, timed side by side):

- ``cpu`` -- the clip decoded ``k`` times: CPU work, as a long video read by decord on the actor's own cores. On this
  2-core machine it competes with the CPU scoring (a GPU actor scores on the GPU, so there it would not);
- ``io`` -- the real decode plus a wait for the rest of the share, which occupies no core: what reading from network
  storage, or decoding on cores the scoring does not use, looks like to the actor.

Each pass runs the same few questions; the first is untimed (nothing runs before it for its decode to hide behind,
while an actor in steady state always has its next item decoding), the rest are timed. Short passes and many rounds
keep each round's series close together in time, so a change in the shared machine's load hits them alike; the
ratio to the scoring-only rate is taken per round. ``busy`` is the fraction of wall time the worker spends scoring
(from frames in hand to trajectory encoded; with ``prefetch_encode`` from the encoded question in hand, so the encode
is not in it), the rest being waits for frames; ``cpu_cores`` is the process's CPU time over wall time (all threads).
``encode_s`` is the encode's own time per question (``timings["encode"]``, inline or on the prefetch thread): what
``prefetch_encode`` can take off the scoring thread at most. On a CPU machine the background encode needs a core of
its own to be hidden; on a GPU actor it would share the GPU with the scoring, so this CPU number is not a GPU one.
Trajectories are checked identical across all series.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
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

MODES = {
    "cpu": "decode repeated k times: CPU work that shares this machine's 2 cores with the CPU scoring",
    "io": "one real decode + a wait that occupies no core (network storage, or decoding on cores scoring does not use)",
}
SERIES = {
    "scoring_only": "frames decoded in advance (decode costs nothing): the rate to reach",
    "<mode>/no_prefetch": "run() decodes (slowed decoder), then scores: cluster.prefetch=false",
    "<mode>/prefetch": "the next item's decode on the prefetch thread while the current one is scored: "
    "cluster.prefetch=true",
    "<mode>/prefetch_encode": "the next item's decode and vision encode on the prefetch thread: "
    "cluster.prefetch_encode=true",
    **{f"mode {m}": text for m, text in MODES.items()},
}
KINDS = ("no_prefetch", "prefetch", "prefetch_encode")
TARGET = 0.95


def _content(payload: bytes) -> bytes:
    from cacovid_rl.rl.trajectory import Trajectory

    return dataclasses.replace(Trajectory.from_bytes(payload), timings={}).to_bytes()


def parse_modes(text: str) -> list[str]:
    """``--slow`` as a list of known modes, in the order given."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"error: --slow {text!r}: give one or more of {', '.join(MODES)} (comma-separated)")
    return list(dict.fromkeys(modes))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__, "prefetch.json")
    p.add_argument("--questions", type=int, default=0, help="questions per pass, the first untimed (0: 6, --quick: 3)")
    p.add_argument("--decode-share", type=float, default=0.30, help="slowed decode time / scoring time per question")
    p.add_argument("--slow", default="cpu,io", help="how the decoder is slowed: cpu, io or both (cpu,io)")
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args, plot)
    modes = parse_modes(args.slow)
    if not 0 < args.decode_share < 10:
        raise SystemExit(f"error: --decode-share {args.decode_share}: give a ratio in (0, 10), e.g. 0.3")
    setup_process(args.threads)
    started = time.perf_counter()
    from cacovid_rl.rl.worker import RewardWorker, WorkItem

    n_q = args.questions or (3 if args.quick else 6)
    if n_q < 2:
        raise SystemExit(f"error: --questions {n_q}: give at least 2 (the first question of each pass is not timed)")
    rounds = args.repeats or (1 if args.quick else 10)
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
    cfg_enc = load_config(None, [*overrides, "cluster.prefetch=true", "cluster.prefetch_encode=true"])
    records = load_records(data / "train.json", data).records[:n_q]
    items = [WorkItem(i, 0, 0, WorkItem.record_to_dict(r)) for i, r in enumerate(records)]
    # One worker without prefetch and one per prefetching series (identical weights: the policy is seeded by
    # cfg.seed). A prefetcher refuses hints for items it has already run, and every series of a round runs the same
    # items (same epoch, so the trajectories can be compared), so the prefetch series cannot share a worker.
    # Same actor id: it is written into each trajectory, which the variants must reproduce byte for byte.
    off = RewardWorker(cfg_off, "reward-0")
    hinted_cfgs = {"prefetch": cfg_on, "prefetch_encode": cfg_enc}
    on = {(m, kind): RewardWorker(cfg, "reward-0") for m in modes for kind, cfg in hinted_cfgs.items()}

    def decode(rec) -> np.ndarray:
        return read_frames(rec.video, cfg_on.data.num_frames, cfg_on.data.max_fps)

    decoded = {str(r.video): decode(r) for r in records}

    def in_advance(rec) -> np.ndarray:
        return decoded[str(rec.video)]

    # Calibrate: scoring time per question (frames in hand) and one real decode, measured side by side (the machine's
    # load moves both alike), then each mode's slowdown.
    for worker in (off, *on.values()):  # warm-up (first-call allocations and caches), outside the timed passes
        worker.decode = in_advance
        for it in items:
            worker.run(it)
    scores, decodes = [], []
    for it, rec in zip(items, records, strict=True):
        t0 = time.perf_counter()
        decode(rec)
        decodes.append(time.perf_counter() - t0)
        scores.append(off.run(it)[0].elapsed_s)
    score_s, one_decode_s = float(np.median(scores)), float(np.median(decodes))
    wanted_s = args.decode_share * score_s
    k = max(1, round(wanted_s / one_decode_s))
    wait_s = max(0.0, wanted_s - one_decode_s)

    def slowed_cpu(rec) -> np.ndarray:
        for _ in range(k - 1):
            decode(rec)
        return decode(rec)

    def slowed_io(rec) -> np.ndarray:
        frames = decode(rec)
        time.sleep(wait_s)  # releases the GIL and no core is busy: an I/O wait
        return frames

    slowed: dict[str, Callable[[Any], np.ndarray]] = {"cpu": slowed_cpu, "io": slowed_io}
    mode_info: dict[str, dict[str, Any]] = {}
    for m in modes:
        walls, cpus = [], []
        for rec in records[:3]:
            t0, c0 = time.perf_counter(), time.process_time()
            slowed[m](rec)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        wall, cpu = float(np.median(walls)), float(np.median(cpus))
        mode_info[m] = {"description": MODES[m], "slowed_decode_s": wall, "slowed_decode_cpu_s": cpu,
                        "decode_share": wall / score_s}  # fmt: skip
    mode_info.get("cpu", {}).update(decode_repeats=k)
    mode_info.get("io", {}).update(wait_s=wait_s)

    def run_pass(name: str, epoch: int) -> dict[str, Any]:
        mode, _, kind = name.partition("/")
        hinted = kind.startswith("prefetch")
        worker = on[mode, kind] if hinted else off
        worker.decode = in_advance if name == "scoring_only" else slowed[mode]
        # A fresh epoch per round: the prefetcher ignores hints for (index, epoch) keys it has already run.
        items_r = [dataclasses.replace(it, epoch=epoch) for it in items]
        statuses, payloads = [], []
        load = os.getloadavg()[0]
        t_start = c_start = 0.0
        for n, it in enumerate(items_r):
            if hinted:
                if n == 0:
                    worker.prefetch(it)  # the driver's first dispatch to an idle actor sends two items at once
                if n + 1 < len(items_r):
                    worker.prefetch(items_r[n + 1])
            status, payload = worker.run(it)
            statuses.append(status)
            payloads.append(payload)
            if n == 0:
                # The first question is the pass's warm-up: nothing runs before it for its decode to hide behind. An
                # actor in steady state always has the next item decoding, so the pass is timed from here.
                t_start, c_start = time.perf_counter(), time.process_time()
        wall = time.perf_counter() - t_start
        cpu = time.process_time() - c_start
        timed = statuses[1:]
        scoring = sum(s.elapsed_s - s.frames_wait_s for s in timed)
        assert all(s.ok for s in statuses), [s.error for s in statuses if not s.ok]
        prefetched = sum(s.prefetched for s in statuses)
        # Every hinted item must come from the prefetch thread, or the pass would time the inline path instead.
        assert prefetched == (len(items) if hinted else 0), (name, prefetched)
        return {
            "wall_s": wall,
            "questions_per_s": len(timed) / wall,
            "busy": scoring / wall,
            "cpu_cores": cpu / wall,
            "scoring_s": scoring,
            "decode_s": sum(s.decode_s for s in timed),
            "encode_s": sum(s.timings["encode"] for s in timed) / len(timed),
            "frames_wait_s": sum(s.frames_wait_s for s in timed),
            "prefetched": prefetched,
            "load_avg_1m": load,
            "payloads": [_content(b) for b in payloads],
        }

    names = ["scoring_only", *(f"{m}/{kind}" for m in modes for kind in KINDS)]
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
        n: {key: med(n, key) for key in ("questions_per_s", "busy", "cpu_cores", "encode_s")} | {"runs": samples[n]}
        for n in names
    }
    # Per-round ratio to the scoring-only rate (a neighbour's load burst slows a whole round alike).
    for n in names:
        ratios = [
            a["questions_per_s"] / b["questions_per_s"]
            for a, b in zip(samples[n], samples["scoring_only"], strict=True)
        ]
        series[n]["of_scoring_only"] = float(np.median(ratios))
        series[n]["of_scoring_only_rounds"] = ratios
    for m in modes:
        # The decode's share of the scoring time while the passes ran (the inline decodes of the no_prefetch series).
        runs = samples[f"{m}/no_prefetch"]
        mode_info[m]["decode_share_in_passes"] = sum(r["decode_s"] for r in runs) / sum(r["scoring_s"] for r in runs)
        mode_info[m]["prefetch_of_scoring_only"] = series[f"{m}/prefetch"]["of_scoring_only"]
        mode_info[m]["meets_target"] = series[f"{m}/prefetch"]["of_scoring_only"] >= TARGET
        mode_info[m]["prefetch_encode_of_scoring_only"] = series[f"{m}/prefetch_encode"]["of_scoring_only"]
    loads = [s["load_avg_1m"] for runs in samples.values() for s in runs]
    results = {
        "series": series,
        "modes": mode_info,
        "score_s_per_question": score_s,
        # The encode's share of a question's time with frames in hand: the most prefetch_encode can hide.
        "encode_share": series["scoring_only"]["encode_s"] * series["scoring_only"]["questions_per_s"],
        "one_decode_s": one_decode_s,
        "trajectories_identical": identical,
        "target_of_scoring_only": TARGET,
        "load_avg_1m": {
            "start": loads[0] if loads else None,
            "median": float(np.median(loads)),
            "max": max(loads),
            "end": os.getloadavg()[0],
        },
    }
    config = {
        "model": source,
        "model_path": model_path,
        "questions": n_q,
        "rounds": rounds,
        "slow": modes,
        "decode_share_requested": args.decode_share,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "overrides": overrides,
    }
    notes = [
        "One RewardWorker per setting in one process; the prefetch thread and the scoring thread share the machine's "
        "cores (decord releases the GIL while it decodes, time.sleep while it waits).",
        "busy = time from frames (with prefetch_encode: the encoded question) in hand to trajectory encoded, over "
        "wall time; cpu_cores = process CPU time over "
        "wall time; load_avg_1m per pass is the machine's 1-minute load average read before the pass.",
    ]
    out = finish(args, "prefetch", config=config, results=results, notes=notes, started=started, argv=argv,
                 report=report, plot=plot)  # fmt: skip
    from benchmarks.common import load_result

    Path(args.out).with_suffix(".md").write_text(markdown(load_result(args.out)))
    return out


COLUMNS = [
    "series",
    "questions/s",
    "busy (scoring) fraction",
    "encode ms / question",
    "CPU cores used",
    "process CPU s / question (ceiling at a fixed CPU share)",
    "of scoring-only rate",
]


def cpu_per_question(series: dict[str, Any]) -> float:
    """Median over the passes of the process's CPU seconds per question (all threads)."""
    return float(np.median([r["cpu_cores"] / r["questions_per_s"] for r in series["runs"]]))


def _rows(results: dict[str, Any]) -> list[list[str]]:
    # A process held to a fixed share of a loaded machine's CPU turns CPU seconds into questions at a fixed rate:
    # relative to scoring-only it can reach at most the ratio of CPU seconds per question, however well it overlaps.
    base = cpu_per_question(results["series"]["scoring_only"])
    rows = []
    for n, s in results["series"].items():
        cpq = cpu_per_question(s)
        rounds = ", ".join(f"{100 * x:.0f}" for x in s["of_scoring_only_rounds"])
        ceiling = f"{cpq:.3f} ({100 * base / cpq:.0f}%)"
        rows.append([n, f"{s['questions_per_s']:.2f}", f"{100 * s['busy']:.0f}%", f"{1e3 * s['encode_s']:.0f}",
                     f"{s['cpu_cores']:.2f}", ceiling,
                     f"{100 * s['of_scoring_only']:.0f}% ({rounds})"])  # fmt: skip
    return rows


def _mode_line(m: str, info: dict[str, Any], score_s: float) -> str:
    how = (
        f"{info['decode_repeats']} decodes of the clip"
        if m == "cpu"
        else f"1 decode + {info['wait_s'] * 1e3:.0f} ms wait"
    )
    return (
        f"`{m}`: {how} = {info['slowed_decode_s'] * 1e3:.0f} ms ({info['slowed_decode_cpu_s'] * 1e3:.0f} ms of CPU), "
        f"{100 * info['decode_share']:.0f}% of the {score_s * 1e3:.0f} ms of scoring per question at calibration, "
        f"{100 * info['decode_share_in_passes']:.0f}% during the passes; prefetch reaches "
        f"{100 * info['prefetch_of_scoring_only']:.0f}% of the scoring-only rate: "
        f"target {'met' if info['meets_target'] else 'NOT met'}; prefetch_encode reaches "
        f"{100 * info['prefetch_encode_of_scoring_only']:.0f}%"
    )


def _encode_line(results: dict[str, Any]) -> str:
    enc = results["series"]["scoring_only"]["encode_s"]
    return (
        f"encode (vision tower + prompt embedding): {enc * 1e3:.0f} ms per question, "
        f"{100 * results['encode_share']:.1f}% of a question's time with frames in hand (scoring_only): "
        "the most prefetch_encode can take off the scoring thread"
    )


def report(results: dict[str, Any]) -> None:
    print_table(
        f"Reward-actor prefetch, slowed decoder modes {', '.join(results['modes'])}; trajectories identical: "
        f"{results['trajectories_identical']}; of scoring-only: per-round median (rounds)",
        COLUMNS,
        _rows(results),
    )
    for m, info in results["modes"].items():
        print(_mode_line(m, info, results["score_s_per_question"]))
    print(_encode_line(results))


def markdown(payload: dict[str, Any]) -> str:
    from benchmarks.common import describe_device

    r = payload["results"]
    load = r["load_avg_1m"]
    lines = [
        "# Reward-actor prefetch (issue 18 #1)",
        "",
        f"Model: {model_name(payload['config'])}. Device: {describe_device(payload['machine'])}.",
        f"Command: `{payload['command']}` ({payload['created'][:10]}{', --quick' if payload.get('quick') else ''}); "
        f"{payload['config']['questions']} questions x {payload['config']['rounds']} interleaved rounds; machine "
        f"load average (1 min) over the passes: median {load['median']:.2f}, max {load['max']:.2f}.",
        "",
        f"Slowed decoders (target: prefetch >= {100 * r['target_of_scoring_only']:.0f}% of the scoring-only rate; "
        f"trajectories identical across all series: {r['trajectories_identical']}):",
        "",
        *(f"- {_mode_line(m, info, r['score_s_per_question'])}." for m, info in r["modes"].items()),
        f"- {_encode_line(r)}.",
        "",
        "| " + " | ".join(COLUMNS) + " (per-round median; rounds) |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in _rows(r)),
        "",
        *(f"- `{n}`: {t}" for n, t in SERIES.items()),
        "",
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    fig, (ax_rate, ax_busy) = new_figure(2, width=5.5, height=4.2)
    names = list(results["series"])
    x = np.arange(len(names))
    colors = {"scoring_only": "#555555", "no_prefetch": "#d62728", "prefetch": "#2ca02c", "prefetch_encode": "#1f77b4"}
    for i, n in enumerate(names):
        s = results["series"][n]
        color = colors[n.partition("/")[2] or n]
        hatch = "//" if n.startswith("io/") else None
        ax_rate.bar(i, s["questions_per_s"], color=color, hatch=hatch, edgecolor="white")
        ax_rate.plot([i] * len(s["runs"]), [run["questions_per_s"] for run in s["runs"]], "k.", ms=4)
        ax_busy.bar(i, 100 * s["busy"], color=color, hatch=hatch, edgecolor="white")
        ax_rate.annotate(f"{100 * s['of_scoring_only']:.0f}%", (i, s["questions_per_s"]), ha="center",
                         va="bottom", fontsize=7)  # fmt: skip
    target = TARGET * results["series"]["scoring_only"]["questions_per_s"]
    ax_rate.axhline(target, ls="--", color="k", lw=0.8, label=f"{100 * TARGET:.0f}% of scoring_only")
    # Further down than legend_below puts it: the rotated series names take the space under the axes.
    ax_rate.legend(loc="upper center", bbox_to_anchor=(0.5, -0.36), fontsize=7.5, frameon=False)
    for ax, label in ((ax_rate, "questions/s (bars: median; dots: rounds)"), (ax_busy, "busy scoring (% of wall)")):
        ax.set_xticks(x, names, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(label, fontsize=8)
    model = model_name(payload["config"]) if payload else "?"
    shares = ", ".join(f"{m} {100 * i['decode_share']:.0f}%" for m, i in results["modes"].items())
    annotate(fig, payload, f"Reward-actor prefetch: slowed decode = {shares} of scoring time", model, SERIES)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
