"""Evaluation as a Ray task: the newest weights, a held-out split, several retentions, the baselines.

Launched periodically by the driver without stopping training (it runs beside the reward actors) and
standalone by ``cacovid-rl eval``.
"""

from __future__ import annotations

from typing import Any

import ray

from cacovid_rl.config import Config, from_dict


def run_evaluation(cfg: Config, policy, version: int, adapter=None, progress: bool = False) -> dict[str, Any]:
    """In-process evaluation on ``cfg.data.eval_path`` (shared by the Ray task and the CLI)."""
    from cacovid_rl.data.records import load_records
    from cacovid_rl.eval.evaluate import evaluate
    from cacovid_rl.models.loading import load_adapter

    adapter = adapter or load_adapter(cfg.model)
    records = load_records(cfg.data.eval_path, cfg.data.video_root).records
    if cfg.eval.max_samples:
        records = records[: cfg.eval.max_samples]
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
    result["version"] = version
    return result


def _evaluation_task(cfg_dict: dict[str, Any], handle, version: int) -> dict[str, Any]:
    import torch

    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.rl.worker import build_policy

    cfg = from_dict(cfg_dict)
    torch.set_num_threads(cfg.cluster.torch_threads)
    adapter = load_adapter(cfg.model)
    policy = build_policy(cfg, adapter)
    policy.load_flat_state(handle.fetch(), handle.meta)
    return run_evaluation(cfg, policy, version, adapter=adapter)


def launch_evaluation(cfg: Config, handle, version: int) -> ray.ObjectRef:
    """Start the evaluation task; it asks for the same accelerator as a reward actor."""
    c = cfg.cluster
    opts: dict[str, Any] = {"num_cpus": 0 if c.address == "local" else c.actor_num_cpus, "num_gpus": c.actor_num_gpus}
    if c.actor_resource:
        opts["resources"] = {c.actor_resource: 1}
    return ray.remote(_evaluation_task).options(**opts).remote(cfg.to_dict(), handle, version)
