"""Models, questions and device facts of the GPU suite.

The 7B architectures are built from the config JSONs kept in ``benchmarks/model_configs/`` (the public Hugging
Face configs' values) with random weights, directly on the device in the run's dtype: nothing is downloaded and a
7B model never exists in float32 or on the host. ``--quick`` shrinks the same JSONs (widths, depths, vocabulary,
frame size) and runs every code path unchanged. ``--model PATH`` loads a real checkpoint instead.

Token ids: the random models are paired with the tiny word-level tokenizer (no tokenizer is downloaded), so the
image/video/vision-start ids in the config are replaced by that tokenizer's ids; the embedding table keeps the
config's vocabulary size, so the weights and FLOPs are the real model's.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import default_dtype, param_count
from cacovid_rl.data.prompts import build_prompt
from cacovid_rl.models.base import VideoLLMAdapter
from cacovid_rl.types import EncodedQuestion

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
CONFIG_FILES = {"llava_onevision": "llava_onevision_qwen2_7b_ov.json", "qwen2_5_vl": "qwen2_5_vl_7b_instruct.json"}
MODEL_NAMES = {"llava_onevision": "LLaVA-OneVision-7B", "qwen2_5_vl": "Qwen2.5-VL-7B"}
QUESTION = "What colour are the dots in the pink box ?\nA. red\nB. green\nC. blue\nD. yellow"

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets, matched on the device name.
# The physical limit of section (d) is 2 x params x tokens / peak; unknown devices and CPUs get no ratio.
BF16_PEAK_TFLOPS: tuple[tuple[str, str, float], ...] = (
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100", "H100 SXM", 989.0),
    ("H200", "H200", 989.0),
    ("A100", "A100", 312.0),
    ("L40S", "L40S", 362.0),
)

# Video layouts per family: (frames T, tokens per frame N) of the question. 7B: LLaVA-OV's 32 x 14 x 14 pooled
# tokens at 384 px; Qwen2.5-VL's 32 frames in 16 temporal groups of 16 x 16 merged tokens (max_pixels 256x28x28,
# configs/qwen2_5_vl_7b.yaml). Quick: a few frames of a handful of tokens.
LAYOUT_FULL = {"llava_onevision": (32, 196), "qwen2_5_vl": (16, 256)}
LAYOUT_QUICK = {"llava_onevision": (4, 16), "qwen2_5_vl": (2, 16)}


def device_peak(device: str) -> dict[str, Any]:
    """``{"name", "matched", "bf16_tflops"}`` of the device (``bf16_tflops`` None on CPU / unknown GPUs)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return {"name": "cpu", "matched": None, "bf16_tflops": None}
    name = torch.cuda.get_device_name(torch.device(device))
    for key, label, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return {"name": name, "matched": label, "bf16_tflops": tflops}
    return {"name": name, "matched": None, "bf16_tflops": None}


def load_config_dict(family: str) -> dict[str, Any]:
    data = json.loads((CONFIG_DIR / CONFIG_FILES[family]).read_text())
    data.pop("_source", None)
    return data


def shrink(family: str, cfg: dict[str, Any], vocab: int) -> dict[str, Any]:
    """The quick-mode version of a 7B config: same structure, tiny widths (hidden 128, 2 layers)."""
    cfg = copy.deepcopy(cfg)
    text = {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
    }
    if family == "llava_onevision":
        cfg["text_config"].update(text)
        cfg["vision_config"].update(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=56,
            patch_size=8,
        )
        cfg["image_grid_pinpoints"] = [[56, 56]]
    else:
        cfg.update(text)
        cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 6, 6]}  # sums to head_dim / 2 = 16
        cfg["vision_config"].update(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=8,
            spatial_patch_size=8,
            out_hidden_size=128,
            window_size=32,
            fullatt_block_indexes=[1],
        )
    return cfg


@dataclass
class Built:
    """One model of the run and how it was made."""

    family: str
    name: str
    adapter: VideoLLMAdapter
    source: str
    build_s: float
    params: int
    llm_params: int  # decoder stack + lm_head: the 2 x P x N prefill FLOP count
    layout: tuple[int, int]
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        a = self.adapter
        t = a.text_config
        return {
            "family": self.family,
            "name": self.name,
            "source": self.source,
            "build_s": round(self.build_s, 2),
            "params": self.params,
            "llm_params": self.llm_params,
            "dtype": str(a.dtype).removeprefix("torch."),
            "hidden_size": a.hidden_size,
            "layers": int(t.num_hidden_layers),
            "vocab_size": int(t.vocab_size),
            "frames": self.layout[0],
            "tokens_per_frame": self.layout[1],
        }


