"""Sections on the video LLM itself: (a) attention kernels, (b) reward path, (c) pruning latency, (d) prefill,
(g) memory. Each returns ``comparisons`` (both sides) and its details; see ``sections.py``."""

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    GIB,
    Stats,
    measure_interleaved,
    param_count,
    sync_device,
    synthetic_data,
)
from benchmarks.gpu_suite.context import PAPER, Ctx, _logits, comparison, flash_attn_status, set_attention
from benchmarks.gpu_suite.models import device_peak, make_question, random_keeps
from cacovid_rl.policy.selection import budget

# ----------------------------------------------------------------------------------------------------------------------
# (a) attention kernels on gapped, pruned inputs; batched answers vs Hugging Face generate


@torch.no_grad()
def section_a(ctx: Ctx) -> dict[str, Any]:
    from cacovid_rl.rl.rewards import batch_rewards

    fa = flash_attn_status()
    use_fa = fa == "installed" and ctx.cuda
    out: dict[str, Any] = {"flash_attn": fa, "models": {}, "comparisons": []}
    for fam in ctx.cache.families(("llava_onevision", "qwen2_5_vl")):
        built = ctx.cache.model(fam)
        adapter = built.adapter
        t, n = built.layout
        enc = make_question(adapter, t, n, ctx.seed)
        g = 3 if ctx.quick else 4
        keep = random_keeps(t * n, budget(0.25, t * n), g, ctx.seed, adapter.device)
        embeds, positions = adapter.gather(enc, keep)
        impls = ["eager", "sdpa", *(["flash_attention_2"] if use_fa else [])]
        logits: dict[str, torch.Tensor] = {}
        try:
            for impl in impls:
                set_attention(adapter.model, impl)
                logits[impl] = _logits(adapter, embeds, positions)
        finally:
            set_attention(adapter.model, "sdpa")
        scale = float(logits["eager"].abs().max())
        pairs = [("sdpa", "eager")]
        if use_fa:
            pairs += [("flash_attention_2", "sdpa"), ("flash_attention_2", "eager")]
        diffs = {
            f"{x}_vs_{y}": {
                "max_abs_diff": float((logits[x] - logits[y]).abs().max()),
                "argmax_agreement": float((logits[x].argmax(-1) == logits[y].argmax(-1)).float().mean()),
            }
            for x, y in pairs
        }
        # Batched pruned answers (the reward actor's adapter.generate) vs one HF generate on the same G sequences.
        max_new = 4 if ctx.quick else 8
        ours = adapter.generate(enc, keep, max_new)
        stop = list(adapter.stop_token_ids)
        pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else stop[0]
        hf_ids = adapter.model.generate(
            inputs_embeds=embeds,
            position_ids=positions,
            max_new_tokens=max_new,
            do_sample=False,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            eos_token_id=stop,
            pad_token_id=pad,
            temperature=None,
            top_p=None,
            top_k=None,
        )
        if fam == "qwen2_5_vl":
            adapter.model.model.rope_deltas = None
        hf = adapter.tokenizer.batch_decode(hf_ids, skip_special_tokens=True)
        # Ground truth: the first letter of the batched path's first answer, so that rewards are not all 0.
        first = next((s.strip()[:1] for s in ours if s.strip()), "A")
        r_ours, r_hf = batch_rewards(ours, first, "multiple choice"), batch_rewards(hf, first, "multiple choice")
        out["models"][fam] = {
            "model": built.describe(),
            "combinations": g,
            "kept_tokens": int(keep.shape[1]),
            "pruned_seq_len": int(embeds.shape[1]),
            "gapped_positions": True,
            "impls": impls,
            "logit_scale_max_abs": scale,
            "logit_diffs": diffs,
            "generate": {
                "max_new_tokens": max_new,
                "ours": ours,
                "hf": hf,
                "text_agreement": float(np.mean([a == b for a, b in zip(ours, hf, strict=True)])),
                "reward_agreement": float(np.mean(r_ours == r_hf)),
                "ground_truth": first,
            },
        }
        main = "flash_attention_2_vs_sdpa" if use_fa else "sdpa_vs_eager"
        x, y = main.split("_vs_")
        out["comparisons"].append(
            comparison(
                f"{built.name}: max abs logit difference {x} vs {y}, against the largest abs logit",
                f"{x} - {y}",
                diffs[main]["max_abs_diff"],
                "max abs logit",
                scale,
                "abs",
            )
        )
        out["comparisons"].append(
            comparison(
                f"{built.name}: identical rewards, batched generate vs HF generate",
                "adapter.generate",
                float(np.mean(r_ours == r_hf)),
                "HF generate",
                1.0,
                "fraction",
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# (b) reward path: the actor's vs the reference trainer's vs naive


def _questions(adapter: Any, policy: Any, frames: int, rate: float, group: tuple[int, int, int], n: int, seed: int):
    from benchmarks.reward_throughput import Question
    from cacovid_rl.config import SamplingConfig
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.policy.sampling import sample_combinations
    from cacovid_rl.types import PolicyScores

    data = synthetic_data()
    sampling = SamplingConfig(num_content=group[0], num_token=group[1], num_frame=group[2], rate=rate)
    out = []
    for i, rec in enumerate(load_records(data / "train.json", data).records[:n]):
        raw = read_frames(rec.video, 8, 1.0)  # the synthetic videos hold 8 frames; repeat them to the layout
        video = raw[np.linspace(0, len(raw) - 1, frames).round().astype(int)]
        prompt = build_prompt(rec.problem, rec.problem_type)
        enc = adapter.encode(video, prompt)
        scores = policy.score(enc)
        scores = PolicyScores(token=scores.token.float().cpu(), frame=scores.frame.float().cpu())
        combos = sample_combinations(
            scores, enc.video_features().float().cpu(), rate, sampling, torch.Generator().manual_seed(seed + i)
        )
        out.append(Question(rec, prompt, video, combos.keep.to(adapter.device)))
    return out


@torch.no_grad()
def section_b(ctx: Ctx) -> dict[str, Any]:
    from dataclasses import replace

    from benchmarks.reward_throughput import Paths, agreement
    from cacovid_rl.policy.network import CacovidPolicy

    fam = ctx.cache.families(("llava_onevision",))[0]
    built = ctx.cache.model(fam)
    adapter = built.adapter
    policy = CacovidPolicy.from_adapter(adapter).eval()
    frames = built.layout[0] if fam == "llava_onevision" else 2 * built.layout[0]
    group = (1, 5, 2) if ctx.quick else (1, 23, 8)
    max_new, ref_max_new = (4, 8) if ctx.quick else (16, 64)
    n_naive = 2 if ctx.quick else 8
    repeats = ctx.reps(2, 1)
    out: dict[str, Any] = {
        "model": built.describe(),
        "group": list(group),
        "frames": frames,
        "actor_max_new_tokens": max_new,
        "reference_max_new_tokens": ref_max_new,
        "naive_combinations": n_naive,
        "rates": {},
        "comparisons": [],
    }
    for rate in (0.02, 0.12):
        qs = _questions(adapter, policy, frames, rate, group, 1, ctx.seed)
        paths = Paths(adapter, policy, qs, max_new, True, ref_max_new, ctx.seed)
        naive_qs = [replace(q, keep=q.keep[:n_naive]) for q in qs]
        naive = Paths(adapter, policy, naive_qs, max_new, True, ref_max_new, ctx.seed)
        warm = Paths(adapter, policy, [replace(q, keep=q.keep[:2]) for q in qs], max_new, True, 2, ctx.seed)
        for fn in (warm.actor, warm.reference, warm.naive, warm.prefill_floor):  # kernels and caches, cheaply
            fn()
        fns: dict[str, Callable[[], Any]] = {
            "actor": paths.actor,
            "reference": paths.reference,
            "reference_capped": lambda p=paths, m=max_new: p.reference(m),
            "naive": naive.naive,
            "prefill_floor": paths.prefill_floor,
        }
        stats, outs = measure_interleaved(fns, repeats, warmup=0, device=ctx.device)
        g = int(qs[0].keep.shape[0])
        counts = {k: (n_naive if k == "naive" else g) * len(qs) for k in fns}
        per_s = {k: Stats.of([counts[k] / x for x in s.samples]) for k, s in stats.items()}
        actor_naive = [r[:n_naive] for r in outs["actor"].rewards]
        res = {
            "group_size": g,
            "kept_tokens": int(qs[0].keep.shape[1]),
            "time_s": stats,
            "combos_per_s": per_s,
            "speedup_of_actor": {k: per_s["actor"].median / per_s[k].median for k in fns if k != "actor"},
            "reward_agreement": {
                "actor_vs_reference": agreement(outs["actor"].rewards, outs["reference"].rewards),
                "actor_vs_reference_capped": agreement(outs["actor"].rewards, outs["reference_capped"].rewards),
                "actor_vs_naive": agreement(actor_naive, outs["naive"].rewards),
            },
            "text_agreement_actor_vs_naive": float(
                np.mean(
                    [
                        a == b
                        for qa, qb in zip(outs["actor"].texts, outs["naive"].texts, strict=True)
                        for a, b in zip(qa[:n_naive], qb, strict=True)
                    ]
                )
            ),
            "reference_mean_tokens_per_row": float(np.mean(outs["reference"].extra["mean_tokens_per_row"])),
        }
        out["rates"][str(rate)] = res
        for other in ("reference", "naive"):
            out["comparisons"].append(
                comparison(
                    f"combinations/s at keep rate {rate}, G={g}",
                    "actor",
                    per_s["actor"].median,
                    other,
                    per_s[other].median,
                    "combos/s",
                )
            )
        print(
            f"[b] rate {rate}: actor {per_s['actor'].median:.1f} combos/s, reference "
            f"{per_s['reference'].median:.1f}, naive {per_s['naive'].median:.1f}",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# (c) pruning latency: policy scoring + selection vs every baseline


@torch.no_grad()
def section_c(ctx: Ctx) -> dict[str, Any]:
    from benchmarks.pruning_latency import BASELINES
    from cacovid_rl.baselines import SelectionContext, compress, get_selector
    from cacovid_rl.policy.network import CacovidPolicy

    fam = ctx.cache.families(("llava_onevision",))[0]
    built = ctx.cache.model(fam)
    adapter = built.adapter
    t, n = built.layout
    enc = make_question(adapter, t, n, ctx.seed)
    warm = make_question(adapter, 1, n, ctx.seed)
    policy = CacovidPolicy.from_adapter(adapter).eval()
    fastv_layer = min(2, len(adapter.language_model.layers) - 1)
    selectors = {b: get_selector(b, layer=fastv_layer) if b == "fastv" else get_selector(b) for b in BASELINES}
    cacovid = get_selector("cacovid")
    ctx_sel = SelectionContext(enc=enc, adapter=adapter, generator=torch.Generator().manual_seed(ctx.seed))
    r = 0.25
    for s in selectors.values():  # merging methods time their whole compressed block, selectors their selection
        compress(s, SelectionContext(enc=warm, adapter=adapter, generator=torch.Generator()), r)
    scores = policy.score(enc)
    fns: dict[str, Callable[[], Any]] = {
        "cacovid": lambda: cacovid.select(SelectionContext(enc=enc, scores=policy.score(enc)), r),
        "cacovid_policy_forward": lambda: policy.score(enc),
        "cacovid_selection": lambda: cacovid.select(SelectionContext(enc=enc, scores=scores), r),
        # as benchmarks/pruning_latency.py: a selector's selection, a merger's whole compressed block
        **{
            b: (lambda s=s: s.select(ctx_sel, r) if hasattr(s, "select") else s.compress(ctx_sel, r))
            for b, s in selectors.items()
        },
    }
    stats, _ = measure_interleaved(fns, ctx.reps(10, 2), warmup=1, device=ctx.device)
    base = stats["cacovid"].median
    out: dict[str, Any] = {
        "model": built.describe(),
        "retention": r,
        "video_tokens": enc.num_video_tokens,
        "seq_len": enc.seq_len,
        "policy_params": param_count(policy),
        "fastv_layer": fastv_layer,
        "latency_s": stats,
        "over_cacovid": {k: s.median / base for k, s in stats.items()},
        "paper": PAPER["pruning_ms"],
        "comparisons": [
            comparison(f"pruning ms at {r:.0%}, {t}x{n} tokens", "cacovid", base * 1e3, b, stats[b].median * 1e3, "ms")
            for b in ("divprune", "fastv", "visionzip", "prunevid")
        ],
    }
    out["comparisons"].append(
        comparison(
            "CaCoVID pruning ms vs the paper's",
            "cacovid (here)",
            base * 1e3,
            "cacovid (paper)",
            PAPER["pruning_ms"]["cacovid"],
            "ms",
        )
    )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# (d) prefill: all tokens vs 25% vs 10%, against the physical limit


@torch.no_grad()
def section_d(ctx: Ctx) -> dict[str, Any]:
    from cacovid_rl.policy.network import CacovidPolicy
    from cacovid_rl.policy.selection import select_tokens

    peak = device_peak(ctx.device)
    out: dict[str, Any] = {"device_peak": peak, "paper": PAPER["prefill_ms"], "models": {}, "comparisons": []}
    for fam in ctx.cache.families(("llava_onevision", "qwen2_5_vl")):
        built = ctx.cache.model(fam)
        adapter = built.adapter
        t, n = built.layout
        enc = make_question(adapter, t, n, ctx.seed)
        policy = CacovidPolicy.from_adapter(adapter).eval()
        scores = policy.score(enc)
        keeps = {str(r): select_tokens(scores, r).to(adapter.device) for r in (0.25, 0.1)}
        fns: dict[str, Callable[[], Any]] = {"full": lambda a=adapter, e=enc: a.generate(e, None, 1)}
        fns.update({r: (lambda k=k, a=adapter, e=enc: a.generate(e, k[None], 1)) for r, k in keeps.items()})
        fns["pruning_0.25"] = lambda p=policy, e=enc: select_tokens(p.score(e), 0.25)
        stats, _ = measure_interleaved(fns, ctx.reps(10, 2), warmup=1, device=ctx.device)
        text_len = enc.seq_len - enc.num_video_tokens
        seq = {"full": enc.seq_len, **{r: text_len + int(k.numel()) for r, k in keeps.items()}}
        rows = {}
        for key in ("full", "0.25", "0.1"):
            flops = 2.0 * built.llm_params * seq[key]
            limit = flops / (peak["bf16_tflops"] * 1e12) if peak["bf16_tflops"] else None
            rows[key] = {
                "seq_len": seq[key],
                "time_s": stats[key],
                "flops": flops,
                "limit_s": limit,
                "over_limit": stats[key].median / limit if limit else None,
                "speedup_vs_full": stats["full"].median / stats[key].median,
            }
        out["models"][fam] = {
            "model": built.describe(),
            "prefill": rows,
            "pruning_s": stats["pruning_0.25"],
            "flops_formula": "2 x llm_params x seq_len (llm_params = decoder stack + lm_head)",
        }
        del policy
        name = built.name
        out["comparisons"].append(
            comparison(
                f"{name}: prefill ms, all tokens vs CaCoVID 25%",
                "all tokens",
                stats["full"].median * 1e3,
                "25%",
                stats["0.25"].median * 1e3,
                "ms",
            )
        )
        out["comparisons"].append(
            comparison(
                f"{name}: prefill ms, all tokens vs 10%",
                "all tokens",
                stats["full"].median * 1e3,
                "10%",
                stats["0.1"].median * 1e3,
                "ms",
            )
        )
        if rows["full"]["limit_s"]:
            out["comparisons"].append(
                comparison(
                    f"{name}: all-token prefill vs physical limit ({peak['matched']})",
                    "measured",
                    stats["full"].median * 1e3,
                    "limit",
                    rows["full"]["limit_s"] * 1e3,
                    "ms",
                )
            )
    return out


# ----------------------------------------------------------------------------------------------------------------------
# (g) memory per reward actor vs combinations per forward; the chunk the library picks


@torch.no_grad()
def section_g(ctx: Ctx) -> dict[str, Any]:
    from benchmarks.actor_memory import _peak_rss_bytes, _reset_peak_rss, _status_bytes, estimate_per_combo, fit

    fam = ctx.cache.families(("llava_onevision",))[0]
    built = ctx.cache.model(fam)
    adapter = built.adapter
    t, n = built.layout
    enc = make_question(adapter, t, n, ctx.seed)
    g = 32  # the method's G: a reward actor scores all of a question's combinations, c at a time
    max_new = 4 if ctx.quick else 16
    cs = [1, 8, 32] if ctx.quick else [1, 4, 8, 16, 32]
    adapter.generate(enc, random_keeps(t * n, 1, 1, ctx.seed, adapter.device), 2, combos_per_forward=1)
    out: dict[str, Any] = {
        "model": built.describe(),
        "G": g,
        "max_new_tokens": max_new,
        "rates": {},
        "measure": "cuda max_memory_allocated - allocated before"
        if ctx.cuda
        else "peak RSS (VmHWM after a clear_refs reset) - RSS before",
        "comparisons": [],
    }
    for rate in (0.02, 0.12):
        keep = random_keeps(t * n, max(1, round(rate * n)) * t, g, ctx.seed, adapter.device)
        seq = enc.seq_len - enc.num_video_tokens + int(keep.shape[1])
        runs = []
        for c in cs:
            if ctx.cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                before = _status_bytes("VmRSS") if _reset_peak_rss() else _peak_rss_bytes()
            t0 = time.perf_counter()
            adapter.generate(enc, keep, max_new, combos_per_forward=c)
            sync_device(ctx.device)
            peak = torch.cuda.max_memory_allocated() if ctx.cuda else _peak_rss_bytes()
            runs.append({"combos_per_forward": c, "delta_bytes": peak - before, "seconds": time.perf_counter() - t0})
        slope, intercept = fit([(r["combos_per_forward"], r["delta_bytes"]) for r in runs])
        est = estimate_per_combo(adapter, seq, max_new)
        chunk = {str(b): adapter.choose_chunk_size(seq, b * GIB, max_new) for b in (12, 80)}
        weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
        chunk["80_minus_weights"] = adapter.choose_chunk_size(seq, 80 * GIB - weights, max_new)
        out["rates"][str(rate)] = {
            "pruned_seq_len": seq,
            "runs": runs,
            "measured_bytes_per_combo": slope,
            "measured_fixed_bytes": intercept,
            "estimate_bytes_per_combo": est,
            "estimate_over_measured": est / slope if slope > 0 else None,
            "chunk_for_budget_gib": chunk,
            "weights_bytes": weights,
        }
        out["comparisons"].append(
            comparison(
                f"bytes per combination at rate {rate} (seq {seq})",
                "measured",
                slope,
                "choose_chunk_size estimate",
                est,
                "bytes",
            )
        )
    return out
