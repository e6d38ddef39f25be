"""The shipped tiny video LLM: a real ``LlavaOnevisionForConditionalGeneration`` trained on synthetic needle videos.

Why it exists: no machine here can download LLaVA-OneVision, yet the local debug mode must train a
policy against a video LLM whose answers depend on *which* video tokens it sees. This module builds
a small model of the real architecture, trains it with full video tokens on the synthetic task
(``cacovid_rl.data.synthetic``; phase 1), then briefly on full and pruned inputs (phase 2, ``PrunedStage``:
so that, like a real video LLM, it still reads the asked box when most other tokens are dropped), and
saves it in the standard ``save_pretrained`` layout under ``cacovid_rl/assets/tiny_vlm/``.

Design choices that matter (see ``shared/environment.md``):
- Patch-local vision features: SigLIP with one layer and ``vision_feature_layer=-2`` (the patch
  embeddings), so an object's colour and shape stay in its own token instead of leaking over the frame.
- One synthetic cell (16x16 pixels) = 2x2 SigLIP patches = exactly one pooled video token.
- Training labels only the answer token and the closing ``<|im_end|>`` (so greedy generation stops).
- A few text-only batches (the question without the video) teach the blind prior (the dot is
  always yellow) and make text-only answers well defined for the blind test.

Processor: transformers' ``LlavaOnevisionVideoProcessor`` needs torchvision, which has no CPU build
for this torch here. The checkpoint is still saved with the standard processor files
(``processor_config.json`` with the image and video processor settings, tokenizer, chat template),
so ``AutoProcessor.from_pretrained`` loads it wherever torchvision is installed; ``load_processor``
falls back to ``FramesProcessor``, which reads the same files and produces the same tensors
(frames already at the target size: rescale + normalise, exactly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BatchFeature,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    SiglipVisionConfig,
)

from cacovid_rl.data import synthetic
from cacovid_rl.data.prompts import INSTRUCTIONS, build_prompt, chat_text
from cacovid_rl.models.preprocessing import process_video
from cacovid_rl.models.tiny import patch_local_llava_config
from cacovid_rl.models.tokenizer import build_word_tokenizer

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_vlm"
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
PROCESSOR_CONFIG = "processor_config.json"


# --------------------------------------------------------------------------------------------------
# Processor (standard files; a torchvision-free stand-in where transformers' video processor cannot run)
# --------------------------------------------------------------------------------------------------


def _pretokenize(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return [w for w, _ in pre.pre_tokenize_str(text)]


def tiny_vocabulary() -> list[str]:
    """Words of the synthetic questions plus every bare-answer instruction (so any problem type tokenizes)."""
    words = list(synthetic.vocabulary())
    for instruction in INSTRUCTIONS.values():
        words += _pretokenize(instruction)
    return list(dict.fromkeys(words))


def processor_dict(frame_size: int, patch_size: int) -> dict[str, Any]:
    """The ``processor_config.json`` transformers 5 writes for a ``LlavaOnevisionProcessor`` with these sizes."""
    size = {"height": frame_size, "width": frame_size}
    common = {
        "size": size,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
    }
    return {
        "processor_class": "LlavaOnevisionProcessor",
        "image_token": "<image>",
        "video_token": "<video>",
        "num_image_tokens": (frame_size // patch_size) ** 2,
        "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9",
        "image_processor": {
            **common,
            "image_grid_pinpoints": [[frame_size, frame_size]],
            "do_pad": True,
            "image_processor_type": "LlavaOnevisionImageProcessor",
        },
        "video_processor": {
            **common,
            "do_sample_frames": False,
            "video_processor_type": "LlavaOnevisionVideoProcessor",
        },
    }


class FramesProcessor:
    """The part of ``LlavaOnevisionProcessor`` the training recipe uses, batched over many short clips.

    ``__call__(text=..., videos=...)`` returns ``input_ids``/``attention_mask`` (the ``<video>``
    placeholder expanded to one token per video feature, right padding) and ``pixel_values_videos``
    (``[B, T, 3, H, W]``). The pixels come from the checkpoint's own transformers
    ``LlavaOnevisionVideoProcessor`` (``models.preprocessing.process_video``), the library's one
    preprocessing path, so the recipe trains on exactly the pixels the adapters feed at evaluation.
    """

    def __init__(self, tokenizer: Any, config: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.video_token = config.get("video_token", "<video>")
        self.video_token_id = int(tokenizer.convert_tokens_to_ids(self.video_token))
        self.num_image_tokens = int(config["num_image_tokens"])
        vp = {k: v for k, v in config["video_processor"].items() if k != "video_processor_type"}
        self.video_processor = LlavaOnevisionVideoProcessor(**vp)
        self.chat_template = tokenizer.chat_template

    @classmethod
    def from_pretrained(cls, path: str | Path) -> FramesProcessor:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        config = json.loads((Path(path) / PROCESSOR_CONFIG).read_text())
        return cls(tokenizer, config)

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def video_tokens(self, num_frames: int) -> int:
        """Video placeholders for ``num_frames`` frames: pooled tokens per frame times frames, plus one newline."""
        side = math.ceil(math.isqrt(self.num_image_tokens) / 2)
        return num_frames * side * side + 1

    def preprocess_frames(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[T, H, W, 3]`` uint8 -> ``[T, 3, h, w]`` float32, resized and normalised by the video processor."""
        return process_video(self.video_processor, np.asarray(frames))["pixel_values_videos"][0]

    def __call__(
        self,
        text: str | Sequence[str],
        videos: Sequence[np.ndarray] | None = None,
        return_tensors: str = "pt",
        padding: bool = True,
        **_: Any,
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        pixel = None
        if videos is not None:
            if len(videos) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(videos)} videos")
            pixel = torch.stack([self.preprocess_frames(v) for v in videos])
        rows = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            n = ids.count(self.video_token_id)
            if pixel is None and n:
                raise ValueError("text holds a <video> placeholder but no video was given")
            if n > 1:
                raise ValueError("one <video> placeholder per text is supported")
            if n:
                k = ids.index(self.video_token_id)
                ids = ids[:k] + [self.video_token_id] * self.video_tokens(pixel.shape[1]) + ids[k + 1 :]
            rows.append(ids)
        input_ids, attention_mask = pad_right(rows, int(self.tokenizer.pad_token_id))
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel is not None:
            data["pixel_values_videos"] = pixel
        return BatchFeature(data, tensor_type=None)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: positions stay ``0..n-1`` exactly as for an unpadded sequence."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def load_processor(path: str | Path) -> FramesProcessor:
    """The recipe's processor for a saved tiny model (its pixels are the video processor's; see FramesProcessor)."""
    return FramesProcessor.from_pretrained(path)


