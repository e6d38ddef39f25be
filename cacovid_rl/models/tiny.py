"""Tiny random-weight configs of the two real architectures, for tests and CPU debugging.

The models are the real transformers classes (``LlavaOnevisionForConditionalGeneration`` with SigLIP +
Qwen2, ``Qwen2_5_VLForConditionalGeneration``) at a few hundred thousand parameters, with the shared
word-level tokenizer and Qwen-style chat template (``cacovid_rl.models.tokenizer``).

LLaVA-OV uses patch-local vision features (one SigLIP layer, ``vision_feature_layer=-2``, i.e. the
patch embeddings): with the last layer's output a single attention layer spreads every object's
colour over its whole frame, and token pruning stops mattering.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)

from cacovid_rl.data import synthetic
from cacovid_rl.data.prompts import INSTRUCTIONS
from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
from cacovid_rl.models.preprocessing import default_video_processor
from cacovid_rl.models.qwen2_5_vl import Qwen2_5VLAdapter
from cacovid_rl.models.tokenizer import build_word_tokenizer

TINY_WORDS: tuple[str, ...] = (
    "what", "which", "colour", "color", "is", "the", "of", "a", "in", "video", "object", "answer", "option",
    "red", "green", "blue", "yellow", "grey", "striped", "dotted", "plain", "square", "circle", "triangle",
    "please", "provide", "only", "single", "letter", "yes", "no", "how", "many", "there", "are",
)  # fmt: skip
QWEN_VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def tiny_vocabulary() -> list[str]:
    """Words of the synthetic questions plus every bare-answer instruction (so any problem type tokenizes).

    The shipped tiny video LLM's vocabulary (``cacovid_rl/assets/tiny_vlm``) and the tiny Qwen2.5-VL checkpoint's;
    instructions are split the way ``build_word_tokenizer`` splits text (whitespace, then punctuation)."""
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = list(synthetic.vocabulary())
    for instruction in INSTRUCTIONS.values():
        words += [w for w, _ in split.pre_tokenize_str(instruction)]
    return list(dict.fromkeys(words))


def tiny_tokenizer(family: str = "llava_onevision", words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """The word-level tokenizer with the family's video placeholder in its chat template."""
    placeholder = "<video>" if family == "llava_onevision" else QWEN_VIDEO_PLACEHOLDER
    return build_word_tokenizer([*TINY_WORDS, *words], video_placeholder=placeholder)


def _text_kwargs(tok: PreTrainedTokenizerFast, hidden_size: int, num_layers: int) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }


def _finish(model: Any, tok: PreTrainedTokenizerFast, init_std: float | None) -> Any:
    if init_std is not None:  # a larger init gives decisive (tie-free) greedy logits in tests
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "norm" not in name:
                    p.normal_(0.0, init_std)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    return model.eval()


