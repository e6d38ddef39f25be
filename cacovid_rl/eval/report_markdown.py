"""``report.md``: the report's numbers as Markdown tables, one function per section."""

from __future__ import annotations

from typing import Any

import numpy as np

from cacovid_rl.baselines import METHODS
from cacovid_rl.eval.aggregate import TARGET_FRACTION, TARGET_RETENTION


def _cell(v: dict[str, Any] | None) -> str:
    if not v:
        return "-"
    return f"{v['mean'] * 100:.1f} ± {v['std'] * 100:.1f}"


def _method_order(table: dict[str, Any]) -> list[str]:
    """The oracle, the policy, then the baselines in the registry's order; unknown names last."""
    order = list(dict.fromkeys(["oracle", "cacovid", *METHODS]))
    return [m for m in order if m in table] + [m for m in table if m not in order and m not in ("n", "full")]


def _header(report: dict[str, Any]) -> list[str]:
    seeds = report["runs"]
    return [
        "# CaCoVID evaluation report",
        "",
        f"- runs: {len(seeds)} seed(s): " + ", ".join(f"`{r['name']}` (seed {r['seed']})" for r in seeds),
        f"- evaluation data: `{report['data']['path']}` ({report['data']['layout']} layout), "
        f"{report['eval']['n']} questions, {report['eval']['skipped_videos']} unreadable videos skipped",
        f"- model: `{report['model']}`, {report['num_frames']} frames; policy selection imp_ratio "
        f"{report['imp_ratio']}",
        "- accuracy in %, mean ± sample std over seeds; deterministic baselines (all but random) do not depend "
        "on the seed (std 0); random and the oracle padding draw per seed",
        "",
    ]


def _accuracy(report: dict[str, Any], image: str) -> list[str]:
    rets, table = report["retentions"], report["accuracy"]["all"]
    lines = [
        "## Accuracy vs retention",
        "",
        "| method | " + " | ".join(f"{r:.0%}" for r in rets) + " |",
        "|---|" + "---:|" * len(rets),
        "| full tokens | " + " | ".join([_cell(table["full"])] * len(rets)) + " |",
    ]
    names = {"cacovid": "**cacovid**", "oracle": "oracle (answer tokens + random)"}
    for m in _method_order(table):
        lines.append(f"| {names.get(m, m)} | " + " | ".join(_cell(table[m].get(str(r))) for r in rets) + " |")
    if "cacovid" in table:
        full, cac = table["full"]["mean"], table["cacovid"]
        rel = [cac[str(r)]["mean"] / full * 100 if str(r) in cac and full else np.nan for r in rets]
        lines.append("| cacovid / full (%) | " + " | ".join(f"{v:.0f}" for v in rel) + " |")
    return [*lines, "", f"![accuracy vs retention]({image})", ""]


def _answer_kept(report: dict[str, Any]) -> list[str]:
    kept, rets = report.get("answer_kept") or {}, report["retentions"]
    if not kept.get("n"):
        return []
    lines = [
        "## How often the answer's tokens are kept",
        "",
        f"Share of the {kept['n']} questions with known answer tokens (`meta.oracle_tokens`) whose selection "
        "keeps at least one of them, in %: where accuracy comes from finding the answer, and where from "
        "the LLM's guesses.",
        "",
        "| method | " + " | ".join(f"{r:.0%}" for r in rets) + " |",
        "|---|" + "---:|" * len(rets),
    ]
    for m in _method_order(kept):
        if m != "oracle":
            lines.append(f"| {m} | " + " | ".join(_cell(kept[m].get(str(r))) for r in rets) + " |")
    return [*lines, ""]


def _per_kind(report: dict[str, Any]) -> list[str]:
    acc = report["accuracy"]
    kinds = [k for k in acc if k != "all"]
    if len(kinds) <= 1:
        return []
    key = str(TARGET_RETENTION)
    lines = [f"## Per question kind at {TARGET_RETENTION:.0%} retention", ""]
    lines.append("| method | " + " | ".join(f"{k} (n={acc[k]['n']})" for k in kinds) + " |")
    lines.append("|---|" + "---:|" * len(kinds))
    lines.append("| full tokens | " + " | ".join(_cell(acc[k]["full"]) for k in kinds) + " |")
    for m in _method_order(acc["all"]):
        lines.append(f"| {m} | " + " | ".join(_cell(acc[k].get(m, {}).get(key)) for k in kinds) + " |")
    return [*lines, ""]


def _target(report: dict[str, Any]) -> list[str]:
    tgt = report["target"]
    lines = ["## Target (issue 7)", ""]
    if not tgt.get("evaluated"):
        return [*lines, "No CaCoVID result at the target retention.", ""]
    verdict = "**met**" if tgt["met"] else "**not met**"
    separated = tgt["separated"]
    return [
        *lines,
        f"At {tgt['retention']:.0%} retention CaCoVID keeps {tgt['fraction_of_full'] * 100:.1f}% of full-token "
        f"accuracy (target ≥ {TARGET_FRACTION:.0%}: {'yes' if tgt['fraction_met'] else 'no'}); best non-oracle "
        f"baseline: {tgt['best_baseline']}, margin {tgt['margin_over_best'] * 100:+.1f} points; seed ranges "
        f"separated from every baseline: {'yes' if all(separated.values()) else 'no'} "
        f"({', '.join(f'{m}: {s}' for m, s in separated.items())}). Target {verdict}.",
        "",
    ]


def _quarters(per: dict[str, Any], key: str) -> str:
    v = per.get(key)
    return f"{v['first_quarter']:.3f} → {v['last_quarter']:.3f}" if v else "-"


def _training(report: dict[str, Any], image: str | None) -> list[str]:
    if not image:
        return []
    lines = ["## Training", "", f"![training curves]({image})", ""]
    lines.append("| seed | updates | token reward (first → last quarter) | frame reward | rate |")
    lines.append("|---|---:|---|---|---|")
    for name, per in report["training"].items():
        lines.append(
            f"| {name} | {per['updates']} | {_quarters(per, 'reward/token_mean')} | "
            f"{_quarters(per, 'reward/frame_mean')} | {_quarters(per, 'rollout/rate_mean')} |"
        )
    return [*lines, ""]


def _heatmaps(images: list[str]) -> list[str]:
    if not images:
        return []
    return [
        "## What the policy keeps",
        "",
        f"Test questions of the first seed. Top row: the frames; bottom row: the policy's keep probability "
        f"per token, tokens kept at {TARGET_RETENTION:.0%} retention outlined in lime, the answer's (oracle) "
        "tokens dashed white; panel titles give the frame score and the tokens kept in that frame.",
        "",
        *[f"![heatmap]({p})" for p in images],
        "",
    ]


def markdown(report: dict[str, Any], images: dict[str, Any]) -> str:
    """``report.md`` of a ``report.json`` (``report``) and the PNG names beside it (``images``: ``accuracy``,
    optional ``training`` and ``heatmaps``)."""
    lines = [
        *_header(report),
        *_accuracy(report, images["accuracy"]),
        *_answer_kept(report),
        *_per_kind(report),
        *_target(report),
        *_training(report, images.get("training")),
        *_heatmaps(images.get("heatmaps") or []),
        *["## Reproduce", "", "```", report["command"], "```", ""],
    ]
    return "\n".join(lines)
