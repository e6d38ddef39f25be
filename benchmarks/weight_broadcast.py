"""Weight broadcast: time from the learner's publish to every actor holding the new version.

What is measured (issue 7 #4, issue 5): the learner side flattens the policy (``CacovidPolicy.flat_state``: one
contiguous byte buffer) and publishes it (``WeightHandle.publish``: ONE ``ray.put`` + checksum per version); every
actor then runs the library's ``RewardActor.sync`` (``WeightHandle.fetch``: zero-copy object-store read + checksum,
``load_flat_state``: copy into its policy). Reported per (policy size, number of actors):

- ``to_all_s``: from the start of the learner's publish (flatten included) to the moment the LAST actor holds the
  new version (actor-side timestamps, one machine, one clock);
- its parts: ``flatten_s``, ``put_checksum_s`` (learner), ``actor_load_s`` (per actor: fetch + verify + copy);
- ``crc32_checksum_s``: one ``learner.weights.checksum`` (CRC32) of the buffer, which the learner computes once
  and every actor once more; ``xxh3_128_s``: the same bytes hashed with xxHash3-128 (untimed side measurements);
- ``sync_latency_s``: the library's own metric (``time.time() - handle.published_at``, what the driver logs as
  ``sync/latency_s``), which starts after the put and checksum.

Actors here are ``RewardActor`` s whose worker holds only a policy copy (no video LLM): the sync path is the
library's, unchanged. They are idle when a version is published; in training an actor picks a version up between
work items, so the driver's latency adds up to one work item. Sizes: the tiny model's policy (float32) and the
7B-width policy (``CacovidPolicy.from_blueprint`` of a Qwen2-7B-width layer: ~250M parameters, bf16, ~0.5 GB).
Policies live on the CPU (the broadcast path is host memory + object store in every deployment; ``--device`` is
only recorded).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import xxhash  # a wandb dependency: the faster-hash comparison

from actors.reward_actor import RewardActor
from benchmarks.common import (
    Stats,
    annotate,
    base_parser,
    default_dtype,
    finish,
    fmt_bytes,
    legend_below,
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
from learner.weights import WeightHandle, checksum


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
        self.worker = PolicyOnlyWorker(build_policy(size, model_path))
        self.sync_latency_s = 0.0
        self.sync_load_s = 0.0
        self.syncs = 0
        self.weights_checksum = ""  # set by sync, as in the real actor

    def timed_sync(self, handle: WeightHandle) -> dict[str, float]:
        version = self.sync(handle)
        return {
            "version": version,
            "done_at": time.time(),
            "load_s": self.sync_load_s,
            "sync_latency_s": self.sync_latency_s,
        }


def bench_size(ray: Any, size: str, model_path: str, counts: list[int], repeats: int) -> dict[str, Any]:
    policy = build_policy(size, model_path)
    remote = ray.remote(LightRewardActor).options(num_cpus=1)
    actors = [remote.remote(size, model_path) for _ in range(max(counts))]
    ray.get([a.info.remote() for a in actors], timeout=600)
    first = next(iter(policy.parameters()))
    version = 0
    per_count: dict[str, Any] = {}
    with torch.no_grad():
        for _ in range(2):  # warm-up: every actor loads a version once
            version += 1
            flat, meta = policy.flat_state()
            handle = WeightHandle.publish(flat, meta, version)
            ray.get([a.timed_sync.remote(handle) for a in actors], timeout=600)
            del handle, flat
        for n in counts:
            rows: dict[str, list[float]] = {k: [] for k in ("to_all_s", "flatten_s", "put_checksum_s", "fanout_s")}
            loads: list[float] = []
            lib_latency: list[float] = []
            crc: list[float] = []
            xxh: list[float] = []
            for _ in range(repeats):
                version += 1
                first.add_(1e-3)  # a real change per version
                t0 = time.time()
                flat, meta = policy.flat_state()
                t1 = time.time()
                handle = WeightHandle.publish(flat, meta, version)
                t2 = time.time()
                out = ray.get([a.timed_sync.remote(handle) for a in actors[:n]], timeout=600)
                if any(o["version"] != version for o in out):
                    raise RuntimeError(f"an actor did not reach version {version}: {out}")
                last = max(o["done_at"] for o in out)
                rows["to_all_s"].append(last - t0)
                rows["flatten_s"].append(t1 - t0)
                rows["put_checksum_s"].append(t2 - t1)
                rows["fanout_s"].append(last - t2)
                loads += [o["load_s"] for o in out]
                lib_latency.append(float(np.mean([o["sync_latency_s"] for o in out])))
                # Untimed breakdown: the CRC32 the learner and every actor compute, and a faster hash for comparison.
                c0 = time.perf_counter()
                checksum(flat)
                c1 = time.perf_counter()
                xxhash.xxh3_128_hexdigest(memoryview(flat))
                c2 = time.perf_counter()
                crc.append(c1 - c0)
                xxh.append(c2 - c1)
                del handle, flat  # drop the old version: the object store frees it
            per_count[str(n)] = {
                **{k: Stats.of(v) for k, v in rows.items()},
                "actor_load_s": Stats.of(loads),
                "sync_latency_s": Stats.of(lib_latency),
                "crc32_checksum_s": Stats.of(crc),
                "xxh3_128_s": Stats.of(xxh),
            }
            print(f"[{size}] {n} actor(s): to all {per_count[str(n)]['to_all_s'].s()} s", flush=True)
    for a in actors:
        ray.kill(a)
    nbytes = int(sum(t.numel() * t.element_size() for t in policy.state_dict().values()))
    return {
        "params": param_count(policy),
        "dtype": str(policy.dtype).removeprefix("torch."),
        "bytes": nbytes,
        "repeats": repeats,
        "actors": per_count,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__ or "", "weight_broadcast.json")
    p.add_argument("--sizes", default="tiny,7b")
    p.add_argument("--actors", default="1,2,4")
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
        f"{machine_info()['cores']} physical cores, so 4 actors share 2 cores.",
        "to_all_s = learner flatten + put + checksum + the slowest actor's fetch/verify/load (actors idle).",
        "sync_latency_s is the library's metric (starts at handle.published_at, i.e. after put + checksum).",
    ]
    return finish(args, "weight_broadcast", config=config, results=results, notes=notes, started=started, argv=argv,
                  report=report, plot=plot)  # fmt: skip


def report(res: dict[str, Any]) -> None:
    for size, r in res["sizes"].items():
        rows = []
        for n, st in r["actors"].items():
            rows.append(
                [n, st["to_all_s"].s(), st["flatten_s"].s(), st["put_checksum_s"].s(), st["actor_load_s"].s(),
                 st["sync_latency_s"].s()]
            )  # fmt: skip
        print_table(
            f"Weight broadcast, {size} policy ({r['params'] / 1e6:.1f}M params, {r['dtype']}, {fmt_bytes(r['bytes'])}):"
            " seconds, median [p10-p90]",
            ["actors", "publish -> all actors", "flatten", "put + checksum", "actor load", "lib sync_latency"],
            rows,
        )


SERIES = {
    "publish -> all actors (left)": "from the start of the learner's publish (flatten included) until the LAST "
    "actor holds the new version; median over repeats, bars p10-p90",
    "tiny / 7b": "the policy of the shipped tiny model (float32) / of a Qwen2-7B-width decoder layer "
    "(CacovidPolicy.from_blueprint, bf16); actors hold only the policy (no video LLM)",
    "flatten / put + CRC32 (right)": "learner: CacovidPolicy.flat_state into one buffer / one ray.put + its CRC32",
    "fetch + CRC32 + load": "the slowest actor: zero-copy object-store read, checksum, copy into its policy",
}


def plot(res: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    fig, (ax, bx) = new_figure(ncols=2, width=5.6, height=5.0)
    for size, r in res["sizes"].items():
        ns = [int(n) for n in r["actors"]]
        med = [r["actors"][str(n)]["to_all_s"].median for n in ns]
        lo = [m - r["actors"][str(n)]["to_all_s"].p10 for m, n in zip(med, ns, strict=True)]
        hi = [r["actors"][str(n)]["to_all_s"].p90 - m for m, n in zip(med, ns, strict=True)]
        ax.errorbar(ns, med, yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{size}: {r['params'] / 1e6:.1f}M params, {fmt_bytes(r['bytes'])}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks([int(n) for n in next(iter(res["sizes"].values()))["actors"]])
    ax.set_xlabel("actors")
    ax.set_ylabel("publish -> all actors (s), log scale")
    ax.set_title("Weight broadcast latency (one machine)", fontsize=10)
    legend_below(ax)
    # where the time goes, for the largest policy
    size, r = max(res["sizes"].items(), key=lambda kv: kv[1]["bytes"])
    ns = list(r["actors"])
    parts = {
        "flatten (learner)": [r["actors"][n]["flatten_s"].median for n in ns],
        "put + CRC32 (learner)": [r["actors"][n]["put_checksum_s"].median for n in ns],
        "fetch + CRC32 + load, slowest actor": [r["actors"][n]["fanout_s"].median for n in ns],
    }
    bottom = np.zeros(len(ns))
    for (label, vals), colour in zip(parts.items(), ["tab:blue", "tab:orange", "tab:green"], strict=True):
        bx.bar(ns, vals, bottom=bottom, label=label, color=colour)
        bottom += np.array(vals)
    crc = float(np.median([r["actors"][n]["crc32_checksum_s"].median for n in ns]))
    xxh = float(np.median([r["actors"][n]["xxh3_128_s"].median for n in ns]))
    bx.axhline(crc, color="k", ls=":", label=f"one CRC32 of the buffer: {crc:.2f} s (xxh3-128: {xxh:.2f} s)")
    bx.set_xlabel("actors")
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
