"""Render the latest result JSONs (``benchmarks/results/*.json``) as the Markdown figures of ``benchmarks/README.md``.

``python -m benchmarks.summarize`` prints the tables; ``--write`` replaces the block between the
``<!-- figures:begin -->`` / ``<!-- figures:end -->`` markers of the README, so the README always shows exactly
what the committed JSONs hold, with the command that produced each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, fmt_bytes

README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _ms(st: dict[str, Any]) -> str:
    return f"{_num(st['median'] * 1e3)} ({_num(st['p10'] * 1e3)}-{_num(st['p90'] * 1e3)})"


def _s(st: dict[str, Any]) -> str:
    return f"{st['median']:.3g} ({st['p10']:.3g}-{st['p90']:.3g})"


def _table(cols: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def _header(d: dict[str, Any]) -> str:
    m = d["machine"]
    dev = m["gpu"]["name"] if m.get("gpu") else m["device"]
    return (
        f"`{d['command']}` ({d['created'][:10]}, {d['wall_s']} s; {m['cores']} cores {m['cpu_model']}, {dev}, "
        f"{m['torch_threads']} torch thread(s), torch {m['torch']}, transformers {m['transformers']}, ray {m['ray']}; "
        f"load {m['load_avg_1m_at_start']} at start)"
    )


def pruning(d: dict[str, Any]) -> str:
    res = d["results"]
    parts = [f"### Pruning latency\n\n{_header(d)}\n"]
    methods = ["cacovid", "cacovid_policy_forward", "cacovid_selection", "uniform", "random", "fastv", "visionzip",
               "divprune"]  # fmt: skip
    cols, rows = ["method"], {m: [m] for m in methods}
    for w, info in res["widths"].items():
        for r, per in sorted(info["latency"].items(), key=lambda kv: float(kv[0])):
            cols.append(f"{w} (d={info['hidden_size']}, {info['dtype']}) {float(r):.0%}: ms")
            for m in methods:
                rows[m].append(_ms(per[m]))
    parts.append(_table(cols, list(rows.values())))
    pre_rows = []
    for w, info in res["widths"].items():
        pre = info["prefill"]
        est = pre.get("extrapolated_28_layers_s", {})
        for k, st in pre["time"].items():
            pre_rows.append(
                [w, f"{pre['layers_run']}", "full" if k == "full" else f"{float(k):.0%}", pre["seq_len"][k], _ms(st),
                 f"{pre['time']['full']['median'] / st['median']:.2f}x", f"{est[k]:.1f}" if k in est else ""]
            )  # fmt: skip
    parts.append("\nPrefill (`adapter.generate(enc, keep, max_new_tokens=1)`), full tokens vs CaCoVID's selection:\n")
    parts.append(
        _table(
            ["width", "LLM layers run", "video tokens", "seq len", "ms", "speedup", "28-layer est. s (+ pruning)"],
            pre_rows,
        )
    )
    return "\n".join(parts)


def reward(d: dict[str, Any]) -> str:
    res = d["results"]
    rows = []
    for k, st in res["combos_per_s"].items():
        sp = res["speedup_of_actor"].get(k)
        rows.append([k, _s(st), "1" if sp is None else f"{sp['median']:.2f}x ({sp['p10']:.2f}-{sp['p90']:.2f})"])
    agree = ", ".join(f"{k} {v:.0%}" for k, v in res["reward_agreement"].items())
    targets = "; ".join(
        f"vs {k}: target >= {v['target']:g}x, measured {v['measured_median']:.2f}x, {'met' if v['met'] else 'NOT met'}"
        for k, v in res["targets"].items()
    )
    return "\n".join(
        [
            f"### Reward throughput\n\n{_header(d)}\n",
            f"{res['questions']} questions x G={res['group_size']}; model: {d['config']['model']}.\n",
            _table(["path", "combinations/s (p10-p90)", "actor speedup"], rows),
            f"\nRewards identical per combination: {agree}. Sampled reference (T=0.01, top_p=0.01) equals greedy on "
            f"{res['reference_sampled_equals_greedy']:.0%} of rows; it ran "
            f"{res['reference_mean_tokens_per_row']:.1f} new tokens per row. Actor time / prefill floor (one batched "
            f"prefill + first-token logits, no decoding): {res['actor_over_floor']['median']:.2f}. Targets: {targets}.",
        ]
    )


def memory(d: dict[str, Any]) -> str:
    res = d["results"]
    rows = []
    for name, sc in res["scenarios"].items():
        deltas = ", ".join(f"{r['combos_per_forward']}: {fmt_bytes(r['delta_bytes'])}" for r in sc["runs"])
        ratio = sc["estimate_over_measured"]
        rows.append(
            [name, f"{sc['pruned_seq_len']}", f"{sc['hidden_size']}/{sc['layers']}/{sc['dtype']}", deltas,
             fmt_bytes(sc["measured_bytes_per_combo"]), fmt_bytes(sc["estimate_bytes_per_combo"]),
             f"{ratio:.2f}" if ratio else ""]
        )  # fmt: skip
    parts = [
        f"### Actor memory\n\n{_header(d)}\n",
        _table(
            [
                "scenario",
                "pruned seq",
                "d/layers/dtype",
                "peak delta by combos per forward",
                "measured /combo",
                "estimate /combo",
                "estimate / measured",
            ],
            rows,
        ),
    ]
    for width, tab in res["chunk_sizes"].items():
        budgets = list(next(iter(tab["lengths"].values()))["chunk"])
        parts.append(
            f"\n`choose_chunk_size` at {width} ({tab['layers']} layers, d={tab['hidden_size']}, {tab['dtype']}):\n"
        )
        parts.append(
            _table(
                ["sequence", "seq len", "est. per combination", *(f"{b} GiB" for b in budgets)],
                [
                    [k, v["seq_len"], fmt_bytes(v["estimate_bytes_per_combo"]), *v["chunk"].values()]
                    for k, v in tab["lengths"].items()
                ],
            )
        )
    return "\n".join(parts)


def broadcast(d: dict[str, Any]) -> str:
    res = d["results"]
    rows = []
    for size, r in res["sizes"].items():
        for n, st in r["actors"].items():
            rows.append(
                [f"{size} ({r['params'] / 1e6:.1f}M, {r['dtype']}, {fmt_bytes(r['bytes'])})", n, _s(st["to_all_s"]),
                 _s(st["flatten_s"]), _s(st["put_checksum_s"]), _s(st["actor_load_s"])]
            )  # fmt: skip
    return "\n".join(
        [
            f"### Weight broadcast\n\n{_header(d)}\n",
            _table(
                ["policy", "actors", "publish -> all actors s", "flatten s", "put + checksum s", "actor load s"], rows
            ),
        ]
    )


def training(d: dict[str, Any]) -> str:
    res = d["results"]
    rows = []
    for n, r in res["runs"].items():
        rows.append(
            [n, f"{r['combos_per_s']:.0f}", f"{r['updates_per_s']:.2f}", f"{r['scaling_efficiency']:.0%}",
             f"{r['sync_latency_s'] * 1e3:.0f}", f"{r['sync_load_s'] * 1e3:.1f}", fmt_bytes(r["bytes_per_question"]),
             f"{r['learner_s_per_question'] * 1e3:.1f}", f"{r['actor_utilisation']:.0%}",
             f"{r.get('load_avg_1m_start', float('nan')):.1f}"]
        )  # fmt: skip
    t = res["transfer_7b"]
    trows = [
        [k, fmt_bytes(v["bytes"]), f"{v['relative_learner_compute']:.2f}x", v["learner_holds"]]
        for k, v in t["rows"].items()
    ]
    return "\n".join(
        [
            f"### Training throughput\n\n{_header(d)}\n",
            _table(
                [
                    "actors",
                    "combinations/s",
                    "updates/s",
                    "scaling efficiency",
                    "sync/latency_s ms",
                    "sync load ms",
                    "bytes/question",
                    "learner ms/question",
                    "actor utilisation",
                    "machine load (1 min)",
                ],
                rows,
            ),
            f"\nCore limit: {res['core_limit']['note']}.\n",
            f"Actor -> learner per question at the 7B width (computed; seq {t['assumptions']['seq_len']}, "
            "hidden 3584, fp16):\n",
            _table(["design", "bytes/question", "learner compute vs policy fwd+bwd", "learner must hold"], trows),
        ]
    )


SECTIONS = {
    "pruning_latency": pruning,
    "reward_throughput": reward,
    "actor_memory": memory,
    "weight_broadcast": broadcast,
    "training_throughput": training,
}


def render(results_dir: Path = RESULTS_DIR) -> str:
    parts = []
    for name, fn in SECTIONS.items():
        path = results_dir / f"{name}.json"
        if path.is_file():
            d = json.loads(path.read_text())
            parts.append(fn(d) + f"\n\nPlot: [`results/{name}.png`](results/{name}.png)")
        else:
            parts.append(f"### {name}\n\n(no result yet: run `python -m benchmarks.{name}`)")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--write", action="store_true", help="update the figures block of benchmarks/README.md")
    args = p.parse_args(argv)
    text = render()
    if not args.write:
        print(text)
        return
    readme = README.read_text()
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    README.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])
    print(f"updated {README}")


if __name__ == "__main__":
    main()
