"""The video-LLM adapter contract and the machinery shared by every family.

An adapter wraps an unmodified transformers video LLM and exposes what CaCoVID needs:

- ``encode``: vision tower -> projector -> pooling once, the full LLM input embeddings and positions
  (an ``EncodedQuestion``), with the video as one contiguous block of ``T*N`` tokens.
- ``generate``: greedy answers of ``G`` token combinations of one question, batched. Pruned tokens are
  removed from the sequence; kept tokens keep their original position ids (gathered, never
  recomputed), so every combination of one question has the same length and no padding is needed.
- ``generate_compressed``: the same, from compressed video blocks (``types.CompressedVideo``: kept or merged
  tokens with their gathered position ids, 1-D or M-RoPE) in place of the ``T*N`` video tokens; the text around
  the video is unchanged. Every training-free baseline answers through it (``baselines.compress``).
- ``generate_text_only`` (blind test), ``early_layer_attention`` (FastV, PruneVid, FrameFusion), ``policy_blueprint``.

Only the encoding differs per family (``llava_onevision.py``, ``qwen2_5_vl.py``); decoding runs the
model's own language model and ``lm_head`` by hand with a ``DynamicCache``.
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask

from cacovid_rl.data.prompts import chat_messages
from cacovid_rl.rl.rewards import mc_prefix_decided
from cacovid_rl.types import CompressedVideo, EncodedQuestion

GIB = 1024**3
# Characters the multiple-choice reward strips before reading the option letter (rl/rewards.py).


class KeepIndexError(ValueError):
    """A combination (``keep``) is malformed: wrong dtype or rank, out of range, duplicated, or ragged."""


class VideoLLMAdapter(ABC):
    """Base class of the per-family adapters. See the module docstring for the contract."""

    family: ClassVar[str] = ""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: Any,
        preprocessing: Any,
        processor: Any | None = None,
        *,
        chat_template: str | None = None,
        combos_per_forward: int = 0,
        memory_budget_bytes: int = 4 * GIB,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        """``preprocessing`` turns ``[T,H,W,3]`` uint8 frames into the model's pixel inputs (see preprocessing.py).

        ``processor`` (the transformers processor, when it could be built) supplies the chat template;
        otherwise ``chat_template`` or the tokenizer's own template is used.
        ``combos_per_forward`` caps the combinations per LLM forward (0: ``choose_chunk_size`` from
        ``memory_budget_bytes``).
        """
        if combos_per_forward < 0:
            raise ValueError(f"combos_per_forward must be >= 0, got {combos_per_forward}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._tokenizer = tokenizer
        self._processor = processor
        self.preprocessing = preprocessing
        self._chat_template = chat_template
        self.combos_per_forward = combos_per_forward
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.stop_token_ids = self._resolve_stop_ids(stop_token_ids)
        self._tag_impossible: bool | None = None
        lm_params = inspect.signature(self.language_model.forward).parameters
        self._cache_kw = "cache" if "cache" in lm_params else "past_key_values"

    # ------------------------------------------------------------------ properties
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def processor(self) -> Any | None:
        """The transformers processor, or ``None`` where it cannot be built (no torchvision)."""
        return self._processor

    @property
    def text_config(self) -> PretrainedConfig:
        return self.model.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (``embed_tokens``, ``layers``, ``rotary_emb``, ``norm``) without the LM head."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    # ------------------------------------------------------------------ per family
    @abstractmethod
    def encode(self, frames: np.ndarray, prompt: str) -> EncodedQuestion:
        """Encode ``[T_raw, H, W, 3]`` uint8 frames and a prompt into the full LLM input."""

    @abstractmethod
    def text_positions(self, length: int) -> torch.Tensor:
        """Position ids of a text-only sequence of ``length`` tokens (``[L]`` or ``[3, L]``)."""

    # ------------------------------------------------------------------ prompts
    def render_prompt(self, prompt: str, with_video: bool) -> str:
        """The chat-template text of one user turn (a video item, then ``prompt``) plus the generation prompt."""
        messages = chat_messages(prompt, video=with_video)  # the same turn the tiny VLM was trained on
        if self._processor is not None and getattr(self._processor, "chat_template", None):
            text = self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = self._tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, chat_template=self._chat_template
            )
        return text if isinstance(text, str) else text[0]

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids of chat-template text (which already holds every special token: none are added)."""
        return torch.tensor(self._tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    @staticmethod
    def expand_placeholder(ids: torch.Tensor, token_id: int, count: int) -> tuple[torch.Tensor, int]:
        """Replace the single ``token_id`` in ``ids`` by ``count`` copies; return the new ids and the block start."""
        where = (ids == token_id).nonzero().flatten()
        if where.numel() != 1:
            raise ValueError(
                f"the rendered prompt must hold exactly one video placeholder (token id {token_id}), "
                f"found {where.numel()}: does the prompt text contain the placeholder itself?"
            )
        start = int(where[0])
        fill = torch.full((count,), token_id, dtype=ids.dtype)
        return torch.cat([ids[:start], fill, ids[start + 1 :]]), start

    # ------------------------------------------------------------------ decoding
    def _resolve_stop_ids(self, extra: Sequence[int] | None) -> tuple[int, ...]:
        ids: set[int] = set(extra or ())
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
        if self._tokenizer.eos_token_id is not None:
            ids.add(int(self._tokenizer.eos_token_id))
        im_end = self._tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self._tokenizer.unk_token_id:
            ids.add(im_end)
        if not ids:
            raise ValueError("no stop token: the tokenizer has no eos token and none was given")
        return tuple(sorted(ids))

    def answer_tag_impossible(self) -> bool:
        """True when no generated text can contain ``<answer>``: no non-special token contains ``<``.

        Sound for word-level, byte-level BPE and SentencePiece vocabularies, whose decoders never
        create a ``<`` that is not in some token's string (byte-fallback tokens such as ``<0x3C>``
        contain ``<`` themselves, so they count). Special tokens are skipped when decoding.
        """
        if self._tag_impossible is None:
            special = set(self._tokenizer.all_special_ids)
            vocab = self._tokenizer.get_vocab()
            self._tag_impossible = not any("<" in tok for tok, i in vocab.items() if i not in special)
        return self._tag_impossible

    def choose_chunk_size(self, seq_len: int, budget_bytes: int, max_new_tokens: int = 16) -> int:
        """Combinations per forward that fit ``budget_bytes`` of activations + KV cache.

        Estimate per combination, in the model's element size ``e``:
        - KV cache: ``2 * layers * kv_heads * head_dim * (seq_len + max_new_tokens) * e``;
        - prefill transients of one layer (residual, norm, q/k/v/o, attention output, the MLP's
          gate/up/activation): ``seq_len * (6 * hidden + 3 * intermediate) * e`` (attention itself
          is O(seq_len) with sdpa / flash kernels);
        - the gathered input embeddings: ``seq_len * hidden * e``.
        Last-position logits (``vocab * 4`` bytes) are negligible. The result is at least 1.
        """
        cfg = self.text_config
        e = torch.finfo(self.dtype).bits // 8
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        kv = 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * (seq_len + max_new_tokens) * e
        act = seq_len * (7 * int(cfg.hidden_size) + 3 * int(cfg.intermediate_size)) * e
        return max(1, int(budget_bytes) // (kv + act))

    def _check_keep(self, enc: EncodedQuestion, keep: torch.Tensor | None) -> torch.Tensor | None:
        if keep is None:
            return None
        if not isinstance(keep, torch.Tensor) or keep.dtype not in (torch.int64, torch.int32):
            raise KeepIndexError(f"keep must be an integer LongTensor [G, K], got {getattr(keep, 'dtype', keep)}")
        if keep.dim() == 1:
            keep = keep[None]
        if keep.dim() != 2 or keep.shape[0] == 0 or keep.shape[1] == 0:
            raise KeepIndexError(f"keep must have shape [G, K] with G, K >= 1, got {tuple(keep.shape)}")
        n = enc.num_video_tokens
        lo, hi = int(keep.min()), int(keep.max())
        if lo < 0 or hi >= n:
            raise KeepIndexError(f"keep indices must lie in [0, {n}) (T*N video tokens), got range [{lo}, {hi}]")
        keep = keep.long().sort(dim=1).values
        if keep.shape[1] > 1 and bool((keep[:, 1:] == keep[:, :-1]).any()):
            raise KeepIndexError("keep holds a duplicated index in some combination")
        return keep

    def gather(self, enc: EncodedQuestion, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pruned embeddings ``[G, L', D]`` and original positions ``[G, L']`` / ``[3, G, L']`` of combinations."""
        keep = self._check_keep(enc, keep)
        device = enc.inputs_embeds.device
        if keep is None:
            seq = torch.arange(enc.seq_len, device=device)[None]
        else:
            seq = enc.kept_sequence_index(keep.to(device))
        embeds = enc.inputs_embeds[seq]
        pos = enc.position_ids.to(device)
        positions = pos[seq] if pos.dim() == 1 else pos[:, seq]
        return embeds, positions

    @torch.no_grad()
    def generate(
        self,
        enc: EncodedQuestion,
        keep: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        *,
        first_token_fast_path: bool = False,
        combos_per_forward: int | None = None,
    ) -> list[str]:
        """Greedy answers of the ``G`` combinations ``keep`` (``[G, K]`` flat video indices; ``None``: no pruning).

        All combinations run as one batch (same length, no padding), in chunks of
        ``combos_per_forward`` (``None``: the adapter's setting; 0: ``choose_chunk_size``). New tokens
        take positions after the last original position, as in the unpruned sequence. A row stops at a
        stop token (eos / ``<|im_end|>``) or after ``max_new_tokens``; finished rows leave the batch
        and the KV cache.

        ``first_token_fast_path`` (multiple-choice questions only) also stops a row as soon as its
        reward is provably fixed (``rl.rewards.mc_prefix_decided``, under both the official and the fixed
        multiple-choice rule). What is proven:
        - if no non-special token contains ``<`` (``answer_tag_impossible``), no continuation can
          create the ``<answer>`` tag, so the parsed answer is the raw text;
        - decoding more tokens only appends text, and ``mc_prefix_decided`` holds only when every
          continuation of the text decoded so far has the same reward (the option's first word has
          ended; no partial UTF-8 character ``\\ufffd`` is pending).
        Such a row is decided and stops; the returned text is a prefix of its full answer with the
        same reward. A row whose next token is a stop token simply stops, in any vocabulary. With a
        vocabulary that can write ``<`` (real Qwen2 tokenizers) nothing else is provable, and the fast
        path is plain decoding.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        embeds, positions = self.gather(enc, keep)
        return self._generate_rows(embeds, positions, max_new_tokens, first_token_fast_path, combos_per_forward)

    def gather_compressed(
        self, enc: EncodedQuestion, blocks: Sequence[CompressedVideo]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``[G, L', D]`` and positions ``[G, L']`` / ``[3, G, L']`` with each block as the video.

        The text before and after the video block (and LLaVA's trailing ``image_newline``) keep their embeddings
        and positions; every block must hold the same number ``K`` of tokens (one batch, no padding), with
        positions of the sequence's layout (``[K]`` for 1-D, ``[3, K]`` for M-RoPE).
        """
        if not blocks:
            raise KeepIndexError("generate_compressed needs at least one block")
        k = blocks[0].num_tokens
        device = enc.inputs_embeds.device
        pos = enc.position_ids.to(device)
        for blk in blocks:
            if blk.num_tokens != k or blk.num_tokens < 1:
                raise KeepIndexError(f"compressed blocks must share K >= 1 tokens, got {blk.num_tokens} and {k}")
            if blk.embeds.shape[-1] != enc.inputs_embeds.shape[-1]:
                raise KeepIndexError(f"block width {blk.embeds.shape[-1]} != hidden size {enc.inputs_embeds.shape[-1]}")
            if blk.positions.dim() != pos.dim() or blk.positions.shape[-1] != k:
                raise KeepIndexError(
                    f"block positions {tuple(blk.positions.shape)} do not fit sequence positions {tuple(pos.shape)}"
                )
        s, n = enc.video_start, enc.num_video_tokens
        g = len(blocks)
        before, after = enc.inputs_embeds[:s], enc.inputs_embeds[s + n :]
        video = torch.stack([b.embeds.to(device=device, dtype=enc.inputs_embeds.dtype) for b in blocks])
        embeds = torch.cat([before.expand(g, -1, -1), video, after.expand(g, -1, -1)], dim=1)
        vpos = torch.stack([b.positions.to(device) for b in blocks], dim=-2)  # [G, K] or [3, G, K]
        if pos.dim() == 1:
            positions = torch.cat([pos[:s].expand(g, -1), vpos, pos[s + n :].expand(g, -1)], dim=-1)
        else:
            lead = pos[:, None, :s].expand(-1, g, -1)
            tail = pos[:, None, s + n :].expand(-1, g, -1)
            positions = torch.cat([lead, vpos, tail], dim=-1)
        return embeds, positions

    @torch.no_grad()
    def generate_compressed(
        self,
        enc: EncodedQuestion,
        blocks: Sequence[CompressedVideo],
        max_new_tokens: int = 16,
        *,
        first_token_fast_path: bool = False,
        combos_per_forward: int | None = None,
    ) -> list[str]:
        """Greedy answers with each compressed block as the question's video, batched like ``generate``.

        A selection's block (``from_keep(enc, keep)``) gives exactly ``generate(enc, keep[None])``'s input.
        """
        embeds, positions = self.gather_compressed(enc, blocks)
        return self._generate_rows(embeds, positions, max_new_tokens, first_token_fast_path, combos_per_forward)

    def _generate_rows(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        max_new_tokens: int,
        first_token_fast_path: bool,
        combos_per_forward: int | None,
    ) -> list[str]:
        """Greedy answers of prepared input rows ``[G, L', D]`` in chunks (see ``generate``)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        g, length = embeds.shape[0], embeds.shape[1]
        chunk = self.combos_per_forward if combos_per_forward is None else combos_per_forward
        if chunk <= 0:
            chunk = self.choose_chunk_size(length, self.memory_budget_bytes, max_new_tokens)
        decide = first_token_fast_path and self.answer_tag_impossible()
        texts: list[str] = []
        for s in range(0, g, chunk):
            pos = positions[s : s + chunk] if positions.dim() == 2 else positions[:, s : s + chunk]
            rows = self._greedy(embeds[s : s + chunk], pos, max_new_tokens, decide)
            texts.extend(self._decode(r) for r in rows)
        return texts

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _decided(self, ids: list[int]) -> bool:
        return mc_prefix_decided(self._decode(ids))

    def _greedy(
        self, embeds: torch.Tensor, positions: torch.Tensor, max_new_tokens: int, decide: bool
    ) -> list[list[int]]:
        """Greedy decoding with a KV cache; finished rows are compacted out of the batch."""
        lm, head = self.language_model, self.lm_head
        embed_tokens = self.model.get_input_embeddings()
        b, length = embeds.shape[:2]
        cache = DynamicCache(config=self.text_config)
        mask = torch.ones(b, length, dtype=torch.long, device=embeds.device)
        # Gapped positions need the explicit 2-D mask: without it transformers reads them as packed sequences.
        out = lm(
            inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=True, **{self._cache_kw: cache}
        )
        next_tok = head(out.last_hidden_state[:, -1]).argmax(-1)
        last_pos = positions[..., -1]  # [B] or [3, B]
        active = torch.arange(b, device=embeds.device)
        tokens: list[list[int]] = [[] for _ in range(b)]
        stop = torch.tensor(self.stop_token_ids, device=embeds.device)
        for step in range(max_new_tokens):
            # Like transformers' generate, the stop token is part of the output (special ones vanish on decode).
            finished = torch.isin(next_tok, stop)
            for i, row in enumerate(active.tolist()):
                tokens[row].append(int(next_tok[i]))
                if decide and not finished[i] and self._decided(tokens[row]):
                    finished[i] = True
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            if bool(finished.any()):
                alive = (~finished).nonzero().flatten()
                cache.batch_select_indices(alive)
                active, next_tok, mask = active[alive], next_tok[alive], mask[alive]
                last_pos = last_pos[..., alive]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = (last_pos + 1 + step).unsqueeze(-1)
            out = lm(
                inputs_embeds=embed_tokens(next_tok)[:, None],
                position_ids=pos,
                attention_mask=mask,
                use_cache=True,
                **{self._cache_kw: cache},
            )
            next_tok = head(out.last_hidden_state[:, -1]).argmax(-1)
        return tokens

    @torch.no_grad()
    def generate_text_only(self, prompt: str, max_new_tokens: int = 16) -> str:
        """Greedy answer to ``prompt`` without any video (the blind test)."""
        ids = self.tokenize(self.render_prompt(prompt, with_video=False)).to(self.device)
        embeds = self.model.get_input_embeddings()(ids)[None]
        pos = as_batch_positions(self.text_positions(ids.numel()).to(self.device))
        return self._decode(self._greedy(embeds, pos, max_new_tokens, decide=False)[0])

    # ------------------------------------------------------------------ FastV / policy support
    @torch.no_grad()
    def early_layer_attention(
        self, enc: EncodedQuestion, layer: int = 2, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention from the last token to each video token at LLM layer ``layer``, averaged over heads.

        Returns ``[T*N]`` float32 (zeros at tokens pruned by ``keep``, a single ``[K]`` combination).
        Layers ``0..layer-1`` run with the model's configured attention; layer ``layer`` runs the
        first ``L-1`` tokens into a KV cache, then the last token alone with eager attention, so only a
        ``[heads, 1, L]`` weight matrix is materialised. The eager call uses a shallow copy of the
        attention module with its own config, so the model's configured attention is never changed.
        """
        lm = self.language_model
        n_layers = len(lm.layers)
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer must be in [0, {n_layers}), got {layer}")
        if keep is not None and keep.dim() != 1:
            raise KeepIndexError(f"early_layer_attention takes one combination [K], got shape {tuple(keep.shape)}")
        embeds, positions = self.gather(enc, keep)
        h = embeds
        pe = lm.rotary_emb(h, positions)
        mask2d = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        mask = create_causal_mask(
            config=lm.config, inputs_embeds=h, attention_mask=mask2d, cache=None, position_ids=None
        )
        for i in range(layer):
            h = lm.layers[i](h, attention_mask=mask, position_embeddings=pe, position_ids=None)
        block = lm.layers[layer]
        x = block.input_layernorm(h)
        cache = DynamicCache(config=self.text_config)
        head_pe = tuple(t[..., :-1, :] for t in pe)
        prefix_mask = create_causal_mask(
            config=lm.config, inputs_embeds=x[:, :-1], attention_mask=mask2d[:, :-1], cache=None, position_ids=None
        )
        block.self_attn(hidden_states=x[:, :-1], attention_mask=prefix_mask, position_embeddings=head_pe, cache=cache)
        eager = copy.copy(block.self_attn)
        eager.config = copy.copy(block.self_attn.config)
        eager.config._attn_implementation = "eager"
        last_pe = tuple(t[..., -1:, :] for t in pe)
        _, weights = eager(hidden_states=x[:, -1:], attention_mask=None, position_embeddings=last_pe, cache=cache)
        attn = weights[0, :, -1].float().mean(0)  # [L']
        out = torch.zeros(enc.num_video_tokens, dtype=torch.float32, device=attn.device)
        n_kept = enc.num_video_tokens if keep is None else keep.numel()
        video_attn = attn[enc.video_start : enc.video_start + n_kept]
        if keep is None:
            out.copy_(video_attn)
        else:
            out[keep.sort().values.to(out.device)] = video_attn
        return out

    def policy_blueprint(self) -> tuple[nn.Module, nn.Module, PretrainedConfig]:
        """The LLM's decoder layer 0, its rotary embedding module and the text config (the policy copies them)."""
        lm = self.language_model
        return lm.layers[0], lm.rotary_emb, lm.config


def as_batch_positions(positions: torch.Tensor) -> torch.Tensor:
    """``[L]`` -> ``[1, L]``; ``[3, L]`` -> ``[3, 1, L]`` (the batched layouts the language models take)."""
    return positions[None] if positions.dim() == 1 else positions[:, None]
