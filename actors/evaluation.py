"""Evaluation as a Ray task: the newest weights, a held-out split, several retentions, the baselines.

Launched periodically by the driver without stopping training (it runs beside the reward actors) and
standalone by ``cacovid-rl eval``.
"""

from __future__ import annotations

from typing import Any

import ray

from cacovid_rl.config import Config, from_dict


def run_evaluation(
    cfg: Config, policy, version: int, adapter=None, progress: bool = False, samples: int = 0
) -> dict[str, Any]:
    """In-process evaluation on ``cfg.data.eval_path`` (shared by the Ray task and the CLI): the records that load
    and fit ``model.max_prompt_tokens``, through the one evaluation loop (``cacovid_rl.eval.evaluate``).

    ``samples`` > 0 adds that many answered questions with their kept-token pictures (``result["samples"]``), which
    the driver logs as a wandb table."""
    from cacovid_rl.data.records import load_records
    from cacovid_rl.eval.evaluate import evaluate
    from cacovid_rl.models.loading import load_adapter

    adapter = adapter or load_adapter(cfg.model)
    report = load_records(cfg.data.eval_path, cfg.data.video_root, allow_outside_root=cfg.data.allow_outside_video_root)
    records = report.records
    if cfg.eval.max_samples:
        records = records[: cfg.eval.max_samples]
    records, over_budget = _within_prompt_budget(adapter, records, cfg.model.max_prompt_tokens)
    if policy is not None:
        policy = policy.to(adapter.device).eval()
    result = evaluate(
        adapter,
        policy,
        records,
        cfg.eval.retentions,
        cfg.eval.baselines,
        num_frames=cfg.data.num_frames,
        max_fps=cfg.data.max_fps,
        max_new_tokens=cfg.model.max_new_tokens,
        seed=cfg.seed,
        imp_ratio=cfg.eval.imp_ratio,
        max_ratio_scale=cfg.eval.max_ratio_scale,
        fix_official_bugs=cfg.reward.fix_official_bugs,
        progress=progress,
    )
    # Skipped before evaluation (over the prompt budget) and at load count with the per-record skips.
    result["skipped"] = int(result.get("skipped", 0)) + len(over_budget)
    result["errors"] = [*over_budget, *result.get("errors", [])][:50]
    result["load_skipped"] = dict(report.skipped)
    result["version"] = version
    if samples and policy is not None:
        from cacovid_rl.eval.samples import sample_questions

        result["samples"] = sample_questions(adapter, policy, records, cfg, n=samples)
    return result


def _within_prompt_budget(adapter, records: list, budget: int) -> tuple[list, list[str]]:
    """The records whose prompt fits ``model.max_prompt_tokens``, and one message per record that does not.

    Filtered here rather than in the evaluation loop: a 100,000-character question runs the LLM out of memory (or
    for minutes) before any per-record ``except`` could help. A record the tokenizer rejects is dropped the same way.
    """
    from cacovid_rl.rl.worker import check_prompt_budget

    kept, dropped = [], []
    for rec in records:
        try:
            check_prompt_budget(adapter, rec, budget)
        except Exception as exc:  # the record's own failure: it is skipped, the evaluation goes on
            dropped.append(f"{rec.sample_id}: {type(exc).__name__}: {exc}")
            continue
        kept.append(rec)
    return kept, dropped


def _evaluation_task(cfg_dict: dict[str, Any], handle, version: int) -> dict[str, Any]:
    import torch

    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy

    cfg = from_dict(cfg_dict)
    torch.set_num_threads(cfg.cluster.torch_threads)
    adapter = load_adapter(cfg.model)
    policy = CacovidPolicy.from_adapter(adapter, cfg.policy)
    policy.load_flat_state(handle.fetch(), handle.meta)
    return run_evaluation(cfg, policy, version, adapter=adapter, samples=4)


def launch_evaluation(cfg: Config, handle, version: int) -> ray.ObjectRef:
    """Start the evaluation task; it asks for the same accelerator as a reward actor."""
    c = cfg.cluster
    opts: dict[str, Any] = {"num_cpus": 0 if c.address == "local" else c.actor_num_cpus, "num_gpus": c.actor_num_gpus}
    if c.actor_resource:
        opts["resources"] = {c.actor_resource: 1}
    return ray.remote(_evaluation_task).options(**opts).remote(cfg.to_dict(), handle, version)
