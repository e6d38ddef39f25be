"""Reward throughput: token combinations scored per second by the reward actor's path vs the reference and naive ones.

What is measured (issue 7 #1): for the same questions (synthetic needle videos, ``make_synthetic``), the same model
and the same ``G`` sampled combinations per question, the wall time of turning one question into ``G`` rewards:

- ``actor`` -- what ``cacovid_rl.rl.rollout`` does in a reward actor: encode the video once, the policy's scoring
  pass, ONE ``adapter.generate`` over all ``G`` pruned sequences (batched, finished rows compacted out of the batch
  and the KV cache, the multiple-choice first-token fast path for MC questions), the rewards.
- ``reference`` -- the reference trainer's path: encode once, the policy's scoring pass, ONE Hugging Face
  ``model.generate`` on the ``G`` pruned sequences as a batch with its settings (``do_sample=True``, temperature
  0.01, top_p 0.01, seeded, up to 768 new tokens: it runs until every row stops or 768), the rewards, then its
  second policy pass for the log-probabilities of the sampled combinations.
- ``reference_capped`` -- the same with ``max_new_tokens`` equal to the actor's: separates the cost of the 768-token
  budget from the cost of the implementation.
- ``naive`` -- per combination: re-encode the video, one greedy ``model.generate`` (the actor's ``max_new_tokens``).
- ``prefill_floor`` -- not a path: encode + policy scoring + ONE prefill of the ``G`` pruned sequences and the first
  token's logits, no decoding, no rewards. Every batched path must do at least this; ``actor_over_floor`` says how
  close the actor's path is to it.

Every variant includes the same per-question work (encoding, policy scoring), so the ratios compare the whole
reward path. Combination sampling (identical inputs for all paths) is done once, outside the timing. Variants are
timed interleaved (round-robin), repeated; combinations/s is ``questions x G / time``.

Correctness: per combination, the rewards of the three paths must be identical (agreement rates reported), and the
sampled reference (temperature 0.01, top_p 0.01) must give the greedy answers (checked against untimed greedy
decoding without the fast path on the first ``max_new_tokens`` tokens).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    REPO_ROOT,
    Stats,
    annotate,
    base_parser,
    finish,
    measure_interleaved,
    model_name,
    new_figure,
    print_table,
    replot,
    resolve_model,
    save_figure,
    setup_process,
    synthetic_data,
)
from cacovid_rl.config import load_config
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord, load_records
from cacovid_rl.data.video import read_frames
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.policy.sampling import sample_combinations
from cacovid_rl.rl.loss import bernoulli_logprob, frame_keep_masks, keep_masks
from cacovid_rl.rl.rewards import batch_rewards
from cacovid_rl.types import PolicyScores

REF_TEMPERATURE = 0.01
REF_TOP_P = 0.01
REF_MAX_NEW_TOKENS = 768
TARGETS = {"reference": 3.0, "naive": 10.0}


@dataclass
class Question:
    record: QARecord
    prompt: str
    frames: np.ndarray
    keep: torch.Tensor  # [G, K] sampled combinations (shared by every path)

    @property
    def multiple_choice(self) -> bool:
        return self.record.problem_type == "multiple choice"


@dataclass
class PathOutput:
    rewards: list[np.ndarray]
    texts: list[list[str]]
    extra: dict[str, Any]


class Paths:
    """The scoring paths over one fixed list of questions."""

    def __init__(self, adapter, policy: CacovidPolicy, questions: list[Question], max_new: int, fast_path: bool,
                 ref_max_new: int, seed: int) -> None:  # fmt: skip
        self.adapter, self.policy, self.questions = adapter, policy, questions
        self.max_new, self.fast_path, self.ref_max_new, self.seed = max_new, fast_path, ref_max_new, seed
        self.stop = list(adapter.stop_token_ids)
        self.pad = adapter.tokenizer.pad_token_id if adapter.tokenizer.pad_token_id is not None else self.stop[0]

    # -- the reward actor's path (rl/rollout.py, one iteration)
    @torch.no_grad()
    def actor(self) -> PathOutput:
        rewards, texts = [], []
        for q in self.questions:
            enc = self.adapter.encode(q.frames, q.prompt)
            self.policy.score(enc)
            fast = self.fast_path and q.multiple_choice
            answers = self.adapter.generate(enc, q.keep, self.max_new, first_token_fast_path=fast)
            rewards.append(batch_rewards(answers, q.record.answer, q.record.problem_type))
            texts.append(answers)
        return PathOutput(rewards, texts, {})

    # -- the reference trainer's path
    def _hf_generate(self, embeds: torch.Tensor, positions: torch.Tensor, max_new: int, sample: bool) -> torch.Tensor:
        kwargs: dict[str, Any] = (
            {"do_sample": True, "temperature": REF_TEMPERATURE, "top_p": REF_TOP_P}
            if sample
            else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        )
        return self.adapter.model.generate(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            max_new_tokens=max_new,
            eos_token_id=self.stop,
            pad_token_id=self.pad,
            **kwargs,
        )

    @torch.no_grad()
    def reference(self, max_new: int | None = None) -> PathOutput:
        max_new = max_new or self.ref_max_new
        rewards, texts, steps, row_tokens, ids = [], [], [], [], []
        for i, q in enumerate(self.questions):
            enc = self.adapter.encode(q.frames, q.prompt)
            self.policy.score(enc)  # first pass: the scores the combinations are sampled from
            embeds, positions = self.adapter.gather(enc, q.keep)
            torch.manual_seed(self.seed + i)
            out = self._hf_generate(embeds, positions, max_new, sample=True)
            answers = self.adapter.tokenizer.batch_decode(out, skip_special_tokens=True)
            rewards.append(batch_rewards(answers, q.record.answer, q.record.problem_type))
            texts.append(answers)
            # second policy pass: log-probabilities of the sampled combinations (token + frame Bernoulli terms)
            new = self.policy.score(enc)
            t, n = enc.num_frames, enc.tokens_per_frame
            keep = q.keep.to(new.token.device)
            logp = bernoulli_logprob(new.token.reshape(-1), keep_masks(keep, t * n)).sum(-1)
            logp = logp + bernoulli_logprob(new.frame, frame_keep_masks(keep, t, n)).sum(-1)
            stopped = torch.isin(out, torch.tensor(self.stop, device=out.device))
            length = torch.where(
                stopped.any(1), stopped.float().argmax(1) + 1, torch.full_like(out[:, 0], out.shape[1])
            )
            steps.append(int(out.shape[1]))
            row_tokens.append(float(length.float().mean()))
            ids.append(out.cpu())
        return PathOutput(rewards, texts, {"steps": steps, "mean_tokens_per_row": row_tokens, "ids": ids})

    # -- the floor: what any one-batched-forward path must do (no decoding, no rewards)
    @torch.no_grad()
    def prefill_floor(self) -> PathOutput:
        for q in self.questions:
            enc = self.adapter.encode(q.frames, q.prompt)
            self.policy.score(enc)
            embeds, positions = self.adapter.gather(enc, q.keep)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out = self.adapter.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask)
            self.adapter.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        return PathOutput([], [], {})

    # -- naive: re-encode and generate one combination at a time
    @torch.no_grad()
    def naive(self) -> PathOutput:
        rewards, texts = [], []
        for q in self.questions:
            enc = self.adapter.encode(q.frames, q.prompt)
            self.policy.score(enc)
            answers = []
            for row in q.keep:
                enc = self.adapter.encode(q.frames, q.prompt)
                embeds, positions = self.adapter.gather(enc, row[None])
                out = self._hf_generate(embeds, positions, self.max_new, sample=False)
                answers.append(self.adapter.tokenizer.decode(out[0], skip_special_tokens=True))
            rewards.append(batch_rewards(answers, q.record.answer, q.record.problem_type))
            texts.append(answers)
        return PathOutput(rewards, texts, {})

    @torch.no_grad()
    def greedy_reference_texts(self) -> list[list[str]]:
        """Untimed: greedy answers without the fast path (what temperature 0.01 / top_p 0.01 should reproduce)."""
        out = []
        for q in self.questions:
            enc = self.adapter.encode(q.frames, q.prompt)
            out.append(self.adapter.generate(enc, q.keep, self.max_new))
        return out


def load_questions(adapter, policy, cfg, n: int, data_n: int, seed: int) -> tuple[list[Question], str]:
    data = synthetic_data(data_n)
    records = load_records(data / "train.json", data).records[:n]
    questions = []
    for i, rec in enumerate(records):
        frames = read_frames(rec.video, cfg.data.num_frames, cfg.data.max_fps)
        prompt = build_prompt(rec.problem, rec.problem_type)
        with torch.no_grad():
            enc = adapter.encode(frames, prompt)
            scores = policy.score(enc)
        scores = PolicyScores(token=scores.token.float().cpu(), frame=scores.frame.float().cpu())  # as rl/rollout.py
        gen = torch.Generator().manual_seed(seed + i)
        combos = sample_combinations(scores, enc.video_features().float().cpu(), cfg.sampling.rate, cfg.sampling, gen)
        questions.append(Question(rec, prompt, frames, combos.keep.to(adapter.device)))
    return questions, str(data)


def agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    x, y = np.concatenate(a), np.concatenate(b)
    return float(np.mean(x == y))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__ or "", "reward_throughput.json")
    p.add_argument("--questions", type=int, default=0, help="questions (default 8, --quick 2)")
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "debug_local.yaml"))
    p.add_argument("--max-new-tokens", type=int, default=16, help="the actor's answer budget (library default 16)")
    p.add_argument("--ref-max-new-tokens", type=int, default=REF_MAX_NEW_TOKENS)
    p.add_argument("--group", default="1,23,8", help="content,token,frame samples per question (method: 1,23,8)")
    args = p.parse_args(argv)
    if args.plot_only:
        return replot(args, plot)
    setup_process(args.threads)
    started = time.perf_counter()
    n_q = args.questions or (2 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 3)
    group = [int(x) for x in args.group.split(",")]
    if args.quick:
        group = [1, 5, 2]
    model_path, source = resolve_model(args.model, args.seed)
    cfg = load_config(
        args.config,
        [
            f"model.path={model_path}",
            f"model.device={args.device}",
            f"model.max_new_tokens={args.max_new_tokens}",
            f"sampling.num_content={group[0]}",
            f"sampling.num_token={group[1]}",
            f"sampling.num_frame={group[2]}",
        ],
    )
    adapter = load_adapter(cfg.model)
    torch.manual_seed(cfg.seed)
    policy = CacovidPolicy.from_adapter(adapter, cfg.policy).eval()
    questions, data_dir = load_questions(adapter, policy, cfg, n_q, 40, args.seed)
    g = int(questions[0].keep.shape[0])
    paths = Paths(
        adapter, policy, questions, cfg.model.max_new_tokens, cfg.model.mc_first_token_fast_path,
        args.ref_max_new_tokens, args.seed,
    )  # fmt: skip
    fns = {
        "actor": paths.actor,
        "reference": paths.reference,
        "reference_capped": lambda: paths.reference(cfg.model.max_new_tokens),
        "naive": paths.naive,
        "prefill_floor": paths.prefill_floor,
    }
    print(f"{len(questions)} questions x G={g}: {list(fns)} x {repeats} repeats (interleaved)", flush=True)
    stats, outs = measure_interleaved(fns, repeats, warmup=1, device=args.device)
    combos = len(questions) * g
    throughput = {k: Stats.of([combos / t for t in s.samples]) for k, s in stats.items()}
    speedup = {
        k: Stats.of([b / a for a, b in zip(stats["actor"].samples, stats[k].samples, strict=True)])
        for k in fns
        if k != "actor"
    }
    greedy = paths.greedy_reference_texts()
    ref_ids = outs["reference"].extra["ids"]
    tok = adapter.tokenizer
    greedy_match = [
        tok.decode(row[: cfg.model.max_new_tokens], skip_special_tokens=True) == gt
        for ids, gq in zip(ref_ids, greedy, strict=True)
        for row, gt in zip(ids, gq, strict=True)
    ]
    rewards = {k: outs[k].rewards for k in fns if k != "prefill_floor"}
    results: dict[str, Any] = {
        "combinations": combos,
        "group_size": g,
        "questions": len(questions),
        "problem_types": sorted({q.record.problem_type for q in questions}),
        "time_s": stats,
        "combos_per_s": throughput,
        "speedup_of_actor": speedup,
        "targets": {
            k: {"target": v, "measured_median": speedup[k].median, "met": speedup[k].median >= v}
            for k, v in TARGETS.items()
        },
        "actor_over_floor": Stats.of(
            [a / f for a, f in zip(stats["actor"].samples, stats["prefill_floor"].samples, strict=True)]
        ),
        "reward_agreement": {
            "actor_vs_reference": agreement(rewards["actor"], rewards["reference"]),
            "actor_vs_reference_capped": agreement(rewards["actor"], rewards["reference_capped"]),
            "actor_vs_naive": agreement(rewards["actor"], rewards["naive"]),
            "reference_vs_naive": agreement(rewards["reference"], rewards["naive"]),
        },
        "reference_sampled_equals_greedy": float(np.mean(greedy_match)),
        "reference_decode_steps": outs["reference"].extra["steps"],
        "reference_mean_tokens_per_row": float(np.mean(outs["reference"].extra["mean_tokens_per_row"])),
        "mean_reward": float(np.mean(np.concatenate(rewards["actor"]))),
    }
    config = {
        "model": source,
        "model_path": model_path,
        "data": data_dir,
        "sampling": {**cfg.sampling.__dict__},
        "frames": cfg.data.num_frames,
        "actor_max_new_tokens": cfg.model.max_new_tokens,
        "actor_mc_fast_path": cfg.model.mc_first_token_fast_path,
        "actor_combos_per_forward": cfg.model.combos_per_forward or "auto (choose_chunk_size)",
        "reference": {"temperature": REF_TEMPERATURE, "top_p": REF_TOP_P, "max_new_tokens": args.ref_max_new_tokens},
        "repeats": repeats,
        "dtype": str(adapter.dtype).removeprefix("torch."),
    }
    notes = [
        "All paths: encode + policy scoring per question; combination sampling done once outside the timing.",
        "reference includes its second policy pass (log-probs of the G combinations) after generation.",
        f"Reference rows ran {results['reference_mean_tokens_per_row']:.2f} new tokens on average "
        f"(max steps {max(results['reference_decode_steps'])}): the model stops long before 768.",
        "prefill_floor is a lower bound, not a path (one batched prefill + first-token logits per question).",
    ]
    if source.startswith("fallback"):
        notes.append("Model: a tiny RANDOM LLaVA-OV (the shipped trained model was missing when this ran).")
    return finish(args, "reward_throughput", config=config, results=results, notes=notes, started=started, argv=argv,
                  report=report, plot=plot)  # fmt: skip


def report(res: dict[str, Any]) -> None:
    rows = []
    for k, s in res["time_s"].items():
        sp = res["speedup_of_actor"].get(k)
        rows.append([k, res["combos_per_s"][k].s(), s.s(), "1 (baseline)" if sp is None else sp.s()])
    print_table(
        f"Reward path, {res['questions']} questions x G={res['group_size']} ({res['combinations']} combinations)",
        ["path", "combinations/s [p10-p90]", "seconds per run", "actor speedup (x)"],
        rows,
    )
    print(f"actor time / prefill floor: {res['actor_over_floor'].s()} (1.0 = nothing but one batched prefill)")
    agree = [[k, f"{v:.1%}"] for k, v in res["reward_agreement"].items()]
    agree.append(["reference sampled == greedy", f"{res['reference_sampled_equals_greedy']:.1%}"])
    print_table("Rewards per combination: agreement", ["pair", "identical"], agree)
    print_table(
        "Targets (CPU, tiny model)",
        ["vs", "target", "measured", "met"],
        [[k, f">= {v['target']}x", f"{v['measured_median']:.2f}x", v["met"]] for k, v in res["targets"].items()],
    )


SERIES = {
    "actor": "this project's reward path (cacovid_rl.rl.rollout): one batched generate over the G combinations, "
    "finished rows compacted out, the multiple-choice first-token fast path",
    "reference": "the official trainer's path: one Hugging Face generate of the G combinations, sampled "
    "(temperature 0.01, top_p 0.01) up to 768 new tokens, then its second policy pass",
    "reference_capped": "the same with max_new_tokens capped at the actor's (the 768-token budget's share)",
    "naive": "per combination: re-encode the video, one greedy generate",
    "prefill_floor": "not a path: encode + policy + ONE batched prefill and first-token logits, no decoding "
    "(the least any batched path must do)",
}


def plot(res: dict[str, Any], path: str, payload: dict[str, Any] | None = None) -> None:
    fig, (ax,) = new_figure(width=7.5, height=3.8)
    names = list(res["combos_per_s"])
    med = [res["combos_per_s"][k].median for k in names]
    lo = [m - res["combos_per_s"][k].p10 for m, k in zip(med, names, strict=True)]
    hi = [res["combos_per_s"][k].p90 - m for m, k in zip(med, names, strict=True)]
    bars = ax.barh(names, med, xerr=[lo, hi], color=["tab:red", "tab:grey", "silver", "tab:brown", "white"],
                   edgecolor="k")  # fmt: skip
    for b, k in zip(bars, names, strict=True):
        sp = None if k == "prefill_floor" else res["speedup_of_actor"].get(k)
        label = "" if sp is None else f"  actor {sp.median:.1f}x faster"
        ax.text(res["combos_per_s"][k].p90, b.get_y() + b.get_height() / 2, label, va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("combinations scored per second (median, p10-p90)")
    ax.set_xlim(0, max(res["combos_per_s"][k].p90 for k in names) * 1.3)  # room for the speedup labels
    cfg = (payload or {}).get("config", {})
    model = f"{model_name(cfg)}, {cfg.get('frames', '?')} frames" if cfg else "not recorded"
    annotate(
        fig,
        payload,
        f"Reward path throughput: G={res['group_size']} combinations x {res['questions']} questions",
        model,
        {k: SERIES[k] for k in names if k in SERIES},
    )
    save_figure(fig, path)


if __name__ == "__main__":
    main()
