"""Convert an official CaCoVID checkpoint into a project policy directory.

The official code (LivingFutureLab/CaCoVID) keeps its ``CompressionPolicy`` inside a patched
``LlavaOnevisionForConditionalGeneration``; its checkpoint is that whole model (safetensors shards with a
``model.safetensors.index.json``, or one ``model.safetensors``) whose policy tensors carry the prefix
``compression_policy.``. Only those tensors are read, and only from the shards that hold them, so converting
the released 7B checkpoint does not load the LLM.

Mapping (official -> ``CacovidPolicy``):

* ``layers.0.*`` -> ``layer.*``: the official policy builds a ``Qwen2DecoderLayer`` from ``text_config``; here it
  is transformers' own ``Qwen2DecoderLayer`` built from the same text config, so the names match one to one.
  ``rotary_emb.inv_freq`` is a non-persistent buffer recomputed from the config (and ignored if a file has it).
* ``layernorm.weight`` -> ``norm.weight`` (RMSNorm, ``eps = text_config.rms_norm_eps``).
* ``token_compress.{0,2,4,6,8}`` / ``frame_compress.{0,2,4,6,8}`` -> ``token_head`` / ``frame_head``: the same
  ``Linear, SiLU, ...`` ``nn.Sequential`` layout, so the Linear indices are the same.
* ``mode_selection.*`` is dropped: the official training and evaluation never read its output (it is an
  untrained head whose logits are only returned), and the project has no mode-selection step.

The converted policy has ``question_match=False`` (the paper's policy has no question-match term) and
``frame_pool="mean_then_norm"`` (the official frame head). The attention mode is the caller's choice:
``causal`` is what the official run computed (under flash-attention-2, transformers 4.50 ignores the
``is_causal=False`` the policy passes, so the released checkpoint was trained and evaluated causal);
``bidirectional`` honours the evident intent of ``is_causal=False``.

Evaluation settings (``topk``, ``token_select_strategy``, ``imp_ratio``, ``max_sample_ratio_for_each_frame``)
are set by the official evaluation at load time and are not in the checkpoint. The project's loader does not
read them either: they come from the eval config (``eval.retentions``, ``eval.imp_ratio``,
``eval.max_ratio_scale``). The converted ``policy_config.json`` records the official defaults and that mapping
under ``official`` for reference.

Nothing here unpickles: a checkpoint with only ``pytorch_model.bin``/``.pt`` files is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
from safetensors import safe_open
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from cacovid_rl.policy.network import CONFIG_FILE, WEIGHTS_FILE, CacovidPolicy

PREFIX = "compression_policy."
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

OFFICIAL_KWARGS = (
    # Training kwargs the official LlavaOnevision __init__ copies into both vision_config and text_config.
    "apply_compression",
    "compression_policy",
    "max_sample_rate",
    "frame_ratio",
    "sample_mode_num",
    "group_size",
    "max_group_prob",
    # Evaluation kwargs, present only if a model was saved after an evaluation-time load.
    "topk",
    "random_compression",
    "token_select_strategy",
    "imp_ratio",
    "max_sample_ratio_for_each_frame",
)
"""Keys that are official CaCoVID settings, not Qwen2 architecture: kept out of the policy's text config."""

OFFICIAL_EVAL_DEFAULTS: dict[str, Any] = {
    "token_select_strategy": "token",
    "topk": [0.10, 0.15, 0.20, 0.25],
    "imp_ratio": 0.5,
    "max_sample_ratio_for_each_frame": "1.5 x topk",
    "source": "lmms_eval/scripts/eval_llava_onevision.sh (LivingFutureLab/CaCoVID)",
    "project_equivalent": {
        "topk": "eval.retentions",
        "imp_ratio": "eval.imp_ratio",
        "max_sample_ratio_for_each_frame": "eval.max_ratio_scale (x retention)",
        "token_select_strategy": "the 'cacovid' selector (policy/selection.py), the only strategy",
    },
}
"""The official evaluation's settings, recorded in the converted config for reference (the loader ignores them)."""

