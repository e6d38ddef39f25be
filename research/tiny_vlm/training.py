"""The recipe: phase 1 (curriculum, then the train split, full video tokens, auxiliary attention loss), phase 2
(full and pruned inputs), evaluation, save. Deterministic from the seed on one CPU thread."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from transformers import LlavaOnevisionForConditionalGeneration

from cacovid_rl.data import synthetic
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from research.tiny_vlm.data import EncodedSet, encode_generated, encode_split, training_batch
from research.tiny_vlm.evaluation import METHODS, first_token_accuracy, text_only_accuracy
from research.tiny_vlm.losses import attention_loss, pruned_keep, pruned_lm_loss
from research.tiny_vlm.model import ASSET_DIR, TinyVLMSpec, build_tiny_vlm, recipe_adapter, save_tiny_vlm
from research.tiny_vlm.settings import DATA_SEED_OFFSET, TrainSettings

Emit = Callable[[dict[str, Any]], None]
REPORT = "training_report.json"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not on norms, biases or other vectors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimise(opt: torch.optim.Optimizer, model: torch.nn.Module, loss: torch.Tensor, grad_clip: float) -> float:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def _text_only_step(step: int, every: int) -> bool:
    return every > 0 and step % every == every - 1


def _progress_row(step: int, stage: Any, losses: list[float]) -> dict[str, Any]:
    # the loss is the mean over the steps since the previous row
    return {"step": step, "stage": stage, "loss": round(float(np.mean(losses)), 4)}


def train_full_tokens(
    adapter: LlavaOnevisionAdapter,
    train: EncodedSet,
    val: EncodedSet,
    settings: TrainSettings,
    seed: int,
    emit: Emit,
) -> list[dict[str, Any]]:
    """Phase 1: the curriculum stages, then the train split, all with full video tokens."""
    model = adapter.model
    t0 = time.time()
    stages = [
        encode_generated(adapter, settings.curriculum_size, seed + 100 * k, st)
        for k, st in enumerate(settings.curriculum)
    ]
    bounds = np.cumsum([st.steps for st in settings.curriculum]).tolist()
    if settings.attention_loss > 0:
        layers = model.config.text_config.num_hidden_layers
        if not 0 <= settings.attention_layer < layers:
            raise ValueError(f"attention_layer {settings.attention_layer} is outside the {layers} layers")
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98))
    gen = np.random.default_rng([seed, 1])
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    for step in range(settings.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = settings.lr_at(step)
        stage = next((k for k, b in enumerate(bounds) if step < b), None)
        source = train if stage is None else stages[stage]
        text_only = _text_only_step(step, settings.text_only_every) and (
            stage is None or settings.curriculum[stage].text_only
        )
        idx = gen.integers(0, len(source), size=settings.batch_size).tolist()
        batch = training_batch(adapter, source, idx, text_only=text_only)
        aux = settings.attention_loss > 0 and not text_only
        out = model(**batch, use_cache=False, output_attentions=aux)
        loss = out.loss
        if aux:
            attn = out.attentions[settings.attention_layer][:, settings.attention_head]
            loss = loss + settings.attention_loss * attention_loss(attn, batch, source, idx, adapter.video_token_id)
        losses.append(_optimise(opt, model, loss, settings.grad_clip))
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            acc = first_token_accuracy(adapter, val, limit=settings.eval_size)["full"]
            row = _progress_row(step + 1, "train split" if stage is None else stage, losses)
            row.update(val=acc, secs=round(time.time() - t0, 1))
            losses = []
            history.append(row)
            emit(row)
    if settings.attention_loss > 0:
        model.set_attn_implementation("sdpa")
    return history


def _pruned_keep_batch(
    train: EncodedSet, idx: list[int], settings: TrainSettings, gen: np.random.Generator, tgen: torch.Generator
) -> torch.Tensor:
    """One pruning per row, all at one random budget: a random share of the asked box plus padding."""
    ps = settings.pruned
    n = int(train.frames.shape[1]) * synthetic.TOKENS_PER_FRAME
    budget = max(1, round(float(gen.uniform(ps.min_keep, ps.max_keep)) * n))
    keep = []
    for i in idx:
        must = int(gen.integers(1, len(train.oracle[i]) + 1)) if train.oracle[i] else 0
        keep.append(torch.sort(pruned_keep(train, i, budget, n, must, tgen, ps.box_padding)).values)
    return torch.stack(keep)


def train_pruned(
    adapter: LlavaOnevisionAdapter,
    train: EncodedSet,
    val: EncodedSet,
    settings: TrainSettings,
    seed: int,
    emit: Emit,
    step0: int,
) -> list[dict[str, Any]]:
    """Phase 2 (``PrunedStage``): each step, the answer loss on a full-token batch plus the same loss on the
    same questions with a random pruning (one budget a batch, ``pruned_lm_loss``); every
    ``text_only_every``-th step a text-only batch instead (the blind prior must survive)."""
    model = adapter.model
    ps = settings.pruned
    t0 = time.time()
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=ps.lr, betas=(0.9, 0.98))
    gen = np.random.default_rng([seed, 2])
    tgen = torch.Generator().manual_seed(seed + 2)
    schedule = dataclasses.replace(settings, steps=ps.steps, lr=ps.lr, warmup_steps=ps.warmup_steps)
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    for step in range(ps.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = schedule.lr_at(step)
        idx = gen.integers(0, len(train), size=settings.batch_size).tolist()
        text_only = _text_only_step(step, settings.text_only_every)
        batch = training_batch(adapter, train, idx, text_only=text_only)
        loss = model(**batch, use_cache=False).loss
        if not text_only:
            loss = loss + pruned_lm_loss(model, batch, _pruned_keep_batch(train, idx, settings, gen, tgen))
        losses.append(_optimise(opt, model, loss, settings.grad_clip))
        if (step + 1) % settings.eval_every == 0 or step + 1 == ps.steps:
            acc = first_token_accuracy(adapter, val, ("full", "oracle_boxes"), seed=seed, limit=settings.eval_size)
            row = _progress_row(step0 + step + 1, "pruned inputs", losses)
            row.update(val=acc["full"], val_oracle_boxes_10pct=acc["oracle_boxes"], secs=round(time.time() - t0, 1))
            losses = []
            history.append(row)
            emit(row)
    return history


class ProgressLog:
    """JSON progress lines to stdout and, when ``path`` is given, appended to that file."""

    def __init__(self, path: str | Path | None) -> None:
        self._file: TextIO | None = open(path, "a") if path else None  # noqa: SIM115 - closed by close()

    def __call__(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg)
        print(line, flush=True)
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def _phase1(
    adapter: LlavaOnevisionAdapter,
    train: EncodedSet,
    val: EncodedSet,
    settings: TrainSettings,
    seed: int,
    emit: Emit,
    init_from: str | Path | None,
) -> tuple[list[dict[str, Any]], float | None]:
    """Phase 1's history, and its seconds when taken from a saved phase-1 checkpoint (``None``: trained here)."""
    if init_from is None:
        return train_full_tokens(adapter, train, val, settings, seed, emit), None
    loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(str(init_from))
    adapter.model.load_state_dict(loaded.state_dict())
    prev = json.loads((Path(init_from) / REPORT).read_text())
    emit({"event": "phase 1 from checkpoint", "path": str(init_from), "steps": prev["steps"]})
    return prev["history"], float(prev["train_seconds"])


