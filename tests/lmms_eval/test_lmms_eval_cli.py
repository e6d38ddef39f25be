"""The real lmms-eval CLI, end to end: ``python -m lmms_eval --model cacovid`` on a local synthetic-video task.

The model is found through the installed package's ``lmms_eval.models`` entry point (nothing imports the
wrapper first), the task through ``--include_path`` (tests/lmms_eval/tasks/cacovid_synthetic), the data are
generated videos in a temporary directory, and the network is off. The accuracy lmms-eval reports must equal,
question for question, what the project's own evaluation (``cacovid_rl.eval.evaluate``) computes with the same
policy, retention and frames. lmms-eval is a test requirement (the ``lmms`` extra): without it the test fails
and says how to install it; it never skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from cacovid_rl.config import ModelConfig
from cacovid_rl.data import synthetic as S
from cacovid_rl.data.records import load_records
from cacovid_rl.eval.evaluate import evaluate
from cacovid_rl.models.loading import load_adapter
from cacovid_rl.policy.network import CacovidPolicy

TASKS = Path(__file__).resolve().parent / "tasks"
TASK = "cacovid_synthetic"
RETENTION = 0.25
NUM_QUESTIONS = 40
INSTALL = "install the test requirements with: .venv/bin/pip install -e '.[dev,lmms]' (README, command 2)"


def require_lmms_eval() -> None:
    """Fail (never skip) when lmms-eval or this package's entry point is missing."""
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.fail(f"lmms-eval is not installed in {sys.prefix}; {INSTALL}")
    names = {ep.name for ep in entry_points(group="lmms_eval.models")}
    if "cacovid" not in names:
        pytest.fail(f"the 'cacovid' lmms_eval.models entry point is not installed (found {sorted(names)}); {INSTALL}")


@pytest.mark.slow
def test_lmms_eval_cli_reports_the_projects_accuracy(tmp_path: Path) -> None:
    require_lmms_eval()
    data = tmp_path / "data"
    S.make_synthetic(data, n=NUM_QUESTIONS, seed=2025, fractions=(0.0, 0.0, 1.0))
    records = load_records(data / "test.json").records  # all but the one validation question
    assert len(records) >= NUM_QUESTIONS - 1
    with (data / f"{TASK}.jsonl").open("w") as f:
        for rec in records:
            doc = {"sample_id": rec.sample_id, "video": str(rec.video), "problem": rec.problem}
            f.write(json.dumps(doc | {"problem_type": rec.problem_type, "answer": rec.answer}) + "\n")

    adapter = load_adapter(ModelConfig(path="tiny"))
    torch.manual_seed(0)
    policy_dir = CacovidPolicy.from_adapter(adapter).save_pretrained(tmp_path / "policy")

    out = tmp_path / "lmms_out"
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),  # lmms-eval's dataset cache stays in the test's directory
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "lmms_eval",
        "--model", "cacovid",
        "--model_args", f"pretrained=tiny,policy={policy_dir},retention={RETENTION},num_frames={S.NUM_FRAMES}",
        "--tasks", TASK,
        "--include_path", str(TASKS),
        "--batch_size", "1",
        "--device", "cpu",
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=data, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    (results_file,) = out.rglob("*results.json")
    accuracy = json.loads(results_file.read_text())["results"][TASK]["accuracy,none"]
    assert f"{accuracy:.4f}" in proc.stdout, proc.stdout[-3000:]  # the table lmms-eval prints
    (samples_file,) = out.rglob(f"*samples_{TASK}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == len(records)

    # The project's own evaluation of the same questions, policy, retention and frames.
    policy = CacovidPolicy.from_pretrained(policy_dir)
    ours = evaluate(adapter, policy, records, [RETENTION], [], num_frames=S.NUM_FRAMES, max_new_tokens=16)
    assert ours["n"] == len(records) and ours["skipped"] == 0
    project = ours["methods"]["cacovid"][str(RETENTION)]
    print(f"lmms-eval accuracy {accuracy:.4f}, project evaluation {project:.4f} on {len(records)} questions")
    assert accuracy == pytest.approx(project, abs=1e-12)
    total = S.NUM_FRAMES * S.TOKENS_PER_FRAME
    for sample in samples:
        (counts,) = sample["token_counts"]  # the GenerationResult's counts, as lmms-eval logged them
        assert counts["video_tokens_total"] == total
        assert counts["video_tokens_kept"] == int(RETENTION * total)
