"""Video-LLM adapters on tiny random-weight configs of the real transformers classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cacovid_rl.config import ModelConfig
from cacovid_rl.models.base import KeepIndexError, VideoLLMAdapter
from cacovid_rl.models.loading import ModelLoadError, load_adapter
from cacovid_rl.models.preprocessing import FrameError
from cacovid_rl.models.tiny import save_adapter, tiny_llava_onevision, tiny_qwen2_5_vl

PROMPT = "what colour is the object ?"
FAMILIES = ["llava_onevision", "qwen2_5_vl"]


def build(family: str, **kwargs) -> VideoLLMAdapter:
    return tiny_llava_onevision(**kwargs) if family == "llava_onevision" else tiny_qwen2_5_vl(**kwargs)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request) -> VideoLLMAdapter:
    return build(request.param, seed=1, init_std=0.2)


@pytest.fixture(scope="module")
def enc(adapter, frames):
    return adapter.encode(frames, PROMPT)


def combos(enc, g: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(enc.num_video_tokens, generator=gen)[:k].sort().values for _ in range(g)])


def naive_generate(adapter: VideoLLMAdapter, enc, keep: torch.Tensor, max_new_tokens: int) -> list[str]:
    """One combination at a time through transformers' own ``model.generate`` on the pruned embeddings."""
    texts = []
    for row in keep:
        embeds, positions = adapter.gather(enc, row[None])
        out = adapter.model.generate(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(adapter.stop_token_ids),
            pad_token_id=adapter.tokenizer.pad_token_id,
        )
        texts.append(adapter.tokenizer.decode(out[0], skip_special_tokens=True))
    return texts


def test_video_block_layout(adapter, enc, frames):
    t_raw = frames.shape[0]
    if adapter.family == "llava_onevision":
        assert (enc.num_frames, enc.tokens_per_frame) == (t_raw, 9)
        newline = adapter.model.model.image_newline
        torch.testing.assert_close(enc.inputs_embeds[enc.video_start + enc.num_video_tokens], newline)
        assert enc.position_ids.shape == (enc.seq_len,)
    else:
        assert enc.num_frames == -(-t_raw // 2)  # temporal groups of 2 frames, last one padded
        assert enc.position_ids.shape == (3, enc.seq_len)
        assert adapter.model.model.rope_deltas is None
    ids = enc.input_ids
    block = ids[enc.video_start : enc.video_start + enc.num_video_tokens]
    assert bool((block == adapter.video_token_id).all())
    assert int(ids[enc.video_start - 1]) != adapter.video_token_id
    assert enc.video_features().shape == (enc.num_frames, enc.tokens_per_frame, adapter.hidden_size)


def test_manual_path_matches_native_logits(adapter, enc, frames):
    with torch.no_grad():
        native = adapter.model(**adapter.native_inputs(frames, PROMPT)).logits[0]
        embeds, positions = adapter.gather(enc, None)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        hidden = adapter.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask)
        manual = adapter.lm_head(hidden.last_hidden_state)[0]
    torch.testing.assert_close(manual, native, rtol=0, atol=1e-5)


def test_unpruned_generate_matches_native_generate(adapter, enc, frames):
    inputs = adapter.native_inputs(frames, PROMPT)
    out = adapter.model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=list(adapter.stop_token_ids))
    if hasattr(adapter.model.model, "rope_deltas"):
        adapter.model.model.rope_deltas = None
    native = adapter.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert adapter.generate(enc, None, 8) == [native]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generate_matches_naive_hf_generate(family, frames):
    adapter = build(family, seed=2, init_std=0.2)
    enc = adapter.encode(frames, PROMPT)
    keep = combos(enc, 5, 7)
    # Pick a frequent, non-final token as an extra stop token so rows stop at different steps
    # (exercising compaction of finished rows out of the batch and the KV cache).
    free = adapter.generate(enc, keep, 8)
    words = [w for text in free for w in text.split()[1:]]
    stop_word = max(set(words), key=words.count)
    adapter.stop_token_ids = (*adapter.stop_token_ids, adapter.tokenizer.convert_tokens_to_ids(stop_word))
    batched = adapter.generate(enc, keep, 8, combos_per_forward=2)
    assert batched == naive_generate(adapter, enc, keep, 8)
    assert len({len(t.split()) for t in batched}) > 1, "rows should stop at different steps"
    assert batched == adapter.generate(enc, keep, 8, combos_per_forward=5)


