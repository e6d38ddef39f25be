"""``load_adapter(cfg.model)``: a video-LLM adapter from a local ``save_pretrained`` checkpoint.

The family comes from the checkpoint's ``config.json`` ``model_type``. The model loads with
``from_pretrained(path, dtype=..., attn_implementation=...)``; frames go through the checkpoint's own
transformers video processor (``AutoProcessor``'s ``video_processor``, or ``AutoVideoProcessor`` where
the checkpoint saved only that), the one preprocessing path (``preprocessing.py``). The chat template
comes from the full processor when the checkpoint has one, else from the tokenizer / ``chat_template.jinja``.

``path="tiny"`` is the model shipped inside the package (``cacovid_rl/assets/tiny_vlm``). Nothing is
ever downloaded: a hub id that is not a local directory is an error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.utils import is_flash_attn_2_available
from transformers.video_processing_utils import BaseVideoProcessor

from cacovid_rl.config import ModelConfig
from cacovid_rl.models.base import GIB, VideoLLMAdapter
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from cacovid_rl.models.preprocessing import VideoProcessorError, load_video_processor
from cacovid_rl.models.qwen2_5_vl import Qwen2_5VLAdapter

log = logging.getLogger(__name__)

TINY_ASSET = Path(__file__).resolve().parent.parent / "assets" / "tiny_vlm"
FAMILIES: dict[str, tuple[type, type[VideoLLMAdapter]]] = {
    "llava_onevision": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionAdapter),
    "qwen2_5_vl": (Qwen2_5_VLForConditionalGeneration, Qwen2_5VLAdapter),
}


class ModelLoadError(RuntimeError):
    """A checkpoint cannot be loaded as a supported video LLM; the message says why and what to do."""


def resolve_model_path(path: str) -> Path:
    """The local checkpoint directory for ``path`` (``"tiny"``: the model shipped in the package)."""
    if path == "tiny":
        if not (TINY_ASSET / "config.json").is_file():
            raise ModelLoadError(
                f"the shipped tiny model is missing: expected a save_pretrained checkpoint at {TINY_ASSET} "
                "(it is built and trained by `python -m research.tiny_vlm.train` in a source checkout, "
                "docs/TINY_VLM.md)"
            )
        return TINY_ASSET
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelLoadError(
            f"model path '{path}' is not a local directory; model.path must be a save_pretrained checkpoint "
            "directory or 'tiny' (nothing is downloaded from a hub)"
        )
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"model path '{path}' has no config.json: not a save_pretrained checkpoint")
    return p


def detect_family(path: Path) -> str:
    """The adapter family named by the checkpoint's ``model_type``."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"unsupported model_type '{model_type}' in {path / 'config.json'}; supported: {sorted(FAMILIES)}"
        )
    return str(model_type)


def _chat_template(path: Path) -> str | None:
    """The processor's chat template from the checkpoint (``chat_template.jinja`` or ``chat_template.json``)."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text()).get("chat_template")
    return None


def _processor(path: Path) -> Any | None:
    """The checkpoint's full transformers processor, or ``None`` where it saved only some of its parts."""
    from transformers import AutoProcessor, ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.info("no full transformers processor in %s (%s); using its video processor and tokenizer", path, exc)
        return None
    # AutoProcessor falls back to a bare tokenizer when the checkpoint has no processor config.
    return processor if isinstance(processor, ProcessorMixin) else None


def _video_processor(path: Path, processor: Any | None) -> BaseVideoProcessor:
    """The full processor's video processor, else the one ``AutoVideoProcessor`` reads from the checkpoint."""
    video_processor = getattr(processor, "video_processor", None)
    if isinstance(video_processor, BaseVideoProcessor):
        return video_processor
    try:
        return load_video_processor(path)
    except VideoProcessorError as exc:
        raise ModelLoadError(str(exc)) from exc


def load_adapter(cfg: ModelConfig) -> VideoLLMAdapter:
    """Load the checkpoint at ``cfg.path`` as a frozen, eval-mode adapter on ``cfg.device``."""
    path = resolve_model_path(cfg.path)
    family = detect_family(path)
    if cfg.family not in ("auto", family):
        raise ModelLoadError(f"model.family is '{cfg.family}' but {path} holds a '{family}' checkpoint")
    if cfg.attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        raise ModelLoadError(
            "attn_implementation 'flash_attention_2' needs the flash-attn package and a CUDA GPU "
            "(pip install 'cacovid-rl[gpu]'); use 'sdpa' otherwise"
        )
    model_cls, adapter_cls = FAMILIES[family]
    model = model_cls.from_pretrained(
        path, dtype=getattr(torch, cfg.dtype), attn_implementation=cfg.attn_implementation
    ).to(cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = _processor(path)
    return adapter_cls(
        model,
        tokenizer,
        _video_processor(path, processor),
        processor,
        chat_template=_chat_template(path),
        combos_per_forward=cfg.combos_per_forward,
        memory_budget_bytes=int(cfg.memory_budget_gb * GIB),
    )