def save_processor(tokenizer: Any, out_dir: str | Path, frame_size: int, patch_size: int) -> None:
    """Write the standard processor files: tokenizer files, ``chat_template.jinja``, ``processor_config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    (out / PROCESSOR_CONFIG).write_text(json.dumps(processor_dict(frame_size, patch_size), indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of the tiny model (the smallest that learned the binding task; see the training report)."""

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    frame_size: int = synthetic.FRAME_SIZE
    patch_size: int = 8


def build_tiny_vlm(
    seed: int = 0, spec: TinyVLMSpec | None = None
) -> tuple[LlavaOnevisionForConditionalGeneration, Any]:
    """A randomly initialised tiny LLaVA-OneVision (seeded) and its processor (``FramesProcessor``, see module doc)."""
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
    processor = FramesProcessor(tokenizer, processor_dict(spec.frame_size, spec.patch_size))
    return model, processor


def load_tiny_vlm(path: str | Path | None = None) -> tuple[LlavaOnevisionForConditionalGeneration, Any]:
    """Load the shipped (or a saved) tiny model and its processor offline, in eval mode."""
    p = Path(path) if path is not None else ASSET_DIR
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no tiny VLM checkpoint at '{p}': run `python -m cacovid_rl.models.tiny_vlm --out {p}`"
        )
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(p))
    model.eval()
    return model, load_processor(p)


# --------------------------------------------------------------------------------------------------
# Encoded data: frames decoded once into a uint8 cache, prompts tokenized once
# --------------------------------------------------------------------------------------------------


@dataclass
class EncodedSet:
    """A split as tensors: frames ``[N,T,H,W,3]`` uint8, prompt ids with and without video, answers, oracle tokens."""

    frames: torch.Tensor
    prompt_ids: list[list[int]]
    text_only_ids: list[list[int]]
    answer_ids: torch.Tensor
    problem_types: list[str]
    oracle: list[list[int]]
    prior: torch.Tensor
    boxes: list[list[int]] = dataclasses.field(default_factory=list)
    """Video tokens of every box in the video (the asked one included): padding a question-aware policy picks."""

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def encode_scenes(
    processor: FramesProcessor, scenes: Sequence[synthetic.Scene], frames: Sequence[np.ndarray]
) -> EncodedSet:
    """Tokenize each scene's prompt once (video placeholder expanded) and stack its frames."""
    tok = processor.tokenizer
    prompt_ids, text_ids, answers, types, oracle, prior, boxes = [], [], [], [], [], [], []
    n_video = processor.video_tokens(int(frames[0].shape[0]))
    for scene in scenes:
        prompt = build_prompt(synthetic.problem_text(scene), scene.problem_type)
        ids = tok(chat_text(processor, prompt), add_special_tokens=False)["input_ids"]
        k = ids.index(processor.video_token_id)
        prompt_ids.append(ids[:k] + [processor.video_token_id] * n_video + ids[k + 1 :])
        text_ids.append(tok(chat_text(processor, prompt, video=False), add_special_tokens=False)["input_ids"])
        answer = tok(scene.answer, add_special_tokens=False)["input_ids"]
        if len(answer) != 1:
            raise ValueError(f"answer {scene.answer!r} is not a single token of the tiny vocabulary")
        answers.append(answer[0])
        types.append(scene.problem_type)
        asked = scene.objects[scene.target[0]].outer  # every copy of the asked box (curriculum tilings have many)
        oracle.append(sorted({i for o in scene.objects if o.outer == asked for i in o.token_indices()}))
        prior.append(scene.prior)
        boxes.append(sorted({i for o in scene.objects for i in o.token_indices()}))
    return EncodedSet(
        frames=torch.from_numpy(np.stack(frames)),
        prompt_ids=prompt_ids,
        text_only_ids=text_ids,
        answer_ids=torch.tensor(answers),
        problem_types=types,
        oracle=oracle,
        prior=torch.tensor(prior),
        boxes=boxes,
    )


def scenes_from_records(path: str | Path) -> tuple[list[synthetic.Scene], list[Path]]:
    """Rebuild scenes (question, answer, boxes) and video paths from a synthetic split file."""
    raw = json.loads(Path(path).read_text())
    return [synthetic.scene_from_record(r) for r in raw], [Path(path).parent / r["video"] for r in raw]


