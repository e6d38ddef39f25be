"""Build, save and load the tiny LLaVA-OneVision the recipe trains, and the library adapter over it.

The model is transformers' own ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2) at about a million
parameters, with transformers' own ``LlavaOnevisionProcessor`` (the word-level tokenizer of
``cacovid_rl.models.tokenizer``, the chat template, ``LlavaOnevisionVideoProcessor``). Saved with
``save_pretrained``, it loads wherever LLaVA-OneVision loads; ``cacovid_rl.models.loading`` ships it as
``model.path: tiny``.

Design choices that matter:
- Patch-local vision features: SigLIP with one layer and ``vision_feature_layer=-2`` (the patch embeddings), so a
  box's colour and dots stay in its own token instead of leaking over the frame.
- One synthetic cell (16 x 16 pixels) = 2 x 2 SigLIP patches = exactly one pooled video token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from cacovid_rl.data import synthetic
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from cacovid_rl.models.loading import TINY_ASSET
from cacovid_rl.models.tiny import patch_local_llava_config, tiny_vocabulary
from cacovid_rl.models.tokenizer import build_word_tokenizer

ASSET_DIR = TINY_ASSET
"""Where the shipped checkpoint lives (the default output of ``python -m research.tiny_vlm.train``)."""
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of the tiny model (the smallest that learned the binding task; docs/TINY_VLM.md)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    frame_size: int = synthetic.FRAME_SIZE
    patch_size: int = 8


def build_processor(tokenizer: PreTrainedTokenizerFast, frame_size: int, patch_size: int) -> LlavaOnevisionProcessor:
    """transformers' ``LlavaOnevisionProcessor`` for ``frame_size`` frames that need no resizing.

    The video processor does not sample frames (the video reader does, ``cacovid_rl.data.video``); the image
    processor is saved too so that ``AutoProcessor`` builds the full processor from the checkpoint.
    """
    common = {
        "size": {"height": frame_size, "width": frame_size},
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
    }
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            **common, image_grid_pinpoints=[[frame_size, frame_size]], do_pad=True
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(**common, do_sample_frames=False),
        chat_template=tokenizer.chat_template,
        num_image_tokens=(frame_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def build_tiny_vlm(
    seed: int = 0, spec: TinyVLMSpec | None = None
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A randomly initialised tiny LLaVA-OneVision (seeded) and its processor."""
    spec = spec or TinyVLMSpec()
    tokenizer = build_word_tokenizer(tiny_vocabulary(), video_placeholder="<video>")
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=spec.frame_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config = patch_local_llava_config(tokenizer, vision, text, spec.frame_size, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model, build_processor(tokenizer, spec.frame_size, spec.patch_size)


def recipe_adapter(
    model: LlavaOnevisionForConditionalGeneration, processor: LlavaOnevisionProcessor
) -> LlavaOnevisionAdapter:
    """The library's adapter over a model the recipe is still training.

    Prompts, placeholder expansion, pixels, pruned forward passes and greedy answers all come from the adapter,
    so the recipe trains and evaluates on exactly what the RL loop feeds the shipped model. The adapter is built
    for inference and freezes every parameter; they are unfrozen again here (its own calls run under
    ``torch.no_grad``, so evaluation builds no graph, while training steps still reach every weight).
    """
    adapter = LlavaOnevisionAdapter(model, processor.tokenizer, processor.video_processor, processor)
    model.requires_grad_(True)
    return adapter


def save_tiny_vlm(
    model: LlavaOnevisionForConditionalGeneration, processor: LlavaOnevisionProcessor, out_dir: str | Path
) -> Path:
    """The standard ``save_pretrained`` layout: model, generation config, tokenizer, chat template, processor."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def load_tiny_vlm(
    path: str | Path | None = None,
) -> tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """Load the shipped (or a saved) tiny model and its processor offline, in eval mode."""
    p = Path(path) if path is not None else ASSET_DIR
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no tiny VLM checkpoint at '{p}': train one with `python -m research.tiny_vlm.train --out {p}`"
        )
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(p))
    model.eval()
    return model, AutoProcessor.from_pretrained(str(p), local_files_only=True)