def test_pruning_keeps_original_positions(adapter, enc):
    keep = combos(enc, 3, 6, seed=3)
    seen: list[torch.Tensor] = []
    hook = adapter.language_model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        adapter.generate(enc, keep, 3, combos_per_forward=3)
    finally:
        hook.remove()
    seq = enc.kept_sequence_index(keep)
    expected = enc.position_ids[seq] if enc.position_ids.dim() == 1 else enc.position_ids[:, seq]
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    if adapter.family == "qwen2_5_vl":
        assert seen[0].shape == (3, 3, seq.shape[1])  # 3-D M-RoPE columns gathered, not recomputed
        video_cols = expected[:, :, enc.video_start : enc.video_start + keep.shape[1]]
        assert not torch.equal(video_cols[0], video_cols[1])  # temporal and height rows really differ
    last = enc.position_ids[..., -1]
    for step, pos in enumerate(seen[1:]):
        assert bool((pos.squeeze(-1) == (last + 1 + step).unsqueeze(-1)).all())


def test_fast_path_gives_the_same_reward(adapter, enc):
    from cacovid_rl.rl.rewards import compute_reward

    assert adapter.answer_tag_impossible()  # the word-level vocabulary cannot write "<"
    keep = combos(enc, 6, 5, seed=4)
    full = adapter.generate(enc, keep, 10)
    fast = adapter.generate(enc, keep, 10, first_token_fast_path=True)
    for f, s in zip(full, fast, strict=True):
        assert f.startswith(s) and len(s) <= len(f)
        for gt in "ABCD":
            for fix in (False, True):  # decided under the official rule and under the fixed one
                assert compute_reward(s, gt, "multiple choice", fix_official_bugs=fix) == compute_reward(
                    f, gt, "multiple choice", fix_official_bugs=fix
                )
    assert sum(len(s) for s in fast) < sum(len(f) for f in full)


def test_text_only_generate_matches_native(adapter):
    ids = adapter.tokenize(adapter.render_prompt(PROMPT, with_video=False))
    assert adapter.video_token_id not in ids.tolist()
    out = adapter.model.generate(
        input_ids=ids[None],
        attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=list(adapter.stop_token_ids),
    )
    if hasattr(adapter.model.model, "rope_deltas"):
        adapter.model.model.rope_deltas = None
    native = adapter.tokenizer.decode(out[0, ids.numel() :], skip_special_tokens=True)
    assert adapter.generate_text_only(PROMPT, 6) == native


@pytest.mark.parametrize("family", FAMILIES)
def test_early_layer_attention_matches_eager_attentions(family, frames):
    sdpa = build(family, seed=5, init_std=0.2, num_layers=3)
    eager = build(family, seed=5, init_std=0.2, num_layers=3, attn_implementation="eager")
    enc = sdpa.encode(frames, PROMPT)
    keep = combos(enc, 1, 8, seed=6)[0]
    for k in (None, keep):
        embeds, positions = eager.gather(enc, None if k is None else k[None])
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        with torch.no_grad():
            out = eager.language_model(
                inputs_embeds=embeds, position_ids=positions, attention_mask=mask, output_attentions=True
            )
        row = out.attentions[1][0, :, -1].mean(0)
        n = enc.num_video_tokens if k is None else k.numel()
        got = sdpa.early_layer_attention(enc, layer=1, keep=k)
        assert got.shape == (enc.num_video_tokens,)
        kept = torch.arange(enc.num_video_tokens) if k is None else k
        torch.testing.assert_close(got[kept], row[enc.video_start : enc.video_start + n], rtol=0, atol=1e-6)
        if k is not None:
            dropped = torch.ones(enc.num_video_tokens, dtype=torch.bool)
            dropped[kept] = False
            assert bool((got[dropped] == 0).all())
    assert sdpa.model.config.get_text_config()._attn_implementation == "sdpa"


def test_policy_blueprint(adapter):
    layer, rotary, config = adapter.policy_blueprint()
    assert layer is adapter.language_model.layers[0]
    assert rotary is adapter.language_model.rotary_emb
    assert config.hidden_size == adapter.hidden_size
    assert adapter.dtype == torch.float32 and adapter.device.type == "cpu"


