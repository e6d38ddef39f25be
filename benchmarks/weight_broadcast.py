"""Weight broadcast: time from the learner's publish to every actor holding the new version.

What is measured (issue 7 #4, issue 5, issue 18 #4), per (policy size, number of actors), for two learner paths
compared side by side in one run (interleaved per repeat, order rotated):

- ``bound`` (the library's path, ``actors.weights.publish_policy``): the learner's policy keeps its weights as views
  into one flat buffer (``CacovidPolicy.bind_flat_buffer``), so a version is ONE ``ray.put`` of memory that already
  exists + its checksum;
- ``flatten`` (the copying path it replaced): ``CacovidPolicy.flat_state`` copies the parameters into a fresh buffer,
  which is then put + checksummed.

Every actor then runs the library's ``RewardActor.sync``: ``WeightHandle.fetch`` (zero-copy object-store read +
XXH3-128 verify), ``load_flat_state`` (one copy into its policy, which binds itself on its first load) and
``actors.weights.state_checksum`` of what its policy now holds (the proof the actor reports), all included.
Reported: ``to_all_s`` (from the start of the learner's publish, flatten included where there is one, to the moment
the LAST actor holds the new version: actor-side timestamps, one machine, one clock) and its parts ``flatten_s``
(``bound``: getting the live buffer), ``put_checksum_s``, ``fanout_s``, ``actor_load_s`` (per actor); the library's
``sync_latency_s``; untimed side measurements: one ``actors.weights.checksum`` of the buffer (``crc32_checksum_s``,
a legacy key name: it is XXH3-128 now) and ``xxh3_128_s``; and one actor's sync split into fetch + verify, load and
state checksum (``actor_breakdown``).

Actors here are ``RewardActor`` s whose worker holds only a policy copy (no video LLM): the sync path is the
library's, unchanged. They are idle when a version is published; in training an actor picks a version up between
work items, so the driver's latency adds up to one work item. Sizes: the tiny model's policy (float32) and the
7B-width policy (``CacovidPolicy.from_blueprint`` of a Qwen2-7B-width layer: ~250M parameters, bf16, ~0.5 GB).
Policies live on the CPU (the broadcast path is host memory + object store in every deployment; ``--device`` is
only recorded).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.reward_actor import RewardActor
from actors.weights import WeightHandle, checksum, publish_policy, state_checksum
from benchmarks.common import (
    Stats,
    annotate,
    base_parser,
    default_dtype,
    describe_device,
    finish,
    fmt_bytes,
    legend_below,
    load_result,
    local_ray,
    machine_info,
    new_figure,
    param_count,
    print_table,
    qwen2_7b_config,
    replot,
    resolve_model,
    save_figure,
    setup_process,
)
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.worker import RewardWorker


def build_policy(size: str, model_path: str) -> CacovidPolicy:
    """The policy of one size, built from a Qwen2 decoder layer + rotary (``from_blueprint``), seeded."""
    from transformers import AutoConfig
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    torch.manual_seed(0)
    if size == "tiny":
        from cacovid_rl.models.loading import resolve_model_path

        text = AutoConfig.from_pretrained(resolve_model_path(model_path)).get_text_config()
        text._attn_implementation = "sdpa"
        dtype = torch.float32
    elif size == "7b":
        text, dtype = qwen2_7b_config(), torch.bfloat16
    else:
        raise ValueError(size)
    with default_dtype(dtype):
        layer, rotary = Qwen2DecoderLayer(text, 0), Qwen2RotaryEmbedding(text)
        policy = CacovidPolicy.from_blueprint(layer, rotary, text)
    del layer
    return policy.eval()


class PolicyOnlyWorker(RewardWorker):
    """A ``RewardWorker`` holding only a policy copy: ``set_weights`` is the library's."""

    def __init__(self, policy: CacovidPolicy) -> None:
        self.policy = policy
        self.version = -1
        self.busy_s = 0.0
        self.started = time.time()


class LightRewardActor(RewardActor):
    """A ``RewardActor`` without a video LLM: ``sync`` (fetch, verify, load) is the library's code path."""

    def __init__(self, size: str, model_path: str) -> None:
        setup_process(1)
        self._attach(PolicyOnlyWorker(build_policy(size, model_path)), "cpu")

    def timed_sync(self, handle: WeightHandle) -> dict[str, float]:
        version = self.sync(handle)
        return {
            "version": version,
            "done_at": time.time(),
            "load_s": self.sync_load_s,
            "sync_latency_s": self.sync_latency_s,
        }

    def breakdown(self, handle: WeightHandle) -> dict[str, float]:
        """One sync's parts, timed apart (the policy already holds ``handle``: this repeats the work, untimed above)."""
        t0 = time.perf_counter()
        flat = handle.fetch()
        t1 = time.perf_counter()
        self.worker.set_weights(flat, handle.meta, handle.version)
        t2 = time.perf_counter()
        state_checksum(self.worker.policy)
        t3 = time.perf_counter()
        return {"fetch_verify_s": t1 - t0, "load_s": t2 - t1, "state_checksum_s": t3 - t2}


