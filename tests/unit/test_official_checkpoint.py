"""Converting an official CaCoVID checkpoint (tests/golden/policy/, built with the official code) into a policy.

The converted policy must reproduce the official ``CompressionPolicy.forward(return_logits=True)`` outputs stored
in forward_case.json, for both attention variants, through the project's own ``CacovidPolicy``.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cacovid_cli.main import main
from cacovid_rl.policy.network import CacovidPolicy
from cacovid_rl.policy.official import OfficialCheckpointError, convert_official

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "policy"
TOL = 1e-5  # forward_case.json: abs 1e-5 on fp32 logits


def _blob(d: dict) -> torch.Tensor:
    """A float32 golden array blob (little-endian raw bytes, base64)."""
    assert d["dtype"] == "float32"
    return torch.from_numpy(np.frombuffer(base64.b64decode(d["b64"]), "<f4").reshape(d["shape"]).copy())


@pytest.fixture(scope="module")
def case() -> dict:
    return json.loads((GOLDEN / "forward_case.json").read_text())


@pytest.fixture(scope="module")
def golden_tensors() -> dict[str, torch.Tensor]:
    with safe_open(str(GOLDEN / "compression_policy.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


def _run(policy: CacovidPolicy, case: dict) -> dict[str, torch.Tensor]:
    """Token logits [T*N, 2], frame logits [T, 2] and the decoder layer's output [L, D] on the golden input."""
    seen: dict[str, torch.Tensor] = {}
    hook = policy.layer.register_forward_hook(lambda m, i, o: seen.update(h=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        token, frame = policy.logits(
            _blob(case["inputs_embeds"]),
            torch.tensor(case["position_ids"]),
            case["video_start"],
            case["T"],
            case["N"],
        )
    hook.remove()
    return {"token_logits": token.reshape(-1, 2), "frame_logits": frame, "hidden_after_layer": seen["h"][0].float()}


def _checkpoint(tmp: Path, shards: dict[str, dict[str, torch.Tensor]], index: bool) -> Path:
    """An official-style checkpoint directory: config.json + the given safetensors files (+ an index)."""
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(GOLDEN / "config.json", tmp / "config.json")
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if index:
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp


@pytest.mark.parametrize("variant", ["causal", "bidirectional"])
def test_converted_policy_reproduces_the_official_forward(variant, case, tmp_path):
    convert_official(GOLDEN, tmp_path / "p", attention=variant)
    policy = CacovidPolicy.from_pretrained(tmp_path / "p")  # the project's normal loader
    assert policy.bidirectional is (variant == "bidirectional") and policy.match is None
    assert policy.frame_pool == "mean_then_norm"
    ours = _run(policy, case)
    official = case["variants"][variant]["official_outputs"]
    for name, value in ours.items():
        diff = (value - _blob(official[name])).abs().max().item()
        assert diff < TOL, (variant, name, diff)
    # the scores the samplers use are the logit differences of those heads
    scores = policy(_blob(case["inputs_embeds"]), torch.tensor(case["position_ids"]), 7, case["T"], case["N"])
    token = _blob(official["token_logits"]).view(case["T"], case["N"], 2)
    torch.testing.assert_close(scores.token, token[..., 1] - token[..., 0], rtol=0, atol=2 * TOL)
    frame = _blob(official["frame_logits"])
    torch.testing.assert_close(scores.frame, frame[:, 1] - frame[:, 0], rtol=0, atol=2 * TOL)
    # the other variant and the old frame-pooling order both miss, so the checks above tell them apart
    other = case["variants"]["bidirectional" if variant == "causal" else "causal"]["official_outputs"]
    assert (ours["token_logits"] - _blob(other["token_logits"])).abs().max() > 1e-3
    policy.frame_pool = "norm_then_mean"
    assert (_run(policy, case)["frame_logits"] - _blob(official["frame_logits"])).abs().max() > 1e-3


def test_converted_config_records_what_was_converted(tmp_path):
    summary = convert_official(GOLDEN, tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "policy_config.json").read_text())
    assert meta["question_match"] is False and meta["bidirectional"] is False and meta["frame_pool"] == "mean_then_norm"
    assert meta["decoder_layer_class"] == "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer"
    for kwarg in ("max_sample_rate", "apply_compression", "sample_mode_num", "frame_ratio"):
        assert kwarg not in meta["text_config"]  # official settings, not Qwen2 architecture
    official = meta["official"]
    assert official["training_settings"]["max_sample_rate"] == 0.02
    assert official["training_settings"]["sample_mode_num"] == {"content": 1, "token": 23, "frame": 8}
    assert (
        official["eval_defaults"]["imp_ratio"] == 0.5 and official["eval_defaults"]["token_select_strategy"] == "token"
    )
    assert len(official["dropped"]) == 10 and all(".mode_selection." in k for k in official["dropped"])
    readme = json.loads((GOLDEN / "README.json").read_text())
    kept = [k for k in readme["policy_keys"] if ".mode_selection." not in k]
    assert summary["num_tensors"] == len(kept)
    assert summary["num_parameters"] == sum(int(np.prod(readme["policy_keys"][k])) for k in kept)
    with pytest.raises(OfficialCheckpointError, match="not empty"):
        convert_official(GOLDEN, tmp_path / "p")
    convert_official(GOLDEN, tmp_path / "p", attention="bidirectional", overwrite=True)
    assert CacovidPolicy.from_pretrained(tmp_path / "p").bidirectional is True


def test_sharded_checkpoint_reads_only_the_policy_shards(golden_tensors, case, tmp_path):
    names = sorted(golden_tensors)
    first = {k: golden_tensors[k] for k in names[: len(names) // 2]}
    first["language_model.model.embed_tokens.weight"] = torch.randn(8, 64)
    second = {k: golden_tensors[k] for k in names[len(names) // 2 :]}
    ckpt = _checkpoint(
        tmp_path / "ckpt",
        {"model-00001-of-00003.safetensors": first, "model-00002-of-00003.safetensors": second},
        index=True,
    )
    # A third shard holding only LLM weights: listed in the index but not a readable file, so opening it fails.
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.lm_head.weight"] = "model-00003-of-00003.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / "model-00003-of-00003.safetensors").write_bytes(b"not safetensors")
    convert_official(ckpt, tmp_path / "sharded")
    # a policy tensor listed in a shard that does not hold it: one clear error, not a safetensors traceback
    index["weight_map"]["compression_policy.layernorm.weight"] = "model-00003-of-00003.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(OfficialCheckpointError, match=r"cannot read safetensors file .*model-00003"):
        convert_official(ckpt, tmp_path / "broken")
    convert_official(GOLDEN, tmp_path / "single")
    a = _run(CacovidPolicy.from_pretrained(tmp_path / "sharded"), case)
    b = _run(CacovidPolicy.from_pretrained(tmp_path / "single"), case)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # a single model.safetensors holding the whole model, LLM included
    whole = _checkpoint(tmp_path / "whole", {"model.safetensors": {**first, **second}}, index=False)
    convert_official(whole, tmp_path / "from_whole")
    c = _run(CacovidPolicy.from_pretrained(tmp_path / "from_whole"), case)
    torch.testing.assert_close(c["token_logits"], a["token_logits"], rtol=0, atol=0)


def test_bf16_checkpoint_stays_bf16_unless_asked(golden_tensors, case, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) for k, v in golden_tensors.items()}
    ckpt = _checkpoint(tmp_path / "ckpt", {"model.safetensors": bf16}, index=False)
    convert_official(ckpt, tmp_path / "bf16")
    policy = CacovidPolicy.from_pretrained(tmp_path / "bf16")
    assert policy.dtype == torch.bfloat16
    state = policy.state_dict()
    assert torch.equal(
        state["layer.self_attn.q_proj.weight"], bf16["compression_policy.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(state["token_head.8.bias"], bf16["compression_policy.token_compress.8.bias"])
    convert_official(ckpt, tmp_path / "fp32", dtype="float32")
    upcast = CacovidPolicy.from_pretrained(tmp_path / "fp32")
    assert upcast.dtype == torch.float32
    assert torch.equal(upcast.state_dict()["norm.weight"], bf16["compression_policy.layernorm.weight"].float())
    low, high = _run(policy, case), _run(upcast, case)
    assert (low["token_logits"] - high["token_logits"]).abs().max() < 0.1  # bf16 arithmetic, same weights


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(GOLDEN / "config.json", ckpt / "config.json")
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(OfficialCheckpointError, match="pickle") as err:
        convert_official(ckpt, tmp_path / "out")
    assert "pytorch_model.bin" in str(err.value) and "safe_serialization=True" in str(err.value)
    assert "weights_only=True" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_a_policy_is_refused(tmp_path):
    ckpt = _checkpoint(
        tmp_path / "ckpt",
        {"model.safetensors": {"language_model.lm_head.weight": torch.zeros(4, 4), "image_newline": torch.zeros(4)}},
        index=False,
    )
    with pytest.raises(OfficialCheckpointError, match=r"no 'compression_policy\.\*' tensors.*language_model"):
        convert_official(ckpt, tmp_path / "out")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"image_newline": "model.safetensors"}})
    )
    with pytest.raises(OfficialCheckpointError, match="image_newline"):
        convert_official(ckpt, tmp_path / "out")


def test_incomplete_or_mismatched_policy_is_refused(golden_tensors, tmp_path):
    partial = {k: v for k, v in golden_tensors.items() if "frame_compress.8" not in k}
    ckpt = _checkpoint(tmp_path / "partial", {"model.safetensors": partial}, index=False)
    with pytest.raises(OfficialCheckpointError, match=r"lacks .*compression_policy\.frame_compress\.8"):
        convert_official(ckpt, tmp_path / "out")
    config = json.loads((GOLDEN / "config.json").read_text())
    config["text_config"]["hidden_size"] = 128
    ckpt = _checkpoint(tmp_path / "wide", {"model.safetensors": dict(golden_tensors)}, index=False)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(OfficialCheckpointError, match="shapes do not match"):
        convert_official(ckpt, tmp_path / "out")


def test_cli_converts_and_reports_errors_on_one_line(tmp_path, capsys, case):
    assert main(["convert-official", str(GOLDEN), "--out", str(tmp_path / "p"), "--attention", "bidirectional"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["attention"] == "bidirectional" and printed["out"] == str(tmp_path / "p")
    ours = _run(CacovidPolicy.from_pretrained(tmp_path / "p"), case)["token_logits"]
    official = _blob(case["variants"]["bidirectional"]["official_outputs"]["token_logits"])
    assert (ours - official).abs().max().item() < TOL
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "model.pt").write_bytes(b"")
    assert main(["convert-official", str(tmp_path / "pickled"), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pickle" in err[0]
