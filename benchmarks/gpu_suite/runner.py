"""The suite's command line, its run loop and its outputs (JSON after every section, Markdown table, PNG).

Built for a short lease on a GPU: the JSON (and the Markdown table) is rewritten after every section, so a run
that is killed keeps everything finished before; a section that raises is recorded with its error and the run
goes on with the next one (the exit status is then 1); every section prints its own time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, machine_info, new_figure, png_path, save_figure, setup_process, write_result
from benchmarks.gpu_suite.models import MODEL_NAMES, ModelCache, device_peak
from benchmarks.gpu_suite.sections import SECTIONS, Ctx

BENCHMARK = "gpu_suite"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda[:i] (the real run) or cpu (with --quick: CI)")
    p.add_argument("--out", default=str(RESULTS_DIR / "gpu_suite.json"), help="result JSON (.md and .png beside)")
    p.add_argument("--quick", action="store_true", help="tiny widths, few frames and repeats: same code paths")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of a-h (default: all, in order)")
    p.add_argument("--model", default="random", help="'random' (7B configs in benchmarks/model_configs) or a path")
    p.add_argument("--dtype", default="", help="bfloat16 (cuda default) or float32 (cpu default)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (0: each section's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--fail-section", default="", help=argparse.SUPPRESS)  # test hook: this section raises
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --device cpu --quick on a CPU)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    setup_process(args.threads)
    started = time.perf_counter()
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "": None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    cache = ModelCache(args.device, dtype, args.quick, args.model, args.seed)
    ctx = Ctx(args.device, dtype, args.quick, args.seed, args.repeats, cache)
    results: dict[str, Any] = {"sections": {}, "device_peak": device_peak(args.device), "models": cache.log}
    config = {
        "sections": args.sections,
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "seed": args.seed,
        "repeats": args.repeats or "section defaults",
    }
    machine = machine_info(args.device)
    failed = []
    try:
        for key in args.sections:
            title, fn = SECTIONS[key]
            print(f"[gpu_suite] section {key}: {title} ...", flush=True)
            t0 = time.perf_counter()
            try:
                if key == args.fail_section:
                    raise RuntimeError(f"--fail-section {key}: raised on purpose (test hook)")
                if args.fail_section == key + "!":  # a run cut short (lease over, Ctrl-C): nothing after it is written
                    raise KeyboardInterrupt(f"--fail-section {key}!: interrupted on purpose (test hook)")
                res = fn(ctx)
                res.update(status="ok", title=title)
            except Exception as exc:  # keep going: a short lease should not lose the sections after a failure
                traceback.print_exc()
                res = {"status": "error", "title": title, "error": f"{type(exc).__name__}: {exc}", "comparisons": []}
                failed.append(key)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            results["sections"][key] = res
            ctx.results[key] = res
            save(args, results, config, machine, started, argv)
            print(
                f"[gpu_suite] section {key} {res['status']} in {res['seconds']:.1f} s "
                f"(total {time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    finally:  # models freed and Ray stopped even when a run is interrupted
        cache.release()
        ctx.close()
    print(markdown(results, machine, args))
    if not args.no_plot:
        plot(results, machine, args, png_path(args.out))
    written = [args.out, str(Path(args.out).with_suffix(".md")), *([] if args.no_plot else [str(png_path(args.out))])]
    print("wrote " + ", ".join(written))
    if failed:
        print(f"[gpu_suite] FAILED sections: {failed}", file=sys.stderr)
    results["failed"] = failed
    return results


def save(
    args: argparse.Namespace,
    results: dict[str, Any],
    config: dict[str, Any],
    machine: dict[str, Any],
    started: float,
    argv: list[str] | None,
) -> None:
    """JSON (atomic) + Markdown after every section: what a killed run leaves behind."""
    notes = [
        "Random-weight models built from benchmarks/model_configs/*.json (bf16 on cuda) unless --model is a path.",
        "Each section: status, seconds, comparisons (two sides each, see benchmarks/README.md 'GPU suite').",
    ]
    write_result(
        args.out,
        BENCHMARK,
        quick=args.quick,
        machine=machine,
        config=config,
        results=results,
        notes=notes,
        started=started,
        argv=argv,
    )
    Path(args.out).with_suffix(".md").write_text(markdown(results, machine, args) + "\n")


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:,.4g}" if isinstance(x, float) else str(x)


def _models_line(results: dict[str, Any], args: argparse.Namespace) -> str:
    models = results.get("models") or {}
    if not models:
        return "model: none built"
    return "; ".join(
        f"{m['name']} ({m['source']}, {m['dtype']}, {m['params'] / 1e6:,.1f}M params)" for m in models.values()
    )


def markdown(results: dict[str, Any], machine: dict[str, Any], args: argparse.Namespace) -> str:
    """One table: every comparison of every section, both sides, with the section's time."""
    dev = (machine.get("gpu") or {}).get("name") or f"CPU ({machine['cpu_model']}, {machine['cores']} cores)"
    lines = [
        f"### GPU suite: {dev}{' (--quick, tiny widths)' if args.quick else ''}",
        "",
        f"`python -m benchmarks.gpu_suite --device {args.device}{' --quick' if args.quick else ''}` — "
        + _models_line(results, args),
        "",
        "| section | comparison | A | value A | B | value B | B / A | unit | section s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, res in results["sections"].items():
        if res["status"] != "ok":
            error = res.get("error", "")[:120].replace("|", "/")
            lines.append(f"| {key} | **{res['status']}**: {error} | | | | | | | {res['seconds']} |")
            continue
        for c in res["comparisons"]:
            ratio = c["b_value"] / c["a_value"] if c["a_value"] else None
            lines.append(
                f"| {key} | {c['what']} | {c['a']} | {_fmt(c['a_value'])} | {c['b']} | {_fmt(c['b_value'])} "
                f"| {_fmt(ratio)} | {c['unit']} | {res['seconds']} |"
            )
    peak = results.get("device_peak", {})
    lines += [
        "",
        f"bf16 peak used for the physical limit: {peak.get('matched') or 'n/a (CPU or unknown device)'}"
        + (f" = {peak['bf16_tflops']} TFLOP/s" if peak.get("bf16_tflops") else ""),
    ]
    return "\n".join(lines)


def plot(results: dict[str, Any], machine: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """One panel per section: its comparisons as paired bars (A red, B grey), values on a log axis."""
    secs = [(k, r) for k, r in results["sections"].items() if r["status"] == "ok" and r["comparisons"]]
    if not secs:
        return
    fig, axes = new_figure(ncols=min(4, len(secs)), width=5.0, height=3.6)
    if len(secs) > 4:
        import matplotlib.pyplot as plt

        plt.close(fig)
        fig, grid = plt.subplots(2, 4, figsize=(20, 7.5), squeeze=False)
        axes = list(grid.flatten())
    for ax, (key, res) in zip(axes, secs, strict=False):
        comps = res["comparisons"]
        ys = range(len(comps))
        a = [max(abs(c["a_value"]), 1e-12) for c in comps]
        b = [max(abs(c["b_value"]), 1e-12) for c in comps]
        ax.barh([y - 0.2 for y in ys], a, height=0.4, color="tab:red", label="A (this library / measured)")
        ax.barh([y + 0.2 for y in ys], b, height=0.4, color="tab:grey", label="B (reference / peer / limit)")
        ax.set_yticks(list(ys))
        ax.set_yticklabels([f"{c['a']} vs {c['b']}\n({c['unit']})"[:60] for c in comps], fontsize=6)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title(f"({key}) {res['title']}"[:70], fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes[len(secs) :]:
        ax.axis("off")
    dev = (machine.get("gpu") or {}).get("name") or "CPU"
    models = ", ".join(MODEL_NAMES.get(f, f) for f in (results.get("models") or {})) or "no model"
    fig.suptitle(
        f"GPU suite on {dev}{' (--quick: tiny widths)' if args.quick else ''}; models: {models} "
        f"({'random weights' if args.model == 'random' else args.model}). A = the first side of each "
        "comparison (this library's path / measured), B = the other (reference trainer, naive, baseline, "
        "paper, physical limit, estimate)",
        fontsize=8,
    )
    save_figure(fig, path)
