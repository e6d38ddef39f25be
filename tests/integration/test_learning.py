"""Learning check: a short in-process training run (RewardWorker + PolicyUpdater, the debug-local config) must
teach the policy to score the box the QUESTION names, which a policy that ignores the question cannot do.

The data are pairs: one synthetic video with two boxes of unique outer colours in the same frame, asked about
once per box ("What colour are the dots in the pink box ?", then "... the cyan box ?"). For a pair (A, B) the
question contrast is

    c = [s_A(q_A) - s_B(q_A)] - [s_A(q_B) - s_B(q_B)]

(``s_X(q)``: the token score of box X when the policy is given question q): how much asking about A rather than
B moves A above B. Whatever part of the scores does not depend on the question (saliency, position, the box the
policy prefers anyway) cancels, so a question-blind or collapsed policy has c = 0 exactly, and c = 0 fails the bar
(ties count against). The bar: c > 0 on at least ``CONTRAST_BAR`` of the ``PAIRS`` pairs, and the mean c at least
``MIN_MEAN_CONTRAST`` (an untrained policy's |c| is under 1e-5, its sign a coin flip). The asked box must also
rise within its frame (mean rank halved), so the policy learns where the answer is, not only its direction.

One test run trains two policies the same way on the same pairs: the policy as shipped, and a question-blind
control whose policy sees one fixed question instead of the asked one (at rollout and in the learner's
recomputed scores; the frozen LLM still answers the real question, so both get the same reward signal). The
shipped policy must pass; the control, and a collapsed policy, must not.

Why a contrast rather than "the asked box outranks the other asked box on both questions": in 36 updates the
question-dependent part of the scores grows (c > 0 on 31 of 32 pairs over 4 seeds) but the question-independent
part grows faster, so which of the two boxes ranks first usually does not flip yet (0-2 of 8 pairs); the full
200-update run does flip it (`docs/report`: the answer token kept on 97% of held-out questions at 10%).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cacovid_rl.config import Config, load_config
from cacovid_rl.data import synthetic
from cacovid_rl.data.prompts import build_prompt, problem_with_options
from cacovid_rl.data.records import QARecord, load_records
from cacovid_rl.data.video import read_frames
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.rl.update import PolicyUpdater
from cacovid_rl.rl.worker import RewardWorker, WorkItem
from cacovid_rl.types import EncodedQuestion

DEBUG_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug_local.yaml"
PAIRS = 8
UPDATES = 24
CONTRAST_BAR = 6
"""Pairs out of ``PAIRS`` whose question contrast must be positive (see the measurements at the assertion)."""
MIN_MEAN_CONTRAST = 0.05
BLIND_QUESTION = "What colour are the dots in the box ?"


def pair_scenes(rng: np.random.Generator) -> tuple[synthetic.Scene, synthetic.Scene]:
    """One video with two askable boxes in the same frame, and the two questions about them.

    Each asked box has an outer colour no other box in the video has (the task's rule: the question names exactly
    one box), neither is white (the blind prior), and the 3-5 boxes of every frame are drawn as in
    ``synthetic.sample_scene``. Same frame, so "outranks" is the per-frame order the selection uses.
    """
    colours = [c for c in synthetic.OUTER_COLOURS if c != synthetic.PRIOR_OUTER]
    a, b = (colours[int(i)] for i in rng.choice(len(colours), 2, replace=False))
    rest = [c for c in synthetic.OUTER_COLOURS if c not in (a, b)]
    frame = int(rng.integers(0, synthetic.NUM_FRAMES))
    cell_a, cell_b = (int(c) for c in rng.choice(synthetic.TOKENS_PER_FRAME, 2, replace=False))
    boxes = [synthetic.make_box(rng, a, cell_a, frame, 1), synthetic.make_box(rng, b, cell_b, frame, 1)]
    for t in range(synthetic.NUM_FRAMES):
        taken = {cell_a, cell_b} if t == frame else set()
        free = [c for c in range(synthetic.TOKENS_PER_FRAME) if c not in taken]
        for c in rng.choice(free, size=max(int(rng.integers(3, 6)) - len(taken), 0), replace=False):
            boxes.append(synthetic.make_box(rng, rest[int(rng.integers(0, len(rest)))], int(c), t, 1))
    ask_a = synthetic.ask(rng, tuple(boxes), 0.0, synthetic.NUM_FRAMES)
    ask_b = synthetic.ask(rng, (boxes[1], boxes[0], *boxes[2:]), 0.0, synthetic.NUM_FRAMES)
    return ask_a, ask_b


def write_pairs(root: Path, n: int, seed: int) -> Path:
    """``n`` pair videos under ``root`` and their ``2n`` records (A then B of each pair) in ``pairs.json``."""
    records = []
    for i in range(n):
        ask_a, ask_b = pair_scenes(np.random.default_rng([seed, i]))
        video = f"videos/pair_{i:03d}.mp4"
        synthetic.write_mp4(synthetic.render_frames(ask_a), root / video)
        records += [synthetic.scene_record(scene, f"pair-{i}-{k}", video) for k, scene in (("a", ask_a), ("b", ask_b))]
    path = root / "pairs.json"
    path.write_text(json.dumps(records))
    return path


class QuestionBlind(nn.Module):
    """The control: ``policy`` scoring every question as if it were ``blind`` (one fixed prompt's encoding).

    Everything but the video block is replaced by the fixed prompt's tokens, in the rollout's old scores and in
    the learner's recomputed ones alike, so the policy cannot tell two questions about one video apart.
    """

    def __init__(self, policy: nn.Module, blind: EncodedQuestion) -> None:
        super().__init__()
        self.policy = policy
        self.blind = blind

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, video_start: int, t: int, n: int):
        if video_start != self.blind.video_start:
            raise ValueError(f"video starts at {video_start}, the fixed prompt's at {self.blind.video_start}")
        x = self.blind.inputs_embeds.clone().to(inputs_embeds.dtype)
        x[video_start : video_start + t * n] = inputs_embeds.reshape(-1, x.shape[-1])[video_start : video_start + t * n]
        return self.policy(x, self.blind.position_ids, video_start, t, n)

    def score(self, enc: EncodedQuestion):
        return self(enc.inputs_embeds, enc.position_ids, enc.video_start, enc.num_frames, enc.tokens_per_frame)

    def param_groups(self, lr: float, decoder_lr_scale: float, weight_decay: float) -> list[dict]:
        return self.policy.param_groups(lr, decoder_lr_scale, weight_decay)


Pair = tuple[tuple[EncodedQuestion, int], tuple[EncodedQuestion, int]]


def contrasts(token_scores, pairs: list[Pair]) -> list[float]:
    """Per pair, the question contrast ``c`` of the module docstring."""
    out = []
    with torch.no_grad():
        for (enc_a, box_a), (enc_b, box_b) in pairs:
            sa, sb = token_scores(enc_a).reshape(-1), token_scores(enc_b).reshape(-1)
            out.append(float((sa[box_a] - sa[box_b]) - (sb[box_a] - sb[box_b])))
    return out


def passes(c: list[float]) -> bool:
    """The bar: c > 0 (strictly: a tie is no evidence of reading the question) on ``CONTRAST_BAR`` pairs, and a
    mean contrast of at least ``MIN_MEAN_CONTRAST``."""
    return sum(x > 0 for x in c) >= CONTRAST_BAR and float(np.mean(c)) >= MIN_MEAN_CONTRAST


def frame_rank(token_scores, pairs: list[Pair]) -> float:
    """Mean rank of the asked box among the tokens of its frame over all questions (0 = top; a tie counts
    against the asked box, so a collapsed policy ranks it last)."""
    ranks = []
    with torch.no_grad():
        for question in pairs:
            for enc, box in question:
                token = token_scores(enc)
                frame = token[box // token.shape[1]]
                ranks.append(int((frame >= token.reshape(-1)[box]).sum()) - 1)
    return float(np.mean(ranks))


def train(cfg: Config, records: list[QARecord], blind: bool) -> tuple[RewardWorker, list[Pair]]:
    """``UPDATES`` updates of ``questions_per_step`` questions cycling over ``records``; the worker (its policy
    trained) and the encoded pairs with their asked-box token indices."""
    worker = RewardWorker(cfg)
    raw = {r["problem_id"]: r for r in json.loads(Path(cfg.data.train_path).read_text())}
    encoded = [
        (
            worker.adapter.encode(read_frames(r.video, cfg.data.num_frames), build_prompt(r.problem, r.problem_type)),
            raw[r.sample_id]["meta"]["oracle_tokens"][0],
        )
        for r in records
    ]
    pairs: list[Pair] = list(zip(encoded[0::2], encoded[1::2], strict=True))
    if blind:
        fixed = build_prompt(problem_with_options(BLIND_QUESTION, synthetic.options()), "multiple choice")
        frames = read_frames(records[0].video, cfg.data.num_frames)  # any video: only its block is replaced
        worker.policy = QuestionBlind(worker.policy, worker.adapter.encode(frames, fixed))
    updater = PolicyUpdater(worker.policy, cfg.learner, cfg.loss, cfg.rollout.iterations)
    qps = cfg.learner.questions_per_step
    for step in range(UPDATES):
        trajs = []
        for i in range(qps):
            k = step * qps + i
            item = WorkItem(k, step, k // len(records), WorkItem.record_to_dict(records[k % len(records)]))
            status, payload = worker.run(item)
            assert status.ok, status
            trajs.append(Trajectory.from_bytes(payload))
        assert np.isfinite(updater.update(trajs)["loss/total"])
        worker.policy.eval()
    return worker, pairs


@pytest.mark.slow
def test_training_teaches_the_policy_the_box_the_question_names(tmp_path: Path) -> None:
    path = write_pairs(tmp_path, PAIRS, seed=1000)
    cfg = load_config(DEBUG_CONFIG, [f"data.train_path={path}", f"data.video_root={tmp_path}", "seed=0"])
    records = load_records(path, tmp_path).records
    assert len(records) == 2 * PAIRS

    def scores(worker: RewardWorker):
        return lambda enc: worker.policy.score(enc).token

    untrained = RewardWorker(cfg)
    aware, pairs = train(cfg, records, blind=False)
    blind, _ = train(cfg, records, blind=True)
    rank_before, rank_after = frame_rank(scores(untrained), pairs), frame_rank(scores(aware), pairs)
    c_aware, c_blind = contrasts(scores(aware), pairs), contrasts(scores(blind), pairs)
    c_collapsed = contrasts(lambda enc: torch.zeros(enc.num_frames, enc.tokens_per_frame), pairs)
    report = {"aware": c_aware, "blind": c_blind, "rank": (rank_before, rank_after)}
    # Measured (data seed 1000, policy seed 0, 2 CPU cores): the shipped policy's contrast is positive on 6 / 8 / 8 /
    # 7 / 6 of 8 pairs after 6 / 12 / 18 / 24 / 30 updates (mean 0.08 / 0.51 / 0.69 / 0.75 / 0.26; untrained: every
    # |c| < 1e-5), and after 36 updates on 8 / 7 / 8 / 8 of 8 pairs for four other data and policy seeds; the asked
    # box's rank in its frame 7.4 -> 1.4 after 24 updates. The blind control's contrast is 0.0 on every pair at
    # every point, although its rank falls too (7.4 -> 2.8: saliency), which is why the rank alone proves nothing.
    assert passes(c_aware), report
    assert rank_after <= rank_before / 2, report
    assert not passes(c_blind), report
    assert not passes(c_collapsed)
