"""The reward worker: everything a reward actor does, as a plain Ray-free class.

``actors/reward_actor.py`` wraps it in a Ray actor; tests and the single-process trainer use it
directly. A worker hosts the frozen video LLM and a copy of the policy at a known weight version,
and turns work items (one question each) into encoded trajectory messages.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cacovid_rl.config import Config
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.data.records import QARecord, parse_record, record_to_dict
from cacovid_rl.data.video import VideoDecodeError, read_frames
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.rl.prefetch import Prefetcher
from cacovid_rl.rl.rollout import encode_question, rollout_question, sample_generator
from cacovid_rl.rl.trajectory import Trajectory
from cacovid_rl.types import EncodedQuestion


@dataclass(frozen=True)
class WorkItem:
    """One question to roll out (the driver -> actor message): its global data index, learner batch, epoch, record."""

    index: int
    batch_index: int
    epoch: int
    record: dict[str, Any]

    @staticmethod
    def record_to_dict(rec: QARecord) -> dict[str, Any]:
        """The record in the loader's own JSON schema (absolute video path), so one parser reads it back."""
        return record_to_dict(rec)

    @property
    def sample_id(self) -> str:
        """The record's id, which names it across epochs (quarantine and logs use it)."""
        return str(self.record.get("problem_id", self.index))

    def to_record(self) -> QARecord:
        return parse_record(self.record, self.index, Path("/"), check_videos=False)


@dataclass(frozen=True)
class ActorReport:
    """What a reward actor measures of itself, with every status and as its ``info`` answer.

    wandb's system monitor runs in the driver, on a cluster's GPU-less head node, so the actors' devices are only seen
    through these readings (``learner/monitoring.py`` turns them into metrics). ``totals`` are cumulative counters
    (``items``, ``combos``, ``video_tokens``, ``kept_tokens``) from which exact cluster-wide rates follow; ``pid`` and
    ``actor_started`` tell a restarted actor (same id, counters back at 0) apart.
    """

    node_id: str
    pid: int
    actor_started: float
    version: int
    weights_checksum: str
    busy_s: float
    alive_s: float
    synced: bool
    """This call loaded a new weight version before its item."""
    sync_latency_s: float
    """Publish -> this actor holding the version (includes the wait for an item that needs it)."""
    sync_load_s: float
    """The load itself: object-store read, checksum, copy into the policy."""
    totals: dict[str, int]
    device: dict[str, Any]
    """``cacovid_rl.device_stats.DeviceMonitor`` readings (``info`` adds the device's name)."""


@dataclass(frozen=True)
class RolloutStatus:
    """The small result of one work item (the actor -> driver message; the trajectory travels as its own object).

    ``status`` is ``"ok"`` or ``"skipped"`` (then ``reason`` is a countable reason and ``error`` the message). Built
    by :meth:`RewardWorker.run` (or :meth:`quarantined` in the driver); the Ray shell adds its :class:`ActorReport`.
    """

    index: int
    batch_index: int
    sample_id: str
    actor_id: str
    weight_version: int
    status: str
    reason: str = ""
    error: str = ""
    prefetched: bool = False
    decode_s: float = 0.0
    frames_wait_s: float = 0.0
    elapsed_s: float = 0.0
    nbytes: int = 0
    combos: int = 0
    reward_mean: float = float("nan")
    video_tokens: int = 0
    """The question's ``T * N`` video tokens (encoded and scored once)."""
    kept_tokens: int = 0
    """Kept tokens summed over the question's combinations (what the LLM read)."""
    timings: dict[str, float] = field(default_factory=dict)
    actor: ActorReport | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def quarantined(cls, item: WorkItem, why: str) -> RolloutStatus:
        """The result recorded for an item that is not run again (too many failed calls)."""
        return cls(item.index, item.batch_index, item.sample_id, "", -1, "skipped", reason="quarantined", error=why)


@dataclass(frozen=True)
class Prepared:
    """A question made ready for scoring (what the prefetch cache holds): its frames and, with
    ``cluster.prefetch_encode``, its encoded LLM input, each with the seconds it took."""

    frames: np.ndarray
    decode_s: float
    encoded: EncodedQuestion | None = None
    encode_s: float = 0.0