Attention = Literal["causal", "bidirectional"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class OfficialCheckpointError(ValueError):
    """An official checkpoint that cannot be converted; the message says why and what to do."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OfficialCheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise OfficialCheckpointError(f"{path} is not a JSON object")
    return data


def _policy_shards(ckpt: Path) -> dict[Path, list[str]]:
    """The safetensors files that hold ``compression_policy.*`` tensors, with those tensor names.

    With an index only the shards it names for policy tensors are opened. Without one, every ``*.safetensors``
    file in the directory is scanned (headers only), which covers ``model.safetensors`` and loose files.
    """
    index = ckpt / INDEX_FILE
    return _indexed_shards(ckpt, index) if index.is_file() else _scanned_shards(ckpt)


def _indexed_shards(ckpt: Path, index: Path) -> dict[Path, list[str]]:
    """:func:`_policy_shards` from a sharded checkpoint's index; every shard it names must exist."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise OfficialCheckpointError(f"{index} has no 'weight_map' object")
    shards: dict[Path, list[str]] = {}
    for name, shard in weight_map.items():
        if name.startswith(PREFIX):
            shards.setdefault(ckpt / shard, []).append(name)
    if not shards:
        _no_policy(ckpt, list(weight_map))
    for shard in shards:
        if not shard.is_file():
            raise OfficialCheckpointError(f"{index} names shard '{shard.name}', which is not in {ckpt}")
    return shards


def _scanned_shards(ckpt: Path) -> dict[Path, list[str]]:
    """:func:`_policy_shards` without an index: the headers of every ``*.safetensors`` file in ``ckpt``."""
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise OfficialCheckpointError(
                f"{ckpt} holds only pickle weights ({', '.join(pickles[:4])}); they are not loaded because "
                "unpickling can run arbitrary code. Convert them to safetensors first, e.g. "
                "model = LlavaOnevisionForConditionalGeneration.from_pretrained(dir) then "
                "model.save_pretrained(out, safe_serialization=True), or "
                "safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')"
            )
        raise OfficialCheckpointError(f"no safetensors weights in {ckpt} (expected {INDEX_FILE} or *.safetensors)")
    shards: dict[Path, list[str]] = {}
    seen: list[str] = []
    for f in files:
        with _open(f) as handle:
            keys = list(handle.keys())
        seen += keys
        names = [k for k in keys if k.startswith(PREFIX)]
        if names:
            shards[f] = names
    if not shards:
        _no_policy(ckpt, seen)
    return shards


def _no_policy(ckpt: Path, names: list[str]) -> NoReturn:
    roots = sorted({n.split(".", 1)[0] for n in names})
    raise OfficialCheckpointError(
        f"{ckpt} has no '{PREFIX}*' tensors, so it is not a CaCoVID checkpoint with a trained policy "
        f"(found {len(names)} tensors under {roots[:8] or 'nothing'})"
    )


def _read_policy_tensors(shards: dict[Path, list[str]]) -> dict[str, torch.Tensor]:
    """``compression_policy.*`` tensors, without the prefix, read from the shards that hold them."""
    out: dict[str, torch.Tensor] = {}
    for shard, names in shards.items():
        with _open(shard) as handle:
            for name in names:
                try:
                    out[name.removeprefix(PREFIX)] = handle.get_tensor(name)
                except Exception as exc:  # safetensors raises its own error type for a missing name
                    raise OfficialCheckpointError(f"cannot read '{name}' from {shard}: {exc}") from exc
    return out


def _open(path: Path) -> Any:
    """``safe_open`` of one file, with an unreadable or non-safetensors file reported as a checkpoint error."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError and OSError: both mean the file cannot be used
        raise OfficialCheckpointError(f"cannot read safetensors file {path}: {exc}") from exc


def text_config_from_official(config: dict[str, Any]) -> tuple[Qwen2Config, dict[str, Any]]:
    """The Qwen2 config the official policy layer is built from, and the official settings found in it."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise OfficialCheckpointError("config.json has no 'text_config': not a LLaVA-OneVision checkpoint")
    if text.get("model_type", "qwen2") != "qwen2":
        raise OfficialCheckpointError(
            f"text_config.model_type is {text.get('model_type')!r}; the official policy layer is a Qwen2 layer"
        )
    settings = {k: text[k] for k in OFFICIAL_KWARGS if k in text}
    arch = {k: v for k, v in text.items() if k not in OFFICIAL_KWARGS and k != "_attn_implementation_autoset"}
    text_config = Qwen2Config.from_dict(arch)
    # sdpa: what the project's loader uses; the causal/bidirectional choice is made by the policy, not here.
    text_config._attn_implementation = "sdpa"
    return text_config, settings


def _map_names(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official policy names -> ``CacovidPolicy`` state-dict names, and the dropped official names."""
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for name, t in sorted(tensors.items()):
        head, _, rest = name.partition(".")
        if name.startswith("layers.0."):
            mapped["layer." + name.removeprefix("layers.0.")] = t
        elif name == "layernorm.weight":
            mapped["norm.weight"] = t
        elif head == "token_compress":
            mapped["token_head." + rest] = t
        elif head == "frame_compress":
            mapped["frame_head." + rest] = t
        elif head == "mode_selection" or name == "rotary_emb.inv_freq":
            dropped.append(PREFIX + name)
        else:
            unknown.append(PREFIX + name)
    if unknown:
        raise OfficialCheckpointError(
            f"unexpected policy tensors {unknown[:6]}: the official CompressionPolicy has one decoder layer "
            "(layers.0), layernorm, token_compress, frame_compress and mode_selection"
        )
    return mapped, dropped


def _official_name(name: str) -> str:
    """The official checkpoint name of a ``CacovidPolicy`` state-dict entry (for error messages)."""
    renames = (("layer.", "layers.0."), ("token_head.", "token_compress."), ("frame_head.", "frame_compress."))
    for ours, theirs in renames:
        if name.startswith(ours):
            return PREFIX + theirs + name.removeprefix(ours)
    return PREFIX + ("layernorm.weight" if name == "norm.weight" else name)


def convert_official(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    attention: Attention = "causal",
    dtype: DType = "auto",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the policy of the official checkpoint in ``ckpt_dir`` as a project policy directory ``out_dir``.

    ``attention``: ``causal`` (what the official run computed, the default for reproducing its numbers) or
    ``bidirectional``. ``dtype``: ``auto`` keeps the checkpoint's (the released 7B one is bfloat16).
    Returns a summary (also written under ``official`` in ``policy_config.json``).
    """
    if attention not in ("causal", "bidirectional"):
        raise OfficialCheckpointError(f"attention must be 'causal' or 'bidirectional', got {attention!r}")
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    if not ckpt.is_dir():
        raise OfficialCheckpointError(f"checkpoint directory {ckpt} does not exist")
    if out.exists() and not out.is_dir():
        raise OfficialCheckpointError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OfficialCheckpointError(f"output directory {out} is not empty (pass --force to overwrite)")
    shards = _policy_shards(ckpt)  # headers only: a pickle-only or policy-less checkpoint fails first
    if not (ckpt / "config.json").is_file():
        raise OfficialCheckpointError(f"{ckpt} has no config.json")
    text_config, settings = text_config_from_official(_read_json(ckpt / "config.json"))
    mapped, dropped = _map_names(_read_policy_tensors(shards))

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in mapped.values()})
    if dtype == "auto":
        if len(dtypes) != 1:
            raise OfficialCheckpointError(f"policy tensors have mixed dtypes {dtypes}: pass --dtype")
        target = getattr(torch, dtypes[0])
    else:
        target = getattr(torch, dtype)
    layer = Qwen2DecoderLayer(text_config, layer_idx=0).to(target)
    rotary = Qwen2RotaryEmbedding(config=text_config)
    policy = CacovidPolicy(
        layer,
        rotary,
        text_config,
        bidirectional=attention == "bidirectional",
        question_match=False,
        frame_pool="mean_then_norm",
    )
    expected = policy.state_dict()
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise OfficialCheckpointError(f"the checkpoint lacks policy tensors {[_official_name(k) for k in missing][:6]}")
    wrong = [
        f"{k}: {tuple(mapped[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(mapped[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise OfficialCheckpointError(
            f"policy tensor shapes do not match text_config (hidden {text_config.hidden_size}): {wrong[:4]}"
        )
    policy.load_state_dict({k: v.to(target) for k, v in mapped.items()}, strict=True)

    summary = {
        "source": str(ckpt),
        "attention": attention,
        "checkpoint_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "dtype": str(target).removeprefix("torch."),
        "num_tensors": len(mapped),
        "num_parameters": sum(t.numel() for t in mapped.values()),
        "dropped": sorted(dropped),
        "dropped_why": "mode_selection: untrained and unused by the official training and evaluation",
        "training_settings": settings,
        "eval_defaults": OFFICIAL_EVAL_DEFAULTS,
    }
    policy.save_pretrained(out, extra={"official": summary})
    return {**summary, "out": str(out), "files": [WEIGHTS_FILE, CONFIG_FILE]}
