"""One question's rollout: encode the video once, score it with the (old) policy, then for each
iteration sample combinations from those first-iteration scores, answer them all with the frozen
LLM and reward them, adapting the keep rate from the question's memory.

The adaptive rate is the official one (grpo_trainer.py ``_inner_training_loop``; golden
``rate_and_schedule.json``): the question's accuracy is the float32 mean of the **token-mode** rewards in its
memory (content and frame samples do not count); at ``>= high_reward`` the rate halves, at ``<= low_reward`` it
doubles, bounded below by ``min(min_rate, base rate)`` and above by ``max(max_rate, base rate)``, so a base rate
outside ``[min_rate, max_rate]`` is never moved further out by the bounds.

Because every iteration samples from the first-iteration scores and the rate depends only on
rewards, the whole loop runs at one weight version: a reward actor does it end to end and the
learner then replays the per-iteration optimiser steps on the growing memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cacovid_rl.config import ModelConfig, RewardConfig, RolloutConfig, SamplingConfig
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord
from cacovid_rl.policy.sampling import sample_combinations
from cacovid_rl.rl.rewards import batch_rewards
from cacovid_rl.types import MODE_TOKEN, EncodedQuestion, PolicyScores, QuestionMemory


def next_rate(rate: float, accuracy: float, cfg: RolloutConfig, base_rate: float | None = None) -> float:
    """Adaptive per-question rate: halve when the question is too easy, double when too hard.

    ``base_rate``: the rate the question started at; the bounds widen to include it (official rule). ``None``
    uses ``cfg.min_rate`` / ``cfg.max_rate`` as they are.
    """
    if not cfg.adaptive_rate:
        return rate
    floor = cfg.min_rate if base_rate is None else min(cfg.min_rate, base_rate)
    ceiling = cfg.max_rate if base_rate is None else max(cfg.max_rate, base_rate)
    if accuracy >= cfg.high_reward:
        return max(rate / 2, floor)
    if accuracy <= cfg.low_reward:
        return min(rate * 2, ceiling)
    return rate


def token_accuracy(memory: QuestionMemory) -> float:
    """The accuracy the rate adapts to: the float32 mean of the token-mode rewards in memory (0.5, the official
    starting value, before any token-mode sample)."""
    if not memory.rewards:
        return 0.5
    rewards, modes = torch.cat(memory.rewards).float(), torch.cat(memory.mode)
    token = rewards[modes == MODE_TOKEN]
    return float(token.mean()) if token.numel() else 0.5


def sample_generator(seed: int, sample_id: str, epoch: int) -> torch.Generator:
    """RNG of one question's rollout, derived from (seed, sample, epoch) only.

    Seeding by the sample rather than by the actor makes a re-dispatched question (dead actor) give
    the same trajectory, and makes runs independent of which actor took which question.
    """
    import hashlib

    digest = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


@dataclass
class RolloutResult:
    enc: EncodedQuestion
    old: PolicyScores
    memory: QuestionMemory
    timings: dict[str, float] = field(default_factory=dict)
    num_combinations: int = 0


@torch.no_grad()
def encode_question(adapter, record: QARecord, frames: np.ndarray) -> EncodedQuestion:
    """The question's LLM input: its frames and prompt through ``adapter.encode``.

    One definition for the rollout and the reward actor's prefetch thread, so both build the same prompt. The
    ``no_grad`` is part of the contract: grad mode is per thread, and a background thread starts with it on.
    """
    return adapter.encode(frames, build_prompt(record.problem, record.problem_type))


@torch.no_grad()
def rollout_question(
    adapter,
    policy,
    record: QARecord,
    frames: np.ndarray,
    sampling: SamplingConfig,
    rollout: RolloutConfig,
    model_cfg: ModelConfig,
    generator: torch.Generator,
    reward_cfg: RewardConfig | None = None,
    encoded: EncodedQuestion | None = None,
    encode_s: float = 0.0,
) -> RolloutResult:
    """Run one question's full sampling-and-reward loop at the policy's current weights.

    ``reward_cfg``: ``None`` is ``RewardConfig()`` (the official rewards with their evident bugs fixed).
    ``encoded``: the question already encoded from ``frames`` (``encode_question``, e.g. on the reward actor's
    prefetch thread), in ``encode_s`` seconds; ``None`` encodes here. Either way ``timings["encode"]`` is the
    encode's own time and ``timings["total"]`` includes it, so the metrics mean the same with and without it.
    """
    fix_bugs = (reward_cfg if reward_cfg is not None else RewardConfig()).fix_official_bugs
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if encoded is None:
        enc = encode_question(adapter, record, frames)
        encode_s = time.perf_counter() - t0
    else:
        enc = encoded
    t1 = time.perf_counter()
    old = policy.score(enc)
    old = PolicyScores(token=old.token.float().cpu(), frame=old.frame.float().cpu())
    t2 = time.perf_counter()
    features = enc.video_features().float().cpu()
    memory = QuestionMemory()
    rate = sampling.rate
    t_sample = t_llm = 0.0
    fast_path = model_cfg.mc_first_token_fast_path and record.problem_type == "multiple choice"
    for _ in range(rollout.iterations):
        ts = time.perf_counter()
        combos = sample_combinations(old, features, rate, sampling, generator)
        tl = time.perf_counter()
        answers = adapter.generate(
            enc, combos.keep.to(enc.inputs_embeds.device), model_cfg.max_new_tokens, first_token_fast_path=fast_path
        )
        rewards = torch.from_numpy(batch_rewards(answers, record.answer, record.problem_type, fix_bugs))
        t_sample += tl - ts
        t_llm += time.perf_counter() - tl
        memory.append(combos, rewards)
        rate = next_rate(rate, token_accuracy(memory), rollout, base_rate=sampling.rate)
    total = encode_s + time.perf_counter() - t1
    timings.update(encode=encode_s, policy=t2 - t1, sample=t_sample, score=t_llm, total=total)
    n = sum(len(k) for k in memory.keep)
    return RolloutResult(enc=enc, old=old, memory=memory, timings=timings, num_combinations=n)