def patch_local_llava_config(
    tokenizer: PreTrainedTokenizerFast,
    vision: SiglipVisionConfig,
    text: Qwen2Config,
    image_size: int,
    **extra: Any,
) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config whose video tokens are patch-local: features come from SigLIP's embedding
    output (``vision_feature_layer=-2`` with one layer), so an object's colour stays in its own tokens
    instead of spreading over the frame (environment.md), and no CLS token is dropped (``full``)."""
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[image_size, image_size]],
        **extra,
    )


def tiny_llava_onevision_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    image_size: int = 48,
    patch_size: int = 8,
    vision_hidden: int = 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    init_std: float | None = None,
    attn_implementation: str = "sdpa",
) -> LlavaOnevisionForConditionalGeneration:
    """A random ``LlavaOnevisionForConditionalGeneration`` (SigLIP 1 layer, Qwen2 ``num_layers`` layers)."""
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = Qwen2Config(**_text_kwargs(tokenizer, hidden_size, num_layers))
    config = patch_local_llava_config(tokenizer, vision, text, image_size)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _finish(LlavaOnevisionForConditionalGeneration(config), tokenizer, init_std)


def tiny_qwen2_5_vl_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    patch_size: int = 8,
    vision_hidden: int = 32,
    hidden_size: int = 64,
    num_layers: int = 2,
    tokens_per_second: int = 2,
    init_std: float | None = None,
    attn_implementation: str = "sdpa",
) -> Qwen2_5_VLForConditionalGeneration:
    """A random ``Qwen2_5_VLForConditionalGeneration`` (2 vision blocks with windowed + full attention)."""
    head_dim = hidden_size // 4
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]  # sums to head_dim / 2, like [16, 24, 24]
    vision = {
        "depth": 2,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": 2,
        "patch_size": patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": tokens_per_second,
        "window_size": patch_size * 2 * 2,
        "out_hidden_size": hidden_size,
        "fullatt_block_indexes": [1],
    }
    text = _text_kwargs(tokenizer, hidden_size, num_layers)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return _finish(Qwen2_5_VLForConditionalGeneration(config), tokenizer, init_std)


def tiny_llava_onevision(
    seed: int = 0, *, words: Iterable[str] = (), adapter_kwargs: dict[str, Any] | None = None, **model_kwargs: Any
) -> LlavaOnevisionAdapter:
    """A tiny LLaVA-OV adapter: 48 px frames, 6 x 6 patches pooled to 3 x 3 = 9 tokens per frame."""
    tok = tiny_tokenizer("llava_onevision", words)
    model = tiny_llava_onevision_model(tok, seed=seed, **model_kwargs)
    # transformers' LlavaOnevisionVideoProcessor with its CLIP defaults, resizing to the tower's image size
    return LlavaOnevisionAdapter(model, tok, default_video_processor(model.config), **(adapter_kwargs or {}))


def tiny_qwen2_5_vl(
    seed: int = 0,
    *,
    frame_size: int = 48,
    words: Iterable[str] = (),
    adapter_kwargs: dict[str, Any] | None = None,
    **model_kwargs: Any,
) -> Qwen2_5VLAdapter:
    """A tiny Qwen2.5-VL adapter: ``frame_size`` px frames (48: 6 x 6 patches merged to 9 tokens per 2 frames)."""
    tok = tiny_tokenizer("qwen2_5_vl", words)
    model = tiny_qwen2_5_vl_model(tok, seed=seed, **model_kwargs)
    vision = model.config.vision_config
    pixels = frame_size * frame_size
    # A pixel budget of exactly one frame_size x frame_size frame: smart_resize keeps any such frame as it is.
    video_processor = Qwen2VLVideoProcessor(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        cap_pixels_per_frame=False,
    )
    return Qwen2_5VLAdapter(model, tok, video_processor, **(adapter_kwargs or {}))


def save_adapter(adapter: LlavaOnevisionAdapter | Qwen2_5VLAdapter, directory: str | Path) -> Path:
    """Write a ``save_pretrained`` checkpoint (model, tokenizer with chat template, the transformers video
    processor's ``video_preprocessor_config.json``) that ``cacovid_rl.models.loading.load_adapter`` reads back."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    adapter.model.save_pretrained(path)
    adapter.tokenizer.save_pretrained(path)
    adapter.video_processor.save_pretrained(path)
    return path


def video_sensitive(
    adapter: LlavaOnevisionAdapter | Qwen2_5VLAdapter, *, text_scale: float = 0.05, option_gain: float = 3.0
) -> LlavaOnevisionAdapter | Qwen2_5VLAdapter:
    """Make a random tiny model answer with an option letter that depends on which video tokens it is given.

    A random model's first answer token hardly depends on the video: the text embeddings dominate the last
    position's hidden state, so every keep set gets the same answer, every reward of a question is equal, group
    advantages are all 0 and the learner skips every optimiser step (nothing reaches the broadcast weights). Shrinking
    the text embeddings by ``text_scale`` leaves the last position attending over mostly video content, and raising
    the LM-head rows of ``A``-``D`` by ``option_gain`` makes one of the letters win; which one then varies with the
    kept tokens. Modifies ``adapter.model`` in place and returns the adapter.
    """
    tok = adapter.tokenizer
    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    if tok.unk_token_id in letters:
        raise ValueError("the tokenizer has no option letters A-D")
    with torch.no_grad():
        adapter.model.get_input_embeddings().weight.mul_(text_scale)
        adapter.model.get_output_embeddings().weight[letters] *= option_gain
    return adapter


def save_tiny_qwen2_5_vl(directory: str | Path, *, seed: int = 0, frame_size: int = 64, **model_kwargs: Any) -> Path:
    """A tiny random Qwen2.5-VL checkpoint for whole-loop tests (``model.path`` names the directory).

    The synthetic task's vocabulary (so questions tokenize into words, not unknown tokens), 64 px frames like the
    synthetic videos (one 16 px cell per merged 2 x 2 group of 8 px patches), and :func:`video_sensitive` answers, so
    a rollout's rewards differ between keep sets and the learner really steps."""
    model_kwargs.setdefault("init_std", 0.2)
    adapter = tiny_qwen2_5_vl(seed=seed, frame_size=frame_size, words=tiny_vocabulary(), **model_kwargs)
    return save_adapter(video_sensitive(adapter), directory)
