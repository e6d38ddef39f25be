"""The evaluation report: the oracle reference, batched answering and an end-to-end report on a few synthetic
questions with the shipped tiny model (its parts: tests/unit/test_eval_*.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cacovid_rl.baselines import ORACLE, SELECTORS, SelectionContext, budget, get_selector
from cacovid_rl.config import EvalConfig, load_config
from cacovid_rl.eval import report as R
from cacovid_rl.eval.evaluate import answer_selections, select_all
from cacovid_rl.types import EncodedQuestion, PolicyScores
from tests.unit.test_eval_runs import write_run

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug_local.yaml"


def make_ctx(t: int = 4, n: int = 16, oracle=None, seed: int = 0) -> SelectionContext:
    torch.manual_seed(seed)
    d = 8
    embeds = torch.randn(3 + t * n + 2, d)
    enc = EncodedQuestion(embeds, torch.arange(embeds.shape[0]), 3, t, n)
    return SelectionContext(
        enc=enc,
        scores=PolicyScores(torch.randn(t, n), torch.randn(t)),
        generator=torch.Generator().manual_seed(seed),
        oracle_tokens=oracle,
    )


# ---------------------------------------------------------------------------------------------------------------------
# the oracle reference


def test_oracle_keeps_answer_tokens_and_pads_randomly() -> None:
    ctx = make_ctx(oracle=[5, 21])
    keep = get_selector(ORACLE).select(ctx, 0.1)  # B = 6 of 64
    assert keep.shape == (budget(0.1, 64),) and {5, 21} <= set(keep.tolist())
    assert (keep.diff() > 0).all()
    again = get_selector(ORACLE).select(make_ctx(oracle=[5, 21]), 0.1)
    assert torch.equal(keep, again)  # the padding comes from the context's generator


def test_oracle_truncates_to_the_budget_and_validates() -> None:
    keep = get_selector(ORACLE).select(make_ctx(oracle=list(range(10, 30))), 3 / 64)
    assert keep.tolist() == [10, 11, 12]
    assert get_selector(ORACLE).select(make_ctx(oracle=[]), 0.1).numel() == 6  # a count of zero: random
    with pytest.raises(ValueError, match="oracle_tokens"):
        get_selector(ORACLE).select(make_ctx(), 0.1)
    with pytest.raises(ValueError, match="outside"):
        get_selector(ORACLE).select(make_ctx(oracle=[64]), 0.1)
    assert ORACLE not in SELECTORS  # not a training-free method: it needs labelled answer tokens


@pytest.fixture(scope="module")
def shipped_question(tmp_path_factory: pytest.TempPathFactory):
    """The shipped tiny model and one real synthetic question encoded by it (loads in about a second)."""
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.synthetic import make_synthetic
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.models.loading import load_adapter

    data = tmp_path_factory.mktemp("report_q")
    make_synthetic(data, n=3, seed=11, fractions=(0.0, 0.0, 1.0))
    rec = load_records(data / "test.json", data).records[0]
    adapter = load_adapter(ModelConfig(path="tiny"))
    with torch.no_grad():
        enc = adapter.encode(read_frames(rec.video, 8, 1.0), build_prompt(rec.problem, rec.problem_type))
    return adapter, enc


def test_select_all_skips_the_oracle_without_tokens_and_memoises_fastv(shipped_question, monkeypatch) -> None:
    """FastV on the shipped model: its selection is the top-B of the model's own early-layer attention (computed
    here once, directly), and ``select_all`` asks the model for that attention once for all retentions."""
    adapter, enc = shipped_question
    with torch.no_grad():
        attn = adapter.early_layer_attention(enc, layer=2).float().reshape(-1)
    calls = []
    real = type(adapter).early_layer_attention

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(adapter), "early_layer_attention", counted)
    ctx = SelectionContext(enc=enc, adapter=adapter, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = select_all(ctx, ["fastv", "uniform", ORACLE], [0.1, 0.25, 0.5])
    assert {m for m, _ in out} == {"fastv", "uniform"} and len(calls) == 1
    total = enc.num_video_tokens
    for r in (0.1, 0.25, 0.5):
        b = budget(r, total)
        top = set(torch.topk(attn, b).indices.tolist())
        assert set(out[("fastv", r)].tolist()) == top, r  # (the tiny model's attention has no ties at the cut)
        assert out[("fastv", r)].numel() == b


def test_answer_selections_batches_equal_sizes(shipped_question, monkeypatch) -> None:
    """The shipped model answers each selection as it does alone, while selections of one size share a forward."""
    adapter, enc = shipped_question
    sel = {"a": torch.tensor([0, 1, 40]), "b": torch.tensor([17, 33, 90]), "c": torch.arange(0, 128, 4)}
    with torch.no_grad():
        alone = {k: adapter.generate(enc, v[None], 4)[0] for k, v in sel.items()}
    batches: list[int] = []
    real = type(adapter).generate

    def recorded(self, enc, keep, max_new_tokens):
        batches.append(0 if keep is None else keep.shape[0])
        return real(self, enc, keep, max_new_tokens)

    monkeypatch.setattr(type(adapter), "generate", recorded)
    with torch.no_grad():
        answers = answer_selections(adapter, enc, sel, 4)
    assert answers == alone and sorted(batches) == [1, 2]


# ---------------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_report_end_to_end(tmp_path: Path) -> None:
    """Two untrained "seeds" on a few synthetic questions: JSON, Markdown and PNGs, oracle included."""
    from cacovid_rl.data.synthetic import make_synthetic
    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy

    data = tmp_path / "data"
    make_synthetic(data, n=6, seed=5, fractions=(0.0, 0.0, 1.0))
    cfg = load_config(DEBUG_CONFIG, [f"data.eval_path={data / 'test.json'}", f"data.video_root={data}"])
    adapter = load_adapter(cfg.model)
    for s in (0, 1):
        run = write_run(tmp_path / "runs" / f"seed{s}", s, with_config=False)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.replace(seed=s).to_dict()))
        torch.manual_seed(s)
        CacovidPolicy.from_adapter(adapter).save_pretrained(run / "policy")
    args = argparse.Namespace(run=str(tmp_path / "runs"), out="", retentions=[0.1, 0.5], heatmaps=2, quiet=True)
    assert R.main(args) == 0
    out = tmp_path / "runs" / "report"
    rep = json.loads((out / "report.json").read_text())
    n = len(json.loads((data / "test.json").read_text()))
    assert rep["eval"]["n"] == n and [r["seed"] for r in rep["runs"]] == [0, 1]
    table = rep["accuracy"]["all"]
    assert set(table) >= {"full", "cacovid", "oracle", *EvalConfig().baselines}  # the report's defaults
    assert len(json.loads((out / "per_question.json").read_text())["rows"]) == n
    assert len(table["cacovid"]["0.1"]["per_seed"]) == 2 and rep["target"]["evaluated"]
    kept = rep["answer_kept"]  # every synthetic question knows its answer token; the oracle always keeps it
    assert kept["n"] == n and kept["oracle"]["0.1"]["mean"] == 1.0
    # Recomputed here from the data: the full-token accuracy (one plain generation per question) and how often the
    # uniform selection keeps an answer token (its kept indices against the records' oracle tokens).
    from cacovid_rl.data.prompts import build_prompt
    from cacovid_rl.data.records import load_records
    from cacovid_rl.data.video import read_frames
    from cacovid_rl.rl.rewards import compute_reward

    raw = json.loads((data / "test.json").read_text())  # load_records keeps the file order
    full, uniform_kept, random_kept = [], {0.1: [], 0.5: []}, []
    for i, (rec, raw_rec) in enumerate(zip(load_records(data / "test.json", data).records, raw, strict=True)):
        with torch.no_grad():
            enc = adapter.encode(
                read_frames(rec.video, cfg.data.num_frames, cfg.data.max_fps),
                build_prompt(rec.problem, rec.problem_type),
            )
            answer = adapter.generate(enc, None, cfg.model.max_new_tokens)[0]
        full.append(compute_reward(answer, rec.answer, rec.problem_type, cfg.reward.fix_official_bugs))
        oracle = set(raw_rec["meta"]["oracle_tokens"])
        for r in uniform_kept:
            keep = get_selector("uniform").select(SelectionContext(enc=enc), r)
            uniform_kept[r].append(float(bool(set(keep.tolist()) & oracle)))
        # Seed 1's random draw on question i comes from its own generator, seeded 1 * 1_000_003 + i.
        gen = torch.Generator().manual_seed(1_000_003 + i)
        keep = get_selector("random").select(SelectionContext(enc=enc, generator=gen), 0.1)
        random_kept.append(float(bool(set(keep.tolist()) & oracle)))
    assert table["full"]["mean"] == pytest.approx(np.mean(full))
    for r, hits in uniform_kept.items():
        assert kept["uniform"][str(r)]["mean"] == pytest.approx(np.mean(hits)), r
    assert kept["uniform"]["0.1"]["mean"] < 1.0  # a question-blind selection misses some answers
    per_q = json.loads((out / "per_question.json").read_text())
    column = per_q["columns"].index(f"{R.KEPT}random@0.1@seed1")
    assert [row[column] for row in per_q["rows"]] == random_kept
    md = (out / "report.md").read_text()
    assert "## How often the answer's tokens are kept" in md
    assert "| **cacovid** |" in md and "oracle" in md and "![heatmap](heatmap_0.png)" in md
    import matplotlib.image

    for name in ("accuracy_vs_retention.png", "training_curves.png", "heatmap_0.png", "heatmap_1.png"):
        assert matplotlib.image.imread(out / name).shape[2] == 4, name  # decodable; their content: test_eval_plots
    assert R.main(argparse.Namespace(run=str(tmp_path / "nowhere"), out="")) == 2
