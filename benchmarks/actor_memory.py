"""Reward-actor memory: peak memory of the scoring forward vs combinations per forward, and the chunk size picked.

What is measured (issue 7 #3):

1. Peak memory of ``adapter.generate(enc, keep[G, K], max_new_tokens, combos_per_forward=c)`` -- the reward actor's
   scoring call -- for ``G`` fixed combinations run ``c`` at a time. Each setting runs in a FRESH subprocess
   (tracemalloc does not see torch's allocations): on CPU, once the model is loaded, the question encoded and the
   kernels primed on a one-token combination, the kernel's peak-RSS mark is reset to the current RSS
   (``/proc/self/clear_refs``), and the peak RSS after the call (``VmHWM``; ``ru_maxrss`` where the reset is not
   available) minus the RSS before it is the scoring call's peak; on cuda ``torch.cuda.max_memory_allocated``
   minus the memory allocated before the call. A linear fit over ``c`` gives the measured bytes per combination,
   compared with the estimate that ``VideoLLMAdapter.choose_chunk_size`` uses.
   Scenarios: ``tiny-native`` (the tiny model on a real synthetic question: 8 frames x 16 tokens, pruned to the
   training rate), ``tiny-long`` (the tiny model on a 32 x 196-token video layout, 25% kept: a 7B-like sequence
   length), ``7b-1layer`` (one Qwen2-7B-width decoder layer in bf16 at the training rate's 2% of 6,272 tokens: the
   per-layer transients at the real width; the KV cache of 28 layers is not represented).
2. The chunk size ``choose_chunk_size`` picks for memory budgets of 1-70 GiB, at the tiny model's and at
   LLaVA-OV-7B's sequence lengths (2%, 10%, 25% and 100% of 6,272 video tokens + ~100 text tokens, bf16, 28 layers),
   computed by the library's ``choose_chunk_size`` on the Qwen2-7B text config (no weights needed).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    GIB,
    MIB,
    REPO_ROOT,
    annotate,
    base_parser,
    finish,
    fmt_bytes,
    model_name,
    new_figure,
    print_table,
    qwen2_7b_config,
    replot,
    resolve_model,
    setup_process,
    synthetic_data,
)

BUDGETS_GIB = (1, 4, 16, 40, 70)
TEXT_TOKENS_7B = 100  # chat template + question + answer prompt, around the 6,272 + 1 video tokens


# ----------------------------------------------------------------------------------------------------------------------
# child: one measurement in a fresh process


def _status_bytes(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (``/proc/self/clear_refs`` = 5, Linux >= 4.0).

    Without it the peak of model construction (random init) would hide a smaller scoring peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        return _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _scenario(spec: dict[str, Any]) -> tuple[Any, Any, torch.Tensor]:
    """``(adapter, enc, keep[G, K])`` of a scenario."""
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.models.loading import load_adapter

    gen = torch.Generator().manual_seed(spec["seed"])
    device = spec["device"]
    if spec["scenario"] == "tiny-native":
        adapter = load_adapter(ModelConfig(path=spec["model_path"], device=device))
        data = synthetic_data()
        rec = load_records(data / "train.json", data).records[0]
        enc = adapter.encode(read_frames(rec.video, 8), build_prompt(rec.problem, rec.problem_type))
    else:
        from benchmarks.pruning_latency import make_question, wide_adapter

        if spec["scenario"] == "tiny-long":
            adapter = load_adapter(ModelConfig(path=spec["model_path"], device=device))
        else:  # 7b-1layer
            adapter = wide_adapter(1, torch.bfloat16, device)
        enc = make_question(adapter, spec["frames"], spec["tokens_per_frame"], spec["seed"])
    n, k = enc.num_video_tokens, max(1, round(spec["keep_fraction"] * enc.num_video_tokens))
    keep = torch.stack([torch.randperm(n, generator=gen)[:k].sort().values for _ in range(spec["G"])])
    return adapter, enc, keep.to(enc.inputs_embeds.device)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one setting; returns the numbers (printed as the last JSON line by ``--child``)."""
    setup_process(1)
    cuda = str(spec["device"]).startswith("cuda")
    adapter, enc, keep = _scenario(spec)
    with torch.inference_mode():
        adapter.generate(enc, keep[:1, :1], 2, combos_per_forward=1)  # prime kernels at negligible memory
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset = _reset_peak_rss()
        before = _status_bytes("VmRSS") if reset else _peak_rss_bytes()
    t0 = time.perf_counter()
    with torch.inference_mode():
        adapter.generate(enc, keep, spec["max_new_tokens"], combos_per_forward=spec["combos_per_forward"])
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss_bytes()
    seq = enc.seq_len - enc.num_video_tokens + int(keep.shape[1])
    return {
        "baseline_bytes": before,
        "peak_bytes": peak,
        "delta_bytes": peak - before,
        "seconds": time.perf_counter() - t0,
        "pruned_seq_len": seq,
        "estimate_bytes_per_combo": estimate_per_combo(adapter, seq, spec["max_new_tokens"]),
        "hidden_size": adapter.hidden_size,
        "layers": int(adapter.text_config.num_hidden_layers),
        "dtype": str(adapter.dtype).removeprefix("torch."),
    }


