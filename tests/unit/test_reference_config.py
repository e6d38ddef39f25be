"""configs/llava_ov_7b_reference.yaml is the official recipe; configs/llava_ov_7b.yaml differs only where its
header table says.

The official values are transcribed from the official launch script and trainer (LivingFutureLab/CaCoVID at
commit 384752d: src/scripts/run_llava_onevision.sh run with WORLD_SIZE=8 and its other defaults,
src/r1-v/src/open_r1/grpo_video.py, src/r1-v/src/open_r1/trainer/grpo_trainer.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cacovid_rl.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (config key, official value, where the official code sets it)
OFFICIAL_RECIPE: list[tuple[str, object, str]] = [
    ("model.family", "llava_onevision", "PRETRAIN_MODEL=llava-hf/llava-onevision-qwen2-7b-ov-hf"),
    ("model.dtype", "bfloat16", "--bf16 true"),
    ("model.attn_implementation", "flash_attention_2", "--attn_implementation flash_attention_2"),
    ("model.max_new_tokens", 768, "--max_completion_length 768"),
    ("data.num_frames", 32, "MAX_FRAMES=32 -> --max_num_images"),
    ("data.max_fps", 1.0, "read_video_decode(decode_fps=1.0)"),
    ("sampling.num_samples", 32, "NUM_GENERATION=32 -> --num_generations"),
    ("sampling.num_content", 1, "CompressionPolicy.sample_mode_num"),
    ("sampling.num_token", 23, "CompressionPolicy.sample_mode_num"),
    ("sampling.num_frame", 8, "CompressionPolicy.sample_mode_num"),
    ("sampling.rate", 0.02, "MAX_SAMPLE_RATE=0.02 -> --max_sample_rate"),
    ("sampling.group_size", 2, "GROUP_SIZE=2.0 -> --group_size"),
    ("sampling.max_group_prob", 2.0, "MAX_GROUP_PROB=2.0 -> --max_group_prob"),
    ("sampling.frame_ratio", 0.125, "FRAME_RATIO=0.125 -> --frame_ratio"),
    ("sampling.knn_k", 4, "div_sample k=4"),
    ("sampling.frame_cap", "official", "clip_max_probability on the repeated softmax matrix"),
    ("rollout.iterations", 5, "num_iterations of the trainer"),
    ("rollout.high_reward", 0.875, "adaptive rate: halve at accuracy >= 0.875"),
    ("rollout.low_reward", 0.125, "adaptive rate: double at accuracy <= 0.125"),
    ("rollout.min_rate", 0.01, "adaptive rate floor"),
    ("rollout.max_rate", 0.12, "adaptive rate ceiling"),
    ("loss.clip_low", 0.2, "epsilon_low"),
    ("loss.clip_high", 0.28, "epsilon_high"),
    ("loss.kl_coef", 0.0, "KL=0.0 -> --video_selection_kl_weight"),
    ("learner.lr", 1e-6, "LR_FOR_CP=1e-6 -> --learning_rate_for_compression_policy and the last --learning_rate"),
    ("learner.decoder_lr_scale", 0.1, "lr_drop_for_attn=0.1"),
    ("learner.weight_decay", 0.01, "--weight_decay 0.01"),
    ("learner.grad_clip", 5.0, "--max_grad_norm 5"),
    ("learner.schedule", "official_cosine", "--lr_scheduler_type cosine, stepped per iteration"),
    ("learner.warmup_steps", 0, "no warmup flag"),
    ("learner.questions_per_step", 8, "--per_device_train_batch_size 1 on 8 GPUs, no accumulation"),
    ("learner.max_staleness", 0, "single-process trainer: always on-policy"),
    ("learner.total_steps", 0, "--num_train_epochs 1 (0 = one epoch)"),
    ("learner.checkpoint_every", 100, "--save_steps 100"),
    ("policy.question_match", False, "the paper's network has no question-match term"),
    ("policy.bidirectional", False, "flash-attention-2 drops is_causal=False: the official layer runs causally"),
    ("policy.init_from_layer0", True, "policy layer copied from the LLM's layer 0"),
    ("reward.fix_official_bugs", False, "accuracy_reward as written"),
    ("eval.imp_ratio", 0.5, "evaluation default imp_ratio"),
    ("eval.max_ratio_scale", 1.5, "max_sample_ratio_for_each_frame = 1.5 x topk"),
    ("cluster.min_actors", 8, "8 GPUs, one question each"),
    ("cluster.max_actors", 8, "8 GPUs, one question each"),
    ("cluster.inflight_per_actor", 1, "one question per GPU per step"),
    ("seed", 42, "--seed 42"),
]


def _get(cfg: Config, dotted: str) -> object:
    node: object = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.fixture(scope="module")
def reference() -> Config:
    return load_config(CONFIGS / "llava_ov_7b_reference.yaml")


@pytest.fixture(scope="module")
def fast() -> Config:
    return load_config(CONFIGS / "llava_ov_7b.yaml")


@pytest.mark.parametrize(("key", "value", "source"), OFFICIAL_RECIPE, ids=[k for k, _, _ in OFFICIAL_RECIPE])
def test_reference_config_is_the_official_recipe(reference: Config, key: str, value: object, source: str) -> None:
    assert _get(reference, key) == value, f"{key}: official value {value!r} ({source})"


def _flat(obj: object, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def test_the_fast_variant_differs_only_where_its_table_says(reference: Config, fast: Config) -> None:
    """Every recipe key on which the two configs differ is a row of the reference file's table, and every row
    names a key on which they do differ (paths, names and placement excluded: they differ by design)."""
    ref, fst = _flat(reference.to_dict()), _flat(fast.to_dict())
    recipe_keys = {k for k, _, _ in OFFICIAL_RECIPE if k in ref}
    differing = {k for k in recipe_keys if ref[k] != fst[k]}
    header = (CONFIGS / "llava_ov_7b_reference.yaml").read_text().split("\n\n", 1)[0]
    rows: set[str] = set()
    for m in re.finditer(r"^# \| ([a-z_.]+(?:/[a-z_]+)?)\s+\|", header, re.MULTILINE):
        key = m.group(1)
        if "/" in key:  # cluster.min/max_actors
            section, names = key.split(".", 1)
            rows.update(f"{section}.{name}" for name in names.split("/"))
        else:
            rows.add(key)
    rows.discard("key")
    # Ready-made differences the table explains outside the recipe list (actor count is one row for two keys).
    assert differing <= rows, f"undocumented differences: {sorted(differing - rows)}"
    documented_but_equal = {k for k in rows if k in ref and ref[k] == fst[k]}
    assert not documented_but_equal, f"table rows that no longer differ: {sorted(documented_but_equal)}"
