"""The policy update, Ray-free: optimizer, schedule and the per-iteration replay of the method.

In the single-process method each question is reused for ``I`` iterations and every iteration takes
one optimiser step on the question's memory so far. A trajectory carries which iteration drew each
sample, so :meth:`PolicyUpdater.update` replays exactly that: step ``j`` uses the samples drawn in
iterations ``<= j`` of every question in the batch, with policy scores recomputed (with gradients)
from the shipped policy input and the behaviour policy's scores as ``logp_old``.

A step whose batch carries no learning signal (in every question, each optimised mode's rewards are all
equal, so every advantage is exactly 0 and so is the loss gradient) is skipped: AdamW would otherwise keep
moving the weights on stale momentum and decoupled weight decay alone, which moves a one-question bandit
away from a learned solution once its rewards stop varying. The LR schedule still advances.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np
import torch

from cacovid_rl.config import LearnerConfig, LossConfig
from cacovid_rl.rl.loss import cacovid_loss
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.types import MODE_FRAME, MODE_TOKEN, PolicyScores


def lr_lambda(cfg: LearnerConfig, total_optimizer_steps: int, iterations: int = 1) -> Callable[[int], float]:
    """The LR multiplier of optimiser step ``step`` (0-based), Hugging Face's schedules with linear warmup.

    Warmup is ``step / warmup_steps`` (so step 0 runs at 0, as in ``transformers``). After it, over the run's
    ``total_optimizer_steps``: ``cosine`` one half-cosine to 0, ``linear`` a straight line to 0, ``constant`` 1.
    ``official_cosine`` is the official run's schedule (``get_cosine_schedule_with_warmup``): sized for
    ``total_optimizer_steps / iterations`` steps (the questions per GPU, one policy update each) but stepped after
    every iteration's optimiser step, so the cosine runs on past its end, reaching 0 and climbing back to 1
    ``iterations / 2`` times over the run (tests/golden/rate_and_schedule.json).
    """
    warmup = cfg.warmup_steps
    if cfg.schedule == "official_cosine":
        length = max(1, total_optimizer_steps // max(1, iterations))
    else:
        length = total_optimizer_steps

    def fn(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, length - warmup)
        if cfg.schedule == "linear":
            return max(0.0, (length - step) / span)
        progress = (step - warmup) / span
        if cfg.schedule == "cosine":
            progress = min(1.0, progress)  # stays at 0 past the end; the official cosine does not (above)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return fn


def policy_scores_for(policy: torch.nn.Module, traj: Trajectory, device: torch.device | str) -> PolicyScores:
    """Recompute the policy's scores (with gradients) from a trajectory's shipped policy input."""
    dtype = next(policy.parameters()).dtype
    emb = torch.from_numpy(np.array(traj.inputs_embeds)).to(
        device=device, dtype=dtype
    )  # copy: wire arrays are read-only
    pos = torch.from_numpy(np.asarray(traj.position_ids, dtype=np.int64)).to(device)
    return policy(emb, pos, traj.video_start, traj.num_frames, traj.tokens_per_frame)


class GradientSync(Protocol):
    """What a data-parallel group (``learner/learner_group.py``) plugs into :class:`PolicyUpdater`.

    Each learner rank holds a full replica and updates on its share of a batch's questions; the updater calls these
    at the few points where the ranks must agree, so that ``W`` ranks take exactly the optimiser steps one learner
    takes on the whole batch: the loss mean over the whole batch (``total``), the same skip decision, the same
    number of replayed iterations, the same finiteness check, and the summed gradient.
    """

    world_size: int

    def all_reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``values`` (a small float tensor) reduced over the ranks (``sum`` or ``max``)."""
        ...

    def reduce_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the ranks, in place (a missing gradient counts as zeros)."""
        ...


class OptimizerBackend(Protocol):
    """The optimisation step a :class:`PolicyUpdater` holds: optimizer, LR schedule and how a loss becomes a step.

    :class:`TorchAdamW` is the library's; ``learner/deepspeed_backend.py`` provides a DeepSpeed ZeRO one, so the
    library never imports DeepSpeed. The updater owns the method (which steps, on which samples, skipped or not);
    the backend owns only the numerics of one step and the state a checkpoint must carry.
    """

    scheduler: torch.optim.lr_scheduler.LRScheduler
    """The LR schedule; checkpoints save and restore its ``state_dict`` (``learner/checkpoint.py``)."""

    def zero_grad(self) -> None:
        """Drop the previous step's gradients (set to ``None``)."""
        ...

    def step(self, loss: torch.Tensor, sync: GradientSync | None) -> float:
        """Backward, gradient sum over the group (``sync``), clip, optimizer and schedule step; the gradient norm
        before clipping."""
        ...

    def skip(self) -> None:
        """Advance the schedule without touching the weights (a step without learning signal)."""
        ...

    def state_dict(self) -> dict:
        """Optimizer state as nested dicts/lists of tensors and scalars (checkpointed without pickle)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, in place."""
        ...

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        ...