def estimate_per_combo(adapter: Any, seq_len: int, max_new_tokens: int) -> float:
    """Bytes per combination behind ``choose_chunk_size`` (read back from it with a huge budget)."""
    huge = 1 << 62
    return huge / adapter.choose_chunk_size(seq_len, huge, max_new_tokens)


def run_child(spec: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.actor_memory", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------------
# chunk sizes at the 7B width


class ConfigOnly:
    """Just what ``VideoLLMAdapter.choose_chunk_size`` reads (``text_config``, ``dtype``), without any weights.

    ``choose_chunk_size`` is called unbound on it, so the library's own estimate is what the table shows.
    """

    def __init__(self, text_config: Any, dtype: torch.dtype) -> None:
        self.text_config = text_config
        self.dtype = dtype
        self.hidden_size = int(text_config.hidden_size)

    def choose_chunk_size(self, seq_len: int, budget_bytes: int, max_new_tokens: int = 16) -> int:
        from cacovid_rl.models.base import VideoLLMAdapter

        return VideoLLMAdapter.choose_chunk_size(self, seq_len, budget_bytes, max_new_tokens)  # type: ignore[arg-type]


def config_7b() -> ConfigOnly:
    """LLaVA-OV-7B's language model (Qwen2-7B: 28 layers, 4 kv heads, head dim 128) in bf16, weights-free."""
    return ConfigOnly(qwen2_7b_config(), torch.bfloat16)


def chunk_table(tiny_adapter: Any, tiny_lengths: dict[str, int], max_new_tokens: int) -> dict[str, Any]:
    wide = config_7b()
    video = 32 * 196
    lengths_7b = {f"{p:.0%} video": TEXT_TOKENS_7B + 1 + round(p * video) for p in (0.02, 0.10, 0.25, 1.0)}
    out: dict[str, Any] = {}
    for name, adapter, lengths in (("tiny", tiny_adapter, tiny_lengths), ("7b", wide, lengths_7b)):
        rows = {}
        for label, seq in lengths.items():
            rows[label] = {
                "seq_len": seq,
                "estimate_bytes_per_combo": estimate_per_combo(adapter, seq, max_new_tokens),
                "chunk": {str(b): adapter.choose_chunk_size(seq, b * GIB, max_new_tokens) for b in BUDGETS_GIB},
            }
        out[name] = {
            "dtype": str(adapter.dtype).removeprefix("torch."),
            "layers": int(adapter.text_config.num_hidden_layers),
            "hidden_size": adapter.hidden_size,
            "max_new_tokens": max_new_tokens,
            "lengths": rows,
        }
    return out


# ----------------------------------------------------------------------------------------------------------------------
# main


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``delta = intercept + slope * c``."""
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    if len(set(x)) < 2:
        return float("nan"), float(y.mean())
    slope, intercept = np.polyfit(x, y, 1)
    return float(slope), float(intercept)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__ or "", "actor_memory.json")
    p.add_argument("--child", default="", help=argparse_hidden())
    p.add_argument("--scenarios", default="tiny-native,tiny-long,7b-1layer")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--parallel", type=int, default=2, help="measurement subprocesses run at once (CPU)")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    if args.plot_only:
        return replot(args, plot)
    setup_process(args.threads)
    started = time.perf_counter()
    model_path, source = resolve_model(args.model, args.seed)
    synthetic_data()  # generate once before the children need it
    scenarios: dict[str, dict[str, Any]] = {
        "tiny-native": {"G": 32, "keep_fraction": 0.0625, "cs": [1, 2, 4, 8, 16, 32], "frames": 8, "tpf": 16},
        "tiny-long": {"G": 32, "keep_fraction": 0.25, "cs": [1, 2, 4, 8, 16, 32], "frames": 32, "tpf": 196},
        "7b-1layer": {"G": 8, "keep_fraction": 0.02, "cs": [1, 4, 8], "frames": 32, "tpf": 196},
    }
    if args.quick:
        scenarios = {"tiny-native": {"G": 4, "keep_fraction": 0.0625, "cs": [1, 4], "frames": 8, "tpf": 16}}
    wanted = [s for s in args.scenarios.split(",") if s in scenarios] if not args.quick else list(scenarios)
    results: dict[str, Any] = {"scenarios": {}}
    for name in wanted:
        sc = scenarios[name]
        specs = [
            {
                "scenario": name,
                "model_path": model_path,
                "device": args.device,
                "G": sc["G"],
                "keep_fraction": sc["keep_fraction"],
                "combos_per_forward": c,
                "max_new_tokens": args.max_new_tokens,
                "frames": sc["frames"],
                "tokens_per_frame": sc["tpf"],
                "seed": args.seed,
            }
            for c in sc["cs"]
        ]
        # Each child measures its own process, so children may run side by side (not on cuda: one device).
        workers = 1 if args.device.startswith("cuda") else args.parallel
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            runs = list(pool.map(run_child, specs))
        points = []
        for c, r in zip(sc["cs"], runs, strict=True):
            r["combos_per_forward"] = c
            points.append((c, r["delta_bytes"]))
            print(f"[{name}] c={c}: peak +{fmt_bytes(r['delta_bytes'])} (rss {fmt_bytes(r['peak_bytes'])})", flush=True)
        slope, intercept = fit(points)
        est = runs[0]["estimate_bytes_per_combo"]
        results["scenarios"][name] = {
            "G": sc["G"],
            "pruned_seq_len": runs[0]["pruned_seq_len"],
            "hidden_size": runs[0]["hidden_size"],
            "layers": runs[0]["layers"],
            "dtype": runs[0]["dtype"],
            "runs": runs,
            "measured_bytes_per_combo": slope,
            "measured_fixed_bytes": intercept,
            "estimate_bytes_per_combo": est,
            "estimate_over_measured": est / slope if slope > 0 else None,
        }
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.models.loading import load_adapter

    tiny = load_adapter(ModelConfig(path=model_path))
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.video import read_frames

    data = synthetic_data()
    rec = load_records(data / "train.json", data).records[0]
    enc = tiny.encode(read_frames(rec.video, 8), build_prompt(rec.problem, rec.problem_type))
    text = enc.seq_len - enc.num_video_tokens  # chat template + question + image_newline
    tiny_lengths = {
        f"native full ({enc.num_frames}x{enc.tokens_per_frame} video)": enc.seq_len,
        "native 6.25% (training rate)": text + round(0.0625 * enc.num_video_tokens),
        "32x196 25%": text + 1568,
        "32x196 full": text + 6272,
    }
    results["chunk_sizes"] = chunk_table(tiny, tiny_lengths, 16)
    config = {
        "model": source,
        "model_path": model_path,
        "max_new_tokens": args.max_new_tokens,
        "budgets_gib": list(BUDGETS_GIB),
        "measure": "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (ru_maxrss) delta",
    }
    notes = [
        "Peak delta = peak after the scoring call minus peak before it (fresh process per setting); the gathered "
        "embeddings of all G combinations are built before chunking, so they are part of the fixed term.",
        "estimate_bytes_per_combo is what choose_chunk_size assumes (KV cache of all layers + one layer's prefill "
        "transients + the gathered embeddings).",
        "Chunk sizes: chunk_sizes.<width>.lengths.<sequence>.chunk.<budget GiB>; max_new_tokens 16.",
    ]
    return finish(args, "actor_memory", config=config, results=results, notes=notes, started=started, argv=argv,
                  report=report, plot=plot)  # fmt: skip


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def report(res: dict[str, Any]) -> None:
    for name, sc in res["scenarios"].items():
        rows = [
            [r["combos_per_forward"], fmt_bytes(r["delta_bytes"]), fmt_bytes(r["peak_bytes"]), f"{r['seconds']:.2f}"]
            for r in sc["runs"]
        ]
        ratio = sc["estimate_over_measured"]
        print_table(
            f"{name}: G={sc['G']}, pruned seq {sc['pruned_seq_len']}, d={sc['hidden_size']}, {sc['layers']} layer(s), "
            f"{sc['dtype']}; measured {fmt_bytes(sc['measured_bytes_per_combo'])}/combo vs estimate "
            f"{fmt_bytes(sc['estimate_bytes_per_combo'])} (x{ratio:.2f})"
            if ratio
            else f"{name}: G={sc['G']}",
            ["combos/forward", "peak delta", "peak RSS", "seconds"],
            rows,
        )
    for width, tab in res["chunk_sizes"].items():
        rows = [
            [label, v["seq_len"], fmt_bytes(v["estimate_bytes_per_combo"]), *v["chunk"].values()]
            for label, v in tab["lengths"].items()
        ]
        print_table(
            f"choose_chunk_size, {width} ({tab['layers']} layers, d={tab['hidden_size']}, {tab['dtype']})",
            ["sequence", "seq len", "est./combo", *(f"{b} GiB" for b in BUDGETS_GIB)],
            rows,
        )


SERIES = {
    "measured peak delta": "peak memory during the scoring call (adapter.generate of G combinations, c per "
    "forward) minus the memory before it: peak RSS on CPU, max_memory_allocated on cuda; one fresh process each",
    "fit fixed + estimate": "the measured fixed part + c x the per-combination bytes that choose_chunk_size "
    "estimates (what the actor sizes its chunks with)",
    "tiny-native / tiny-long": "the tiny model on a synthetic question (8 x 16 tokens, training rate) / on a "
    "32 x 196-token layout with 25% kept (a 7B-like sequence length)",
    "7b-1layer": "one Qwen2-7B-width decoder layer, bf16, 2% of 6,272 video tokens (per-layer transients only)",
}


def plot(res: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    names = list(res["scenarios"])
    fig, axes = new_figure(ncols=max(1, len(names)), width=4.6, height=4.0)
    for ax, name in zip(axes, names, strict=False):
        sc = res["scenarios"][name]
        cs = [r["combos_per_forward"] for r in sc["runs"]]
        ax.plot(cs, [r["delta_bytes"] / MIB for r in sc["runs"]], "o-", label="measured peak delta")
        fixed = sc["measured_fixed_bytes"]
        ax.plot(
            cs, [(fixed + c * sc["estimate_bytes_per_combo"]) / MIB for c in cs], "--", label="fit fixed + estimate"
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("combinations per forward")
        ax.set_ylabel("MiB")
        ax.set_title(f"{name} (seq {sc['pruned_seq_len']})", fontsize=10)
        ax.legend(fontsize=8, loc="upper left")  # memory grows with c: the top left is empty
    cfg = (payload or {}).get("config", {})
    annotate(
        fig,
        payload,
        "Reward-actor memory: peak of the scoring forward vs combinations per forward",
        f"{model_name(cfg)} (tiny-*); one Qwen2-7B-width decoder layer, bf16 (7b-1layer)",
        SERIES,
    )
    from benchmarks.common import save_figure

    save_figure(fig, path)


if __name__ == "__main__":
    main()
