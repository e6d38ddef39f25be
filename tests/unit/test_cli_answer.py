"""``cacovid-rl answer``: the README's line works as written, builds the training prompt, reports what it kept.

A fresh (untrained) policy stands in for a trained one: these tests pin the prompt, the output and the errors,
not the accuracy (a trained policy's accuracy is the report's business, docs/report).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cacovid_cli.answer import split_options
from cacovid_cli.common import UserError
from cacovid_cli.main import main
from cacovid_rl.data import synthetic
from cacovid_rl.data.prompts import build_prompt, letter_options, problem_with_options

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_line(prefix: str) -> list[str]:
    """The README line that starts with ``prefix``, as argv after ``cacovid-rl`` (its comment dropped)."""
    lines = [line for line in README.read_text().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"README should hold exactly one line starting with {prefix!r}, found {lines}"
    argv = shlex.split(lines[0], comments=True)
    assert argv[0] == "cacovid-rl"
    return argv[1:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A directory laid out as the README assumes: the generated clips and a policy at runs/debug_local/policy."""
    from cacovid_rl.config import ModelConfig
    from cacovid_rl.models.loading import load_adapter
    from cacovid_rl.policy.network import CacovidPolicy

    root = tmp_path_factory.mktemp("readme")
    make = _readme_line("cacovid-rl make-synthetic --out data/clips")
    assert subprocess.run([sys.executable, "-m", "cacovid_cli", *make], cwd=root, timeout=300).returncode == 0
    torch.manual_seed(0)
    CacovidPolicy.from_adapter(load_adapter(ModelConfig(path="tiny"))).save_pretrained(root / "runs/debug_local/policy")
    return root


def _record(workdir: Path, video: str) -> dict:
    """The generated record of ``video`` (a path under the dataset directory)."""
    for split in synthetic.SPLITS:
        for rec in json.loads((workdir / "data/clips" / f"{split}.json").read_text()):
            if video.endswith(rec["video"]):
                return rec
    raise AssertionError(f"no record for {video}")


def test_the_readme_answer_line_runs_and_asks_the_training_prompt(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    argv = _readme_line("cacovid-rl answer")
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("answer: ") and out[1].startswith("kept 12 of 128 video tokens")

    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rec = _record(workdir, argv[argv.index("--video") + 1])
    # The question is about this clip, and the prompt is exactly what training built from its record.
    assert printed["prompt"] == build_prompt(rec["problem"], rec["problem_type"])
    assert printed["problem_type"] == "multiple choice"
    assert {"answer", "option", "kept_indices", "kept_tokens", "total_tokens", "timings_s"} <= set(printed)
    assert printed["kept_tokens"] == len(printed["kept_indices"]) == 12 and printed["total_tokens"] == 128
    assert printed["kept_indices"] == sorted(set(printed["kept_indices"]))
    assert set(printed["timings_s"]) == {"decode", "encode", "score", "select", "generate", "total"}
    assert printed["config"] == "built-in defaults"  # no training run wrote a config.yaml beside this policy
    if printed["option"] is not None:
        assert printed["option"].startswith(printed["answer"][:1])


def test_numerical_question_json_and_heatmap(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    rec = next(
        r
        for split in synthetic.SPLITS
        for r in json.loads((workdir / "data/clips" / f"{split}.json").read_text())
        if r["problem_type"] == "numerical"
    )
    video = str(Path("data/clips") / rec["video"])
    argv = ["answer", "--policy", "runs/debug_local/policy", "--video", video, "--question", rec["problem"]]
    assert main([*argv, "--problem-type", "numerical", "--json", "--heatmap", "kept.png", "--retention", "0.25"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["prompt"] == build_prompt(rec["problem"], "numerical")
    assert printed["kept_tokens"] == 32 and printed["option"] is None
    assert (workdir / "kept.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_config_beside_the_policy_sets_the_defaults(workdir, monkeypatch, capsys):
    """runs/<run>/config.yaml (written by train) gives answer the run's model, frames and selection."""
    monkeypatch.chdir(workdir)
    run = workdir / "runs/debug_local"
    (run / "config.yaml").write_text("data:\n  num_frames: 4\neval:\n  imp_ratio: 1.0\nmodel:\n  max_new_tokens: 3\n")
    try:
        argv = _readme_line("cacovid-rl answer")
        assert main([*argv, "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["config"] == "runs/debug_local/config.yaml"
        assert printed["imp_ratio"] == 1.0 and printed["max_frames"] == 4 and printed["total_tokens"] == 64
        assert main([*argv, "--json", "--imp-ratio", "0.5", "--num-frames", "8"]) == 0  # flags win
        printed = json.loads(capsys.readouterr().out)
        assert printed["imp_ratio"] == 0.5 and printed["total_tokens"] == 128
    finally:
        (run / "config.yaml").unlink()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--video": "data/clips/videos/missing.mp4"}, "video file 'data/clips/videos/missing.mp4' does not exist"),
        ({"--policy": "runs/nope/policy"}, "policy directory 'runs/nope/policy' does not exist"),
        ({"--policy": "data/clips"}, "no saved policy at 'data/clips'"),
        ({"--retention": "0"}, "--retention must be in (0, 1]"),
        ({"--problem-type": "numerical"}, "--options go with --problem-type 'multiple choice'"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(workdir, change, message):
    """The real command (stderr as a user sees it): one ``error:`` line, no traceback."""
    argv = _readme_line("cacovid-rl answer")
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    proc = subprocess.run(
        [sys.executable, "-m", "cacovid_cli", *argv], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_debug_shows_the_traceback(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = _readme_line("cacovid-rl answer")
    argv[argv.index("--video") + 1] = "missing.mp4"
    with pytest.raises(UserError, match=r"missing\.mp4"):
        main([*argv, "--debug"])
    with pytest.raises(UserError, match=r"missing\.mp4"):
        main(["--debug", *argv])


def test_a_corrupt_video_is_a_user_error(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    (workdir / "bad.mp4").write_bytes(b"not a video")
    argv = _readme_line("cacovid-rl answer")
    argv[argv.index("--video") + 1] = "bad.mp4"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.mp4" in err[0]


def test_options_are_laid_out_as_the_training_records():
    scene = synthetic.sample_scene(np.random.default_rng([0, 0]), 0.0, 3, 5, synthetic.NUM_FRAMES)
    assert scene.problem_type == "multiple choice"
    # Labelled or bare, the options give the synthetic record's own problem text.
    assert problem_with_options(scene.question, synthetic.options()) == synthetic.problem_text(scene)
    assert problem_with_options(scene.question, list(synthetic.OPTION_COLOURS)) == synthetic.problem_text(scene)
    assert letter_options(["A) x", "B) y"]) == ["A) x", "B) y"]
    with pytest.raises(ValueError, match="label every option"):
        letter_options(["A. red", "green"])
    with pytest.raises(ValueError, match="no options"):
        letter_options([" "])
    assert split_options(["A. red\nB. green"]) == ["A. red", "B. green"]  # one argument, one option per line
