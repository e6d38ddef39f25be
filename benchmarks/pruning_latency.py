"""Pruning latency: CaCoVID policy scoring + evaluation-time selection vs the training-free baselines, and prefill.

What is measured (issue 3, issue 7 #2), for one question of 32 frames x 196 tokens (6,272 video tokens, about
6,300 LLM-input tokens with the chat template and question), at two LLM widths:

- ``tiny``: the tiny video LLM's language model (hidden 128, 3 layers; the shipped model, or a random one of the
  same shapes while it is missing), float32;
- ``7b``: a random-weight Qwen2-7B-width language model (hidden 3584, 28 heads, 4 kv heads, intermediate 18944)
  with only the first 3 decoder layers (FastV needs layers 0-2), bf16 on CPU and on cuda. The policy is
  ``CacovidPolicy.from_blueprint`` of its layer 0 + rotary (about 250M parameters).

The LLM-input embeddings are random (text tokens from the model's embedding table, video tokens N(0, 0.5^2)):
latency does not depend on the values, and no 7B checkpoint is available here.

Per method, the wall time of one ``select`` call at a retention ratio (the pruning decision only):
``cacovid`` = policy forward + ``select_tokens`` (also reported separately), ``fastv`` = layers 0-1 over the
whole sequence + layer 2's attention of the last token (``adapter.early_layer_attention``), ``visionzip`` /
``divprune`` on the video features, ``uniform`` / ``random`` (index arithmetic). All methods are timed
interleaved (round-robin) in one run.

Prefill: ``adapter.generate(enc, keep, max_new_tokens=1)`` (gather + LLM prefill + first token) with all video
tokens vs the tokens CaCoVID keeps at 25% and 10%. Tiny: the whole 3-layer LM. 7b: ONE decoder layer of the
7B-width LM (a CPU-time proxy; a 28-layer 7B prefill is about 28x that, reported as an extrapolation).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    VIDEO_7B,
    Stats,
    annotate,
    base_parser,
    default_dtype,
    load_result,
    machine_info,
    measure_interleaved,
    model_name,
    new_figure,
    param_count,
    parse_dtype,
    png_path,
    print_table,
    qwen2_7b_config,
    replot,
    resolve_model,
    save_figure,
    setup_process,
    write_result,
)
from cacovid_rl.baselines import METHODS, SelectionContext, compress, get_selector
from cacovid_rl.config import ModelConfig
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.models.base import VideoLLMAdapter
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.types import EncodedQuestion

BASELINES = tuple(m for m in METHODS if m != "cacovid")
"""Every training-free method; the merging ones (PruneVid, FrameFusion, FlashVID, FastVID) are timed through
``baselines.compress`` (their whole compressed block), the selecting ones through ``select``."""
QUESTION = "What colour are the dots in the pink box ?\nA. red\nB. green\nC. blue\nD. yellow"
PAPER = {
    "source": "CaCoVID paper (arXiv 2602.01649), LLaVA-OV-7B on GPU",
    "pruning_ms": {"cacovid": 11.2, "prunevid": 34.1, "divprune": 134.3},
    "prefill_ms": {"full": 200.4, "0.25": 53.2},
}


def tiny_width_adapter(model: str, device: str, seed: int) -> tuple[LlavaOnevisionAdapter, str]:
    path, source = resolve_model(model, seed)
    adapter = load_adapter(ModelConfig(path=path, device=device))
    if not isinstance(adapter, LlavaOnevisionAdapter):
        raise SystemExit(f"pruning_latency needs a LLaVA-OneVision checkpoint, got {type(adapter).__name__}")
    return adapter, source


def wide_adapter(num_layers: int, dtype: torch.dtype, device: str) -> LlavaOnevisionAdapter:
    """A random LLaVA-OV whose LLM has the Qwen2-7B width and ``num_layers`` layers (tiny vision tower, vocabulary)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    from cacovid_rl.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("llava_onevision")
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=48, patch_size=8
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=qwen2_7b_config(num_layers, vocab_size=len(tok)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[48, 48]],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with default_dtype(dtype):
        model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return LlavaOnevisionAdapter(model.to(device).eval(), tok)