class TorchAdamW:
    """Plain ``torch.optim.AdamW`` with :func:`lr_lambda`'s schedule and gradient-norm clipping."""

    def __init__(self, policy: torch.nn.Module, learner: LearnerConfig, iterations: int) -> None:
        self.params = list(policy.parameters())
        self.grad_clip = learner.grad_clip
        self.optimizer = torch.optim.AdamW(
            policy.param_groups(learner.lr, learner.decoder_lr_scale, learner.weight_decay), lr=learner.lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(learner, learner.total_steps * iterations, iterations)
        )

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, loss: torch.Tensor, sync: GradientSync | None) -> float:
        loss.backward()
        if sync is not None:
            sync.reduce_gradients(self.params)  # before the clip: the norm is the whole batch's
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(grad_norm)

    def skip(self) -> None:
        self.scheduler.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


class PolicyUpdater:
    """Replays the method's optimiser steps on batches of trajectories; one :meth:`update` per batch.

    The optimisation step itself is the ``backend``'s (default :class:`TorchAdamW`); the backend must be built
    around ``policy`` already on ``device``.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        learner: LearnerConfig,
        loss: LossConfig,
        iterations: int,
        device: str = "cpu",
        backend: OptimizerBackend | None = None,
    ) -> None:
        self.policy = policy.to(device)
        self.cfg = learner
        self.loss_cfg = loss
        self.iterations = iterations
        self.device = device
        self.backend: OptimizerBackend = (
            backend if backend is not None else TorchAdamW(self.policy, learner, iterations)
        )
        self.optimizer_steps = 0
        self.skipped_steps = 0  # optimiser steps skipped for want of any learning signal
        # Set by a data-parallel learner group; None for a single learner (every hook below is then a no-op).
        self.sync: GradientSync | None = None

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The backend's LR schedule (checkpoints save and restore its state)."""
        return self.backend.scheduler

    def has_signal(self, trajs: Sequence[Trajectory], iteration: int) -> bool:
        """Whether optimiser step ``iteration`` has a non-zero gradient: some optimised mode of some question has
        rewards that differ (group advantages are exactly 0 otherwise), or the KL term is on."""
        if self.loss_cfg.kl_coef > 0:
            return True
        modes = (MODE_TOKEN, MODE_FRAME) if self.loss_cfg.frame_loss else (MODE_TOKEN,)
        for traj in trajs:
            sel = traj.iterations <= iteration
            rewards, kinds = np.asarray(traj.rewards)[sel], np.asarray(traj.modes)[sel]
            for mode in modes:
                r = rewards[kinds == mode]
                if r.size > 1 and r.max() > r.min():
                    return True
        return False

    def _batch_loss(
        self,
        trajs: Sequence[Trajectory],
        iteration: int,
        prox: Sequence[PolicyScores | None] | None = None,
        denom: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the batch; ``denom`` is the whole batch's size when ``trajs`` is one rank's share of it
        (the ranks' partial sums then add up to the single-learner mean)."""
        n = denom or len(trajs)
        if not trajs:
            # An empty share still joins the gradient sum: a zero loss connected to every parameter.
            return sum(p.reshape(-1)[0] * 0.0 for p in self.policy.parameters()), {}
        total = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        prox = prox if prox is not None else [None] * len(trajs)
        for traj, traj_prox in zip(trajs, prox, strict=True):
            sel = np.nonzero(traj.iterations <= iteration)[0]
            keeps = traj.keep_list()
            frame_masks = traj.frame_masks()[torch.from_numpy(sel)].to(self.device)
            new = policy_scores_for(self.policy, traj, self.device)
            old = traj.old_scores()
            old = PolicyScores(old.token.to(self.device), old.frame.to(self.device))
            out = cacovid_loss(
                new,
                old,
                [keeps[i].to(self.device) for i in sel],
                torch.from_numpy(traj.modes[sel].astype(np.int64)).to(self.device),
                torch.from_numpy(np.array(traj.rewards[sel])).to(self.device),
                self.loss_cfg,
                prox=traj_prox,
                frame_masks=frame_masks,
            )
            total = total + out.total / n
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / n
        return total, metrics

    def optimizer_state(self) -> dict:
        """The backend's optimizer state (see :meth:`OptimizerBackend.state_dict`)."""
        return self.backend.state_dict()

    def load_optimizer_state(self, state: dict) -> None:
        self.backend.load_state_dict(state)

    @torch.no_grad()
    def proximal_scores(self, trajs: Sequence[Trajectory], version: int | None) -> list[PolicyScores | None]:
        """This policy's scores before the update, for the trajectories rolled out at another version.

        ``None`` (on-policy: the behaviour scores are this policy's own) for every trajectory when ``version``
        is ``None`` or equals the trajectory's ``weight_version``; see the decoupled loss in ``rl/loss.py``.
        """
        if version is None:
            return [None] * len(trajs)
        out: list[PolicyScores | None] = []
        for traj in trajs:
            if traj.weight_version == version:
                out.append(None)
                continue
            scores = policy_scores_for(self.policy, traj, self.device)
            out.append(PolicyScores(token=scores.token.detach(), frame=scores.frame.detach()))
        return out

    @staticmethod
    def _record_first_iteration(agg: dict[str, float], it: int, metrics: dict[str, float]) -> None:
        """The trust-region metrics of iteration 0, before any step of this batch: for an on-policy batch the
        learner's recomputed scores must equal the actor's, so the ratio is exactly 1 and the KL 0 (a broken
        weight sync or a policy-input mismatch shows here first)."""
        if it == 0:
            agg["policy/first_ratio_max"] = metrics.get("policy/ratio_max", float("nan"))
            agg["policy/first_approx_kl"] = metrics.get("policy/approx_kl", float("nan"))

    def _reduce(self, value: float, op: str) -> float:
        if self.sync is None:
            return value
        return float(self.sync.all_reduce(torch.tensor([float(value)], dtype=torch.float64), op)[0])

    def update(
        self, trajs: Sequence[Trajectory], version: int | None = None, total: int | None = None
    ) -> dict[str, float]:
        """Replay the per-iteration optimiser steps of one batch of questions; returns mean metrics.

        ``version``: the weight version this policy is at. Trajectories rolled out at an older version are
        optimised with the decoupled (proximal) loss; ``None`` treats every trajectory as on-policy.
        ``total``: in a data-parallel group (``sync`` set), the number of trajectories of the whole batch, of which
        ``trajs`` is this rank's share (possibly empty); the metrics are then this share's part of the batch means.
        """
        if not trajs and (self.sync is None or not total):
            raise ValueError("update() needs at least one trajectory")
        self.policy.train()
        prox = self.proximal_scores(trajs, version)
        stale = sum(p is not None for p in prox)
        iterations = int(self._reduce(max((len(t.rates) for t in trajs), default=0), "max"))
        agg: dict[str, float] = {}
        for it in range(iterations):
            self.backend.zero_grad()
            signal = self.has_signal(trajs, it) if self.cfg.skip_no_signal_steps else True
            if not self._reduce(float(signal), "max"):
                with torch.no_grad():
                    loss, metrics = self._batch_loss(trajs, it, prox, total)
                self._record_first_iteration(agg, it, metrics)
                self.backend.skip()
                self.optimizer_steps += 1
                self.skipped_steps += 1
                metrics.update({"loss/total": float(loss), "policy/grad_norm": 0.0})
                for k, v in metrics.items():
                    agg[k] = agg.get(k, 0.0) + v / iterations
                continue
            loss, metrics = self._batch_loss(trajs, it, prox, total)
            self._record_first_iteration(agg, it, metrics)
            # Every rank must raise (or none): a rank that raised alone would leave the others in the all-reduce.
            if not math.isfinite(self._reduce(float(loss.detach()), "sum")):
                raise FloatingPointError(
                    f"non-finite loss at optimizer step {self.optimizer_steps} "
                    f"(samples {[t.sample_id for t in trajs]}); lower learner.lr or check the inputs"
                )
            grad_norm = self.backend.step(loss, self.sync)
            self.optimizer_steps += 1
            metrics.update({"loss/total": float(loss.detach()), "policy/grad_norm": float(grad_norm)})
            for k, v in metrics.items():
                agg[k] = agg.get(k, 0.0) + v / iterations
        agg["learner/lr"] = self.backend.lr
        agg["learner/optimizer_steps"] = float(self.optimizer_steps)
        agg["learner/skipped_steps"] = float(self.skipped_steps)
        agg["learner/stale_trajectories"] = float(stale)
        return agg
