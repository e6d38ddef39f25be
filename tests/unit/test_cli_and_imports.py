"""The command line's surface, and its light imports (``--help`` loads neither torch nor Ray).

Which package may import which is ``test_import_layers.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from cacovid_cli.common import presets, resolve_config
from cacovid_cli.main import build_parser, main
from cacovid_cli.report import report_parser
from cacovid_rl.config import ConfigError, load_config

SUBCOMMANDS = [
    "train",
    "eval",
    "answer",
    "blind-test",
    "make-synthetic",
    "report",
    "convert-official",
]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help_with_defaults_and_examples(sub: str, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cacovid-rl {sub} ")  # the report too, not "python -m cacovid_rl.eval.report"
    assert "(default: " in out
    assert "examples:" in out and f"cacovid-rl {sub} " in out.split("examples:")[1]
    assert "--debug" in out  # accepted after the subcommand as well as before it


def _subparser(sub: str) -> argparse.ArgumentParser:
    """The subcommand's parser (the report's is built on demand, like main() does)."""
    if sub == "report":
        return report_parser()
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[sub]


def _options(sub: str) -> dict[str, argparse.Action]:
    return {flag: a for a in _subparser(sub)._actions for flag in a.option_strings}


def test_flags_mean_one_thing_everywhere():
    for sub in SUBCOMMANDS:
        opts = _options(sub)
        if "--data" in opts:  # always a records file; a directory is --data-dir / --out
            assert "file" in opts["--data"].help and "director" not in opts["--data"].help, sub
        if "--config" in opts and sub != "report":  # the report's is a fallback for runs without a config
            assert "overrides" in [a.dest for a in _subparser(sub)._actions], f"{sub}: --config without overrides"
    for sub in ("train", "eval", "answer", "blind-test", "report"):  # every subcommand that runs a model
        assert "--device" in _options(sub), sub


def test_version_comes_from_the_installed_package():
    out = subprocess.run(
        [sys.executable, "-m", "cacovid_cli", "--version"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == f"cacovid-rl {version('cacovid-rl')}"
    script = Path(sys.executable).parent / "cacovid-rl"  # the console script pip installed
    if script.is_file():
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True, timeout=60)
        assert out.stdout.strip() == f"cacovid-rl {version('cacovid-rl')}"


def test_config_errors_name_the_key_and_exit_2(capsys):
    assert main(["train", "--config", "configs/debug_local.yaml", "learner.lrr=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "learner.lrr" in err[0]


def test_a_named_preset_resolves_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here: outside a clone
    assert set(presets()) >= {"debug_local", "llava_ov_7b", "llava_ov_7b_reference", "qwen2_5_vl_7b", "qwen2_5_vl_3b"}
    path = resolve_config("debug_local")
    assert path.is_file() and path.name == "debug_local.yaml"
    assert resolve_config("debug_local.yaml") == path
    assert load_config(path).wandb.run_name == "debug_local"
    assert resolve_config("configs/debug_local.yaml") == path  # the documented spelling, outside a clone
    own = tmp_path / "mine.yaml"  # a path still works, and wins
    own.write_text("seed: 3\n")
    assert load_config(resolve_config(str(own))).seed == 3
    (tmp_path / "debug_local.yaml").write_text("seed: 4\n")
    assert load_config(resolve_config("debug_local.yaml")).seed == 4  # an existing file beats the preset name
    with pytest.raises(ConfigError, match=r"neither a YAML file nor a shipped preset.*debug_local"):
        resolve_config("debug_locall")
    # Through the command: the preset loads (the bad key is reported, so nothing trains).
    assert main(["train", "--config", "debug_local", "learner.lrr=1"]) == 2
    assert "learner.lrr" in capsys.readouterr().err
    assert main(["train", "--config", "nope"]) == 2
    assert "presets: " in capsys.readouterr().err


def test_the_installed_command_finds_a_preset_from_another_directory(tmp_path):
    """The real entry point, run where there is no configs/ directory (outside a clone)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cacovid_cli", "train", "--config", "debug_local", "learner.lrr=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith("error: ") and "learner.lrr" in proc.stderr


def test_configs_ship_as_package_data():
    """pyproject maps configs/ to the package cacovid_rl.configs, so a wheel carries the presets.

    The explicit package list replaces setuptools' find (which cannot add a directory from outside the package);
    this keeps it complete.
    """
    from setuptools import find_namespace_packages

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; the test runs there

    root = Path(__file__).resolve().parents[2]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["cacovid_rl.configs"] == "configs"
    assert "*.yaml" in tool["package-data"]["cacovid_rl.configs"]
    found = find_namespace_packages(str(root), include=["cacovid_rl*", "cacovid_cli*", "actors*", "learner*"])
    assert sorted(tool["packages"]) == sorted([*found, "cacovid_rl.configs"])
    assert (root / "configs" / "debug_local.yaml").is_file()


def test_the_subcommand_list_is_complete():
    """Every subcommand the parser offers is in SUBCOMMANDS (so the help and flag tests above cover it)."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)


def test_help_and_config_errors_import_neither_torch_nor_ray():
    """``--help`` (of the command and of every subcommand but the report, whose options live beside its torch
    code) and a config mistake are answered without loading torch, transformers or Ray."""
    subs = [s for s in SUBCOMMANDS if s != "report"]
    code = (
        "import sys\n"
        "from cacovid_cli.main import main\n"
        f"for argv in [['--help'], *[[s, '--help'] for s in {subs!r}]]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (argv, exc.code)\n"
        "assert main(['train', '--config', 'debug_local', 'learner.lrr=1']) == 2\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'ray'))\n"
        "assert not heavy, heavy[:10]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: cacovid-rl train" in proc.stdout and "learner.lrr" in proc.stderr


def test_train_refuses_synthetic_data_of_another_generator(tmp_path):
    import json

    from cacovid_cli.training import ensure_data
    from cacovid_rl.config import load_config
    from cacovid_rl.data.synthetic import TASK

    data = tmp_path / "synthetic"
    data.mkdir()
    (data / "train.json").write_text("[]")
    cfg = load_config(None, [f"data.synthetic_dir={data}", f"data.train_path={data / 'train.json'}"])
    ensure_data(cfg)  # no manifest: a user's own data, left alone
    (data / "synthetic.json").write_text(json.dumps({"n": 2000, "seed": 0}))  # written by the v1 generator
    with pytest.raises(ValueError, match=r"quadrants-v1.*delete"):
        ensure_data(cfg)
    (data / "synthetic.json").write_text(json.dumps({"task": TASK}))
    ensure_data(cfg)
