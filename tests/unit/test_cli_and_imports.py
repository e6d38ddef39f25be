"""The command line's surface and the library's Ray-free import contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cacovid_rl.cli import main

SUBCOMMANDS = ["train", "eval", "answer", "blind-test", "make-synthetic", "train-tiny-vlm", "report", "convert-official"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub: str, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_config_errors_name_the_key_and_exit_2(capsys):
    assert main(["train", "--config", "configs/debug_local.yaml", "learner.lrr=1"]) == 2
    assert "learner.lrr" in capsys.readouterr().err


def test_library_never_imports_ray():
    code = (
        "import importlib, pkgutil, sys, cacovid_rl\n"
        "for m in pkgutil.walk_packages(cacovid_rl.__path__, 'cacovid_rl.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_train_refuses_synthetic_data_of_another_generator(tmp_path):
    import json

    from cacovid_rl.cli import ensure_data
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