MODES = ("bound", "flatten")


def publish(mode: str, policy: CacovidPolicy, version: int) -> tuple[WeightHandle, np.ndarray, float]:
    """Publish ``version`` by ``mode``; returns the handle, the buffer put and when the buffer was ready."""
    if mode == "bound":
        t = time.time()
        flat = policy.flat_buffer()[0].numpy()
        ready = time.time()
        handle = publish_policy(policy, version)
        return handle, flat, ready - t
    t = time.time()
    flat, meta = policy.flat_state()
    ready = time.time()
    return WeightHandle.publish(flat, meta, version), flat, ready - t


def bench_size(ray: Any, size: str, model_path: str, counts: list[int], repeats: int) -> dict[str, Any]:
    policies = {"bound": build_policy(size, model_path), "flatten": build_policy(size, model_path)}
    if not policies["bound"].bind_flat_buffer():
        raise RuntimeError(f"the {size} policy could not be bound to a flat buffer")
    remote = ray.remote(LightRewardActor).options(num_cpus=1)
    actors = [remote.remote(size, model_path) for _ in range(max(counts))]
    ray.get([a.info.remote() for a in actors], timeout=900)
    version = 0
    out: dict[str, dict[str, Any]] = {m: {} for m in MODES}
    breakdown: dict[str, Any] = {}
    with torch.no_grad():
        for mode in MODES:  # warm-up: every actor loads (and binds) once, each path runs once
            version += 1
            handle, _, _ = publish(mode, policies[mode], version)
            ray.get([a.timed_sync.remote(handle) for a in actors], timeout=900)
            del handle
        for n in counts:
            keys = ("to_all_s", "flatten_s", "put_checksum_s", "fanout_s")
            rows = {m: {k: [] for k in keys} for m in MODES}
            loads: dict[str, list[float]] = {m: [] for m in MODES}
            lib_latency: dict[str, list[float]] = {m: [] for m in MODES}
            xxh: list[float] = []
            for rep in range(repeats):
                order = MODES if rep % 2 == 0 else MODES[::-1]  # interleaved, order rotated
                for mode in order:
                    version += 1
                    next(iter(policies[mode].parameters())).add_(1e-3)  # a real change per version
                    t0 = time.time()
                    handle, flat, flatten_s = publish(mode, policies[mode], version)
                    t2 = time.time()
                    res = ray.get([a.timed_sync.remote(handle) for a in actors[:n]], timeout=900)
                    if any(o["version"] != version for o in res):
                        raise RuntimeError(f"an actor did not reach version {version}: {res}")
                    last = max(o["done_at"] for o in res)
                    rows[mode]["to_all_s"].append(last - t0)
                    rows[mode]["flatten_s"].append(flatten_s)
                    rows[mode]["put_checksum_s"].append(t2 - t0 - flatten_s)
                    rows[mode]["fanout_s"].append(last - t2)
                    loads[mode] += [o["load_s"] for o in res]
                    lib_latency[mode].append(float(np.mean([o["sync_latency_s"] for o in res])))
                    if mode == "bound":
                        c0 = time.perf_counter()
                        checksum(flat)
                        xxh.append(time.perf_counter() - c0)
                    last_handle = handle
                    del handle, flat  # drop the old version: the object store frees it
            for mode in MODES:
                out[mode][str(n)] = {
                    **{k: Stats.of(v) for k, v in rows[mode].items()},
                    "actor_load_s": Stats.of(loads[mode]),
                    "sync_latency_s": Stats.of(lib_latency[mode]),
                    "crc32_checksum_s": Stats.of(xxh),
                    "xxh3_128_s": Stats.of(xxh),
                }
            parts = [ray.get(actors[0].breakdown.remote(last_handle), timeout=900) for _ in range(max(1, repeats))]
            breakdown[str(n)] = {k: Stats.of([p[k] for p in parts]) for k in parts[0]}
            del last_handle
            print(
                f"[{size}] {n} actor(s): to all, bound {out['bound'][str(n)]['to_all_s'].s()} s, "
                f"flatten {out['flatten'][str(n)]['to_all_s'].s()} s",
                flush=True,
            )
    for a in actors:
        ray.kill(a)
    policy = policies["bound"]
    nbytes = int(sum(t.numel() * t.element_size() for t in policy.state_dict().values()))
    return {
        "params": param_count(policy),
        "dtype": str(policy.dtype).removeprefix("torch."),
        "bytes": nbytes,
        "repeats": repeats,
        "actors": out["bound"],
        "before_flatten": {"actors": out["flatten"]},
        "actor_breakdown": breakdown,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__ or "", "weight_broadcast.json")
    p.add_argument("--sizes", default="tiny,7b")
    p.add_argument("--actors", default="1,2,4,8")
    p.add_argument("--object-store-mb", type=int, default=2048)
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args, plot)
    setup_process(args.threads)
    started = time.perf_counter()
    sizes = ["tiny"] if args.quick else [s for s in args.sizes.split(",") if s]
    counts = [1, 2] if args.quick else [int(x) for x in args.actors.split(",")]
    repeats = args.repeats or (1 if args.quick else 5)
    model_path, source = resolve_model(args.model, args.seed)
    results: dict[str, Any] = {"sizes": {}}
    with local_ray(num_cpus=max(counts), object_store_mb=args.object_store_mb) as ray:
        for size in sizes:
            results["sizes"][size] = bench_size(ray, size, model_path, counts, repeats)
    config = {
        "model": source,
        "actor_counts": counts,
        "ray_num_cpus": max(counts),
        "object_store_mb": args.object_store_mb,
        "actor": "RewardActor with a policy-only worker (library sync path)",
    }
    notes = [
        f"Ray logical CPUs = {max(counts)} so that every actor is placed; the machine has "
        f"{machine_info()['cores']} physical cores, so more than 2 actors share 2 cores.",
        "to_all_s = learner (flatten +) put + checksum + the slowest actor's fetch/verify/load/state checksum "
        "(actors idle). 'actors' = the bound path (the library's); 'before_flatten' = the flatten-first path.",
        "sync_latency_s is the library's metric (starts at handle.published_at, i.e. after put + checksum).",
        "crc32_checksum_s is a legacy key: the checksum is XXH3-128 (actors.weights.checksum), same as xxh3_128_s.",
    ]
    out = finish(args, "weight_broadcast", config=config, results=results, notes=notes, started=started, argv=argv,
                 report=report, plot=plot)  # fmt: skip
    Path(args.out).with_suffix(".md").write_text(markdown(load_result(args.out)))
    return out


