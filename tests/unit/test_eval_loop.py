"""The one evaluation loop (``eval/evaluate.py``): every number it gives is recomputed here question by question
with the shipped tiny model, selections drawn directly from the methods and each answer generated alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cacovid_rl.baselines import SelectionContext, get_selector
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord, load_records
from cacovid_rl.data.video import VideoDecodeError, read_frames
from cacovid_rl.eval.evaluate import (
    AnsweredQuestion,
    AnswerSettings,
    Arm,
    SkippedQuestion,
    accuracy_table,
    answer_questions,
    evaluate,
)
from cacovid_rl.policy.selection import select_tokens
from cacovid_rl.rl.rewards import compute_reward

FRAMES, TOKENS = 8, 4


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory):
    """The shipped tiny model, a fresh policy on it and five synthetic test questions."""
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.data.synthetic import make_synthetic
    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy

    data = tmp_path_factory.mktemp("eval_loop")
    make_synthetic(data, n=5, seed=21, fractions=(0.0, 0.0, 1.0))
    records = load_records(data / "test.json", data).records
    adapter = load_adapter(ModelConfig(path="tiny"))
    torch.manual_seed(4)
    policy = CacovidPolicy.from_adapter(adapter).eval()
    with torch.no_grad():  # a fresh question-match term is zero: move it so the policy reads the question
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return adapter, policy, records


def _alone(adapter, enc, keep: torch.Tensor, rec: QARecord) -> float:
    text = adapter.generate(enc, keep[None].to(enc.inputs_embeds.device), TOKENS)[0]
    return compute_reward(text, rec.answer, rec.problem_type, True)


def test_evaluate_is_the_mean_of_each_question_answered_alone(shipped) -> None:
    adapter, policy, records = shipped
    rets = [0.1, 0.5]
    result = evaluate(
        adapter, policy, records, rets, ["uniform", "random"], num_frames=FRAMES, max_new_tokens=TOKENS, seed=3
    )
    gen = torch.Generator().manual_seed(3)  # one generator for all questions, drawn in question order
    full, sums = 0.0, {(m, r): 0.0 for m in ("cacovid", "uniform", "random") for r in rets}
    for rec in records:
        with torch.no_grad():
            enc = adapter.encode(read_frames(rec.video, FRAMES, 1.0), build_prompt(rec.problem, rec.problem_type))
            full += compute_reward(adapter.generate(enc, None, TOKENS)[0], rec.answer, rec.problem_type, True)
            scores = policy.score(enc)
            for r in rets:
                sums[("cacovid", r)] += _alone(adapter, enc, select_tokens(scores, r, 0.5, max_ratio=1.5 * r), rec)
                uniform = get_selector("uniform").select(SelectionContext(enc=enc), r)
                sums[("uniform", r)] += _alone(adapter, enc, uniform, rec)
            for r in rets:
                drawn = get_selector("random").select(SelectionContext(enc=enc, generator=gen), r)
                sums[("random", r)] += _alone(adapter, enc, drawn, rec)
    n = len(records)
    assert result["n"] == n and result["skipped"] == 0 and result["full"] == pytest.approx(full / n)
    expected = {m: {str(r): sums[(m, r)] / n for r in rets} for m in ("cacovid", "uniform", "random")}
    assert result["methods"].keys() == expected.keys()
    for m, per in expected.items():
        assert result["methods"][m] == pytest.approx(per), m
    assert result["counts"] == {"cacovid": n, "uniform": n, "random": n}


def test_a_failing_record_is_skipped_whole_or_raises_when_not_listed(shipped) -> None:
    adapter, _, records = shipped
    missing = dataclasses.replace(records[0], sample_id="gone", video=Path("/nonexistent/clip.mp4"))
    settings = AnswerSettings(FRAMES, 1.0, TOKENS)
    out = list(answer_questions(adapter, [records[1], missing], [Arm("a", ("uniform",))], [0.25], settings))
    assert [type(q) for q in out] == [AnsweredQuestion, SkippedQuestion]
    assert out[1].index == 1 and out[1].record.sample_id == "gone" and isinstance(out[1].error, VideoDecodeError)
    with pytest.raises(VideoDecodeError):  # a read error not in read_skip propagates
        list(answer_questions(adapter, [missing], [Arm("a", ("uniform",))], [0.25], settings, read_skip=(KeyError,)))

    class Broken:  # the adapter, with answering that raises: the report's setting (read errors only) must stop on it
        def __getattr__(self, name):
            return getattr(adapter, name)

        def generate(self, *args, **kwargs):
            raise ValueError("a selector bug")

    report_skips = {"read_skip": (ValueError, OSError, VideoDecodeError), "skip": ()}
    unreadable = list(answer_questions(Broken(), [missing], [Arm("a", ("uniform",))], [0.25], settings, **report_skips))
    assert [type(q) for q in unreadable] == [SkippedQuestion]
    with pytest.raises(ValueError, match="a selector bug"):
        list(answer_questions(Broken(), [records[1]], [Arm("a", ("uniform",))], [0.25], settings, **report_skips))
    result = evaluate(adapter, None, [missing, records[1]], [0.25], ["uniform"], num_frames=FRAMES, max_new_tokens=4)
    assert result["n"] == 1 and result["skipped"] == 1 and result["errors"][0].startswith("gone: VideoDecodeError")
    assert result["methods"]["uniform"]["0.25"] == out[0].arms["a"].rewards[("uniform", 0.25)]


def test_arms_answer_with_their_own_policy_generator_and_oracle(shipped) -> None:
    """Two arms on one question: the shared one without policy or generator, a seeded one with both; the oracle
    runs only where the question's answer tokens are given, and keeps them."""
    adapter, policy, records = shipped
    rec = records[2]
    oracle = {rec.sample_id: [5, 70]}
    arms = [
        Arm("", ("uniform",)),
        Arm("s", ("cacovid", "random", "oracle"), policy, lambda i: torch.Generator().manual_seed(100 + i), 1.0, 1.5),
    ]
    settings = AnswerSettings(FRAMES, 1.0, TOKENS)
    (q,) = answer_questions(adapter, [rec], arms, [0.1], settings, oracle=oracle)
    assert q.arms[""].scores is None and set(q.arms[""].rewards) == {("uniform", 0.1)}
    assert set(q.arms["s"].rewards) == {("cacovid", 0.1), ("random", 0.1), ("oracle", 0.1)}
    with torch.no_grad():
        enc = adapter.encode(q.frames, build_prompt(rec.problem, rec.problem_type))
        scores = policy.score(enc)
    torch.testing.assert_close(q.arms["s"].scores.token, scores.token)
    drawn = get_selector("random").select(SelectionContext(enc=enc, generator=torch.Generator().manual_seed(100)), 0.1)
    assert torch.equal(q.arms["s"].blocks[("random", 0.1)].kept.cpu(), drawn)
    kept = select_tokens(scores, 0.1, 1.0, max_ratio=0.15)
    assert torch.equal(q.arms["s"].blocks[("cacovid", 0.1)].kept.cpu(), kept)
    assert {5, 70} <= set(q.arms["s"].blocks[("oracle", 0.1)].kept.tolist())
    assert q.full_answer == adapter.generate(enc, None, TOKENS)[0]
    (no_oracle,) = answer_questions(adapter, [rec], arms, [0.1], settings)
    assert ("oracle", 0.1) not in no_oracle.arms["s"].rewards


def test_accuracy_table_is_the_report_table_of_one_evaluation() -> None:
    result = {"n": 4, "full": 0.75, "methods": {"uniform": {"0.1": 0.25, "0.5": 0.5}}}
    assert accuracy_table(result) == {
        "n": 4,
        "full": {"mean": 0.75, "std": 0.0},
        "uniform": {"0.1": {"mean": 0.25, "std": 0.0}, "0.5": {"mean": 0.5, "std": 0.0}},
    }
