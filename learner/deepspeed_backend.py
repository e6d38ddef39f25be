"""DeepSpeed ZeRO (stages 0-2) for the learner, behind ``learner.backend: deepspeed``.

A single learner owns the whole policy (about 259M parameters at 7B width), so there ZeRO's value is its
fused, partition-aware optimizer and mixed-precision master weights. In a learner group
(``learner.num_learners`` > 1, ``learner/learner_group.py``) the process group is already initialised with every
rank when this updater is built, so ZeRO 1/2 partition the optimizer state across the ranks and DeepSpeed reduces
the gradients; the group then checkpoints every rank's partition. Stage 3 (parameter partitioning) is rejected:
rank 0 publishes the whole policy.

Checkpoints stay pickle-free: the policy goes to safetensors as with the torch backend, and the
ZeRO optimizer is saved as its two real pieces of state, the base AdamW state and the fp32 master
partitions, which are restored in place (see :meth:`DeepSpeedBackend.state_dict`).

The method (which optimiser steps, on which samples) stays :class:`cacovid_rl.rl.update.PolicyUpdater`'s; this
module only supplies the step as an :class:`cacovid_rl.rl.update.OptimizerBackend`.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import torch

from cacovid_rl.config import LearnerConfig, LossConfig
from cacovid_rl.rl.update import GradientSync, PolicyUpdater, lr_lambda


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def ds_config(cfg: LearnerConfig, device: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": device.startswith("cuda")},
        # torch_adam: the reference AdamW, no compiled DeepSpeed CPU-Adam op needed.
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "steps_per_print": 10**9,
    }


class DeepSpeedBackend:
    """The DeepSpeed engine as an ``OptimizerBackend``: AdamW (``torch_adam``) with ZeRO stage 0-2 over the default
    process group, the learner's LR schedule, gradient clipping inside the engine."""

    def __init__(self, policy: torch.nn.Module, learner: LearnerConfig, iterations: int, device: str) -> None:
        """``policy`` must already be on ``device``; the engine steps it in place (``engine.module`` is ``policy``)."""
        if learner.zero_stage > 2:
            raise ValueError(
                f"learner.zero_stage={learner.zero_stage}: every learner rank holds (and rank 0 publishes) the whole "
                "policy; use ZeRO stage 0, 1 or 2 (stage 3 would shard the parameters themselves)"
            )
        _single_process_env()
        import deepspeed
        import deepspeed.ops

        # Skip DeepSpeed's shared-memory allreduce op: its JIT build costs about a minute on CPU, it is unused at
        # world size 1, and a learner group reduces over the process group it already has.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if device.startswith("cuda") else "gloo")
        groups = policy.param_groups(learner.lr, learner.decoder_lr_scale, learner.weight_decay)
        schedule = lr_lambda(learner, learner.total_steps * iterations, iterations)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=policy,
            model_parameters=groups,
            config=ds_config(learner, device),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        )
        self.engine = engine
        self.optimizer = optimizer
        self.scheduler = scheduler

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor, sync: GradientSync | None) -> float:
        # In a learner group (``sync`` set) DeepSpeed averages the ranks' gradients where the torch backend sums
        # them; each rank's loss is its share of the batch mean, so scaling by the world size restores the sum.
        self.engine.backward(loss * (sync.world_size if sync is not None else 1))
        self.engine.step()  # clips to gradient_clipping, steps the optimizer and the LR schedule
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def skip(self) -> None:
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict:
        opt = self.optimizer
        partitions = getattr(opt, "single_partition_of_fp32_groups", None)
        if partitions is None:  # ZeRO stage 0: a plain torch optimizer
            return {"base": opt.state_dict()}
        return {"base": opt.optimizer.state_dict(), "fp32_partitions": list(partitions)}

    def load_state_dict(self, state: dict) -> None:
        opt = self.optimizer
        partitions = getattr(opt, "single_partition_of_fp32_groups", None)
        if partitions is None:
            opt.load_state_dict(state["base"])
            return
        with torch.no_grad():
            for dst, src in zip(partitions, state["fp32_partitions"], strict=True):
                dst.copy_(src)
        opt.optimizer.load_state_dict(state["base"])
        # Push the restored fp32 masters into the (possibly bf16) model weights.
        for i in range(len(partitions)):
            opt._update_model_bit16_weights(i)


def deepspeed_updater(
    policy: torch.nn.Module, learner: LearnerConfig, loss: LossConfig, iterations: int, device: str = "cpu"
) -> PolicyUpdater:
    """A :class:`PolicyUpdater` whose optimisation step is a :class:`DeepSpeedBackend` (``learner.backend:
    deepspeed``); the same arguments as ``PolicyUpdater``."""
    policy = policy.to(device)
    return PolicyUpdater(
        policy, learner, loss, iterations, device, backend=DeepSpeedBackend(policy, learner, iterations, device)
    )