def test_choose_chunk_size(adapter, enc):
    small = adapter.choose_chunk_size(enc.seq_len, 1)
    assert small == 1
    a = adapter.choose_chunk_size(enc.seq_len, 10**8)
    b = adapter.choose_chunk_size(4 * enc.seq_len, 10**8)
    assert a > b >= 1
    keep = combos(enc, 4, 5, seed=7)
    adapter.memory_budget_bytes = 1  # combos_per_forward=0 -> one combination per forward
    try:
        assert adapter.generate(enc, keep, 4, combos_per_forward=0) == adapter.generate(
            enc, keep, 4, combos_per_forward=4
        )
    finally:
        adapter.memory_budget_bytes = 4 * 1024**3


def test_bad_inputs_raise_clear_errors(adapter, enc, frames):
    with pytest.raises(FrameError, match="non-empty"):
        adapter.encode(frames[:0], PROMPT)
    with pytest.raises(FrameError, match="uint8"):
        adapter.encode(frames.astype(np.float32), PROMPT)
    with pytest.raises(FrameError, match=r"\[T, H, W, 3\]"):
        adapter.encode(frames[..., 0], PROMPT)
    with pytest.raises(KeepIndexError, match="must lie in"):
        adapter.generate(enc, torch.tensor([[0, enc.num_video_tokens]]), 2)
    with pytest.raises(KeepIndexError, match="must lie in"):
        adapter.generate(enc, torch.tensor([[-1, 3]]), 2)
    with pytest.raises(KeepIndexError, match="duplicated"):
        adapter.generate(enc, torch.tensor([[2, 2]]), 2)
    with pytest.raises(KeepIndexError, match="G, K >= 1"):
        adapter.generate(enc, torch.zeros(0, 3, dtype=torch.long), 2)
    with pytest.raises(KeepIndexError, match="integer"):
        adapter.generate(enc, torch.tensor([[0.0, 1.0]]), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        adapter.generate(enc, None, 0)
    with pytest.raises(ValueError, match="exactly one video placeholder"):
        adapter.encode(frames, adapter.tokenizer.convert_ids_to_tokens(adapter.video_token_id))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_round_trip(family, frames, tmp_path):
    original = build(family, seed=8)
    save_adapter(original, tmp_path / "ckpt")
    loaded = load_adapter(ModelConfig(path=str(tmp_path / "ckpt")))
    assert type(loaded) is type(original)
    assert loaded.video_processor.to_dict() == original.video_processor.to_dict()
    a, b = original.encode(frames, PROMPT), loaded.encode(frames, PROMPT)
    torch.testing.assert_close(a.inputs_embeds, b.inputs_embeds, rtol=0, atol=0)
    assert original.generate(a, None, 4) == loaded.generate(b, None, 4)
    bf16 = load_adapter(ModelConfig(path=str(tmp_path / "ckpt"), dtype="bfloat16", combos_per_forward=3))
    assert bf16.dtype == torch.bfloat16 and bf16.combos_per_forward == 3


def test_load_adapter_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not a local directory"):
        load_adapter(ModelConfig(path=str(tmp_path / "missing")))
    save_adapter(tiny_llava_onevision(seed=0), tmp_path / "ckpt")
    with pytest.raises(ModelLoadError, match="holds a 'llava_onevision'"):
        load_adapter(ModelConfig(path=str(tmp_path / "ckpt"), family="qwen2_5_vl"))
    with pytest.raises(ModelLoadError, match="flash-attn"):
        load_adapter(ModelConfig(path=str(tmp_path / "ckpt"), attn_implementation="flash_attention_2"))
    (tmp_path / "ckpt" / "video_preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match="no video processor config"):
        load_adapter(ModelConfig(path=str(tmp_path / "ckpt")))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["model_type"] = "llava_next_video"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"unsupported model_type 'llava_next_video'.*llava_onevision.*qwen2_5_vl"):
        load_adapter(ModelConfig(path=str(tmp_path / "ckpt")))


def test_shipped_tiny_model_loads():
    from cacovid_rl.models.loading import TINY_ASSET

    assert (TINY_ASSET / "config.json").is_file(), f"the shipped tiny model is missing from {TINY_ASSET}"
    adapter = load_adapter(ModelConfig(path="tiny"))
    assert adapter.family == "llava_onevision"
