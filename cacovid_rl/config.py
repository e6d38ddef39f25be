"""One typed, frozen config tree for every entry point.

Loaded from YAML, overridable with dotted ``key=value`` pairs on the command line. Unknown keys,
wrong types and out-of-range values fail at load time with an error that names the key, so a typo
in a 40-hour cluster job is caught before any GPU is allocated.

Defaults follow the published recipe (method.md); ``configs/debug_local.yaml`` shrinks them for a
laptop CPU.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cacovid_rl.config_parsing import (
    ConfigError,
    apply_overrides,
    build_dataclass,
    parse_yaml,
    to_plain,
    yaml_literal,
)


@dataclass(frozen=True)
class DataConfig:
    train_path: str = ""
    """Video-R1 style JSON list of training records (blind-test filtered)."""
    eval_path: str = ""
    """Held-out JSON records for evaluation (may be empty: no periodic evaluation)."""
    video_root: str = ""
    """Directory that record ``video``/``path`` fields are relative to."""
    num_frames: int = 32
    """Frames sampled uniformly over each video (at most ``max_fps`` per second of video)."""
    max_fps: float = 1.0
    """At most this many frames per second of video are sampled (the official ``decode_fps``); short videos get
    fewer than ``num_frames``."""
    synthetic_dir: str = ""
    """If set and ``train_path`` is missing, ``cacovid-rl train`` generates synthetic data here."""
    synthetic_size: int = 2000
    """Number of synthetic records to generate when ``synthetic_dir`` is used."""
    blind_filter: bool = False
    """Blind-test ``train_path`` before training (method.md, "Training data and blind test"): ``cacovid-rl train``
    asks ``model.path`` every question without its video, writes the ones it gets wrong to ``<train stem>.blind.json``
    beside it (once; reused afterwards) and trains on that file. For data that was not filtered offline with
    ``cacovid-rl blind-test`` (the debug config's generated data)."""
    allow_outside_video_root: bool = False
    """Accept records whose video path leaves ``video_root`` (absolute paths elsewhere, ``../``). Off, such a record
    is skipped without looking at the path, so a records file cannot make actors open (or reveal the existence
    of) arbitrary files; turn on for datasets that deliberately list absolute paths on other volumes."""

    def validate(self) -> None:
        _check(self.num_frames >= 1, "data.num_frames", "must be >= 1")
        _check(self.max_fps > 0, "data.max_fps", "must be > 0")
        _check(self.synthetic_size >= 1, "data.synthetic_size", "must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    path: str = "tiny"
    """Local path of a ``save_pretrained`` checkpoint, or ``tiny`` for the model shipped in the package."""
    family: Literal["auto", "llava_onevision", "qwen2_5_vl"] = "auto"
    """Adapter family; ``auto`` reads ``model_type`` from the checkpoint's config."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights and activations of the frozen video LLM (``bfloat16`` on GPUs, ``float32`` on CPU)."""
    device: str = "cpu"
    """Where the video LLM runs in a reward actor or evaluation (``cpu``, ``cuda``, ``cuda:1``)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """transformers attention kernel of the video LLM; ``flash_attention_2`` needs the ``gpu`` extra."""
    max_new_tokens: int = 16
    """Answer budget per combination (the reference uses 768; bare answers need a handful)."""
    mc_first_token_fast_path: bool = True
    """Decide multiple-choice rewards from the first generated token when that provably fixes the reward."""
    combos_per_forward: int = 0
    """Max combinations per LLM forward; 0 picks the largest chunk that fits ``memory_budget_gb``."""
    memory_budget_gb: float = 4.0
    """Activation/KV memory an actor may use per scoring forward when choosing the chunk size."""
    max_prompt_tokens: int = 2048
    """Longest question prompt (tokens, without video) an actor or evaluation accepts; a longer one is skipped
    with its reason instead of running an actor out of memory or past ``cluster.call_timeout_s`` on every retry.
    0 removes the cap."""

    def validate(self) -> None:
        _check(_is_device(self.device), "model.device", f"must be cpu, cuda, cuda:N or mps, got {self.device!r}")
        _check(self.max_new_tokens >= 1, "model.max_new_tokens", "must be >= 1")
        _check(self.max_prompt_tokens >= 0, "model.max_prompt_tokens", "must be >= 0 (0 = no cap)")
        _check(bool(self.path.strip()), "model.path", "must name a checkpoint directory or 'tiny'")
        _check(self.combos_per_forward >= 0, "model.combos_per_forward", "must be >= 0")
        _check(self.memory_budget_gb > 0, "model.memory_budget_gb", "must be > 0")


@dataclass(frozen=True)
class PolicyConfig:
    bidirectional: bool = True
    """Run the policy decoder layer without a causal mask so video tokens see the question."""
    init_from_layer0: bool = True
    """Initialise the decoder layer from the LLM's layer 0 (method.md); else random init."""
    question_match: bool = True
    """Add the bilinear video-token x question term to the scores (policy/network.py; not in the paper)."""
    path: str = ""
    """Optional ``save_pretrained`` directory to start from instead of a fresh policy."""


@dataclass(frozen=True)
class SamplingConfig:
    num_content: int = 1
    """Content (DPC-KNN, policy-free) combinations per question and iteration."""
    num_token: int = 23
    """Token-mode combinations per question and iteration; the first is the policy's per-frame top-k."""
    num_frame: int = 8
    """Frame-mode combinations per question and iteration; the first keeps the top-scored frames."""
    rate: float = 0.02
    """Initial keep rate per frame for training combinations (k = round(rate * tokens_per_frame))."""
    group_size: int = 2
    """Rank bands per frame: ``num_group = max(int(1 / rate / group_size), 1)`` (about ``group_size * k`` tokens
    each)."""
    max_group_prob: float = 2.0
    """A band's draw probability is capped at ``clip(max_group_prob / num_group, 0.1, 0.9)``."""
    frame_ratio: float = 0.125
    """Fraction of frames kept by a frame-mode sample."""
    knn_k: int = 4
    """Neighbours used by the DPC-KNN density (the token itself counts as its own nearest neighbour, as in the
    official code)."""
    frame_cap: Literal["official", "per_frame"] = "official"
    """Frame-mode draw probabilities. ``official``: what the official code computes at run time (its 3/t cap is
    applied to the repeated (samples x t) softmax matrix, so for t <= 32 frames are drawn from max(softmax, 1/64)
    renormalised); ``per_frame``: the cap the official code means, each frame at most 3/t (water-filling)."""

    @property
    def num_samples(self) -> int:
        return self.num_content + self.num_token + self.num_frame

    def validate(self) -> None:
        _check(0.0 < self.rate <= 1.0, "sampling.rate", "must be in (0, 1]")
        _check(self.num_token >= 1, "sampling.num_token", "must be >= 1 (sample 0 is the top-k)")
        _check(min(self.num_content, self.num_frame) >= 0, "sampling.num_content/num_frame", "must be >= 0")
        _check(0.0 < self.frame_ratio <= 1.0, "sampling.frame_ratio", "must be in (0, 1]")
        _check(self.group_size >= 1, "sampling.group_size", "must be >= 1")
        _check(self.max_group_prob > 0, "sampling.max_group_prob", "must be > 0")
        _check(self.knn_k >= 1, "sampling.knn_k", "must be >= 1")


@dataclass(frozen=True)
class RolloutConfig:
    iterations: int = 5
    """Reuses of one question; each samples fresh combinations from the first-iteration scores."""
    adaptive_rate: bool = True
    """Adapt each question's keep rate between iterations from its token-mode accuracy so far."""
    high_reward: float = 0.875
    """Halve the rate when the token-mode accuracy in memory is at least this (the question is too easy)."""
    low_reward: float = 0.125
    """Double the rate when the token-mode accuracy in memory is at most this (the question is too hard)."""
    min_rate: float = 0.01
    """Floor of the adaptive rate (the floor in force is ``min(min_rate, sampling.rate)``)."""
    max_rate: float = 0.12
    """Ceiling of the adaptive rate (the ceiling in force is ``max(max_rate, sampling.rate)``)."""

    def validate(self) -> None:
        _check(self.iterations >= 1, "rollout.iterations", "must be >= 1")
        _check(0 < self.min_rate <= self.max_rate <= 1, "rollout.min_rate/max_rate", "need 0 < min <= max <= 1")
        _check(self.low_reward < self.high_reward, "rollout.low_reward", "must be < rollout.high_reward")
        _check(self.low_reward >= 0 and self.high_reward <= 1, "rollout.low_reward/high_reward", "must be in [0, 1]")


@dataclass(frozen=True)
class LossConfig:
    clip_low: float = 0.2
    """PPO ratio clip below 1: ``clip(ratio, 1 - clip_low, 1 + clip_high)``."""
    clip_high: float = 0.28
    """PPO ratio clip above 1 (asymmetric, as the official trainer)."""
    kl_coef: float = 0.0
    """Weight of the optional k3 KL towards Bernoulli(0.5)."""
    adv_eps: float = 1e-4
    """Added to the (unbiased) reward std when normalising group advantages."""
    frame_loss: bool = True
    """Add the frame head's loss (frame-mode samples) to the token loss, as the method does."""
    max_is_weight: float = 2.0
    """Truncation of the behaviour -> proximal importance weight for stale rollouts (rl/loss.py)."""

    def validate(self) -> None:
        _check(self.clip_low >= 0 and self.clip_high >= 0, "loss.clip_low/clip_high", "must be >= 0")
        _check(self.kl_coef >= 0, "loss.kl_coef", "must be >= 0")
        _check(self.adv_eps > 0, "loss.adv_eps", "must be > 0 (it divides by the reward std)")
        _check(self.clip_low < 1, "loss.clip_low", "must be < 1 (the ratio's lower bound 1 - clip_low must be > 0)")
        _check(self.max_is_weight > 0, "loss.max_is_weight", "must be > 0")


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = 1e-6
    """Learning rate of the scoring heads."""
    decoder_lr_scale: float = 0.1
    """Decoder-layer learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay, not applied to biases and norms."""
    grad_clip: float = 5.0
    """Global gradient-norm clip per optimiser step."""
    schedule: Literal["cosine", "constant", "linear", "official_cosine"] = "cosine"
    """LR multiplier: ``cosine`` (one half-cosine over the run's optimiser steps), ``constant``, ``linear``
    decay, or ``official_cosine``: the official run's schedule, a cosine sized for the number of questions but
    stepped once per iteration, so it falls to 0 and climbs back ``rollout.iterations / 2`` times over the run
    (needed to match the released checkpoint; golden/rate_and_schedule.json)."""
    warmup_steps: int = 0
    """Linear warmup, in optimiser steps (Hugging Face's ``step / warmup``)."""
    total_steps: int = 1000
    """Policy updates (questions-per-step batches) before the run stops; 0 = one epoch of the training data."""
    questions_per_step: int = 1
    """Questions per policy update (the official run: 1 question on each of 8 GPUs = 8)."""
    backend: Literal["torch", "deepspeed"] = "torch"
    """``torch`` (plain AdamW) or ``deepspeed`` (ZeRO; ``zero_stage``)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage when ``backend`` is ``deepspeed``."""
    device: str = "cpu"
    """Where the learner's policy replica and optimiser live (``cpu``, ``cuda``)."""
    placement_resource: str = ""
    """Custom resource the learner actor asks for (``learner`` on a cluster, empty locally)."""
    checkpoint_dir: str = "runs/default/checkpoints"
    """Directory of ``step_*`` checkpoints and the ``LATEST`` pointer (must outlive any node)."""
    checkpoint_every: int = 50
    """Write a checkpoint every N policy updates (and at the end, and on SIGTERM/SIGINT)."""
    max_staleness: int = 2
    """Pipeline window: batch ``b`` is rolled out with weight version ``max(0, b - max_staleness)``, so reward actors
    run up to this many versions ahead of the learner (0 = on-policy, as the official trainer)."""
    skip_no_signal_steps: bool = True
    """Skip the optimiser step of an iteration whose advantages are all exactly 0 (every optimised mode's rewards
    equal in every question of the batch, KL off); the LR schedule still advances. The official trainer steps
    anyway, so AdamW moves the weights on stale momentum and weight decay alone, which moves a one-question bandit
    away from a learned solution once its rewards stop varying. ``false`` steps as the official does."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep; older ones are deleted after each save."""
    num_learners: int = 1
    """Data-parallel learner ranks (``learner/learner_group.py``), each a full policy replica placed like the single
    learner (``placement_resource`` + 1 GPU): each update's questions are split over them and their gradients summed.
    Raise it when the learner, not the reward actors, limits throughput (``benchmarks/cluster_simulation.py``)."""

    def validate(self) -> None:
        _check(self.lr > 0, "learner.lr", "must be > 0")
        _check(self.num_learners >= 1, "learner.num_learners", "must be >= 1")
        _check(self.decoder_lr_scale >= 0, "learner.decoder_lr_scale", "must be >= 0")
        _check(self.weight_decay >= 0, "learner.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
        _check(_is_device(self.device), "learner.device", f"must be cpu, cuda, cuda:N or mps, got {self.device!r}")
        _check(bool(self.checkpoint_dir.strip()), "learner.checkpoint_dir", "must not be empty")
        _check(self.keep_checkpoints >= 1, "learner.keep_checkpoints", "must be >= 1 (0 would delete every save)")
        _check(self.total_steps >= 0, "learner.total_steps", "must be >= 0 (0 = one epoch)")
        _check(self.questions_per_step >= 1, "learner.questions_per_step", "must be >= 1")
        _check(self.grad_clip > 0, "learner.grad_clip", "must be > 0")
        _check(self.zero_stage in (0, 1, 2, 3), "learner.zero_stage", "must be 0, 1, 2 or 3")
        _check(self.max_staleness >= 0, "learner.max_staleness", "must be >= 0")
        _check(self.checkpoint_every >= 1, "learner.checkpoint_every", "must be >= 1")


@dataclass(frozen=True)
class ClusterConfig:
    address: str = "local"
    """``local`` starts a loopback-only Ray instance; ``auto`` joins the cluster of a submitted job."""
    num_cpus: int = 2
    """CPUs of the local Ray instance (ignored when joining a cluster)."""
    object_store_memory_mb: int = 512
    """Object store of the local Ray instance (weights and trajectories pass through it)."""
    min_actors: int = 2
    """The pool never shrinks below this many reward actors (it waits for capacity instead)."""
    max_actors: int = 2
    """The elastic pool grows towards this as ``reward_actor`` resources appear."""
    actor_num_gpus: float = 0.0
    """GPUs per reward actor (1 on a cluster; fractions share a device; 0 on CPU)."""
    actor_num_cpus: float = 1.0
    """CPUs per reward actor (frame decoding and preprocessing run on them)."""
    actor_resource: str = ""
    """Custom resource each reward actor asks for (``reward_actor`` on a cluster, empty locally)."""
    torch_threads: int = 1
    """``torch.set_num_threads`` in each actor and task; oversubscribed threads slow CPU runs ~30x."""
    max_restarts: int = 3
    """Ray restarts a dead reward actor this many times before the pool replaces it."""
    call_timeout_s: float = 600.0
    """A reward call taking longer than this counts as a hung actor: the actor is killed, work re-dispatched."""
    startup_timeout_s: float = 600.0
    """How long the driver waits for the learner and the first reward actor (cold GPU nodes take minutes)."""
    inflight_per_actor: int = 2
    """Questions queued on one reward actor at a time (1 = no overlap between questions)."""
    prefetch: bool = True
    """Decode the next queued question's video on a background thread of the reward actor while the current one is
    scored (``cacovid_rl.rl.prefetch``); needs ``inflight_per_actor >= 2``. Results are identical either way: off
    only to rule it out or to save the memory of up to ``inflight_per_actor`` decoded videos per actor."""
    prefetch_encode: bool = False
    """Also encode the prefetched question (``adapter.encode``: vision tower + prompt embedding) on the prefetch thread;
    needs ``cluster.prefetch``. Costs one ``inputs_embeds`` ``[L, D]`` on the actor's device per cached item (~45 MB
    in fp16 at 7B width, 6.3k tokens). Same results; the encode shares the device with the running question's
    scoring, so it gains only where that scoring leaves the device (or its feeding host thread) idle."""
    pool_resize_every_s: float = 10.0
    """How often the driver re-reads the cluster's ``reward_actor`` capacity to grow or shrink the pool."""
    max_item_failures: int = 2
    """A question whose reward call hangs past ``call_timeout_s`` or kills its actor this many times is quarantined:
    skipped, counted (``data/quarantined``) and named in the log and the summary, so one poison record cannot
    stall training by being re-dispatched forever."""

    def validate(self) -> None:
        _check(bool(self.address.strip()), "cluster.address", "must be local, auto or a Ray address")
        _check(self.num_cpus >= 1, "cluster.num_cpus", "must be >= 1")
        _check(self.object_store_memory_mb >= 80, "cluster.object_store_memory_mb", "must be >= 80 (Ray's minimum)")
        _check(min(self.actor_num_cpus, self.actor_num_gpus) >= 0, "cluster.actor_num_cpus/gpus", "must be >= 0")
        _check(self.max_restarts >= 0, "cluster.max_restarts", "must be >= 0")
        _check(self.pool_resize_every_s > 0, "cluster.pool_resize_every_s", "must be > 0")
        _check(self.max_item_failures >= 1, "cluster.max_item_failures", "must be >= 1")
        _check(1 <= self.min_actors <= self.max_actors, "cluster.min_actors/max_actors", "need 1 <= min <= max")
        _check(self.call_timeout_s > 0, "cluster.call_timeout_s", "must be > 0")
        _check(self.startup_timeout_s > 0, "cluster.startup_timeout_s", "must be > 0")
        _check(self.inflight_per_actor >= 1, "cluster.inflight_per_actor", "must be >= 1")
        _check(self.torch_threads >= 1, "cluster.torch_threads", "must be >= 1")
        _check(self.prefetch or not self.prefetch_encode, "cluster.prefetch_encode", "needs cluster.prefetch=true")


@dataclass(frozen=True)
class EvalConfig:
    retentions: tuple[float, ...] = (0.05, 0.10, 0.25, 0.50)
    """Retention ratios (kept fraction of video tokens) evaluated for the policy and every baseline."""
    baselines: tuple[str, ...] = (
        "uniform",
        "random",
        "fastv",
        "visionzip",
        "divprune",
        "vidcom2",
        "prunevid",
        "framefusion",
        "flashvid",
        "fastvid",
    )
    """Training-free methods evaluated beside the policy (``cacovid_rl.baselines.METHODS``: selection and merging)."""
    every_steps: int = 0
    """Launch the evaluation task every N learner steps (0: only at the end)."""
    max_samples: int = 0
    """Evaluate on at most this many held-out records (0: all)."""
    imp_ratio: float = 0.5
    """Share of the evaluation budget given to per-frame top-scored tokens; the rest is spread evenly (coverage)."""
    max_ratio_scale: float = 1.5
    """Per-frame cap of the importance quotas as a multiple of the retention (the official
    ``max_sample_ratio_for_each_frame`` is 1.5 x retention)."""

    def validate(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps", "must be >= 0 (0 = only at the end)")
        _check(self.max_samples >= 0, "eval.max_samples", "must be >= 0 (0 = all)")
        _check(len(set(self.baselines)) == len(self.baselines), "eval.baselines", "lists a method twice")
        _check(self.max_ratio_scale > 0, "eval.max_ratio_scale", "must be > 0")
        for r in self.retentions:
            _check(0.0 < r <= 1.0, "eval.retentions", f"ratio {r} must be in (0, 1]")
        _check(0.0 <= self.imp_ratio <= 1.0, "eval.imp_ratio", "must be in [0, 1]")


@dataclass(frozen=True)
class RewardConfig:
    fix_official_bugs: bool = True
    """Correct the official reward's evident bugs (a ``nan`` regression prediction scoring 1, an exact 0 against
    ground truth 0 scoring 0, empty strings matching, decimal commas, non-ASCII free-form text; the list is in
    docs/ARCHITECTURE.md). ``false`` reproduces the official rewards bit for bit."""


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    """``offline`` writes ``wandb/offline-run-*`` under ``output_dir`` (``wandb sync`` uploads later)."""
    project: str = "cacovid-rl"
    """wandb project name."""
    entity: str = ""
    """wandb team or user (empty: the API key's default)."""
    run_name: str = ""
    """wandb run name (empty: generated); a resumed run continues the same wandb run."""


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation records, videos and frame sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen video LLM that answers the combinations."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The policy network."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Online combination-space sampling for training."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Per-question iterations and the adaptive rate."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Correctness rewards."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The clipped, class-balanced policy loss."""
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    """Optimiser, schedule, batching, staleness and checkpoints."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray: local instance or cluster, reward-actor pool and timeouts."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation-time selection and the periodic evaluation task."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Experiment tracking."""
    output_dir: str = "runs/default"
    """Run directory: resolved ``config.yaml``, ``metrics.jsonl``, ``policy/``, ``eval/``, ``wandb/``."""
    seed: int = 42
    """Seeds the data order, every question's sampling RNG and the policy init."""

    def validate(self) -> Config:
        # numpy's seeded generators (data order, per-question RNG) reject negative and >= 2**63 seeds, inside Ray.
        _check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        _check(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "validate"):
                value.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> Config:
        """Return a copy with dotted-key overrides applied (``replace(**{"learner.lr": 1e-5})``)."""
        return from_dict(apply_overrides(self.to_dict(), [f"{k}={yaml_literal(v)}" for k, v in overrides.items()]))


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {what}")


_DEVICE = re.compile(r"(cpu|mps|cuda(:\d+)?)")


def _is_device(value: str) -> bool:
    """A torch device string this code can place a model on; anything else failed only inside a Ray actor."""
    return _DEVICE.fullmatch(value) is not None


def from_dict(raw: dict[str, Any]) -> Config:
    return build_dataclass(Config, raw or {}).validate()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {exc.start}): pass a YAML file") from exc
        except OSError as exc:
            raise ConfigError(f"config file '{p}' cannot be read: {exc.strerror or exc}") from exc
        try:
            raw = parse_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{p}' is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    return from_dict(apply_overrides(raw, overrides or []))