def train_tiny_vlm(
    data_dir: str | Path,
    out_dir: str | Path = ASSET_DIR,
    seed: int = 0,
    spec: TinyVLMSpec | None = None,
    settings: TrainSettings | None = None,
    log_path: str | Path | None = None,
    save: bool = True,
    data_size: int = 10000,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Train the tiny VLM on ``data_dir/train.json``; evaluate; save; return the report.

    Phase 1 trains with full video tokens (``settings.steps``, the curriculum first); phase 2
    (``settings.pruned``) fine-tunes on full and pruned inputs. ``init_from``: a checkpoint saved by phase 1
    of the same seed and settings (the weights phase 1 ends with, deterministically): phase 1 is skipped and
    its history taken from that checkpoint's ``training_report.json``.

    ``data_dir`` holds a synthetic dataset (``make_synthetic``); when ``train.json`` is missing it is
    generated there with ``n=data_size`` and seed ``DATA_SEED_OFFSET + seed``. Writes the ``save_pretrained``
    layout plus ``training_report.json`` to ``out_dir``; returns the report (test accuracy with full tokens and at
    10% retention under each evaluation method, and without the video).
    """
    torch.set_num_threads(1)
    spec = spec or TinyVLMSpec()
    settings = settings or TrainSettings()
    data_dir = Path(data_dir)
    if not (data_dir / "train.json").is_file():
        synthetic.make_synthetic(data_dir, n=data_size, seed=DATA_SEED_OFFSET + seed, progress=True)
    emit = ProgressLog(log_path)
    t0 = time.time()
    model, processor = build_tiny_vlm(seed, spec)
    adapter = recipe_adapter(model, processor)
    train, val, test = (encode_split(adapter, data_dir / f"{s}.json") for s in synthetic.SPLITS)
    emit({"event": "data", "train": len(train), "val": len(val), "test": len(test), "secs": round(time.time() - t0, 1)})
    history, phase1_seconds = _phase1(adapter, train, val, settings, seed, emit, init_from)
    if phase1_seconds is None:
        phase1_seconds = time.time() - t0  # data encoding included, as phase 1 needs it
    t1 = time.time()
    if settings.pruned.steps > 0:
        history += train_pruned(adapter, train, val, settings, seed, emit, settings.steps)
    results: dict[str, Any] = first_token_accuracy(adapter, test, METHODS, retention=0.1, seed=seed)
    results["text_only_prior"] = text_only_accuracy(adapter, test)
    report = {
        "seed": seed,
        "steps": settings.steps,
        "data_dir": str(data_dir),
        "spec": asdict(spec),
        "settings": asdict(settings),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_size": len(train),
        "test_size": len(test),
        "test_accuracy_10pct": results,
        "history": history,
        "train_seconds": round(phase1_seconds + time.time() - t1, 1),
    }
    emit({"event": "done", "results": results})
    if save:
        out = save_tiny_vlm(model, processor, out_dir)
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    emit.close()
    return report
