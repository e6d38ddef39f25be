"""The recipe's training losses beyond the native answer loss: the auxiliary attention loss (phase 1) and the
answer loss on pruned inputs (phase 2), with the pruning phase 2 draws."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionForConditionalGeneration

from research.tiny_vlm.data import EncodedSet


def attention_loss(
    attn: torch.Tensor, batch: dict[str, torch.Tensor], data: EncodedSet, idx: Sequence[int], video_token_id: int
) -> torch.Tensor:
    """Mean over the batch of ``-log`` (attention mass of the last prompt position on the asked box's tokens).

    ``attn``: one head's weights ``[B, L, L]``. The last prompt position is the one that predicts the answer.
    """
    losses = []
    for row, i in enumerate(idx):
        q = len(data.prompt_ids[i]) - 1
        video = (batch["input_ids"][row] == video_token_id).nonzero().squeeze(-1)
        keys = video[torch.tensor(data.oracle[i], dtype=torch.long)]
        losses.append(-torch.log(attn[row, q, keys].sum() + 1e-6))
    return torch.stack(losses).mean()


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


def pruned_lm_loss(
    model: LlavaOnevisionForConditionalGeneration, batch: dict[str, torch.Tensor], keep: torch.Tensor
) -> torch.Tensor:
    """The training loss of ``batch`` (labels on the answer and ``<|im_end|>``) with only the video tokens
    ``keep`` (``[B, K]`` sorted flat indices) in the sequence.

    Pruned tokens are removed and kept ones keep their original position ids, as the library's adapters prune
    (``EncodedQuestion.kept_sequence_index``); the trailing ``image_newline`` stays. Unlike the adapters this runs
    with gradients, on a right-padded batch, which is why it is the recipe's own. Both labelled tokens count: a
    model trained on the first one only answered right under pruning but then kept talking instead of stopping
    (``"4 D C C"`` for ``"4"``).
    """
    cfg = model.config
    input_ids = batch["input_ids"]
    b, length = input_ids.shape
    embeds = model.get_input_embeddings()(input_ids)
    feats = model.model.get_video_features(
        batch["pixel_values_videos"],
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output
    is_video = input_ids == cfg.video_token_id
    embeds = embeds.masked_scatter(is_video.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
    start = is_video.float().argmax(dim=1)  # first placeholder of each row
    n_video = int(is_video[0].sum()) - 1  # the trailing newline is never pruned
    index = torch.stack(
        [
            torch.cat([torch.arange(int(s)), keep[r] + int(s), torch.arange(int(s) + n_video, length)])
            for r, s in enumerate(start.tolist())
        ]
    )
    embeds = torch.gather(embeds, 1, index.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    positions = torch.gather(torch.arange(length).expand(b, length), 1, index)
    mask = torch.gather(batch["attention_mask"], 1, index)
    labels = torch.gather(batch["labels"], 1, index)
    # The explicit mask matters: without it transformers reads gapped positions as packed sequences.
    out = model.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=False)
    logits = model.lm_head(out.last_hidden_state[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