class RewardWorker:
    """Frozen video LLM + policy copy; rolls out questions at the current weight version."""

    def __init__(self, cfg: Config, actor_id: str = "worker-0") -> None:
        torch.set_num_threads(cfg.cluster.torch_threads)
        self.cfg = cfg
        self.actor_id = actor_id
        self.adapter = load_adapter(cfg.model)
        torch.manual_seed(cfg.seed)
        self.policy = CacovidPolicy.from_adapter(self.adapter, cfg.policy).eval()
        self.version = -1
        self.busy_s = 0.0
        self.started = time.time()
        # The driver queues ``inflight_per_actor - 1`` items behind the running one; one slot more because the hint
        # for the next dispatch can reach the actor just before the running item's ``run`` takes its own entry.
        self.prefetcher = Prefetcher(cfg.cluster.inflight_per_actor) if cfg.cluster.prefetch else None
        self.prefetch_encode = cfg.cluster.prefetch_encode  # the config refuses it without cluster.prefetch
        # With the encode on the prefetch thread, an item whose entry was not ready encodes inline while the thread
        # may be encoding the next one: one encode at a time keeps the vision activations' peak memory that of one
        # question and the tokenizer out of two threads.
        self._encode_lock = threading.Lock()

    def decode(self, rec: QARecord) -> np.ndarray:
        """The question's frames (a method so benchmarks can substitute a slowed decoder)."""
        return read_frames(rec.video, self.cfg.data.num_frames, self.cfg.data.max_fps)

    def prepare(self, rec: QARecord, encode: bool) -> Prepared:
        """Decode ``rec``'s video and, if ``encode``, encode the question (the prefetch thread's load).

        The encode is the one ``rollout_question`` would run (``encode_question``, under ``no_grad`` on whichever
        thread calls it), on the model the scoring thread uses at the same time: forward passes only, and the one
        piece of shared state an encode writes (Qwen2.5-VL's ``model.model.rope_deltas``, reset) is not read by
        scoring, which passes explicit positions. The prompt budget is checked first, so an oversized prompt is
        never tokenized here (``run`` rejects it before taking the entry).
        """
        t0 = time.perf_counter()
        frames = self.decode(rec)
        decode_s = time.perf_counter() - t0
        if not encode:
            return Prepared(frames, decode_s)
        check_prompt_budget(self.adapter, rec, self.cfg.model.max_prompt_tokens)
        return Prepared(frames, decode_s, *self._encode(rec, frames))

    def _encode(self, rec: QARecord, frames: np.ndarray) -> tuple[EncodedQuestion, float]:
        """(the encoded question, its seconds), one encode at a time (see ``_encode_lock``)."""
        with self._encode_lock:
            t0 = time.perf_counter()
            encoded = encode_question(self.adapter, rec, frames)
            if encoded.inputs_embeds.is_cuda:
                # Kernels run asynchronously: without the wait the time would be the launches only, and the encode's
                # GPU work would be billed to whatever the other thread times next.
                torch.cuda.synchronize(encoded.inputs_embeds.device)
            return encoded, time.perf_counter() - t0

    def prefetch(self, item: WorkItem) -> bool:
        """Hint that ``item`` will run next: decode its video (and with ``cluster.prefetch_encode`` encode it) in
        the background. False if not scheduled (prefetch off, cache full, or already known); the item is then
        prepared inline in ``run``, with the same result."""
        if self.prefetcher is None:
            return False
        return self.prefetcher.hint(_prefetch_key(item), lambda: self.prepare(item.to_record(), self.prefetch_encode))

    def set_weights(self, flat: np.ndarray, meta: dict[str, Any], version: int) -> None:
        self.policy.load_flat_state(flat, meta)
        self.version = version

    def run(self, item: WorkItem) -> tuple[RolloutStatus, bytes]:
        """Roll out one question: (its status, encoded trajectory or ``b""`` if skipped).

        The status travels separately from the (large) trajectory so the driver can count and route
        results without ever fetching trajectory bytes. Any exception raised by the item itself (a
        missing/corrupt video, a bad field, text the tokenizer rejects, a prompt over ``model.max_prompt_tokens``)
        is reported as ``status="skipped"`` with its ``reason``, never raised: a raised error reaches the driver
        like a dead actor's and the item would be re-dispatched to fail again, forever. Only a dead or hung actor
        (which no ``except`` here can catch) is left to the driver's bounded retries.
        """
        t0 = time.perf_counter()
        head = {
            "index": item.index,
            "batch_index": item.batch_index,
            "sample_id": item.sample_id,
            "actor_id": self.actor_id,
            "weight_version": self.version,
        }
        try:
            payload, outcome = self._rollout(item, t0)
        except Exception as exc:  # the item's own failure, whatever its type (see the docstring)
            if self.prefetcher is not None:  # e.g. a prompt over budget: its hinted frames will never be taken
                self.prefetcher.discard(_prefetch_key(item))
            payload, outcome = b"", {"status": "skipped", "reason": skip_reason(exc), "error": _one_line(exc)}
        elapsed = time.perf_counter() - t0
        self.busy_s += elapsed
        return RolloutStatus(**head, **outcome, elapsed_s=elapsed), payload

    def _rollout(self, item: WorkItem, t0: float) -> tuple[bytes, dict[str, Any]]:
        """The trajectory of ``item`` and the status fields of a rolled-out item (raises for the item's own faults)."""
        rec = item.to_record()
        check_prompt_budget(self.adapter, rec, self.cfg.model.max_prompt_tokens)
        # Inline, only the decode: without prefetch_encode the encode then runs in ``rollout_question``.
        if self.prefetcher is not None:
            ready, prefetched = self.prefetcher.take(_prefetch_key(item), lambda: self.prepare(rec, encode=False))
        else:
            ready, prefetched = self.prepare(rec, encode=False), False
        if self.prefetch_encode and ready.encoded is None:  # taken inline: encode under the lock, not in the rollout
            encoded, encode_s = self._encode(rec, ready.frames)
            ready = replace(ready, encoded=encoded, encode_s=encode_s)
        frames_wait_s = time.perf_counter() - t0
        gen = sample_generator(self.cfg.seed, rec.sample_id, item.epoch)
        res = rollout_question(
            self.adapter,
            self.policy,
            rec,
            ready.frames,
            self.cfg.sampling,
            self.cfg.rollout,
            self.cfg.model,
            gen,
            reward_cfg=self.cfg.reward,
            encoded=ready.encoded,
            encode_s=ready.encode_s,
        )
        traj = Trajectory.from_rollout(
            res,
            sample_id=rec.sample_id,
            epoch=item.epoch,
            batch_index=item.batch_index,
            weight_version=self.version,
            problem_type=rec.problem_type,
            actor_id=self.actor_id,
        )
        payload = traj.to_bytes()
        return payload, {
            "status": "ok",
            "prefetched": prefetched,
            "decode_s": ready.decode_s,
            "frames_wait_s": frames_wait_s,
            "nbytes": len(payload),
            "combos": int(traj.num_samples),
            "reward_mean": float(np.mean(traj.rewards)),
            "video_tokens": int(traj.num_frames) * int(traj.tokens_per_frame),
            "kept_tokens": int(traj.keep_lengths.sum()),
            "timings": traj.timings,
        }