def encode_split(processor: FramesProcessor, path: str | Path) -> EncodedSet:
    """Decode every video of a synthetic split once (decord) and tokenize its prompts."""
    from cacovid_rl.data.video import read_frames

    scenes, videos = scenes_from_records(path)
    frames = [read_frames(v, scenes[i].num_frames) for i, v in enumerate(videos)]
    return encode_scenes(processor, scenes, frames)


def fill_with_asked_box(scene: synthetic.Scene) -> synthetic.Scene:
    """The asked box copied into every cell of every frame (curriculum: the same answer in every token)."""
    box = scene.objects[scene.target[0]]
    objects = tuple(
        dataclasses.replace(box, row=c // synthetic.GRID, col=c % synthetic.GRID, start=0, span=scene.num_frames)
        for c in range(synthetic.TOKENS_PER_FRAME)
    )
    return dataclasses.replace(scene, objects=objects, target=(0,))


@dataclass(frozen=True)
class Stage:
    """A curriculum stage: ``steps`` on in-memory scenes with ``min..max_per_frame`` boxes a frame.

    ``asked_span`` keeps the asked box visible that many consecutive frames (more tokens carry the
    answer: a strong signal while the video pathway starts working); ``numerical_fraction`` is the
    share of dot-count questions; ``text_only`` allows the text-only batches during the stage.
    """

    steps: int
    min_per_frame: int
    max_per_frame: int
    asked_span: int = 1
    numerical_fraction: float = 0.3
    text_only: bool = True
    fill: bool = False
    """Show a copy of the asked box in every cell of every frame (the answer in all 128 tokens)."""
    max_boxes: int = 0
    """When > 0: instead of boxes per frame, ``min_boxes..max_boxes`` boxes in the whole video, each
    visible ``box_span`` consecutive frames (few, long-lived boxes: binding with a strong signal)."""
    min_boxes: int = 2
    box_span: int = 8
    fill_boxes: int = 0
    """When > 0: every cell of every frame shows one of this many boxes (distinct colours, picked at
    random per cell): the asked box holds about 1/n of all 128 tokens (binding with little background)."""


def few_box_scene(rng: np.random.Generator, stage: Stage) -> synthetic.Scene:
    """A curriculum scene: ``min_boxes..max_boxes`` boxes of distinct outer colours, each in its own cell
    and visible ``box_span`` consecutive frames; the question names the first."""
    n = int(rng.integers(stage.min_boxes, stage.max_boxes + 1))
    colours = [synthetic.OUTER_COLOURS[int(i)] for i in rng.choice(len(synthetic.OUTER_COLOURS), n, replace=False)]
    cells = rng.choice(synthetic.TOKENS_PER_FRAME, n, replace=False)
    t = synthetic.NUM_FRAMES
    boxes = tuple(
        synthetic.make_box(rng, c, int(cell), int(rng.integers(0, t - stage.box_span + 1)), stage.box_span)
        for c, cell in zip(colours, cells, strict=True)
    )
    return synthetic.ask(rng, boxes, stage.numerical_fraction, t)


def tiled_scene(rng: np.random.Generator, stage: Stage) -> synthetic.Scene:
    """A curriculum scene: ``fill_boxes`` boxes of distinct colours tiled at random over every cell of every frame."""
    t, n = synthetic.NUM_FRAMES, stage.fill_boxes
    colours = [synthetic.OUTER_COLOURS[int(i)] for i in rng.choice(len(synthetic.OUTER_COLOURS), n, replace=False)]
    protos = [synthetic.make_box(rng, c, 0, 0, 1) for c in colours]
    owner = rng.integers(0, n, size=(t, synthetic.TOKENS_PER_FRAME))
    owner.flat[int(rng.integers(0, owner.size))] = 0  # the asked box appears at least once
    copies = [
        dataclasses.replace(protos[int(owner[f, c])], row=c // synthetic.GRID, col=c % synthetic.GRID, start=f)
        for f in range(t)
        for c in range(synthetic.TOKENS_PER_FRAME)
    ]
    first = next(i for i, b in enumerate(copies) if b.outer == colours[0])
    copies.insert(0, copies.pop(first))
    return synthetic.ask(rng, tuple(copies), stage.numerical_fraction, t)


def encode_generated(processor: FramesProcessor, n: int, seed: int, stage: Stage) -> EncodedSet:
    """In-memory scenes of a curriculum stage: rendered frames, no mp4 round trip."""
    scenes, frames = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, 7919, i])
        if stage.fill_boxes > 0:
            scene = tiled_scene(rng, stage)
        elif stage.max_boxes > 0:
            scene = few_box_scene(rng, stage)
        else:
            scene = synthetic.sample_scene(
                rng, stage.numerical_fraction, stage.min_per_frame, stage.max_per_frame, asked_span=stage.asked_span
            )
        if stage.fill:
            scene = fill_with_asked_box(scene)
        scenes.append(scene)
        frames.append(synthetic.render_frames(scene))
    return encode_scenes(processor, scenes, frames)


# --------------------------------------------------------------------------------------------------
# Forward paths
# --------------------------------------------------------------------------------------------------


def pixel_values(processor: FramesProcessor, frames: torch.Tensor) -> torch.Tensor:
    """``[B,T,H,W,3]`` uint8 -> ``[B,T,3,H,W]`` normalised (same arithmetic as ``FramesProcessor``)."""
    b, t = frames.shape[:2]
    flat = processor.preprocess_frames(frames.reshape(b * t, *frames.shape[2:]).numpy())
    return flat.view(b, t, *flat.shape[1:])