def markdown(payload: dict[str, Any]) -> str:
    """The side-by-side table (bound vs flatten) as Markdown, beside the JSON."""
    res, m = payload["results"], payload["machine"]
    lines = [
        f"# Weight broadcast ({describe_device(m)}; torch threads {m['torch_threads']}; `{payload['command']}`)",
        "",
        "Seconds, median [p10-p90]. bound = weights are views into one flat buffer, a version is one put (this "
        "library); flatten = `flat_state` copy first, then the put (the copying path). Actor load = fetch + verify + "
        "one copy into the policy + state checksum of what it holds.",
        "",
        "| policy | actors | publish -> all, bound | publish -> all, flatten | put + checksum, bound | flatten | "
        "slowest actor after put, bound | actor load, bound |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size, r in res["sizes"].items():
        name = f"{size} ({r['params'] / 1e6:.1f}M, {r['dtype']}, {fmt_bytes(r['bytes'])})"
        for n, st in r["actors"].items():
            before = r["before_flatten"]["actors"][n]
            lines.append(
                f"| {name} | {n} | {st['to_all_s'].s()} | {before['to_all_s'].s()} | {st['put_checksum_s'].s()} | "
                f"{before['flatten_s'].s()} | {st['fanout_s'].s()} | {st['actor_load_s'].s()} |"
            )
    lines += ["", "One actor's sync, split (seconds, median):", "", "| policy | actors | fetch + verify | load | "
              "state checksum |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for size, r in res["sizes"].items():
        for n, b in r.get("actor_breakdown", {}).items():
            lines.append(
                f"| {size} | {n} | {b['fetch_verify_s'].median:.3f} | {b['load_s'].median:.3f} | "
                f"{b['state_checksum_s'].median:.3f} |"
            )
    return "\n".join(lines) + "\n"


def report(res: dict[str, Any]) -> None:
    for size, r in res["sizes"].items():
        rows = []
        for n, st in r["actors"].items():
            before = r.get("before_flatten", {}).get("actors", {}).get(n)
            rows.append(
                [n, st["to_all_s"].s(), before["to_all_s"].s() if before else "-", st["put_checksum_s"].s(),
                 before["flatten_s"].s() if before else "-", st["actor_load_s"].s(), st["sync_latency_s"].s()]
            )  # fmt: skip
        print_table(
            f"Weight broadcast, {size} policy ({r['params'] / 1e6:.1f}M params, {r['dtype']}, {fmt_bytes(r['bytes'])}):"
            " seconds, median [p10-p90]",
            ["actors", "publish -> all (bound)", "publish -> all (flatten)", "put + checksum (bound)",
             "flatten (before)", "actor load (bound)", "lib sync_latency"],
            rows,
        )  # fmt: skip


SERIES = {
    "publish -> all actors (left)": "from the start of the learner's publish until the LAST actor holds the new "
    "version; median over repeats, bars p10-p90",
    "tiny / 7b": "the policy of the shipped tiny model (float32) / of a Qwen2-7B-width decoder layer "
    "(CacovidPolicy.from_blueprint, bf16); actors hold only the policy (no video LLM)",
    "bound / flatten": "bound: the learner's weights are views into one flat buffer, a version is one put (this "
    "library); flatten: a flat_state copy first (the copying path it replaced), compared interleaved in the same run",
    "put + CRC32 (right)": "learner: one ray.put + its checksum (XXH3-128; the key name is historical)",
    "fetch + CRC32 + load": "the slowest actor after the put: zero-copy read, checksum verify, one copy into its "
    "policy, and the checksum of what its policy then holds",
}


def plot(res: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    fig, (ax, bx) = new_figure(ncols=2, width=5.6, height=5.0)
    for size, r in res["sizes"].items():
        variants = [("bound", r["actors"], "-")]
        if "before_flatten" in r:
            variants.append(("flatten", r["before_flatten"]["actors"], "--"))
        for mode, per_n, style in variants:
            ns = [int(n) for n in per_n]
            med = [per_n[str(n)]["to_all_s"].median for n in ns]
            lo = [m - per_n[str(n)]["to_all_s"].p10 for m, n in zip(med, ns, strict=True)]
            hi = [per_n[str(n)]["to_all_s"].p90 - m for m, n in zip(med, ns, strict=True)]
            ax.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3, ls=style,
                        label=f"{size}, {mode}: {r['params'] / 1e6:.1f}M params, {fmt_bytes(r['bytes'])}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks([int(n) for n in next(iter(res["sizes"].values()))["actors"]])
    ax.set_xlabel("actors")
    ax.set_ylabel("publish -> all actors (s), log scale")
    ax.set_title("Weight broadcast latency (one machine)", fontsize=10)
    legend_below(ax)
    # where the time goes, for the largest policy: bound (left bar) vs flatten (right bar) per actor count
    size, r = max(res["sizes"].items(), key=lambda kv: kv[1]["bytes"])
    ns = list(r["actors"])
    x = np.arange(len(ns))
    modes = [("bound", r["actors"], -0.2)]
    if "before_flatten" in r:
        modes.append(("flatten", r["before_flatten"]["actors"], 0.2))
    colours = {"flatten (learner)": "tab:blue", "put + CRC32 (learner)": "tab:orange",
               "fetch + CRC32 + load, slowest actor": "tab:green"}  # fmt: skip
    for mode, per_n, dx in modes:
        parts = {
            "flatten (learner)": [per_n[n]["flatten_s"].median for n in ns],
            "put + CRC32 (learner)": [per_n[n]["put_checksum_s"].median for n in ns],
            "fetch + CRC32 + load, slowest actor": [per_n[n]["fanout_s"].median for n in ns],
        }
        bottom = np.zeros(len(ns))
        for label, vals in parts.items():
            bx.bar(x + dx, vals, width=0.38, bottom=bottom, color=colours[label],
                   label=label if mode == "bound" else None, hatch="" if mode == "bound" else "//")  # fmt: skip
            bottom += np.array(vals)
    bx.set_xticks(x, ns)
    bx.set_xlabel("actors (left bar: bound; right, hatched: flatten)")
    bx.set_ylabel("seconds (medians)")
    bx.set_title(f"{size} policy ({fmt_bytes(r['bytes'])}): where the time goes", fontsize=10)
    legend_below(bx)
    annotate(
        fig,
        payload,
        "Weight broadcast: learner publish -> every reward actor on the new policy version (Ray object store)",
        "policies only: the shipped tiny model's and a 7B-width one (see tiny / 7b)",
        SERIES,
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