def _prefetch_key(item: WorkItem) -> tuple[int, int]:
    # The data index names the record (and so the video); the epoch keeps a later epoch's pass over the same
    # question from matching a stale entry.
    return (item.index, item.epoch)


class PromptTooLong(ValueError):
    """A question whose prompt exceeds ``model.max_prompt_tokens``: skipped before any frame is decoded."""


def prompt_length(adapter, rec: QARecord) -> int:
    """Tokens of the question prompt (without the chat template and video tokens, which are the same for every
    record of a run)."""
    return len(adapter.tokenizer(build_prompt(rec.problem, rec.problem_type), add_special_tokens=False)["input_ids"])


def check_prompt_budget(adapter, rec: QARecord, budget: int) -> None:
    """Raise ``PromptTooLong`` for a prompt over ``budget`` tokens (0: no cap).

    A 100,000-character question made an actor allocate gigabytes and run past ``call_timeout_s`` on every try;
    the cap turns it into one skip. The prompt's UTF-8 size bounds its token count from above (a byte-level BPE
    token spans at least one byte), so ordinary prompts are not tokenized an extra time.
    """
    if budget <= 0:
        return
    if len(build_prompt(rec.problem, rec.problem_type).encode("utf-8", "surrogatepass")) <= budget:
        return
    n = prompt_length(adapter, rec)
    if n > budget:
        raise PromptTooLong(f"question prompt is {n} tokens, over model.max_prompt_tokens={budget}")


def skip_reason(exc: BaseException) -> str:
    """A short, countable reason for a skipped item (metrics group skips by it)."""
    if isinstance(exc, PromptTooLong):
        return "prompt_too_long"
    if isinstance(exc, (VideoDecodeError, OSError)):
        return "bad_video"
    if isinstance(exc, (ValueError, KeyError)):
        return "bad_record"
    return "item_error"


def _one_line(exc: BaseException) -> str:
    # Bounded: a poison record's message can echo a huge field; the status travels through the driver's log.
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 500 else text[:497] + "..."