def build_random(family: str, device: str, dtype: torch.dtype, quick: bool, seed: int = 0) -> Built:
    """A random-weight model of ``family`` from the kept config, constructed on ``device`` in ``dtype``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    from cacovid_rl.models.llava_onevision import LlavaOnevisionAdapter
    from cacovid_rl.models.qwen2_5_vl import Qwen2_5VLAdapter
    from cacovid_rl.models.tiny import tiny_tokenizer, tiny_vocabulary

    t0 = time.perf_counter()
    tok = tiny_tokenizer(family, tiny_vocabulary())
    raw = load_config_dict(family)
    if quick:
        raw = shrink(family, raw, len(tok))
    ids = {
        name: tok.convert_tokens_to_ids(name)
        for name in ("<image>", "<video>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    if family == "llava_onevision":
        raw.update(image_token_index=ids["<image>"], video_token_index=ids["<video>"])
        raw["text_config"].update(eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id)
        config, model_cls = LlavaOnevisionConfig.from_dict(raw), LlavaOnevisionForConditionalGeneration
    else:
        raw.update(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
            pad_token_id=tok.pad_token_id,
        )
        config, model_cls = Qwen2_5_VLConfig.from_dict(raw), Qwen2_5_VLForConditionalGeneration
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Built in place on the device and in the dtype: an 8B model is ~16 GB in bf16 and never touches the host.
    with torch.device(device), default_dtype(dtype):
        model = model_cls(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    # The adapters build the family's default transformers video processor from the model config.
    adapter_cls = LlavaOnevisionAdapter if family == "llava_onevision" else Qwen2_5VLAdapter
    adapter: VideoLLMAdapter = adapter_cls(model.eval(), tok)
    layout = (LAYOUT_QUICK if quick else LAYOUT_FULL)[family]
    scale = "tiny widths (--quick)" if quick else "7B config"
    return _built(family, adapter, f"random weights, {scale} from {CONFIG_FILES[family]}", t0, layout)


def load_given(path: str, device: str, dtype: torch.dtype, quick: bool) -> Built:
    """A real checkpoint (``--model PATH``) through the library's own loader."""
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.models.loading import load_adapter

    t0 = time.perf_counter()
    adapter = load_adapter(ModelConfig(path=path, device=device, dtype=str(dtype).removeprefix("torch.")))
    family = adapter.family
    layout = (LAYOUT_QUICK if quick else LAYOUT_FULL)[family]
    return _built(family, adapter, f"checkpoint {path}", t0, layout)


def _built(family: str, adapter: VideoLLMAdapter, source: str, t0: float, layout: tuple[int, int]) -> Built:
    from benchmarks.common import sync_device

    sync_device(adapter.device)
    llm = param_count(adapter.language_model) + param_count(adapter.lm_head)
    return Built(
        family, MODEL_NAMES[family], adapter, source, time.perf_counter() - t0, param_count(adapter.model), llm, layout
    )


class ModelCache:
    """Builds each model at its first use and frees them all before the end-to-end section (its own processes
    load the model again, and two 16 GB copies plus two actors' would crowd an 80 GB device)."""

    def __init__(self, device: str, dtype: torch.dtype, quick: bool, model_path: str, seed: int) -> None:
        self.device, self.dtype, self.quick, self.model_path, self.seed = device, dtype, quick, model_path, seed
        self.models: dict[str, Built] = {}
        self.log: dict[str, dict[str, Any]] = {}

    def families(self, wanted: tuple[str, ...]) -> list[str]:
        """The families a section can use: both random architectures, or the given checkpoint's one."""
        if self.model_path == "random":
            return list(wanted)
        return [self.get(None).family]

    def get(self, family: str | None) -> Built:
        key = family or "given"
        if key not in self.models:
            if self.model_path == "random":
                built = build_random(str(family), self.device, self.dtype, self.quick, self.seed)
            else:
                built = load_given(self.model_path, self.device, self.dtype, self.quick)
            print(
                f"[gpu_suite] built {built.name}: {built.params / 1e6:,.1f}M params ({built.source}) "
                f"in {built.build_s:.1f} s",
                flush=True,
            )
            self.models[key] = built
            self.log[built.family] = built.describe()
        return self.models[key]

    def model(self, family: str) -> Built:
        return self.get(family if self.model_path == "random" else None)

    def release(self) -> None:
        self.models.clear()
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def make_question(adapter: VideoLLMAdapter, frames: int, tokens_per_frame: int, seed: int) -> EncodedQuestion:
    """The LLM input of one question with a ``frames x tokens_per_frame`` video, random video features.

    LLaVA-OV: plain positions and the trailing ``image_newline`` token. Qwen2.5-VL: the model's own 3-D M-RoPE
    ids from ``get_rope_index`` on a ``frames x 2h x 2w`` patch grid (the values are what gapped pruning gathers).
    Latency does not depend on the feature values.
    """
    ids = adapter.tokenize(adapter.render_prompt(build_prompt(QUESTION, "multiple choice"), with_video=True))
    n_video = frames * tokens_per_frame
    qwen = adapter.family == "qwen2_5_vl"
    extra = 0 if qwen else 1  # LLaVA-OV appends one image_newline after the video
    ids, start = adapter.expand_placeholder(ids, adapter.video_token_id, n_video + extra)
    ids = ids.to(adapter.device)
    if qwen:
        side = round(tokens_per_frame**0.5)
        if side * side != tokens_per_frame:
            raise ValueError(f"Qwen2.5-VL layout needs a square token grid, got {tokens_per_frame} per frame")
        merge = adapter.merge_size
        grid = torch.tensor([[frames, side * merge, side * merge]], device=adapter.device)
        mm = torch.zeros_like(ids)
        mm[start : start + n_video] = 2  # video token type
        adapter.model.model.rope_deltas = None
        positions, _ = adapter.model.model.get_rope_index(ids[None], mm_token_type_ids=mm[None], video_grid_thw=grid)
        adapter.model.model.rope_deltas = None
        positions = positions[:, 0]
    else:
        positions = adapter.text_positions(ids.numel()).to(adapter.device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeds = adapter.model.get_input_embeddings()(ids).clone()
        feats = 0.5 * torch.randn(n_video + extra, adapter.hidden_size, generator=gen)
        embeds[start : start + n_video + extra] = feats.to(embeds.device, embeds.dtype)
    return EncodedQuestion(
        inputs_embeds=embeds,
        position_ids=positions,
        video_start=start,
        num_frames=frames,
        tokens_per_frame=tokens_per_frame,
        input_ids=ids,
    )


def random_keeps(n_video: int, k: int, g: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """``[g, k]`` sorted random combinations (gapped positions, the pruned inputs every section scores)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_video, generator=gen)[:k].sort().values for _ in range(g)]).to(device)
