"""Helpers shared by every benchmark: timing with medians and spread, machine facts, JSON results, tables, models.

Conventions (see ``benchmarks/README.md``):
- Every script takes ``--out PATH`` (JSON result), ``--quick`` (same code paths and JSON keys, tiny sizes, for the
  smoke test), ``--device`` and ``--model``, and prints a rich table.
- Machines here are noisy (2 cores shared with other agents): one torch thread per process, every measurement
  repeated, medians reported with the 10th/90th percentiles, and compared variants timed *interleaved* in one run
  (round-robin), so a burst of load from a neighbour hits all of them alike.
- A result JSON always holds ``benchmark``, ``command``, ``created``, ``quick``, ``machine``, ``config``,
  ``results`` (and ``notes``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CACHE_DIR = Path(os.environ.get("CACOVID_BENCH_CACHE", Path(tempfile.gettempdir()) / "cacovid_rl_bench"))
GIB = 1024**3
MIB = 1024**2

# The LLaVA-OneVision-7B language model (Qwen2-7B) sizes: the "7B width" of every benchmark.
QWEN2_7B: dict[str, Any] = {
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
}
VIDEO_7B = {"frames": 32, "tokens_per_frame": 196}  # 6,272 video tokens after 2x pooling at 384 px


# ----------------------------------------------------------------------------------------------------------------------
# process setup


def setup_process(threads: int = 1) -> None:
    """One torch thread (a 2-core shared machine: 2 threads per process were ~30x slower under load), quiet libs."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback only
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("WANDB_MODE", "disabled")
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable once per process
        torch.set_num_interop_threads(1)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The arguments every benchmark shares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS_DIR / default_out), help="result JSON path (a PNG goes next to it)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (smoke test): same JSON keys")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument(
        "--model",
        default="tiny",
        help="video-LLM checkpoint: 'tiny' (the shipped model; a saved tiny random one while it is missing) or a path",
    )
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (0: the script's default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument(
        "--plot-only",
        action="store_true",
        help="measure nothing: redraw the PNG from the existing result JSON at --out",
    )
    return p