def make_question(adapter: LlavaOnevisionAdapter, frames: int, tokens_per_frame: int, seed: int) -> EncodedQuestion:
    """The LLM input of one question with a ``frames x tokens_per_frame`` video (+ image_newline), random features."""
    ids = adapter.tokenize(adapter.render_prompt(build_prompt(QUESTION, "multiple choice"), with_video=True))
    n_video = frames * tokens_per_frame
    ids, start = adapter.expand_placeholder(ids, adapter.video_token_id, n_video + 1)
    ids = ids.to(adapter.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds = adapter.model.get_input_embeddings()(ids).clone()
        feats = 0.5 * torch.randn(n_video + 1, adapter.hidden_size, generator=gen)
        embeds[start : start + n_video + 1] = feats.to(embeds.device, embeds.dtype)
    return EncodedQuestion(
        inputs_embeds=embeds,
        position_ids=adapter.text_positions(ids.numel()).to(adapter.device),
        video_start=start,
        num_frames=frames,
        tokens_per_frame=tokens_per_frame,
        input_ids=ids,
    )


@contextlib.contextmanager
def first_layers(adapter: VideoLLMAdapter, n: int) -> Iterator[None]:
    """Temporarily run only the first ``n`` decoder layers of the adapter's LLM (the per-layer prefill proxy)."""
    lm = adapter.language_model
    full = lm.layers
    lm.layers = nn.ModuleList(list(full)[:n])
    try:
        yield
    finally:
        lm.layers = full


def bench_width(
    name: str,
    adapter: LlavaOnevisionAdapter,
    retentions: list[float],
    prefill_retentions: list[float],
    frames: int,
    tokens_per_frame: int,
    repeats: int,
    prefill_layers: int,
    fastv_layer: int,
    device: str,
    seed: int,
) -> dict[str, Any]:
    """All latencies of one width: per-method selection at each retention, then prefill full vs pruned."""
    torch.manual_seed(seed)
    policy = CacovidPolicy.from_adapter(adapter).eval()
    enc = make_question(adapter, frames, tokens_per_frame, seed)
    warm = make_question(adapter, 1, tokens_per_frame, seed)  # primes kernels cheaply (a 7B-width call is seconds)
    selectors = {n: get_selector(n, layer=fastv_layer) if n == "fastv" else get_selector(n) for n in BASELINES}
    cacovid = get_selector("cacovid")
    ctx = SelectionContext(enc=enc, adapter=adapter, generator=torch.Generator().manual_seed(seed))

    with torch.inference_mode():
        scores = policy.score(enc)
        for sel in selectors.values():  # warm-up on the one-frame question
            compress(sel, SelectionContext(enc=warm, adapter=adapter), 0.25)
        policy.score(warm)

        latency: dict[str, dict[str, Stats]] = {}
        for r in retentions:

            def run_cacovid(r: float = r) -> torch.Tensor:
                return cacovid.select(SelectionContext(enc=enc, scores=policy.score(enc)), r)

            fns = {
                "cacovid": run_cacovid,
                "cacovid_policy_forward": lambda: policy.score(enc),
                "cacovid_selection": lambda r=r: cacovid.select(SelectionContext(enc=enc, scores=scores), r),
                **{
                    n: (lambda s=s, r=r: s.select(ctx, r) if hasattr(s, "select") else s.compress(ctx, r))
                    for n, s in selectors.items()
                },
            }
            print(f"[{name}] selection at retention {r}: {len(fns)} variants x {repeats} repeats", flush=True)
            stats, _ = measure_interleaved(fns, repeats, warmup=0, device=device)
            latency[str(r)] = stats

        keeps = {str(r): cacovid.select(SelectionContext(enc=enc, scores=scores), r) for r in prefill_retentions}
        layers_total = len(adapter.language_model.layers)
        with first_layers(adapter, prefill_layers):
            fns = {"full": lambda: adapter.generate(enc, None, 1)}
            fns.update({r: (lambda k=k: adapter.generate(enc, k[None], 1)) for r, k in keeps.items()})
            adapter.generate(warm, None, 1)
            print(f"[{name}] prefill ({prefill_layers} layer(s)): {list(fns)} x {repeats} repeats", flush=True)
            prefill, _ = measure_interleaved(fns, repeats, warmup=0, device=device)
    seq = {"full": enc.seq_len, **{r: enc.seq_len - enc.num_video_tokens + int(k.numel()) for r, k in keeps.items()}}
    out: dict[str, Any] = {
        "hidden_size": adapter.hidden_size,
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "llm_layers_built": layers_total,
        "policy_params": param_count(policy),
        "policy_dtype": str(policy.dtype).removeprefix("torch."),
        "frames": frames,
        "tokens_per_frame": tokens_per_frame,
        "video_tokens": enc.num_video_tokens,
        "seq_len": enc.seq_len,
        "fastv_layer": fastv_layer,
        "latency": latency,
        "prefill": {
            "layers_run": prefill_layers,
            "seq_len": seq,
            "time": prefill,
            "speedup_vs_full": {r: prefill["full"].median / prefill[r].median for r in keeps},
        },
    }
    if name == "7b":
        # Whole-model estimate: 28 x the one-layer prefill, plus CaCoVID's own pruning cost for the pruned runs.
        full28 = 28 * prefill["full"].median
        est = {"full": full28}
        for r in keeps:
            est[r] = 28 * prefill[r].median + latency.get(r, latency[str(retentions[-1])])["cacovid"].median
        out["prefill"]["extrapolated_28_layers_s"] = est
        out["prefill"]["extrapolated_speedup_incl_pruning"] = {r: full28 / est[r] for r in keeps}
    return out


SERIES = {
    "cacovid": "CaCoVID's pruning decision: the policy forward + select_tokens (its two parts below)",
    "cacovid_policy_forward / cacovid_selection": "the policy network's forward alone / the evaluation-time "
    "selection (select_tokens) alone",
    "uniform / random": "evenly spaced / random video tokens (index arithmetic)",
    "fastv": "LLM layers 0-1 over the whole sequence + layer 2's attention of the last token",
    "visionzip / divprune": "on the video features: dominant + merged contextual tokens / max-min diversity",
    "prefill (right)": "adapter.generate(max_new_tokens=1): gather + LLM prefill + first token, with the tokens "
    "CaCoVID keeps, relative to all video tokens; 'proportional' = time in proportion to the tokens kept",
}


def plot(results: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    widths = list(results["widths"])
    fig, axes = new_figure(ncols=len(widths) + 1, width=5.2, height=4.2)
    ours = ["cacovid", "cacovid_policy_forward", "cacovid_selection"]
    for ax, w in zip(axes, widths, strict=False):
        lat = results["widths"][w]["latency"]
        r = max(lat, key=float)
        # Results measured before a method existed have no entry for it: plot what was measured.
        methods = [m for m in [*ours, *BASELINES] if m in lat[r]]
        med = [lat[r][m].median * 1e3 for m in methods]
        lo = [lat[r][m].median * 1e3 - lat[r][m].p10 * 1e3 for m in methods]
        hi = [lat[r][m].p90 * 1e3 - lat[r][m].median * 1e3 for m in methods]
        colours = ["tab:red" if m == "cacovid" else "salmon" if m in ours else "tab:grey" for m in methods]
        ax.barh(methods, med, xerr=[lo, hi], color=colours)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ms per question (median, p10-p90), log scale")
        info = results["widths"][w]
        ax.set_title(f"{w} width (d={info['hidden_size']}, {info['dtype']}): select {float(r):.0%}")
    ax = axes[-1]
    for w in widths:
        pre = results["widths"][w]["prefill"]
        keys = ["full", *sorted((k for k in pre["time"] if k != "full"), key=float, reverse=True)]
        xs = [1.0 if k == "full" else float(k) for k in keys]
        ys = [pre["time"][k].median / pre["time"]["full"].median for k in keys]
        ax.plot(xs, ys, marker="o", label=f"{w} ({pre['layers_run']} layer(s))")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="proportional")
    ax.set_xlabel("video tokens kept")
    ax.set_ylabel("prefill time / full-token prefill")
    ax.set_title("prefill vs retention")
    ax.legend(fontsize=8, loc="upper left")  # the curves run from bottom left to top right
    cfg = (payload or {}).get("config", {})
    frames, per_frame = cfg.get("frames", "?"), cfg.get("tokens_per_frame", "?")
    seven_b = f"random-weight Qwen2-7B-width LM (d=3584, first 3 layers, {cfg.get('wide_dtype', 'bfloat16')})"
    annotate(
        fig,
        payload,
        f"Pruning latency per question ({frames} frames x {per_frame} video tokens) and prefill vs retention",
        f"tiny: {model_name(cfg, 'tiny_model')} LM; 7b: {seven_b}; random LLM-input embeddings",
        SERIES,
    )
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__ or "", "pruning_latency.json")
    p.add_argument("--widths", default="tiny,7b", help="comma list of tiny,7b")
    p.add_argument("--wide-dtype", default="", help="dtype of the 7B-width model (default bf16; float32 is ~5x slower)")
    p.add_argument("--frames", type=int, default=VIDEO_7B["frames"])
    p.add_argument("--tokens-per-frame", type=int, default=VIDEO_7B["tokens_per_frame"])
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args, plot)
    setup_process(args.threads)
    started = time.perf_counter()
    widths = [w.strip() for w in args.widths.split(",") if w.strip()]
    frames = 1 if args.quick else args.frames
    wide_dtype = parse_dtype(args.wide_dtype or "bfloat16")
    results: dict[str, Any] = {"widths": {}, "paper_reference": PAPER}
    config: dict[str, Any] = {
        "frames": frames,
        "tokens_per_frame": args.tokens_per_frame,
        "wide_dtype": str(wide_dtype).removeprefix("torch."),
        "seed": args.seed,
    }
    model_source = ""
    for w in widths:
        if w == "tiny":
            adapter, model_source = tiny_width_adapter(args.model, args.device, args.seed)
            fastv_layer, prefill_layers = 2, len(adapter.language_model.layers)
            repeats, retentions = args.repeats or (2 if args.quick else 9), [0.1, 0.25]
        elif w == "7b":
            t0 = time.perf_counter()
            layers = 1 if args.quick else 3  # FastV ranks at layer 2 (layer 0 in --quick, to build one layer)
            adapter = wide_adapter(layers, wide_dtype, args.device)
            print(f"[7b] built a {layers}-layer 7B-width LLM in {time.perf_counter() - t0:.1f}s", flush=True)
            fastv_layer, prefill_layers = layers - 1, 1
            repeats, retentions = args.repeats or (1 if args.quick else 4), [0.25]
        else:
            raise SystemExit(f"unknown width {w!r} (tiny, 7b)")
        res = bench_width(
            w,
            adapter,
            retentions,
            [0.25, 0.1],
            frames,
            args.tokens_per_frame,
            repeats,
            prefill_layers,
            fastv_layer,
            args.device,
            args.seed,
        )
        res["repeats"] = repeats
        results["widths"][w] = res
        del adapter
    config["tiny_model"] = model_source
    results["summary"] = summary(results)
    notes = [
        "Latency of one select() call per question; the LLM-input embeddings are random (values do not change "
        "the work done). Medians over interleaved repeats, [p10-p90] in the tables.",
        f"7b width: random Qwen2-7B-width layers in {config['wide_dtype']} "
        f"({'bf16 uses AMX on this CPU, float32 was ~5x slower' if wide_dtype == torch.bfloat16 else 'float32'}); "
        "FastV at 7b width runs layers 0-1 of a 3-layer LM plus layer 2's last-token attention.",
        "Prefill at 7b width is ONE decoder layer (CPU proxy); extrapolated_28_layers_s multiplies it by 28 and "
        "adds CaCoVID's pruning cost to the pruned runs.",
    ]
    write_result(
        args.out,
        "pruning_latency",
        quick=args.quick,
        machine=machine_info(args.device),
        config=config,
        results=results,
        notes=notes,
        started=started,
        argv=argv,
    )
    report(results)
    if not args.no_plot:
        payload = load_result(args.out)
        plot(payload["results"], str(png_path(args.out)), payload)
    print(f"wrote {args.out}")
    return results


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios: each baseline's latency / CaCoVID's, and prefill speedups."""
    out: dict[str, Any] = {}
    for w, res in results["widths"].items():
        lat = res["latency"]
        r = max(lat, key=float)
        base = lat[r]["cacovid"].median
        out[w] = {
            "retention": float(r),
            "cacovid_ms": base * 1e3,
            "baseline_over_cacovid": {b: lat[r][b].median / base for b in BASELINES},
            "prefill_speedup": res["prefill"]["speedup_vs_full"],
        }
    return out


def report(results: dict[str, Any]) -> None:
    methods = ["cacovid", "cacovid_policy_forward", "cacovid_selection", *BASELINES]
    for w, res in results["widths"].items():
        lat = res["latency"]
        rets = sorted(lat, key=float)
        rows = [[m, *(lat[r][m].ms() for r in rets)] for m in methods]
        title = (
            "Pruning latency, "
            f"{w} width (d={res['hidden_size']}, {res['dtype']}, policy {res['policy_params'] / 1e6:.1f}M params), "
            f"{res['frames']}x{res['tokens_per_frame']} video tokens, seq {res['seq_len']}: ms [p10-p90]"
        )
        print_table(title, ["method", *(f"retention {float(r):.0%}" for r in rets)], rows)
        pre = res["prefill"]
        rows = []
        for k, st in pre["time"].items():
            row = [
                k if k == "full" else f"{float(k):.0%}",
                pre["seq_len"][k],
                st.ms(),
                f"{pre['time']['full'].median / st.median:.2f}x",
            ]
            if "extrapolated_28_layers_s" in pre:
                row.append(f"{pre['extrapolated_28_layers_s'][k]:.1f}")
            rows.append(row)
        cols = ["tokens", "seq len", f"prefill ms ({pre['layers_run']} layer(s))", "speedup"]
        if "extrapolated_28_layers_s" in pre:
            cols.append("28-layer est. s (+pruning)")
        print_table(f"Prefill, {w} width", cols, rows)


if __name__ == "__main__":
    main()