def training_batch(
    processor: FramesProcessor, data: EncodedSet, idx: Sequence[int], text_only: bool = False
) -> dict[str, torch.Tensor]:
    """Native-forward inputs with labels on the answer token and ``<|im_end|>`` only."""
    eos = int(processor.tokenizer.eos_token_id)
    rows, labels = [], []
    for i in idx:
        ids = (data.text_only_ids if text_only else data.prompt_ids)[i]
        rows.append([*ids, int(data.answer_ids[i]), eos])
        labels.append([-100] * len(ids) + [int(data.answer_ids[i]), eos])
    input_ids, attention_mask = pad_right(rows, int(processor.tokenizer.pad_token_id))
    label_t, _ = pad_right(labels, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}
    if not text_only:
        batch["pixel_values_videos"] = pixel_values(processor, data.frames[list(idx)])
    return batch


def _llm_inputs(
    model: LlavaOnevisionForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values_videos: torch.Tensor | None,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM input embeddings, position ids and mask, with only the video tokens ``keep`` (``[B, K]`` flat
    indices) left in the sequence, and the sequence index each position came from ``[B, L']``.

    Pruned tokens are removed from the sequence; kept ones keep their original position ids (as the adapters
    do, ``cacovid_rl.types.EncodedQuestion.kept_sequence_index``); the trailing ``image_newline`` stays."""
    cfg = model.config
    embeds = model.get_input_embeddings()(input_ids)
    b, length = input_ids.shape
    positions = torch.arange(length).expand(b, length)
    index = positions
    if pixel_values_videos is not None:
        feats = model.model.get_video_features(
            pixel_values_videos,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
        is_video = input_ids == cfg.video_token_id
        embeds = embeds.masked_scatter(is_video.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        if keep is not None:
            start = is_video.float().argmax(dim=1)  # first placeholder of each row
            n_video = int(is_video[0].sum()) - 1  # the trailing newline is never pruned
            rows = []
            for r in range(b):
                s = int(start[r])
                rows.append(
                    torch.cat([torch.arange(s), keep[r] + s, torch.arange(s + n_video, length)])  # keep sorted
                )
            index = torch.stack(rows)
            embeds = torch.gather(embeds, 1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
            positions = torch.gather(positions, 1, index)
            attention_mask = torch.gather(attention_mask, 1, index)
    return embeds, positions, attention_mask, index


def first_token_logits(
    model: LlavaOnevisionForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values_videos: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token logits after the prompt, keeping only the video tokens ``keep`` (``[B, K]`` flat indices).

    An explicit attention mask is passed so gapped positions are not read as packed sequences. With
    ``keep=None`` this equals the native forward's last-position logits. Differentiable; callers that only
    evaluate wrap it in ``torch.no_grad``.
    """
    embeds, positions, attention_mask, _ = _llm_inputs(model, input_ids, attention_mask, pixel_values_videos, keep)
    out = model.model.language_model(
        inputs_embeds=embeds, position_ids=positions, attention_mask=attention_mask, use_cache=False
    )
    last = attention_mask.sum(dim=1) - 1  # right padding: last real token of each row
    hidden = out.last_hidden_state[torch.arange(embeds.shape[0]), last]
    return model.lm_head(hidden)


def pruned_lm_loss(
    model: LlavaOnevisionForConditionalGeneration, batch: dict[str, torch.Tensor], keep: torch.Tensor
) -> torch.Tensor:
    """The training loss of ``batch`` (labels on the answer and ``<|im_end|>``) with only the video tokens
    ``keep`` in the sequence. Both labelled tokens count: a model trained on the first one only answered right
    under pruning but then kept talking instead of stopping (``"4 D C C"`` for ``"4"``)."""
    embeds, positions, mask, index = _llm_inputs(
        model, batch["input_ids"], batch["attention_mask"], batch["pixel_values_videos"], keep
    )
    labels = torch.gather(batch["labels"], 1, index)
    out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False)
    logits = model.lm_head(out.last_hidden_state[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def pruned_keep(
    data: EncodedSet,
    i: int,
    budget: int,
    n: int,
    must_count: int | None,
    generator: torch.Generator,
    box_padding: float,
) -> torch.Tensor:
    """``budget`` video tokens of sample ``i`` (unsorted): ``must_count`` of the asked box's tokens (all when
    ``None``), then padding, from the other boxes with probability ``box_padding`` (random tokens when the
    boxes run out), else from random tokens."""
    oracle = torch.tensor(data.oracle[i], dtype=torch.long)
    order = oracle[torch.randperm(oracle.numel(), generator=generator)]
    must = order[: min(budget, oracle.numel() if must_count is None else must_count)]
    rest = torch.randperm(n, generator=generator)
    if data.boxes and torch.rand((), generator=generator).item() < box_padding:
        boxes = torch.tensor(data.boxes[i], dtype=torch.long)
        boxes = boxes[torch.randperm(boxes.numel(), generator=generator)]
        rest = torch.cat([boxes, rest[~torch.isin(rest, boxes)]])  # the boxes first, then the other tokens
    rest = rest[~torch.isin(rest, must)]
    return torch.cat([must, rest[: budget - must.numel()]])


def select_tokens(
    method: str, data: EncodedSet, idx: Sequence[int], budget: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Kept video tokens ``[B, budget]`` (sorted) for a selection method: full, random, uniform, saliency, oracle
    (the asked box topped up with random tokens) and oracle_boxes (topped up with other boxes, the padding a
    question-aware policy that keeps salient tokens picks)."""
    if method == "full":
        return None
    t = data.frames.shape[1]
    n = t * synthetic.TOKENS_PER_FRAME
    rows = []
    for i in idx:
        if method == "random":
            keep = torch.randperm(n, generator=generator)[:budget]
        elif method == "uniform":
            keep = torch.linspace(0, n - 1, budget).round().long()
        elif method == "oracle":
            # the tokens that hold the answer, topped up with random others to the same budget
            must = torch.tensor(data.oracle[i][:budget], dtype=torch.long)
            rest = torch.randperm(n, generator=generator)
            rest = rest[~torch.isin(rest, must)][: budget - must.numel()]
            keep = torch.cat([must, rest])
        elif method == "oracle_boxes":
            keep = pruned_keep(data, i, budget, n, None, generator, box_padding=1.0)
        elif method == "saliency":
            # question-agnostic: the most colourful cells (max - min channel), i.e. "keep the salient objects"
            f = data.frames[i].float().view(t, synthetic.GRID, synthetic.CELL, synthetic.GRID, synthetic.CELL, 3)
            chroma = (f.amax(-1) - f.amin(-1)).mean(dim=(2, 4)).reshape(-1)
            keep = torch.argsort(chroma, descending=True, stable=True)[:budget]
        else:
            raise ValueError(f"unknown selection method {method!r}")
        rows.append(torch.sort(keep).values)
    return torch.stack(rows)


def evaluate(
    model: LlavaOnevisionForConditionalGeneration,
    processor: FramesProcessor,
    data: EncodedSet,
    method: str = "full",
    retention: float = 0.1,
    batch_size: int = 64,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, float]:
    """First-token accuracy (all synthetic answers are one token) overall and per kind, under a selection method."""
    model.eval()
    n = len(data) if limit is None else min(limit, len(data))
    budget = math.floor(retention * data.frames.shape[1] * synthetic.TOKENS_PER_FRAME)
    gen = torch.Generator().manual_seed(seed)
    correct = torch.zeros(n, dtype=torch.bool)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        batch = training_batch(processor, data, idx)
        prompt_len = batch["attention_mask"].sum(1) - 2  # drop the answer + eos appended for training
        mask = (torch.arange(batch["input_ids"].shape[1]) < prompt_len.unsqueeze(1)).long()
        keep = select_tokens(method, data, idx, budget, gen)
        with torch.no_grad():
            logits = first_token_logits(model, batch["input_ids"], mask, batch["pixel_values_videos"], keep)
        correct[s : s + len(idx)] = logits.argmax(-1) == data.answer_ids[idx]
    kinds = {
        "colour": torch.tensor([p == "multiple choice" for p in data.problem_types[:n]]) & ~data.prior[:n],
        "prior": data.prior[:n],
        "dots": torch.tensor([p == "numerical" for p in data.problem_types[:n]]) & ~data.prior[:n],
    }
    out = {"accuracy": float(correct.float().mean())}
    for k, m in kinds.items():
        if m.any():
            out[k] = float(correct[m].float().mean())
    return out


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunedStage:
    """Phase 2: a short fine-tune (fresh AdamW) on the train split where each step pairs the full-token batch
    with the same questions under a random pruning (the asked box kept, padded to a random budget).

    Why: trained on full tokens only, the v3 model read the asked box reliably among all 128 tokens (test 1.000)
    but not among a few: with the box plus 7 other boxes (what a question-aware policy keeps at 1 token a
    frame) 0.68-0.92 per colour. A real frozen video LLM keeps answering from the informative tokens when
    the rest are dropped (what FastV / VisionZip rely on); this stage gives the stand-in that property, so the
    policy's reward measures whether it kept the right tokens, not the stand-in's fragility."""

    steps: int = 600
    lr: float = 3e-4
    warmup_steps: int = 10
    min_keep: float = 0.05
    max_keep: float = 0.5
    box_padding: float = 0.5
    """Share of pruned rows padded with other boxes (else random tokens)."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of the shipped run (see ``TRIED`` for what else was tried)."""

    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    curriculum: tuple[Stage, ...] = (
        Stage(100, 0, 0, fill=True, text_only=False),
        Stage(200, 0, 0, min_boxes=2, max_boxes=2, box_span=8),
        Stage(300, 0, 0, min_boxes=2, max_boxes=5, box_span=4),
        Stage(300, 1, 2, asked_span=2),
        Stage(300, 2, 4),
    )
    """Stages before the train split: from reading a box that fills every cell of every frame (the
    answer in all 128 tokens, so the video pathway starts working) through two long-lived boxes and a
    few shorter ones, to boxes in every frame, then the real split (3-5 boxes a frame, the answer in
    one token)."""
    curriculum_size: int = 3000
    text_only_every: int = 8
    """Every N-th step is a text-only batch (question without video): teaches the blind prior."""
    eval_every: int = 250
    eval_size: int = 256
    attention_loss: float = 0.5
    """Weight of an auxiliary loss on one attention head (``attention_head`` of layer ``attention_layer``):
    minus the log of the attention mass the last prompt position puts on the asked box's tokens. It
    teaches the binding (find the named box) directly instead of waiting for it to emerge from the
    answer loss alone. The shipped model is still a plain LLaVA-OneVision; only its recipe uses it."""
    attention_layer: int = 1
    attention_head: int = 0
    pruned: PrunedStage = PrunedStage()


DATA_SEED_OFFSET = 1
TRIED: list[str] = [
    "v1 task (binding by quadrant, 2-4 coloured objects of 2 tokens, counting): entries up to the next v2 one",
    "shape binding (circle/square/triangle/cross/diamond named by shape), hidden 128, 2 layers, 4 heads, "
    "intermediate 512, AdamW lr 2e-3, 200 steps on 1-object scenes first: no colour reading after 250 steps "
    "(answer loss at ln 4, constant output), stopped",
    "same with 3 layers, intermediate 256 (same cost per step): read the colour of a single object by step 200, "
    "then stayed at the question-agnostic 'average the coloured objects' solution (0.29 on 2-4 objects) to step 450",
    "3 layers, lr 3e-3, curriculum 1 object spanning 8 frames -> 2 objects -> 2-4 objects spanning 4 frames: "
    "no learning at all in 300 steps (lr too high)",
    "probe, lr 1e-3: 1 object spanning 8 frames reaches 100% in 200 steps; then 2 objects spanning 8 frames stay "
    "at 0.47-0.51 (saliency + prior) for 500 steps. Diagnosis: at init, patch features of these silhouettes are "
    "dominated by colour (cosine 0.57 between shapes of one colour, -0.02 between colours of one shape), "
    "so there is no colour-independent shape key to bind",
    "thin, non-overlapping shapes (bar/pillar/frame/dot/diagonal) give comparable shape and colour weight, but "
    "less colour mass: the 1-object stage did not start learning in 350 steps",
    "binding by quadrant (colour-independent key), 3 layers, lr 1e-3, curriculum 1 object (span 8) -> 2-4 objects "
    "(span 4): first stage did not start learning in 150 steps (the plateau before the video pathway is used)",
    "first stage with the coloured object filling its whole quadrant for the whole video (32 tokens): learned in "
    "<100 steps; binding then emerged on 2-4 objects; 2200 steps reached 0.80 overall on its test split (shipped)",
    "longer run: 4500 steps, a 600-step 2-4-object stage, 12000 training videos: 0.78 full / 0.41 random-10% / "
    "0.76 oracle-10% on its test split; on a common unseen set (1000 videos, seed 4242) 0.755 full against 0.782 "
    "for the 2200-step run, which stays shipped (counting stays the weak part: about 0.5 for both)",
    "v2 task (this one: ~32 boxes a video, the question names one by its outer colour, answer = its dots' colour or "
    "count, 1 token of 128). Why the change: v1's policy could not bind the question to an object token (object "
    "tokens barely carried their position; docs/report/README.md), and v1's counting stayed at 0.5",
    "v2 first draft: box colours shared the option words (red/green/blue/yellow): the key word then appeared twice in "
    "the prompt and a one-layer policy cannot tell the two apart by context; box colours now never are option words",
    "v2, 3 layers, curriculum box-in-every-frame (asked box visible 8 frames, 8 tokens) -> 1-2 -> 2-4 boxes a frame: "
    "reads a lone box, but no binding by step 1000 (val 0.29-0.34 = chance + prior)",
    "v2, 3 layers, curriculum box filling all 128 tokens (100 steps, reading learned) -> 2 boxes x 8 frames (300) -> "
    "2-5 boxes x 4 frames (400) -> 1-2 -> 2-4 a frame, 5000 steps: plateau at 'read either box' (loss 0.46, 2 boxes), "
    "val 0.33-0.40 at step 1950; the same with 4 layers: val 0.37 at step 1300; with 8 heads and an 800-step "
    "2-box stage: 0.33-0.36 loss on 2 boxes (= picking one of the two at random) to step 900; with 2 or 4 boxes "
    "tiled over every cell first (little background): no binding by step 700",
    "v2 shipped: the same curriculum plus an auxiliary loss on one attention head (layer 1, head 0: -log of the "
    "attention mass the answering position puts on the asked box, weight 0.5) teaches the binding directly: val 0.51 "
    "at step 900 where every run without it sat at chance",
    "v3 shipped (boxes-v3: a white box holds one yellow dot with probability 0.5, else random dots): the v2 recipe "
    "unchanged, seed 0, 5000 steps, 3318 s on one core: val 0.89 at step 1500, 1.00 from 4250; test 1.000 full, "
    "0.335 random-10%, 0.931 oracle-10%, 0.474 colour saliency; text-only 1.0 on the prior questions",
    "RL against that phase-1 model (debug config, seed 0): the policy kept the asked box on 94.6% of the test "
    "questions needing the video but answered only 77.7% of them: with the box plus 7 other boxes (1 token a "
    "frame) the model read the box 0.68-0.92 per colour, and under pruning it often did not stop after the "
    "answer ('4 D C C' for '4': the reward path's greedy text disagreed with its own first token on 36%)",
    "phase 2 (PrunedStage, shipped): from the phase-1 checkpoint, 600 steps, fresh AdamW lr 3e-4 cosine, each "
    "step the full-token loss plus the same loss with a random pruning (asked box + 5-50% padding, half of the "
    "rows padded with other boxes); a first version trained the first token only under pruning and had the same "
    "not-stopping problem, so both labelled tokens count. 523 s: test 1.000 full, 0.999 oracle-10%, 1.000 "
    "oracle-10% padded with boxes, 0.335 random-10%, 0.579 colour saliency; greedy answers under pruning agree "
    "with the first-token eval on 91/91 (8 and 12 tokens); text-only prior 1.0 / other 0.225",
]
"""Earlier attempts and their outcomes, copied into ``training_report.json``."""


def attention_loss(
    attn: torch.Tensor, batch: dict[str, torch.Tensor], data: EncodedSet, idx: Sequence[int], processor: Any
) -> torch.Tensor:
    """Mean over the batch of ``-log`` (attention mass of the last prompt position on the asked box's tokens).

    ``attn``: one head's weights ``[B, L, L]``. The last prompt position is the one that predicts the answer.
    """
    video_id = int(processor.video_token_id)
    losses = []
    for row, i in enumerate(idx):
        q = len(data.prompt_ids[i]) - 1
        video = (batch["input_ids"][row] == video_id).nonzero().squeeze(-1)
        keys = video[torch.tensor(data.oracle[i], dtype=torch.long)]
        losses.append(-torch.log(attn[row, q, keys].sum() + 1e-6))
    return torch.stack(losses).mean()


def _lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    p = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_tiny_vlm(
    data_dir: str | Path,
    out_dir: str | Path = ASSET_DIR,
    seed: int = 0,
    steps: int | None = None,
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
    generated there with ``n=data_size`` and seed ``DATA_SEED_OFFSET + seed``. Deterministic from
    ``seed`` on one CPU thread. Writes the ``save_pretrained`` layout plus ``training_report.json`` to
    ``out_dir``; returns the report (test accuracy with full tokens and at 10% retention under random,
    uniform, colour-saliency and oracle selections, and without the video).
    """
    torch.set_num_threads(1)
    spec = spec or TinyVLMSpec()
    settings = settings or TrainSettings()
    if steps is not None:
        settings = dataclasses.replace(settings, steps=steps)
    data_dir = Path(data_dir)
    if not (data_dir / "train.json").is_file():
        # A seed offset keeps these videos apart from the debug dataset (make_synthetic(seed=0)): sample i
        # of a dataset depends only on (seed, i), so equal seeds would share their first videos.
        synthetic.make_synthetic(data_dir, n=data_size, seed=DATA_SEED_OFFSET + seed, progress=True)
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed at the end

    def emit(msg: dict[str, Any]) -> None:
        line = json.dumps(msg)
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    t0 = time.time()
    model, processor = build_tiny_vlm(seed, spec)
    train = encode_split(processor, data_dir / "train.json")
    val = encode_split(processor, data_dir / "val.json")
    test = encode_split(processor, data_dir / "test.json")
    emit({"event": "data", "train": len(train), "val": len(val), "test": len(test), "secs": round(time.time() - t0, 1)})
    phase1_seconds = 0.0
    if init_from is None:
        history = _train_full_tokens(model, processor, train, val, settings, spec, seed, emit)
        phase1_seconds = time.time() - t0
    else:
        loaded = LlavaOnevisionForConditionalGeneration.from_pretrained(str(init_from))
        model.load_state_dict(loaded.state_dict())
        prev = json.loads((Path(init_from) / "training_report.json").read_text())
        history, phase1_seconds = prev["history"], float(prev["train_seconds"])
        emit({"event": "phase 1 from checkpoint", "path": str(init_from), "steps": prev["steps"]})
    t1 = time.time()
    if settings.pruned.steps > 0:
        history += _train_pruned(model, processor, train, val, settings, seed, emit, settings.steps)

    results = {}
    for method in ("full", "random", "oracle", "oracle_boxes", "saliency", "uniform"):
        results[method] = evaluate(model, processor, test, method=method, retention=0.1, seed=seed)
    results["text_only_prior"] = _text_only_accuracy(model, processor, test)
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
        "tried": TRIED,
    }
    emit({"event": "done", "results": results})
    if save:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        save_processor(processor.tokenizer, out, spec.frame_size, spec.patch_size)
        (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if log:
        log.close()
    return report


def _train_full_tokens(
    model: LlavaOnevisionForConditionalGeneration,
    processor: FramesProcessor,
    train: EncodedSet,
    val: EncodedSet,
    settings: TrainSettings,
    spec: TinyVLMSpec,
    seed: int,
    emit: Any,
) -> list[dict[str, Any]]:
    """Phase 1: the curriculum stages, then the train split, all with full video tokens."""
    t0 = time.time()
    stages = [
        encode_generated(processor, settings.curriculum_size, seed + 100 * k, st)
        for k, st in enumerate(settings.curriculum)
    ]
    bounds = np.cumsum([st.steps for st in settings.curriculum]).tolist()
    if settings.attention_loss > 0:
        if not 0 <= settings.attention_layer < spec.num_layers:
            raise ValueError(f"attention_layer {settings.attention_layer} is outside the {spec.num_layers} layers")
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
    opt = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98))
    gen = np.random.default_rng([seed, 1])
    history = []
    losses: list[float] = []
    for step in range(settings.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, settings)
        stage = next((k for k, b in enumerate(bounds) if step < b), None)
        source = train if stage is None else stages[stage]
        text_only = (
            settings.text_only_every > 0
            and step % settings.text_only_every == settings.text_only_every - 1
            and (stage is None or settings.curriculum[stage].text_only)
        )
        idx = gen.integers(0, len(source), size=settings.batch_size).tolist()
        batch = training_batch(processor, source, idx, text_only=text_only)
        aux = settings.attention_loss > 0 and not text_only
        out = model(**batch, use_cache=False, output_attentions=aux)
        loss = out.loss
        if aux:
            loss = loss + settings.attention_loss * attention_loss(
                out.attentions[settings.attention_layer][:, settings.attention_head], batch, source, idx, processor
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            acc = evaluate(model, processor, val, limit=settings.eval_size)
            row = {
                "step": step + 1,
                "stage": "train split" if stage is None else stage,
                "loss": round(float(np.mean(losses)), 4),  # mean over the steps since the last row
                "val": acc,
                "secs": round(time.time() - t0, 1),
            }
            losses = []
            history.append(row)
            emit(row)
    if settings.attention_loss > 0:
        model.set_attn_implementation("sdpa")
    return history


def _train_pruned(
    model: LlavaOnevisionForConditionalGeneration,
    processor: FramesProcessor,
    train: EncodedSet,
    val: EncodedSet,
    settings: TrainSettings,
    seed: int,
    emit: Any,
    step0: int,
) -> list[dict[str, Any]]:
    """Phase 2 (``PrunedStage``): each step, the answer loss on a full-token batch plus the same loss on the
    same questions with a random pruning (one budget a batch, ``pruned_lm_loss``); every
    ``text_only_every``-th step a text-only batch instead (the blind prior must survive)."""
    ps = settings.pruned
    t0 = time.time()
    opt = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=ps.lr, betas=(0.9, 0.98))
    gen = np.random.default_rng([seed, 2])
    tgen = torch.Generator().manual_seed(seed + 2)
    n = int(train.frames.shape[1]) * synthetic.TOKENS_PER_FRAME
    phase = dataclasses.replace(settings, steps=ps.steps, lr=ps.lr, warmup_steps=ps.warmup_steps)
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    for step in range(ps.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, phase)
        idx = gen.integers(0, len(train), size=settings.batch_size).tolist()
        text_only = settings.text_only_every > 0 and step % settings.text_only_every == settings.text_only_every - 1
        batch = training_batch(processor, train, idx, text_only=text_only)
        loss = model(**batch, use_cache=False).loss
        if not text_only:
            budget = max(1, round(float(gen.uniform(ps.min_keep, ps.max_keep)) * n))
            keep = []
            for i in idx:
                must = int(gen.integers(1, len(train.oracle[i]) + 1)) if train.oracle[i] else 0
                keep.append(torch.sort(pruned_keep(train, i, budget, n, must, tgen, ps.box_padding)).values)
            loss = loss + pruned_lm_loss(model, batch, torch.stack(keep))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == ps.steps:
            row = {
                "step": step0 + step + 1,
                "stage": "pruned inputs",
                "loss": round(float(np.mean(losses)), 4),
                "val": evaluate(model, processor, val, limit=settings.eval_size),
                "val_oracle_boxes_10pct": evaluate(
                    model, processor, val, method="oracle_boxes", limit=settings.eval_size, seed=seed
                ),
                "secs": round(time.time() - t0, 1),
            }
            losses = []
            history.append(row)
            emit(row)
    return history


@torch.no_grad()
def _text_only_accuracy(
    model: LlavaOnevisionForConditionalGeneration, processor: FramesProcessor, data: EncodedSet
) -> dict[str, float]:
    """Accuracy without the video: high on prior questions (the dot), near chance elsewhere."""
    model.eval()
    correct = []
    for s in range(0, len(data), 128):
        idx = list(range(s, min(len(data), s + 128)))
        ids, mask = pad_right([data.text_only_ids[i] for i in idx], int(processor.tokenizer.pad_token_id))
        logits = first_token_logits(model, ids, mask, None)
        correct.append(logits.argmax(-1) == data.answer_ids[idx])
    c = torch.cat(correct)
    out = {"all": float(c.float().mean())}
    if data.prior.any():
        out["prior"] = float(c[data.prior].float().mean())
        out["other"] = float(c[~data.prior].float().mean())
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shipped tiny video LLM on synthetic needle videos.")
    parser.add_argument(
        "--data", default="/tmp/cacovid_tiny_vlm_data", help="synthetic dataset dir (generated if missing)"
    )
    parser.add_argument("--out", default=str(ASSET_DIR), help="output dir (save_pretrained layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log", default=None, help="append JSON progress lines here")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--curriculum", default=None, help='JSON list of Stage fields, e.g. [{"steps": 100, ...}]')
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument(
        "--init-from", default=None, help="a phase-1 checkpoint of the same seed: skip phase 1, run phase 2 only"
    )
    parser.add_argument("--pruned-steps", type=int, default=None, help="phase-2 steps (0: full tokens only)")
    args = parser.parse_args(argv)
    spec = TinyVLMSpec()
    if args.hidden or args.layers:
        spec = TinyVLMSpec(
            **{
                **asdict(spec),
                **({"hidden_size": args.hidden} if args.hidden else {}),
                **({"num_layers": args.layers} if args.layers else {}),
            }
        )
    settings = TrainSettings()
    overrides: dict[str, Any] = {}
    if args.lr:
        overrides["lr"] = args.lr
    if args.eval_every:
        overrides["eval_every"] = args.eval_every
    if args.pruned_steps is not None:
        overrides["pruned"] = dataclasses.replace(settings.pruned, steps=args.pruned_steps)
    if args.curriculum is not None:
        overrides["curriculum"] = tuple(Stage(**st) for st in json.loads(args.curriculum))
    settings = dataclasses.replace(settings, **overrides)
    train_tiny_vlm(
        args.data,
        args.out,
        args.seed,
        args.steps,
        spec,
        settings,
        args.log,
        save=not args.no_save,
        init_from=args.init_from,
    )


if __name__ == "__main__":
    main()