def command_line(benchmark: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces this run, as typed from the repository root (``argv``: the script's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f"python -m benchmarks.{benchmark}", *(shlex.quote(a) for a in args)])


# ----------------------------------------------------------------------------------------------------------------------
# timing


@dataclass
class Stats:
    """Repeated timings of one thing (seconds): median, 10th/90th percentiles, min/max, all samples."""

    median: float
    p10: float
    p90: float
    min: float
    max: float
    n: int
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        xs = [float(x) for x in samples]
        if not xs:
            raise ValueError("no samples")
        q = np.percentile(xs, [10, 90]) if len(xs) > 1 else (xs[0], xs[0])
        return cls(statistics.median(xs), float(q[0]), float(q[1]), min(xs), max(xs), len(xs), xs)

    @property
    def spread(self) -> float:
        """Relative spread ``(p90 - p10) / median`` (0 for a single sample)."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}

    def ms(self) -> str:
        """``median ms [p10-p90]`` for tables."""
        return f"{self.median * 1e3:.3g} [{self.p10 * 1e3:.3g}-{self.p90 * 1e3:.3g}]"

    def s(self) -> str:
        return f"{self.median:.3g} [{self.p10:.3g}-{self.p90:.3g}]"


def sync_device(device: str | torch.device) -> None:
    """Wait for queued kernels (cuda) so that wall-clock times are real."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """``(seconds, result)`` of one call, synchronising the device before and after."""
    sync_device(device)
    t0 = time.perf_counter()
    out = fn()
    sync_device(device)
    return time.perf_counter() - t0, out


def measure(
    fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str | torch.device = "cpu"
) -> tuple[Stats, Any]:
    """``repeats`` timed calls after ``warmup`` untimed ones; returns the stats and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        dt, out = timed(fn, device)
        times.append(dt)
    return Stats.of(times), out


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: str | torch.device = "cpu"
) -> tuple[dict[str, Stats], dict[str, Any]]:
    """Time several variants side by side: round ``r`` runs every variant once, in an order rotated by ``r``.

    Interleaving makes the ratios robust to the machine's load changing during the run (a neighbour's
    burst slows every variant of that round, not one variant's whole series).
    """
    names = list(fns)
    last: dict[str, Any] = {}
    for _ in range(warmup):
        for name in names:
            last[name] = fns[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            dt, last[name] = timed(fns[name], device)
            times[name].append(dt)
    return {n: Stats.of(t) for n, t in times.items()}, last


def ratio_stats(numerator: Sequence[float], denominator: Sequence[float]) -> Stats:
    """Per-round ratios of two interleaved series (the noise of one round cancels in its ratio)."""
    return Stats.of([a / b for a, b in zip(numerator, denominator, strict=True)])


# ----------------------------------------------------------------------------------------------------------------------
# machine facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return float("nan")


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except ImportError:
        return "not installed"


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Cores, CPU model, memory, device, load, library versions: recorded in every result."""
    dev = str(device)
    gpu = None
    if dev.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(dev))
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1), "count": torch.cuda.device_count()}
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count() or 0
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "memory_gib": _mem_total_gib(),
        "device": dev,
        "gpu": gpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        "numpy": np.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------------
# results


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Stats):
        return obj.to_dict()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_result(
    out: str | Path,
    benchmark: str,
    *,
    quick: bool,
    machine: dict[str, Any],
    config: dict[str, Any],
    results: dict[str, Any],
    notes: Sequence[str] = (),
    started: float | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    """Write the result JSON (atomically) and return its path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": benchmark,
        "command": command_line(benchmark, argv),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "wall_s": round(time.perf_counter() - started, 1) if started is not None else None,
        "machine": machine,
        "config": config,
        "results": results,
        "notes": list(notes),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(str(c), justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(str(x) for x in r))
    Console(width=max(100, 20 * len(columns))).print(table)


def png_path(out: str | Path) -> Path:
    """The plot that goes next to a result JSON."""
    return Path(out).with_suffix(".png")


def finish(args, benchmark: str, *, config, results, notes, started, argv, report, plot) -> dict:
    """The common end of every benchmark: write the JSON, print the table, draw the PNG.

    The plot is drawn from the JSON just written (``load_result``), exactly as ``--plot-only`` redraws it later,
    so a figure never shows anything the committed JSON does not hold.
    """
    write_result(args.out, benchmark, quick=args.quick, machine=machine_info(args.device), config=config,
                 results=results, notes=notes, started=started, argv=argv)  # fmt: skip
    report(results)
    if not args.no_plot:
        payload = load_result(args.out)
        plot(payload["results"], str(png_path(args.out)), payload)
    print(f"wrote {args.out}")
    return results


def _revive(obj: Any) -> Any:
    """JSON back to what the plots read: every ``Stats.to_dict`` becomes a ``Stats`` again."""
    if isinstance(obj, dict):
        if set(obj) >= {"median", "p10", "p90", "min", "max", "n", "samples"}:
            return Stats(*(obj[k] for k in ("median", "p10", "p90", "min", "max", "n", "samples")))
        return {k: _revive(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_revive(v) for v in obj]
    return obj


def load_result(path: str | Path) -> dict[str, Any]:
    """A result JSON as the benchmark held it (``Stats`` objects included)."""
    return _revive(json.loads(Path(path).read_text()))


def replot(args: argparse.Namespace, plot: Callable[..., Any]) -> dict[str, Any]:
    """``--plot-only``: redraw the PNG beside ``args.out`` from the JSON there, without measuring anything."""
    path = Path(args.out)
    if not path.is_file():
        raise SystemExit(f"error: --plot-only needs an existing result JSON, and {path} does not exist")
    payload = load_result(path)
    plot(payload["results"], str(png_path(path)), payload)
    print(f"wrote {png_path(path)} from {path}")
    return payload["results"]


def describe_device(machine: dict[str, Any]) -> str:
    """Where a result was measured, in the words a figure needs: the accelerator or the CPU, and its load."""
    gpu = machine.get("gpu")
    if gpu:
        where = f"GPU {gpu['name']} ({gpu['memory_gib']} GiB)"
    else:
        threads = machine["torch_threads"]
        where = f"CPU only: {machine['cpu_model']}, {machine['cores']} cores, {threads} torch thread(s)"
    return f"{where}; load {machine.get('load_avg_1m_at_start', '?')} at start; torch {machine.get('torch', '?')}"


def annotate(fig: Any, payload: dict[str, Any] | None, title: str, model: str, series: dict[str, str]) -> None:
    """Title the figure with what it shows, the device and the model, and define every series under the axes.

    A figure is often seen without its README: the device and model are in the title, and each series name that
    appears in it (``reference``, ``prefill_floor`` ...) is defined in the caption below the panels.
    """
    import textwrap

    device = describe_device(payload["machine"]) if payload else "device not recorded"
    when = f"{payload['created'][:10]}{' (--quick)' if payload.get('quick') else ''}" if payload else ""
    fig.suptitle(f"{title}\nmodel: {model}\ndevice: {device}; {when}", fontsize=9)
    width = max(60, int(fig.get_figwidth() * 15))
    lines = [textwrap.fill(f"{name}: {text}", width, subsequent_indent="    ") for name, text in series.items()]
    fig.text(0.01, 0.0, "\n".join(lines), ha="left", va="top", fontsize=7.5, family="sans-serif")


def legend_below(ax: Any, ncol: int = 1, **kw: Any) -> Any:
    """A legend under the axes (below the x label), where it cannot cover the data."""
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=7.5, frameon=False, **kw)


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0) -> tuple[Any, Any]:
    """A matplotlib figure (Agg backend) with ``ncols`` axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay the panels out under the title and save; ``bbox_inches="tight"`` keeps the legends and caption that
    sit outside the axes (``legend_below``, ``annotate``) in the image."""
    import matplotlib.pyplot as plt

    fig.tight_layout()  # makes room for the suptitle too
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------------
# models and data


def fallback_tiny_model(seed: int = 0) -> Path:
    """A saved tiny *random* LLaVA-OV (the shipped model's shapes: 64 px frames, patch 8, hidden 128, 3 layers).

    Used only while the shipped trained model (``cacovid_rl/assets/tiny_vlm``) is missing. Its greedy answers are
    arbitrary and rarely stop early, which makes decoding-length effects larger than with a trained model.
    """
    from cacovid_rl.models.tiny import save_adapter, tiny_llava_onevision, tiny_vocabulary

    path = CACHE_DIR / f"tiny_random_llava_ov_s{seed}"
    if not (path / "config.json").is_file():
        adapter = tiny_llava_onevision(
            seed, words=tiny_vocabulary(), image_size=64, patch_size=8, vision_hidden=64, hidden_size=128, num_layers=3
        )
        save_adapter(adapter, path)
    return path


TINY_MODEL = "shipped tiny LLaVA-OneVision (SigLIP 1 layer + Qwen2 LM d=128, 3 layers, float32)"
"""How figures name the shipped tiny video LLM (``cacovid_rl/assets/tiny_vlm``)."""


def model_name(config: dict[str, Any], key: str = "model") -> str:
    """The video LLM a result used, from its ``config`` (``shipped``, a fallback random model, or a path)."""
    source = str(config.get(key, ""))
    if source == "shipped":
        return TINY_MODEL
    if source.startswith("fallback"):
        return "random tiny LLaVA-OneVision of the shipped shapes (the shipped model was missing)"
    return str(config.get("model_path") or source or "not recorded")


def resolve_model(model: str, seed: int = 0) -> tuple[str, str]:
    """``(path for model.path, source)``: the shipped tiny model, a fallback random one, or the given path."""
    if model != "tiny":
        return model, "given"
    from cacovid_rl.models.loading import TINY_ASSET

    if (TINY_ASSET / "config.json").is_file():
        return "tiny", "shipped"
    return str(fallback_tiny_model(seed)), "fallback-random (shipped tiny model missing)"


def synthetic_data(n: int = 40, seed: int = 7) -> Path:
    """The synthetic needle video-QA set (``make_synthetic``), generated once into the cache."""
    from cacovid_rl.data.synthetic import make_synthetic

    path = CACHE_DIR / f"synthetic_n{n}_s{seed}"
    if not (path / "synthetic.json").is_file():
        make_synthetic(path, n=n, seed=seed)
    return path


def qwen2_7b_config(num_layers: int = QWEN2_7B["num_hidden_layers"], vocab_size: int = 1024, attn: str = "sdpa"):
    """A ``Qwen2Config`` of the Qwen2-7B width (LLaVA-OV-7B's LLM) with ``num_layers`` layers and a small vocabulary."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        **{**QWEN2_7B, "num_hidden_layers": num_layers},
        vocab_size=vocab_size,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn
    return cfg


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (a 7B-width layer in bf16 never exists in float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def parse_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[name]


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def local_ray(num_cpus: int, object_store_mb: int) -> Iterator[Any]:
    """A loopback-only local Ray instance (no dashboard), always shut down."""
    import logging

    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(
        address="local",  # a NEW instance: never attach to another session's cluster on this machine
        num_cpus=num_cpus,
        object_store_memory=object_store_mb * MIB,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
