"""Operator mistakes caught before anything starts: range checks, YAML traps, paths, CLI exit codes.

Uncaught, each case would pass validation and fail late (inside a Ray actor, at the first periodic evaluation, at
the first checkpoint) or end in a traceback with exit 1; each must be one ``error:`` line naming the key or file,
exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cacovid_cli.main import main
from cacovid_rl.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("seed=-1", "seed"),
        ("learner.device=banana", "learner.device"),
        ("model.device=gpu0", "model.device"),
        ("learner.lr=.inf", "learner.lr"),
        ("loss.clip_low=.nan", "loss.clip_low"),
        ("loss.adv_eps=0", "loss.adv_eps"),
        ("cluster.num_cpus=0", "cluster.num_cpus"),
        ("learner.keep_checkpoints=0", "learner.keep_checkpoints"),
        ("cluster.max_item_failures=0", "cluster.max_item_failures"),
        ("model.max_prompt_tokens=-1", "model.max_prompt_tokens"),
        ("eval.every_steps=-1", "eval.every_steps"),
    ],
)
def test_values_that_failed_late_are_rejected_at_load(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_integer_key_duplicate_section_and_binary_file_name_the_problem(tmp_path: Path) -> None:
    int_key = tmp_path / "int.yaml"
    int_key.write_text("learner:\n  1: 3\n")
    with pytest.raises(ConfigError, match="must be a name"):  # not a TypeError from sorting int and str keys
        load_config(int_key)
    dup = tmp_path / "dup.yaml"
    dup.write_text("learner:\n  lr: 0.5\nseed: 3\nlearner:\n  total_steps: 7\n")
    with pytest.raises(ConfigError, match="given twice"):  # not a silent drop of the first learner section
        load_config(dup)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01")
    with pytest.raises(ConfigError, match="not UTF-8"):  # not a UnicodeDecodeError traceback
        load_config(binary)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from cacovid_rl.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("robust_data")
    make_synthetic(out, n=10, seed=3)
    return out


def _train_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        "debug_local",
        "data.synthetic_dir=",
        "data.blind_filter=false",
        f"data.train_path={data / 'train.json'}",
        f"data.eval_path={data / 'test.json'}",
        f"data.video_root={data}",
        f"output_dir={tmp_path / 'run'}",
        f"learner.checkpoint_dir={tmp_path / 'run' / 'ckpt'}",
        "wandb.mode=disabled",
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["model.path=/nonexistent/model"], "model.path"),
        (["data.video_root=/nonexistent/videos"], "data.video_root"),
        (["data.eval_path=/nonexistent/tset.json"], "data.eval_path"),
        (["eval.baselines=[uniform, nonexistent]"], "eval.baselines"),
        (["--resume"], "--resume"),
        (["--allow-config-change"], "--allow-config-change"),
    ],
)
def test_train_user_errors_are_one_line_exit_2_before_ray_starts(
    tmp_path: Path, tiny_data: Path, capsys, extra: list[str], needle: str
) -> None:
    args = _train_args(tmp_path, tiny_data, *[e for e in extra if not e.startswith("--")])
    args[1:1] = [e for e in extra if e.startswith("--")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_model_dir_with_garbage_weights_is_a_user_error(tmp_path: Path, tiny_data: Path, capsys) -> None:
    import shutil

    from cacovid_rl.models.loading import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("tiny"), model)
    (model / "model.safetensors").write_bytes(b"\x13\x37" * 4096)  # random bytes in place of the weights
    assert main(_train_args(tmp_path, tiny_data, f"model.path={model}")) == 2
    err = capsys.readouterr().err
    assert "model.path" in err and "model.safetensors" in err


def test_unwritable_checkpoint_dir_is_found_at_start(tmp_path: Path, tiny_data: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory must be")  # root ignores chmod: a file in the path blocks anyone
    assert main(_train_args(tmp_path, tiny_data, f"learner.checkpoint_dir={blocker / 'ckpt'}")) == 2
    err = capsys.readouterr().err
    assert "learner.checkpoint_dir" in err and "not writable" in err


def test_eval_data_file_with_no_usable_record_is_named(tmp_path: Path, tiny_data: Path, capsys) -> None:
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps([{"problem": "q", "solution": "<answer>A</answer>"}]))
    assert main(_train_args(tmp_path, tiny_data, f"data.eval_path={bad}")) == 2
    err = capsys.readouterr().err
    assert "data.eval_path" in err and "no usable record" in err
